"""The gateway application: routes each parsed request and proxies it to an endpoint.

Routes:
- `GET /health`, `GET /metrics`: the gateway's own.
- `GET /v1/models`: every served model; `POST /v1/...`: the service serving the body's `model`.
- `/<namespace>/<name>/<path>`: that service, `<path>` forwarded as is
  (`GET /<namespace>/<name>/v1/models` is answered by the gateway).
- `/admin/...`: the admin API (`admin.py`).

Every failure the gateway detects itself is an `APIError` turned into an OpenAI error
object in `_handle`; nothing else maps exceptions to statuses.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import time
from dataclasses import dataclass

from llmisvc.protocol import headers as h
from llmisvc.protocol.errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    GatewayTimeoutError,
    NotFoundError,
    ServiceUnavailableError,
    TooManyRequestsError,
    error_body,
)

from . import admission
from .admin import AdminAPI
from .health import HealthProber
from .jsonutil import JSONDecodeError, dumps, loads
from .metrics import GatewayMetrics
from .proxy import DONE, RETRY_STATUS, Relay, build_request_head
from .server import ClientConnection, Request
from .services import Endpoint, Limits, Service, ServiceTable
from .upstream import ConnectFailed, UpstreamClosed, UpstreamError, UpstreamTimeout

logger = logging.getLogger(__name__)

_REQUEST_ID = h.REQUEST_ID.encode()
_CRITICALITY = h.CRITICALITY.encode()
_DROP_REASON = h.DROP_REASON.encode()
_VALID_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")


class BadGatewayError(APIError):
    """Every attempt to reach an endpoint failed before it answered (502)."""

    status = 502
    error_type = "upstream_error"


@dataclass
class GatewaySettings:
    """Gateway-wide settings, from the command line."""

    max_body_bytes: int = 32 * 1024 * 1024
    attempts: int = 2
    upstream_timeout: float = 600.0
    connect_timeout: float = 5.0
    api_key: str | None = None
    admin_token: str | None = None
    health_interval: float = 2.0
    limits: Limits = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.limits is None:
            self.limits = Limits()


class Gateway:
    """Routing table, metrics and request handling of one gateway process."""

    def __init__(self, settings: GatewaySettings, loop: asyncio.AbstractEventLoop):
        self.settings = settings
        self.loop = loop
        self.metrics = GatewayMetrics()
        self.table = ServiceTable(self.metrics, settings.limits, loop, settings.connect_timeout)
        self.admin = AdminAPI(self.table, settings.admin_token)
        self._api_key = settings.api_key.encode() if settings.api_key else None
        self._tasks: list[asyncio.Task] = []

    def start_background(self) -> None:
        """Start the tasks the gateway owns (health probes)."""
        prober = HealthProber(self.table, self.settings.health_interval)
        self._tasks.append(self.loop.create_task(prober.run()))

    async def close(self) -> None:
        """Cancel background tasks and close idle upstream connections."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for service in self.table.by_key.values():
            for endpoint in service.endpoints.values():
                endpoint.pool.close()

    # entry point

    async def handle(self, request: Request, client: ClientConnection) -> None:
        """Handle one client request (the `ClientConnection` handler)."""
        try:
            await self._route(request, client)
        except APIError as exc:
            headers = [(_REQUEST_ID, _request_id(request))]
            if isinstance(exc, TooManyRequestsError):
                headers.append((_DROP_REASON, exc.drop_reason.encode()))
            client.send_error(exc, headers)

    async def _route(self, request: Request, client: ClientConnection) -> None:
        path = request.path
        if path.startswith("/v1/"):
            self._check_api_key(request)
            if path == "/v1/models" and request.method == b"GET":
                client.send_json(200, self._models(self.table.by_key.values()))
                return
            if request.method != b"POST":
                raise NotFoundError(f"no route for {request.method.decode()} {path}")
            body = _parse_body(request)
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise BadRequestError("missing required parameter 'model'", param="model")
            service = self.table.by_model.get(model)
            if service is None:
                raise NotFoundError(f"model '{model}' does not exist", param="model", code="model_not_found")
            await self._proxy(request, client, service, path, body)
            return
        if path == "/health":
            client.send_json(200, {"status": "ok"})
            return
        if path == "/metrics":
            client.send(200, [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")], self.metrics.render())
            return
        if path.startswith("/admin/"):
            self.admin.handle(request, client)
            return

        parts = path.split("/", 3)
        service = self.table.by_key.get((parts[1], parts[2])) if len(parts) == 4 else None
        if service is None:
            raise NotFoundError(f"no route for {path}: expected /v1/... or /<namespace>/<name>/...")
        self._check_api_key(request)
        engine_path = "/" + parts[3]
        if engine_path == "/v1/models" and request.method == b"GET":
            client.send_json(200, self._models([service]))
            return
        body = _parse_body(request) if request.method == b"POST" and request.body else {}
        await self._proxy(request, client, service, engine_path, body)

    # proxying

    async def _proxy(self, request: Request, client: ClientConnection, service: Service, path: str, body: dict) -> None:
        start = self.loop.time()
        metrics = service.metrics
        request_id = _request_id(request)
        status = 0
        relay = None
        admitted = False
        try:
            level = admission.parse_criticality(
                request.header(_CRITICALITY), service.criticality, param=h.CRITICALITY
            )
            endpoint = service.pick()
            if endpoint is None:
                raise ServiceUnavailableError(
                    f"no ready endpoint for {service.namespace}/{service.name} (model {service.model})"
                )
            if not service.admission.try_acquire():
                metrics.queued.inc()
                try:
                    await service.admission.acquire(level)
                finally:
                    metrics.queued.dec()
                endpoint = service.pick() or endpoint
            admitted = True
            service.in_flight += 1
            metrics.in_flight.inc()

            relay = Relay(client, self.loop, request_id, metrics, start, body.get("stream") is True)
            await self._attempts(request, client, service, endpoint, path, relay, request_id)
            status = relay.status
        except APIError as exc:
            status = exc.status
            headers = [(_REQUEST_ID, request_id)]
            if isinstance(exc, TooManyRequestsError):
                headers.append((_DROP_REASON, exc.drop_reason.encode()))
            client.send_error(exc, headers)
        except asyncio.CancelledError:
            status = 499
            metrics.cancellations.inc()
            if relay is not None:
                relay.cancel()
            raise
        finally:
            if admitted:
                service.in_flight -= 1
                metrics.in_flight.dec()
                service.admission.release()
            metrics.count_request(status)
            if relay is not None and status and status < 300:
                self._record_success(relay, metrics, start)

    async def _attempts(
        self,
        request: Request,
        client: ClientConnection,
        service: Service,
        endpoint: Endpoint,
        path: str,
        relay: Relay,
        request_id: bytes,
    ) -> None:
        """Send the request to `endpoint`, and to others on a failure before the first response byte."""
        metrics = service.metrics
        tried: tuple[Endpoint, ...] = ()
        attempt = 0
        fresh_retry_used = False
        while True:
            attempt += 1
            tried += (endpoint,)
            may_retry = attempt < self.settings.attempts and service.has_alternative(tried)
            endpoint.in_flight += 1
            try:
                outcome = await self._attempt(request, service, endpoint, path, relay, may_retry, request_id)
            except ConnectFailed as exc:
                outcome = exc
            finally:
                endpoint.in_flight -= 1
                if endpoint.draining:
                    self.table.forget_if_idle(service, endpoint)

            if outcome == DONE:
                return
            if outcome == RETRY_STATUS:
                error_kind, message = "status_5xx", f"endpoint {endpoint.address} answered {relay.status}"
            else:
                exc = outcome
                if isinstance(exc, UpstreamClosed) and exc.reused and not relay.head_sent and not fresh_retry_used:
                    # An idle keep-alive connection the engine had just closed: same endpoint,
                    # new connection, not counted as an attempt.
                    fresh_retry_used = True
                    attempt -= 1
                    tried = tried[:-1]
                    continue
                error_kind, message = exc.kind, str(exc)
                if not isinstance(exc, UpstreamTimeout):
                    self._mark_unhealthy(service, endpoint, message)
            metrics.count_upstream_error(endpoint.address, error_kind)

            if relay.head_sent:
                self._end_broken_response(client, relay, message, request_id)
                return
            if isinstance(outcome, UpstreamTimeout):
                raise GatewayTimeoutError(message)
            next_endpoint = service.pick(exclude=tried) if attempt < self.settings.attempts else None
            if next_endpoint is None:
                raise BadGatewayError(f"{message}; no other endpoint to try (tried {len(tried)})")
            logger.warning("request %s: %s; retrying on %s", request_id.decode(), message, next_endpoint.address)
            metrics.retries.inc()
            endpoint = next_endpoint

    async def _attempt(
        self,
        request: Request,
        service: Service,
        endpoint: Endpoint,
        path: str,
        relay: Relay,
        may_retry: bool,
        request_id: bytes,
    ) -> object:
        """Run one attempt; return DONE, RETRY_STATUS or the UpstreamError that ended it."""
        connection, reused = await endpoint.pool.acquire()
        authorization = service.engine_authorization
        if authorization is None and self._api_key is None:
            authorization = request.header(b"authorization")
        head = build_request_head(request, path, endpoint.address, request_id, len(request.body), authorization)
        service.metrics.count_pick(endpoint.address)
        outcome = relay.begin(connection, endpoint.address, may_retry)
        connection.send(head, request.body, relay, self.settings.upstream_timeout)
        try:
            return await outcome
        except UpstreamError as exc:
            exc.reused = reused
            return exc

    def _end_broken_response(self, client: ClientConnection, relay: Relay, message: str, request_id: bytes) -> None:
        """End a response whose upstream failed after bytes reached the client."""
        logger.warning("request %s: %s after the response started", request_id.decode(), message)
        if relay.is_sse and not client.closed:
            # Close the event in progress, then tell the client why the stream ends.
            prefix = b"" if relay.last_bytes.endswith(b"\n\n") else b"\n\n"
            event = dumps(error_body(message, "upstream_error", None, 502))
            client.write(prefix + b"data: " + event + b"\n\n")
            client.close_after_response()
            client.finish()
        else:
            client.abort()

    def _mark_unhealthy(self, service: Service, endpoint: Endpoint, reason: str) -> None:
        if endpoint.healthy:
            endpoint.healthy = False
            logger.warning(
                "endpoint %s of %s/%s marked unhealthy: %s", endpoint.address, service.namespace, service.name, reason
            )

    def _record_success(self, relay: Relay, metrics, start: float) -> None:
        metrics.e2e.observe(self.loop.time() - start)
        usage = None
        if relay.stream_meter is not None:
            usage = relay.stream_meter.usage
        elif relay.body_meter is not None:
            usage = relay.body_meter.usage()
        if usage is not None:
            metrics.count_usage(usage)

    # helpers

    def _check_api_key(self, request: Request) -> None:
        if self._api_key is None:
            return
        value = request.header(b"authorization") or b""
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._api_key):
            raise AuthenticationError("missing or invalid API key: send 'Authorization: Bearer <key>'")

    def _models(self, services) -> dict:
        created = int(time.time())
        data = [
            {"id": s.model, "object": "model", "created": created, "owned_by": "llmisvc", "root": s.model}
            for s in services
        ]
        return {"object": "list", "data": data}


def _parse_body(request: Request) -> dict:
    """Parse the JSON object body; raise BadRequestError when it is not one."""
    if not request.body:
        raise BadRequestError("request body is empty: expected a JSON object", param="body")
    try:
        body = loads(request.body)
    except JSONDecodeError as exc:
        raise BadRequestError(f"request body is not valid JSON: {exc}", param="body") from None
    if not isinstance(body, dict):
        raise BadRequestError("request body must be a JSON object", param="body")
    return body


def _request_id(request: Request) -> bytes:
    """Return the client's `x-request-id` when well formed, else a new random id."""
    value = request.header(_REQUEST_ID)
    if value is not None and _VALID_REQUEST_ID.fullmatch(value):
        return value
    return os.urandom(16).hex().encode()
