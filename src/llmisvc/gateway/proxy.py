"""Relaying one request to an endpoint and its response back to the client.

`build_request_head` turns the client's request into the upstream request head (hop-by-hop,
routing and credential headers removed, `x-request-id` set, the engine API key added).
`Relay` is the sink of the upstream response. A 2xx head and the body bytes of each socket
read go to the client from the protocol callback that parsed them, with no task switch and
no waiting for more data. SSE events are never split or re-encoded, but several upstream
chunks from one read leave as one client chunk, which saves a system call per chunk. A
3xx/4xx response is collected and sent with a fresh Content-Length, and a 5xx head with
retries left ends the attempt without a byte to the client. The one rewrite is
prefill/decode's usage filter: SSE events carrying `usage` are re-encoded by it, and a JSON
body it changes is collected and sent with a recomputed Content-Length.
"""

from __future__ import annotations

import asyncio

from llmisvc.protocol import headers as h

from .metrics import ModelMetrics
from .pd import UsageRewriter
from .server import ClientConnection, Request
from .stream_meter import BodyMeter, StreamMeter
from .upstream import UpstreamConnection, UpstreamError

# Client request headers never forwarded upstream. Authorization is handled separately
# because it may be the gateway's own key or the engine's.
_DROP_REQUEST = frozenset(
    name.encode()
    for name in (
        *h.HOP_BY_HOP,
        *h.CLIENT_ROUTING_HEADERS,
        "host",
        "content-length",
        "expect",
        "authorization",
        h.REQUEST_ID,
        h.CRITICALITY,
        h.ENDPOINT,
    )
)

# Upstream response headers never forwarded to the client; the gateway sets its own.
_DROP_RESPONSE = frozenset(
    name.encode() for name in (*h.HOP_BY_HOP, "content-length", h.REQUEST_ID, h.ENDPOINT, h.DROP_REASON)
)

_REQUEST_ID = h.REQUEST_ID.encode()
_ENDPOINT = h.ENDPOINT.encode()

# Largest non-2xx body collected to send with a recomputed Content-Length; a longer one is
# relayed as it comes.
_MAX_BUFFERED_ERROR = 1 << 20

# Outcomes of one attempt, besides an UpstreamError.
DONE = "done"
RETRY_STATUS = "retry-status"


def connection_listed_headers(request: Request) -> frozenset[bytes]:
    """Return header names the client listed in `Connection` (hop-by-hop by declaration)."""
    value = request.header(b"connection")
    if value is None or b"," not in value and value.lower() in (b"keep-alive", b"close"):
        return frozenset()
    return frozenset(token.strip().lower() for token in value.split(b",") if token.strip())


def build_request_head(
    request: Request,
    path: str,
    address: str,
    request_id: bytes,
    body_length: int,
    authorization: bytes | None,
    added: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    """Return the upstream request head (request line and headers, ending in a blank line).

    `path` is the engine path (the service prefix removed). `authorization` is the full
    `Authorization` value to send, or None to send none. `added` are headers the gateway
    itself sets (for example `x-prefiller-host-port` in sidecar mode). They are sent after
    the client's headers, and the client's copies of routing headers are always dropped.
    """
    target = path if not request.query else f"{path}?{request.query.decode('latin-1')}"
    parts = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (request.method, target.encode("latin-1"), address.encode())]
    listed = connection_listed_headers(request)
    for name, value in request.headers:
        if name in _DROP_REQUEST or name in listed:
            continue
        parts.append(b"%s: %s\r\n" % (name, value))
    parts.append(b"x-request-id: %s\r\n" % request_id)
    if authorization is not None:
        parts.append(b"authorization: %s\r\n" % authorization)
    for name, value in added:
        parts.append(b"%s: %s\r\n" % (name, value))
    if body_length or request.method not in (b"GET", b"HEAD"):
        parts.append(b"content-length: %d\r\n" % body_length)
    parts.append(b"\r\n")
    return b"".join(parts)


