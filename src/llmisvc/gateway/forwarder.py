"""The path of one proxied request: admission, endpoint choice, prefill leg, attempts, accounting.

Order of checks, each with its status (the gateway's status-code table):
1. invalid `x-llmisvc-criticality` → 400;
2. no ready endpoint in the service → 503 (never 429);
3. a `Sheddable` request while the scheduler reports saturation → 429 `saturated`;
4. admission: queue full → 429 `queue-full` (or `displaced`), queue wait past its timeout → 503;
5. the scheduler's pick: every candidate filtered out → 429, no ready endpoint → 503;
6. prefill/decode: with `pd_legs="gateway"` the prefill leg runs via `pd.PDOrchestrator`.
   A prefill 4xx goes to the client as it came, and a prefill failure falls back to
   decode-only. With `pd_legs="sidecar"` (Kubernetes) no leg runs here. The request goes to
   the decode endpoint (its sidecar) with `x-prefiller-host-port` naming the chosen prefill
   endpoint, or without that header when the scheduler kept the request on decode;
7. attempts: a connect failure, a connection closed before any response byte, or a 5xx head
   moves to another endpoint (`--attempts` in total). Nothing is retried once a byte reached
   the client. All attempts failing → 502; an upstream timeout → 504.

In-flight counts (service, endpoint, datastore, gauges) and the admission slot are released
in `finally` blocks, so every exit (success, error, client disconnect) gives them back.
"""

from __future__ import annotations

import asyncio
import logging

from llmisvc.protocol import headers as h
from llmisvc.protocol.errors import (
    APIError,
    GatewayTimeoutError,
    ServiceUnavailableError,
    TooManyRequestsError,
    error_body,
)
from llmisvc.scheduler import SchedulingRequest

from . import admission
from .jsonutil import dumps
from .metrics import ModelMetrics
from .pd import PDOrchestrator, PrefillLegFailed, PrefillOutcome, scores_prompt
from .proxy import DONE, RETRY_STATUS, Relay, build_request_head
from .server import ClientConnection, Request
from .services import Endpoint, Service, ServiceTable
from .upstream import ConnectFailed, UpstreamClosed, UpstreamError, UpstreamTimeout, fetch

logger = logging.getLogger(__name__)

_REQUEST_ID = h.REQUEST_ID.encode()
_CRITICALITY = h.CRITICALITY.encode()
_DROP_REASON = h.DROP_REASON.encode()
_PREFILLER_HOST_PORT = h.PREFILLER_HOST_PORT.encode()
PD_LEGS = ("gateway", "sidecar")
_JSON = [(b"content-type", b"application/json")]


class BadGatewayError(APIError):
    """Every attempt to reach an endpoint failed before a response arrived (502)."""

    status = 502
    error_type = "upstream_error"


