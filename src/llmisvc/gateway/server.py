"""HTTP/1.1 front end of the gateway: an asyncio protocol over the httptools parser.

One `ClientConnection` per accepted socket parses requests, hands each complete request to
the application as a task, and offers the application a small response API (`send`,
`start`, `write`, `finish`, `abort`). Requests on one connection get responses in order;
pipelined requests wait until the previous response is finished.

The connection keeps reading while a request is being handled, so a client that goes away
is noticed at once (also before any response byte) and the request's task is cancelled.

`ConnectionRegistry.sweep` closes connections that sent nothing for the idle timeout while no
request of theirs was being handled: idle keep-alive clients, and clients that stall in the
middle of sending a request.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Awaitable, Callable

import httptools

from llmisvc.protocol.errors import APIError, PayloadTooLargeError, error_body

from .jsonutil import dumps

logger = logging.getLogger(__name__)

# Pipelined bytes buffered while a request is in progress before reading is paused.
_MAX_PIPELINE_BUFFER = 1 << 20

_REASONS = {
    100: b"Continue",
    200: b"OK",
    201: b"Created",
    204: b"No Content",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Payload Too Large",
    422: b"Unprocessable Entity",
    429: b"Too Many Requests",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}

_STATUS_LINES = {code: b"HTTP/1.1 %d %s\r\n" % (code, reason) for code, reason in _REASONS.items()}


def status_line(status: int) -> bytes:
    """Return the HTTP/1.1 status line for `status`, CRLF included."""
    line = _STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d Status\r\n" % status
    return line


class Request:
    """One parsed client request: method, path, query, lower-cased headers and the whole body."""

    __slots__ = ("method", "path", "query", "headers", "body", "keep_alive", "http_11")

    def __init__(
        self,
        method: bytes,
        path: str,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        keep_alive: bool,
        http_11: bool,
    ):
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.http_11 = http_11

    def header(self, name: bytes) -> bytes | None:
        """Return the first value of header `name` (lower case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


Handler = Callable[[Request, "ClientConnection"], Awaitable[None]]


class ConnectionRegistry:
    """The open client connections of one server, for the idle sweep."""

    def __init__(self, idle_timeout: float):
        self.idle_timeout = idle_timeout
        self.connections: set[ClientConnection] = set()

    def sweep(self, now: float) -> int:
        """Close connections idle for `idle_timeout` seconds at loop time `now`; return how many."""
        closed = 0
        for connection in list(self.connections):
            if connection.idle_since(now) >= self.idle_timeout:
                connection.abort()
                closed += 1
        return closed


class ClientConnection(asyncio.Protocol):
    """The server side of one client TCP connection.

    `handler(request, connection)` runs as a task per request and must produce exactly one
    response through `send`, or `start` + `write`* + `finish`, or `abort`. When the client
    disconnects the task is cancelled; `on_pause`/`on_resume` callbacks registered by the
    handler are called when the client's socket buffer fills and drains.
    """

    def __init__(
        self,
        handler: Handler,
        max_body_bytes: int,
        loop: asyncio.AbstractEventLoop,
        registry: ConnectionRegistry | None = None,
    ):
        self._handler = handler
        self._max_body_bytes = max_body_bytes
        self._loop = loop
        self._registry = registry
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self.closed = False
        self.peer = ""
        self._last_activity = loop.time()

        # State of the request being parsed.
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body_parts: list[bytes] = []
        self._body_size = 0
        self._rejecting = False

        # State of the request being handled.
        self._ready: deque[Request] = deque()
        self._task: asyncio.Task | None = None
        self._pipelined = b""
        self._reading_paused = False
        self._response_keep_alive = True
        self._chunked = False
        self._close_delimited = False
        self._http_11 = True
        self._pending_head = b""
        self.writing_paused = False
        self.on_pause: Callable[[], None] | None = None
        self.on_resume: Callable[[], None] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else ""
        if self._registry is not None:
            self._registry.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self._last_activity = self._loop.time()
        if self._task is not None or self._ready:
            self._buffer_pipelined(data)
            return
        self._feed(data)

    def eof_received(self) -> bool:
        # A client that shuts down its sending side is treated as gone: the connection closes
        # and the request in flight is cancelled, as a disconnect would do.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._registry is not None:
            self._registry.connections.discard(self)
        self._ready.clear()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.on_pause is not None:
            self.on_pause()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.on_resume is not None:
            self.on_resume()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._body_parts = []
        self._body_size = 0
        self._rejecting = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        length = None
        expect = None
        for name, value in self._headers:
            if name == b"content-length":
                length = value
            elif name == b"expect":
                expect = value
        if length is not None and length.isdigit() and int(length) > self._max_body_bytes:
            self._reject_too_large()
            return
        if expect is not None and expect.lower() == b"100-continue" and not self._rejecting:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._rejecting:
            return
        self._body_size += len(body)
        if self._body_size > self._max_body_bytes:
            self._reject_too_large()
            return
        self._body_parts.append(body)

    def on_message_complete(self) -> None:
        if self._rejecting:
            # The 413 was written when the limit was crossed. The rest of the body has been
            # read and dropped so the client reads the 413 instead of a connection reset.
            self.closed = True
            self.transport.close()
            return
        parser = self._parser
        parsed = httptools.parse_url(self._url)
        path = parsed.path.decode("latin-1")
        body = self._body_parts[0] if len(self._body_parts) == 1 else b"".join(self._body_parts)
        request = Request(
            parser.get_method(),
            path,
            parsed.query or b"",
            self._headers,
            body,
            parser.should_keep_alive(),
            parser.get_http_version() == "1.1",
        )
        self._body_parts = []
        self._ready.append(request)
        if self._task is None:
            self._start_next()

    # request dispatch

    def _feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._send_error_and_close(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            if not self._rejecting:
                self._send_error_and_close(400, f"malformed HTTP request: {exc}")

    def _buffer_pipelined(self, data: bytes) -> None:
        self._pipelined += data
        if len(self._pipelined) > _MAX_PIPELINE_BUFFER and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def _start_next(self) -> None:
        request = self._ready.popleft()
        self._response_keep_alive = request.keep_alive
        self._http_11 = request.http_11
        self._pending_head = b""
        self._chunked = False
        self._close_delimited = False
        self._task = self._loop.create_task(self._handler(request, self))
        self._task.add_done_callback(self._on_task_done)

    def idle_since(self, now: float) -> float:
        """Return seconds since the client last sent bytes, or 0 while a request is handled."""
        if self._task is not None or self._ready:
            return 0.0
        return now - self._last_activity

    def _on_task_done(self, task: asyncio.Task) -> None:
        self._task = None
        self._last_activity = self._loop.time()
        self.on_pause = None
        self.on_resume = None
        if not task.cancelled() and task.exception() is not None:
            logger.error("request handler failed", exc_info=task.exception())
            self.abort()
            return
        if self.closed:
            return
        if self._ready:
            self._start_next()
            return
        if self._pipelined:
            data, self._pipelined = self._pipelined, b""
            if self._reading_paused:
                self._reading_paused = False
                self.transport.resume_reading()
            self._feed(data)

    # response API

    def send(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """Write a complete response with a Content-Length computed from `body`."""
        if self.closed:
            return
        parts = [status_line(status)]
        for name, value in headers:
            parts.append(b"%s: %s\r\n" % (name, value))
        parts.append(b"content-length: %d\r\n" % len(body))
        if not self._response_keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        parts.append(body)
        self.transport.write(b"".join(parts))
        self._end_response()

    def send_json(self, status: int, obj: object, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        """Write a complete JSON response."""
        extra = headers or []
        self.send(status, [(b"content-type", b"application/json"), *extra], dumps(obj))

    def send_error(self, exc: APIError, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        """Write `exc` as an OpenAI error object with its status."""
        self.send_json(exc.status, exc.body(), headers)

    def start(self, status: int, headers: list[tuple[bytes, bytes]], content_length: int | None) -> None:
        """Prepare the response head; it leaves with the first `write`, `flush_head` or `finish`.

        Holding the head lets the head, the first body bytes and, for a short response, the
        end of the body share one system call. With `content_length` None the body is sent
        chunked (or close-delimited to an HTTP/1.0 client); `headers` must not contain
        content-length or transfer-encoding.
        """
        if self.closed:
            return
        parts = [status_line(status)]
        for name, value in headers:
            parts.append(b"%s: %s\r\n" % (name, value))
        if content_length is not None:
            parts.append(b"content-length: %d\r\n" % content_length)
        elif self._http_11:
            self._chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
        else:
            self._close_delimited = True
            self._response_keep_alive = False
        if not self._response_keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        self._pending_head = b"".join(parts)

    def write(self, data: bytes, last: bool = False) -> None:
        """Write body bytes exactly as given (one chunk when chunked); `last` also ends the response."""
        if self.closed:
            return
        head, self._pending_head = self._pending_head, b""
        if self._chunked:
            if data:
                data = b"%x\r\n%s\r\n" % (len(data), data)
            if last:
                data += b"0\r\n\r\n"
        if head or data:
            self.transport.write(head + data if head else data)
        if last:
            if self._close_delimited:
                self._response_keep_alive = False
            self._end_response()

    def flush_head(self) -> None:
        """Write a prepared head now, before any body byte is available."""
        if self._pending_head and not self.closed:
            head, self._pending_head = self._pending_head, b""
            self.transport.write(head)

    def finish(self) -> None:
        """End a response begun with `start`."""
        self.write(b"", last=True)

    def close_after_response(self) -> None:
        """Close the connection once the current response is finished."""
        self._response_keep_alive = False

    def abort(self) -> None:
        """Close the connection at once, so the client receives a truncated response."""
        if not self.closed:
            self.closed = True
            self.transport.abort()

    def _end_response(self) -> None:
        if not self._response_keep_alive:
            self.closed = True
            self.transport.close()

    def _reject_too_large(self) -> None:
        if self._rejecting:
            return
        self._rejecting = True
        self._body_parts = []
        error = PayloadTooLargeError(
            f"request body exceeds the limit of {self._max_body_bytes} bytes "
            f"(set with --max-body-bytes)",
            param="body",
        )
        # Keep the connection open until the body has been read (see on_message_complete).
        self._write_error(error.status, error.message, error.error_type)

    def _send_error_and_close(self, status: int, message: str, error_type: str = "invalid_request_error") -> None:
        """Respond to a request that cannot be parsed, then close the connection."""
        if self.closed:
            return
        self._write_error(status, message, error_type)
        self.closed = True
        self.transport.close()

    def _write_error(self, status: int, message: str, error_type: str) -> None:
        body = dumps(error_body(message, error_type, None, status))
        self.transport.write(
            b"".join(
                [
                    status_line(status),
                    b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
                    b"connection: close\r\n\r\n",
                    body,
                ]
            )
        )
