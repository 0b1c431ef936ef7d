"""Client side of the gateway: keep-alive HTTP/1.1 connections to engine endpoints.

`UpstreamConnection` sends one request at a time and feeds the response into a sink
(`ResponseSink`) as httptools parses it. Nothing is buffered here: body bytes reach the sink
in the pieces each socket read delivered, and `flush` follows every read. `EndpointPool` keeps idle connections per endpoint.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import httptools

logger = logging.getLogger(__name__)


class UpstreamError(Exception):
    """An upstream call failed; `kind` is the metrics label (connect, closed, timeout, status_5xx)."""

    kind = "closed"
    # Set by the proxy: whether the failed call ran on a reused keep-alive connection.
    reused = False


class ConnectFailed(UpstreamError):
    """The endpoint refused or did not accept a TCP connection in time."""

    kind = "connect"


class UpstreamClosed(UpstreamError):
    """The endpoint closed the connection, or sent a malformed response, before the response ended."""

    kind = "closed"


class UpstreamTimeout(UpstreamError):
    """The endpoint sent nothing for longer than the upstream timeout."""

    kind = "timeout"


class ResponseSink(Protocol):
    """Receiver of one upstream response, called from the connection's protocol callbacks."""

    def on_head(self, status: int, headers: list[tuple[bytes, bytes]], connection: "UpstreamConnection") -> None: ...

    def on_body(self, data: bytes) -> None: ...

    def on_complete(self) -> None: ...

    def on_failure(self, error: UpstreamError) -> None: ...

    def flush(self) -> None:
        """Write out what `on_body` calls of one socket read produced (called after each read)."""


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to an endpoint, used for one request at a time."""

    def __init__(self, pool: "EndpointPool"):
        self._pool = pool
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._sink: ResponseSink | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._has_length = False
        self._head_seen = False
        self.closed = False
        self.last_activity = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timeout = 0.0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.last_activity = self._loop.time()
        if self._parser is None:
            # Bytes with no request outstanding break the framing, so drop the connection.
            self.abort()
            return
        sink = self._sink
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamClosed(f"malformed response from {self._pool.address}: {exc}"))
            self.abort()
            return
        if sink is not None and sink is self._sink:
            # One client write per socket read, however many chunks the read contained.
            sink.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        self._cancel_timer()
        if self._sink is None:
            return
        if self._head_seen and not self._has_length:
            # A response framed by connection close ends here, because httptools has no end-of-input call.
            sink, self._sink = self._sink, None
            sink.on_complete()
            return
        reason = f": {exc}" if exc else ""
        self._fail(UpstreamClosed(f"endpoint {self._pool.address} closed the connection{reason}"))

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value.lower()):
            self._has_length = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            # 1xx interim responses carry no body; the final head follows.
            self._headers = []
            return
        self._head_seen = True
        if status in (204, 304):
            self._has_length = True
        if self._sink is not None:
            self._sink.on_head(status, self._headers, self)

    def on_body(self, body: bytes) -> None:
        if self._sink is not None:
            self._sink.on_body(body)

    def on_message_complete(self) -> None:
        if not self._head_seen:
            return
        sink, self._sink = self._sink, None
        keep_alive = self._parser.should_keep_alive()
        self._parser = None
        self._cancel_timer()
        if sink is not None:
            sink.on_complete()
        if keep_alive and not self.closed:
            self._pool.release(self)
        else:
            self.close()

    # use by the proxy

    def send(self, head: bytes, body: bytes, sink: ResponseSink, timeout: float) -> None:
        """Write one request and route its response to `sink`.

        `timeout` is the longest silence in seconds (before the head and between body
        chunks) before `sink.on_failure(UpstreamTimeout)` is called and the connection closed.
        """
        self._sink = sink
        self._parser = httptools.HttpResponseParser(self)
        self._headers = []
        self._has_length = False
        self._head_seen = False
        self._timeout = timeout
        self.last_activity = self._loop.time()
        self._timer = self._loop.call_at(self.last_activity + timeout, self._check_timeout)
        if body and len(body) > 65536:
            self.transport.writelines((head, body))
        else:
            self.transport.write(head + body)

    def detach(self) -> None:
        """Stop delivering to the current sink and close, as when the client went away."""
        self._sink = None
        self.abort()

    def pause_reading(self) -> None:
        """Stop reading from the endpoint while the client's socket buffer is full."""
        if not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Resume reading from the endpoint."""
        if not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        """Close the connection after pending writes."""
        if not self.closed:
            self.closed = True
            self._cancel_timer()
            self.transport.close()

    def abort(self) -> None:
        """Close the connection at once, which cancels the request in the engine."""
        if not self.closed:
            self.closed = True
            self._cancel_timer()
            self.transport.abort()

    def _check_timeout(self) -> None:
        self._timer = None
        if self._sink is None or self.closed:
            return
        deadline = self.last_activity + self._timeout
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._check_timeout)
            return
        self._fail(UpstreamTimeout(f"endpoint {self._pool.address} sent nothing for {self._timeout:g} s"))
        self.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, error: UpstreamError) -> None:
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.on_failure(error)


class EndpointPool:
    """Idle keep-alive connections to one endpoint (`host:port`)."""

    def __init__(self, address: str, loop: asyncio.AbstractEventLoop, max_idle: int = 512, connect_timeout: float = 5.0):
        host, _, port = address.rpartition(":")
        self.address = address
        self.host = host.strip("[]")
        self.port = int(port)
        self.loop = loop
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self._idle: list[UpstreamConnection] = []
        self._closed = False

    async def acquire(self, fresh: bool = False) -> tuple[UpstreamConnection, bool]:
        """Return an open connection and whether it was reused from the idle list.

        `fresh` skips the idle list, for a retry after a reused connection turned out closed.
        Raises ConnectFailed when a new connection cannot be made within `connect_timeout`.
        """
        idle = self._idle
        while idle and not fresh:
            connection = idle.pop()
            if not connection.closed:
                return connection, True
        try:
            _, connection = await asyncio.wait_for(
                self.loop.create_connection(lambda: UpstreamConnection(self), self.host, self.port),
                self.connect_timeout,
            )
        except asyncio.TimeoutError:
            raise ConnectFailed(f"connecting to {self.address} timed out after {self.connect_timeout:g} s") from None
        except OSError as exc:
            raise ConnectFailed(f"connecting to {self.address} failed: {exc.strerror or exc}") from None
        return connection, False

    def release(self, connection: UpstreamConnection) -> None:
        """Return a connection whose response ended cleanly to the idle list."""
        if self._closed or len(self._idle) >= self.max_idle:
            connection.close()
            return
        self._idle.append(connection)

    def forget(self, connection: UpstreamConnection) -> None:
        """Drop a closed connection from the idle list."""
        try:
            self._idle.remove(connection)
        except ValueError:
            pass

    def close(self) -> None:
        """Close every idle connection; connections in use close when their response ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


