"""The gateway's own health probes of its endpoints.

Every `interval` seconds each endpoint gets `GET /health` (with the service's engine API key).
A refused connection or a non-200 status marks the endpoint unhealthy, so the picker skips
it; a 200 marks it healthy again. A probe that times out changes nothing, because a CPU
engine busy with a long prompt can be slow to respond and is still alive. The proxy also
marks an endpoint unhealthy at once when a connection to it fails or dies mid-response.
An admin update that turns an endpoint from not ready to ready marks it healthy at once,
because a probe that failed while the engine was loading is out of date. For the same
reason a failed probe that was sent before the endpoint turned ready changes nothing.
"""

from __future__ import annotations

import asyncio
import logging

from .services import Endpoint, Service, ServiceTable
from .upstream import UpstreamError, UpstreamTimeout, fetch

logger = logging.getLogger(__name__)


class HealthProber:
    """Periodic health probes of every endpoint in a service table; `run` is the task body."""

    def __init__(self, table: ServiceTable, interval: float, timeout: float = 5.0):
        self._table = table
        self._interval = interval
        self._timeout = timeout

    async def run(self) -> None:
        """Probe forever; the owner cancels the task at shutdown."""
        while True:
            await asyncio.sleep(self._interval)
            probes = [
                self._probe(service, endpoint)
                for service in list(self._table.by_key.values())
                for endpoint in list(service.endpoints.values())
                if not endpoint.draining
            ]
            if probes:
                await asyncio.gather(*probes)

    async def _probe(self, service: Service, endpoint: Endpoint) -> None:
        headers = [(b"authorization", service.engine_authorization)] if service.engine_authorization else []
        ready_at_start = endpoint.ready
        try:
            status, _ = await fetch(endpoint.pool, "GET", "/health", headers=headers, timeout=self._timeout)
        except UpstreamTimeout:
            logger.info("health probe of %s timed out after %g s", endpoint.address, self._timeout)
            return
        except UpstreamError as exc:
            failure = str(exc)
        else:
            if status == 200:
                self._set(service, endpoint, True, "GET /health returned status 200")
                return
            failure = f"GET /health returned status {status}"
        if endpoint.ready and not ready_at_start:
            # The probe started while the engine was loading, so the controller's later report wins.
            logger.debug("health probe of %s sent before it turned ready failed: %s", endpoint.address, failure)
            return
        self._set(service, endpoint, False, failure)

    def _set(self, service: Service, endpoint: Endpoint, healthy: bool, reason: str) -> None:
        if endpoint.healthy == healthy:
            return
        endpoint.healthy = healthy
        service.sync_endpoint(endpoint)
        state = "healthy" if healthy else "unhealthy"
        logger.warning(
            "endpoint %s of %s/%s is %s: %s", endpoint.address, service.namespace, service.name, state, reason
        )
