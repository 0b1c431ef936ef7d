"""The gateway application: routes each parsed request and proxies it to an endpoint.

Routes:
- `GET /health`, `GET /metrics`: the gateway's own.
- `GET /v1/models`: every served model; `POST /v1/...`: the service serving the body's `model`.
- `/<namespace>/<name>/<path>`: that service, `<path>` forwarded as is
  (the gateway itself responds to `GET /<namespace>/<name>/v1/models`).
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
    MethodNotAllowedError,
    NotFoundError,
    TooManyRequestsError,
)

from .admin import AdminAPI
from .forwarder import Forwarder
from .health import HealthProber
from .json_scan import SCAN_MIN_BYTES, ScanError, top_level_fields
from .jsonutil import JSONDecodeError, loads
from .metrics import GatewayMetrics
from .pd import PDMetrics, PDOrchestrator
from .server import ClientConnection, ConnectionRegistry, Request
from .services import Limits, ServiceTable

logger = logging.getLogger(__name__)

_REQUEST_ID = h.REQUEST_ID.encode()
_DROP_REASON = h.DROP_REASON.encode()
# OpenAI routes served with POST only: another method on them gets a 405 naming POST.
_POST_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/embeddings"})
_MODEL_ONLY = frozenset({"model"})
_VALID_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")


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
    idle_timeout: float = 75.0
    scrape_interval: float = 0.05
    metrics_staleness: float | None = None
    prefill_timeout: float = 60.0
    # "gateway": run both legs of a split request here; "sidecar": delegate them to the
    # decode endpoint's sidecar with x-prefiller-host-port (Kubernetes).
    pd_legs: str = "gateway"
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
        self.table = ServiceTable(
            self.metrics,
            settings.limits,
            loop,
            settings.connect_timeout,
            scrape_interval=settings.scrape_interval,
            metrics_staleness=settings.metrics_staleness,
        )
        self.admin = AdminAPI(self.table, settings.admin_token)
        self._api_key = settings.api_key.encode() if settings.api_key else None
        pd = PDOrchestrator(PDMetrics(self.metrics.registry), prefill_timeout=settings.prefill_timeout)
        # Without a gateway API key the client's Authorization may be meant for the engine.
        self.forwarder = Forwarder(
            self.table, pd, loop, settings.attempts, settings.upstream_timeout, forward_client_authorization=self._api_key is None,
            pd_legs=settings.pd_legs,
        )
        self._tasks: list[asyncio.Task] = []
        self.connections = ConnectionRegistry(settings.idle_timeout)

    def protocol(self) -> ClientConnection:
        """Return the protocol for one accepted client connection (the server's factory)."""
        return ClientConnection(self.handle, self.settings.max_body_bytes, self.loop, self.connections)

    def start_background(self) -> None:
        """Start the tasks the gateway owns (health probes)."""
        prober = HealthProber(self.table, self.settings.health_interval)
        self._tasks.append(self.loop.create_task(prober.run()))
        self._tasks.append(self.loop.create_task(self._sweep_idle()))

    async def _sweep_idle(self) -> None:
        interval = max(0.05, min(self.connections.idle_timeout / 4, 5.0))
        while True:
            await asyncio.sleep(interval)
            closed = self.connections.sweep(self.loop.time())
            if closed:
                logger.debug("closed %d client connections idle for %g s", closed, self.connections.idle_timeout)

    async def close(self) -> None:
        """Cancel background tasks and close idle upstream connections."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.forwarder.close()
        for service in self.table.by_key.values():
            service.close_scheduler()
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
            if isinstance(exc, MethodNotAllowedError):
                headers.append((b"allow", ", ".join(exc.allow).encode()))
            client.send_error(exc, headers)

    async def _route(self, request: Request, client: ClientConnection) -> None:
        path = request.path
        if path.startswith("/v1/"):
            self._check_api_key(request)
            if path == "/v1/models" and request.method == b"GET":
                client.send_json(200, self._models(self.table.by_key.values()))
                return
            if request.method != b"POST":
                if path in _POST_ROUTES:
                    raise MethodNotAllowedError(f"method {request.method.decode()} not allowed for {path}: use POST", allow=("POST",))
                raise NotFoundError(f"no route for {request.method.decode()} {path}")
            body = _parse_body(request, full=False)
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise BadRequestError("missing required parameter 'model'", param="model")
            service = self.table.by_model.get(model)
            if service is None:
                raise NotFoundError(f"model '{model}' does not exist", param="model", code="model_not_found")
            if service.scheduler is not None and len(request.body) >= SCAN_MIN_BYTES:
                # The scan read only `model`; the scheduler needs the prompt as well.
                body = _parse_body(request)
            await self.forwarder.forward(request, client, service, path, body, _request_id(request))
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
        # Round robin needs nothing from the body, so only the scheduler's services parse it.
        body = {}
        if service.scheduler is not None and request.method == b"POST" and request.body:
            body = _parse_body(request)
        await self.forwarder.forward(request, client, service, engine_path, body, _request_id(request))

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


def _parse_body(request: Request, full: bool = True) -> dict:
    """Parse the JSON object body; raise BadRequestError when it is not one.

    With `full` False a body of SCAN_MIN_BYTES or more is only scanned for `model`, and the
    result contains only that key when present.
    """
    if not request.body:
        raise BadRequestError("request body is empty: expected a JSON object", param="body")
    if not full and len(request.body) >= SCAN_MIN_BYTES:
        try:
            return top_level_fields(request.body, _MODEL_ONLY)
        except ScanError as exc:
            raise BadRequestError(f"request body is not a valid JSON object: {exc}", param="body") from None
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
