"""Endpoints of one service: labels, readiness, scraped metrics with ages, in-flight counts.

The runtime (or the gateway's admin API) sets the endpoint list. The scraper refreshes
each endpoint's engine metrics every `scrape_interval` seconds. The gateway reports
requests starting and finishing, so in-flight counts are exact and immediate. Metrics
carry the time they were read, and a value older than `staleness` seconds is stale:
plugins see `metrics_age()` and decide (the utilization detector treats stale as
saturated), never receiving an old value as if it were fresh.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

from llmisvc.scheduler.metrics_scrape import EngineMetrics, MetricsConnection, ScrapeError, parse_engine_metrics

logger = logging.getLogger(__name__)

ROLE_LABEL = "llm-d.ai/role"

# Fetches an endpoint's metrics text; replaced in benchmarks that run engines in-process.
MetricsFetcher = Callable[[str], Awaitable[str]]


@dataclass(frozen=True)
class EndpointSpec:
    """An endpoint as the runtime describes it. `role` is `both`, `prefill` or `decode`."""

    address: str
    role: str = "both"
    labels: Mapping[str, str] = field(default_factory=dict)
    ready: bool = True


@dataclass
class Endpoint:
    """An endpoint with its current state. `metrics_time` is None until the first scrape."""

    address: str
    role: str
    labels: dict[str, str]
    ready: bool
    metrics: EngineMetrics = field(default_factory=EngineMetrics)
    metrics_time: float | None = None
    in_flight: int = 0
    draining: bool = False
    scrape_errors: int = 0

    @property
    def role_label(self) -> str | None:
        """The `llm-d.ai/role` label, falling back to `role` when the label is absent."""
        return self.labels.get(ROLE_LABEL, self.role)


class Datastore:
    """Endpoint table of one service, shared by the scheduler and the gateway.

    `scrape_interval` and `staleness` are seconds. `staleness` defaults to ten intervals,
    but at least 0.5 s, so one or two slow scrapes do not mark an endpoint stale.
    `clock` is monotonic seconds (replaceable for virtual-time benchmarks).
    """

    def __init__(
        self,
        scrape_interval: float = 0.05,
        staleness: float | None = None,
        scrape_timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        fetcher: MetricsFetcher | None = None,
    ):
        if scrape_interval <= 0:
            raise ValueError(f"scrape_interval must be positive, got {scrape_interval}")
        self.scrape_interval = scrape_interval
        self.staleness = staleness if staleness is not None else max(10 * scrape_interval, 0.5)
        self.scrape_timeout = scrape_timeout if scrape_timeout is not None else max(scrape_interval, 1.0)
        self.clock = clock
        self._fetcher = fetcher
        self._endpoints: dict[str, Endpoint] = {}
        self._connections: dict[str, MetricsConnection] = {}
        self._scrapers: dict[str, asyncio.Task] = {}
        self._removal_listeners: list[Callable[[str], None]] = []
        self._running = False

    # ------------------------------------------------------------ endpoints

    def set_endpoints(self, specs: Iterable[EndpointSpec]) -> None:
        """Replace the endpoint list. Endpoints that are gone are drained, then forgotten when idle."""
        wanted = {spec.address: spec for spec in specs}
        for address, spec in wanted.items():
            endpoint = self._endpoints.get(address)
            labels = dict(spec.labels)
            labels.setdefault(ROLE_LABEL, spec.role)
            if endpoint is None:
                self._endpoints[address] = Endpoint(address, spec.role, labels, spec.ready)
                if self._running:
                    self._start_scraper(address)
            else:
                endpoint.role, endpoint.labels, endpoint.ready, endpoint.draining = spec.role, labels, spec.ready, False
        for address, endpoint in list(self._endpoints.items()):
            if address not in wanted:
                endpoint.draining = True
                if endpoint.in_flight == 0:
                    self._forget(address)

    def set_ready(self, address: str, ready: bool) -> None:
        """Mark one endpoint ready or not ready."""
        endpoint = self._endpoints.get(address)
        if endpoint is not None:
            endpoint.ready = ready

    def candidates(self) -> list[Endpoint]:
        """Return ready endpoints that are not draining (the pool a request may use)."""
        return [e for e in self._endpoints.values() if e.ready and not e.draining]

    def all_endpoints(self) -> list[Endpoint]:
        """Return every known endpoint, draining ones included."""
        return list(self._endpoints.values())

    def get(self, address: str) -> Endpoint | None:
        """Return the endpoint at `address`, or None."""
        return self._endpoints.get(address)

    def add_removal_listener(self, listener: Callable[[str], None]) -> None:
        """Call `listener(address)` whenever an endpoint is forgotten."""
        self._removal_listeners.append(listener)

    def _forget(self, address: str) -> None:
        self._endpoints.pop(address, None)
        task = self._scrapers.pop(address, None)
        if task is not None:
            task.cancel()
        connection = self._connections.pop(address, None)
        if connection is not None:
            connection.close()
        logger.info("endpoint %s removed", address)
        for listener in self._removal_listeners:
            listener(address)

    # ------------------------------------------------------------ in-flight counts

    def request_started(self, address: str) -> None:
        """Count a request sent to `address`."""
        endpoint = self._endpoints.get(address)
        if endpoint is not None:
            endpoint.in_flight += 1

    def request_finished(self, address: str) -> None:
        """Count a request finished at `address`; a drained endpoint is forgotten at zero."""
        endpoint = self._endpoints.get(address)
        if endpoint is None:
            return
        endpoint.in_flight = max(endpoint.in_flight - 1, 0)
        if endpoint.draining and endpoint.in_flight == 0:
            self._forget(address)

    # ------------------------------------------------------------ metrics

    def metrics_age(self, endpoint: Endpoint) -> float:
        """Return seconds since the endpoint's metrics were read (infinity before the first read)."""
        if endpoint.metrics_time is None:
            return float("inf")
        return self.clock() - endpoint.metrics_time

    def is_stale(self, endpoint: Endpoint) -> bool:
        """Return True when the endpoint's metrics are older than `staleness`."""
        return self.metrics_age(endpoint) > self.staleness

    def update_metrics(self, address: str, metrics: EngineMetrics | str) -> None:
        """Store freshly read metrics (parsed, or Prometheus text) for `address`."""
        endpoint = self._endpoints.get(address)
        if endpoint is None:
            return
        endpoint.metrics = parse_engine_metrics(metrics) if isinstance(metrics, str) else metrics
        endpoint.metrics_time = self.clock()
        endpoint.scrape_errors = 0

    async def run(self) -> None:
        """Scrape every endpoint until cancelled; the caller owns the task running this."""
        self._running = True
        for address in self._endpoints:
            self._start_scraper(address)
        try:
            await asyncio.Event().wait()
        finally:
            self._running = False
            for task in self._scrapers.values():
                task.cancel()
            await asyncio.gather(*self._scrapers.values(), return_exceptions=True)
            self._scrapers.clear()
            for connection in self._connections.values():
                connection.close()
            self._connections.clear()

    def _start_scraper(self, address: str) -> None:
        if address not in self._scrapers:
            self._scrapers[address] = asyncio.get_running_loop().create_task(self._scrape_loop(address))

    async def _scrape_loop(self, address: str) -> None:
        loop = asyncio.get_running_loop()
        next_time = loop.time()
        # The flag ends the loop even if a cancellation is lost inside a scrape.
        while self._running and address in self._endpoints:
            await self.scrape_once(address)
            # Fixed-rate schedule: a slow scrape shortens the next wait instead of drifting.
            next_time = max(next_time + self.scrape_interval, loop.time())
            await asyncio.sleep(next_time - loop.time())

    async def scrape_once(self, address: str) -> bool:
        """Read one endpoint's metrics now; return False (keeping the old values) on failure."""
        try:
            if self._fetcher is not None:
                text = await self._fetcher(address)
            else:
                connection = self._connections.get(address)
                if connection is None:
                    connection = self._connections[address] = MetricsConnection(address)
                text = await connection.fetch(self.scrape_timeout)
        except (ScrapeError, OSError) as exc:
            endpoint = self._endpoints.get(address)
            if endpoint is not None:
                endpoint.scrape_errors += 1
                # Log the first failure and then every 100th, not one line per 50 ms.
                if endpoint.scrape_errors % 100 == 1:
                    logger.warning("scraping metrics of %s failed (%d in a row): %s", address, endpoint.scrape_errors, exc)
            return False
        self.update_metrics(address, text)
        return True