class _CollectingSink:
    """Sink that collects a whole response for the gateway's own calls (health, tokenize)."""

    def __init__(self, future: asyncio.Future):
        self._future = future
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._parts: list[bytes] = []

    def on_head(self, status: int, headers: list[tuple[bytes, bytes]], connection: UpstreamConnection) -> None:
        self.status = status
        self.headers = headers

    def on_body(self, data: bytes) -> None:
        self._parts.append(data)

    def on_complete(self) -> None:
        if not self._future.done():
            self._future.set_result(b"".join(self._parts))

    def on_failure(self, error: UpstreamError) -> None:
        if not self._future.done():
            self._future.set_exception(error)

    def flush(self) -> None:
        pass


async def fetch(
    pool: EndpointPool,
    method: str,
    path: str,
    body: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    """Send one request on `pool` and return (status, body); raise UpstreamError on failure."""
    connection, _ = await pool.acquire()
    future = pool.loop.create_future()
    sink = _CollectingSink(future)
    parts = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (method.encode(), path.encode(), pool.address.encode())]
    for name, value in headers or []:
        parts.append(b"%s: %s\r\n" % (name, value))
    if body or method not in ("GET", "HEAD"):
        parts.append(b"content-length: %d\r\n" % len(body))
    parts.append(b"\r\n")
    connection.send(b"".join(parts), body, sink, timeout)
    try:
        data = await future
    except asyncio.CancelledError:
        connection.detach()
        raise
    return sink.status, data