class Forwarder:
    """Runs proxied requests for a service table (one per gateway)."""

    def __init__(
        self,
        table: ServiceTable,
        pd: PDOrchestrator,
        loop: asyncio.AbstractEventLoop,
        attempts: int,
        upstream_timeout: float,
        forward_client_authorization: bool,
        pd_legs: str = "gateway",
    ):
        if pd_legs not in PD_LEGS:
            raise ValueError(f"pd_legs must be one of {', '.join(PD_LEGS)}, got {pd_legs!r}")
        self._table = table
        # Who runs the two legs of a split request: this gateway, or the decode pod's sidecar.
        self._pd_legs = pd_legs
        self._pd = pd
        self._loop = loop
        self._attempts_allowed = attempts
        self._upstream_timeout = upstream_timeout
        self._forward_client_authorization = forward_client_authorization
        # Early releases of prefill blocks that outlive the request that started them.
        self._background: set[asyncio.Task] = set()

    async def forward(
        self, request: Request, client: ClientConnection, service: Service, path: str, body: dict, request_id: bytes
    ) -> None:
        """Proxy `request` to one of `service`'s endpoints at engine path `path` and respond to the client.

        `body` is the parsed JSON body ({} for a request without one). Client-visible failures
        are sent here as OpenAI errors; a client disconnect cancels the calling task.
        """
        start = self._loop.time()
        metrics = service.metrics
        status = 0
        relay: Relay | None = None
        admitted = False
        prefill: PrefillOutcome | None = None
        try:
            level = admission.parse_criticality(request.header(_CRITICALITY), service.criticality, param=h.CRITICALITY)
            if not service.has_alternative(()):
                raise ServiceUnavailableError(f"no ready endpoint for {service.key} (model {service.model})")
            if level == admission.SHEDDABLE and service.saturated():
                raise TooManyRequestsError(
                    f"every endpoint of {service.key} is saturated and the request is Sheddable", drop_reason="saturated"
                )
            await self._admit(service, level, metrics)
            admitted = True
            service.in_flight += 1
            metrics.in_flight.inc()

            endpoint, prefill_endpoint, extra_headers = self._choose(request, service, body, request_id)
            upstream_body = request.body
            rewriter = None
            added: tuple[tuple[bytes, bytes], ...] = ()
            if prefill_endpoint is not None and self._pd_legs == "sidecar":
                self._pd.count_delegated_split(service.model)
                added = ((_PREFILLER_HOST_PORT, prefill_endpoint.address.encode()),)
            elif prefill_endpoint is not None:
                prefill = await self._run_prefill(request, service, path, body, request_id, prefill_endpoint)
                if prefill.response is not None:
                    status = prefill.response[0]
                    client.send(status, [*_JSON, (_REQUEST_ID, request_id)], prefill.response[1])
                    return
                upstream_body = prefill.decode_body
                rewriter = prefill.usage_rewriter()

            relay = Relay(client, self._loop, request_id, metrics, start, rewriter, extra_headers)
            role = "decode" if service.shape == "pd" else None
            await self._attempts(request, client, service, endpoint, path, relay, request_id, upstream_body, role, added)
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
            if prefill is not None and prefill.split and (relay is None or not relay.sent):
                self._release_prefill_later(prefill)
            metrics.count_request(status)
            if relay is not None and 0 < status < 300:
                self._record_success(relay, metrics, start)

    async def _admit(self, service: Service, level: int, metrics: ModelMetrics) -> None:
        if service.admission.try_acquire():
            return
        metrics.queued.inc()
        try:
            await service.admission.acquire(level)
        finally:
            metrics.queued.dec()

    def _choose(
        self, request: Request, service: Service, body: dict, request_id: bytes
    ) -> tuple[Endpoint, Endpoint | None, list[tuple[bytes, bytes]]]:
        """Return (target, prefill endpoint or None, extra response headers) for the request."""
        if service.scheduler is None:
            endpoint = service.pick()
            if endpoint is None:
                raise ServiceUnavailableError(f"no ready endpoint for {service.key} (model {service.model})")
            return endpoint, None, []

        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in request.headers}
        result = service.scheduler.schedule(
            SchedulingRequest(request_id.decode(), service.model, None, headers, body if body else None)
        )
        endpoint = service.endpoints.get(result.target.address)
        if endpoint is None or not endpoint.eligible:
            # The datastore lags the gateway's own view by at most one admin update.
            endpoint = service.pick()
            if endpoint is None:
                raise ServiceUnavailableError(f"no ready endpoint for {service.key} (model {service.model})")
        prefill = None
        if result.prefill is not None and not scores_prompt(body):
            prefill = service.endpoints.get(result.prefill.address)
        elif service.shape == "pd":
            self._pd.count_decode_only(service.model)
        extra = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in result.response_headers.items()]
        return endpoint, prefill, extra

    async def _run_prefill(
        self, request: Request, service: Service, path: str, body: dict, request_id: bytes, endpoint: Endpoint
    ) -> PrefillOutcome:
        """Run the prefill leg on `endpoint` (one of the service's own endpoints)."""

        async def send(address: str, leg_path: str, leg_body: bytes, headers: list[tuple[str, str]], timeout: float):
            raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
            try:
                return await fetch(endpoint.pool, "POST", leg_path, leg_body, raw_headers, timeout)
            except UpstreamError as exc:
                raise PrefillLegFailed(exc.kind, str(exc)) from None

        headers = [("authorization", service.engine_authorization.decode())] if service.engine_authorization else []
        endpoint.in_flight += 1
        if service.datastore is not None:
            service.datastore.request_started(endpoint.address)
        try:
            return await self._pd.run_prefill(
                request=body,
                path=path,
                request_id=request_id.decode(),
                model=service.model,
                prefill_address=endpoint.address,
                send=send,
                headers=headers,
            )
        finally:
            endpoint.in_flight -= 1
            self._finish_on(service, endpoint, request_id)

    async def _attempts(
        self,
        request: Request,
        client: ClientConnection,
        service: Service,
        endpoint: Endpoint,
        path: str,
        relay: Relay,
        request_id: bytes,
        body: bytes,
        role: str | None,
        added: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        """Send the request to `endpoint`, and to others on a failure before the first response byte."""
        metrics = service.metrics
        tried: tuple[Endpoint, ...] = ()
        attempt = 0
        fresh_retry_used = False
        while True:
            attempt += 1
            tried += (endpoint,)
            may_retry = attempt < self._attempts_allowed and service.has_alternative(tried, role)
            endpoint.in_flight += 1
            if service.datastore is not None:
                service.datastore.request_started(endpoint.address)
            failure = None
            try:
                try:
                    outcome = await self._attempt(
                        request, service, endpoint, path, relay, may_retry, request_id, body,
                        fresh=fresh_retry_used, added=added,
                    )
                except ConnectFailed as exc:
                    outcome = exc
                failure = _failure(outcome, endpoint, relay, fresh_retry_used)
                if failure is not None:
                    # Counted before the release below, because releasing a drained endpoint removes its series.
                    metrics.count_upstream_error(endpoint.address, failure[0])
            finally:
                endpoint.in_flight -= 1
                self._finish_on(service, endpoint, request_id)

            if outcome == DONE:
                return
            if failure is None:
                # An idle keep-alive connection the engine had just closed: same endpoint,
                # new connection, not counted as an attempt.
                fresh_retry_used = True
                attempt -= 1
                tried = tried[:-1]
                continue
            error_kind, message = failure
            if outcome != RETRY_STATUS and not isinstance(outcome, UpstreamTimeout):
                self.mark_unhealthy(service, endpoint, message)

            if relay.head_sent:
                self._end_broken_response(client, relay, message, request_id)
                return
            if isinstance(outcome, UpstreamTimeout):
                raise GatewayTimeoutError(message)
            next_endpoint = service.pick(exclude=tried, role=role) if attempt < self._attempts_allowed else None
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
        body: bytes,
        fresh: bool = False,
        added: tuple[tuple[bytes, bytes], ...] = (),
    ) -> object:
        """Run one attempt; return DONE, RETRY_STATUS or the UpstreamError that ended it."""
        connection, reused = await endpoint.pool.acquire(fresh)
        authorization = service.engine_authorization
        if authorization is None and self._forward_client_authorization:
            authorization = request.header(b"authorization")
        head = build_request_head(request, path, endpoint.address, request_id, len(body), authorization, added)
        service.metrics.count_pick(endpoint.address)
        outcome = relay.begin(connection, endpoint.address, may_retry)
        connection.send(head, body, relay, self._upstream_timeout)
        try:
            return await outcome
        except UpstreamError as exc:
            exc.reused = reused
            return exc

    def _finish_on(self, service: Service, endpoint: Endpoint, request_id: bytes) -> None:
        if service.datastore is not None:
            service.datastore.request_finished(endpoint.address)
            service.scheduler.request_finished(endpoint.address, request_id.decode())
        if endpoint.draining:
            self._table.forget_if_idle(service, endpoint)

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

    def mark_unhealthy(self, service: Service, endpoint: Endpoint, reason: str) -> None:
        """Take `endpoint` out of rotation until a health probe passes."""
        if endpoint.healthy:
            endpoint.healthy = False
            service.sync_endpoint(endpoint)
            logger.warning("endpoint %s of %s marked unhealthy: %s", endpoint.address, service.key, reason)

    def _release_prefill_later(self, outcome: PrefillOutcome) -> None:
        task = self._loop.create_task(self._pd.release_prefill(outcome))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _record_success(self, relay: Relay, metrics: ModelMetrics, start: float) -> None:
        metrics.e2e.observe(self._loop.time() - start)
        usage = None
        if relay.stream_meter is not None:
            usage = relay.stream_meter.usage
        elif relay.body_meter is not None:
            usage = relay.body_meter.usage()
        if usage is not None:
            metrics.count_usage(usage)

    async def close(self) -> None:
        """Wait briefly for early prefill releases still running."""
        if self._background:
            await asyncio.wait(self._background, timeout=2.0)


def _failure(outcome: object, endpoint: Endpoint, relay: Relay, fresh_retry_used: bool) -> tuple[str, str] | None:
    """Return the (error kind, message) of a failed attempt.

    Returns None for a finished attempt and for the first close of a reused keep-alive
    connection before any response byte, which is retried on a fresh connection.
    """
    if outcome == DONE:
        return None
    if outcome == RETRY_STATUS:
        return "status_5xx", f"endpoint {endpoint.address} responded with status {relay.status}"
    if isinstance(outcome, UpstreamClosed) and outcome.reused and not relay.head_sent and not fresh_retry_used:
        return None
    return outcome.kind, str(outcome)