class Relay:
    """Sink of one request's upstream response(s); one attempt at a time.

    After `begin` the handler awaits `outcome`: DONE when the response reached the client,
    RETRY_STATUS when a 5xx head ended a retryable attempt, or an UpstreamError. `head_sent`
    is True once any response byte went to the client, after which nothing is retried.
    """

    __slots__ = (
        "_client",
        "_loop",
        "_request_id",
        "_metrics",
        "_start",
        "_rewriter",
        "_extra_headers",
        "_connection",
        "_may_retry",
        "_endpoint",
        "_status",
        "_headers",
        "_buffer",
        "_buffer_size",
        "outcome",
        "head_sent",
        "status",
        "is_sse",
        "stream_meter",
        "body_meter",
        "last_bytes",
        "sent",
        "_out",
    )

    def __init__(
        self,
        client: ClientConnection,
        loop: asyncio.AbstractEventLoop,
        request_id: bytes,
        metrics: ModelMetrics,
        start: float,
        rewriter: UsageRewriter | None = None,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
    ):
        self._client = client
        self._loop = loop
        self._request_id = request_id
        self._metrics = metrics
        self._start = start
        self._rewriter = rewriter
        self._extra_headers = extra_headers or []
        self._connection: UpstreamConnection | None = None
        self._may_retry = False
        self._endpoint = b""
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._buffer: list[bytes] | None = None
        self._buffer_size = 0
        self.outcome: asyncio.Future | None = None
        self.head_sent = False
        self.status = 0
        self.is_sse = False
        self.stream_meter: StreamMeter | None = None
        self.body_meter: BodyMeter | None = None
        self.last_bytes = b"\n\n"
        # Whether any attempt's request was written to an endpoint.
        self.sent = False
        # Body bytes of the current socket read, written by `flush`.
        self._out: list[bytes] = []

    def begin(self, connection: UpstreamConnection, endpoint: str, may_retry: bool) -> asyncio.Future:
        """Start an attempt on `connection`; return the future of its outcome."""
        self._connection = connection
        self._endpoint = endpoint.encode()
        self._may_retry = may_retry
        self._buffer = None
        self.sent = True
        self.outcome = self._loop.create_future()
        return self.outcome

    def cancel(self) -> None:
        """Abort the current attempt's upstream connection (the client went away)."""
        if self._connection is not None:
            self._connection.detach()
            self._connection = None

    # ResponseSink

    def on_head(self, status: int, headers: list[tuple[bytes, bytes]], connection: UpstreamConnection) -> None:
        if status >= 500 and self._may_retry:
            self.status = status
            connection.detach()
            self._resolve(RETRY_STATUS)
            return

        content_length = None
        out = []
        for name, value in headers:
            if name in _DROP_RESPONSE:
                if name == b"content-length":
                    content_length = value
                continue
            if name == b"content-type" and value.startswith(b"text/event-stream"):
                self.is_sse = True
            out.append((name, value))
        out.append((_REQUEST_ID, self._request_id))
        out.append((_ENDPOINT, self._endpoint))
        out.extend(self._extra_headers)
        self.status = status

        rewrite_json = self._rewriter is not None and not self.is_sse and status < 300
        if rewrite_json or (status >= 300 and (content_length is None or int(content_length) <= _MAX_BUFFERED_ERROR)):
            self._status = status
            self._headers = out
            self._buffer = []
            self._buffer_size = 0
            return

        length = int(content_length) if content_length is not None and content_length.isdigit() else None
        if self._rewriter is not None:
            length = None
        self._client.start(status, out, length)
        self.head_sent = True
        if self.is_sse and status < 300:
            self.stream_meter = StreamMeter(self._metrics, self._start)
        elif status < 300:
            self.body_meter = BodyMeter()
        self._client.on_pause = connection.pause_reading
        self._client.on_resume = connection.resume_reading
        if self._client.writing_paused:
            connection.pause_reading()

    def on_body(self, data: bytes) -> None:
        buffer = self._buffer
        if buffer is not None:
            buffer.append(data)
            self._buffer_size += len(data)
            if self._buffer_size > _MAX_BUFFERED_ERROR and self._rewriter is None:
                self._flush_buffer_as_stream()
            return
        if self._rewriter is not None:
            data = self._rewriter.feed(data)
            if not data:
                return
        self._out.append(data)

    def flush(self, last: bool = False) -> None:
        out = self._out
        if not out:
            if last:
                self._client.finish()
            elif self.head_sent:
                self._client.flush_head()
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._client.write(data, last)
        if self.stream_meter is not None:
            self.last_bytes = data[-2:]
            self.stream_meter.feed(data, self._loop.time())
        elif self.body_meter is not None:
            self.body_meter.feed(data)

    def on_complete(self) -> None:
        self._connection = None
        if self._buffer is not None:
            body = b"".join(self._buffer)
            self._buffer = None
            if self._rewriter is not None and self._status < 300:
                body = self._rewriter.rewrite_json(body)
                if self.body_meter is None:
                    self.body_meter = BodyMeter()
                self.body_meter.feed(body)
            self._client.send(self._status, self._headers, body)
            self.head_sent = True
        else:
            if self._rewriter is not None:
                rest = self._rewriter.flush()
                if rest:
                    self._out.append(rest)
            self.flush(last=True)
        self._resolve(DONE)

    def on_failure(self, error: UpstreamError) -> None:
        self._connection = None
        self.flush()
        if self._buffer is not None:
            # Nothing of the error response reached the client yet, so it still counts as
            # a failure before the first byte.
            self._buffer = None
        self._resolve(error)

    def _flush_buffer_as_stream(self) -> None:
        # A long error body is relayed as it comes instead of being held in memory.
        buffer, self._buffer = self._buffer, None
        self._client.start(self._status, self._headers, None)
        self.head_sent = True
        self._out.extend(buffer)

    def _resolve(self, result: object) -> None:
        outcome = self.outcome
        if outcome is None or outcome.done():
            return
        if isinstance(result, BaseException):
            outcome.set_exception(result)
        else:
            outcome.set_result(result)
