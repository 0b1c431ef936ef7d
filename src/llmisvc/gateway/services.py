"""The gateway's service table: services, their endpoints, and how endpoints are picked.

A service entry (the admin API's JSON and the `--config` file's items) is:

    {"model": str, "shape": "scheduler" | "no-scheduler" | "pd", "scheduler_config": dict | null,
     "criticality": "Critical" | "Standard" | "Sheddable", "engine_api_key": str | null,
     "endpoints": [{"address": "host:port", "role": "both" | "decode" | "prefill",
                    "ready": bool, "labels": {str: str}}],
     "max_concurrency": int, "max_queue": int, "queue_timeout": float}

The last three are optional and default to the gateway's command-line values.

Shapes `scheduler` and `pd` pick through `llmisvc.scheduler`. Each such service has its own
Datastore, scraped with the engine API key, and a Scheduler built from `scheduler_config`
(None gives the shape's default profile). Shape `no-scheduler` uses the gateway's round robin.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from llmisvc.protocol.errors import BadRequestError
from llmisvc.scheduler import ConfigError, Datastore, EndpointSpec, Scheduler, SchedulerMetrics
from llmisvc.scheduler.metrics_scrape import ScrapeError

from .admission import Admission, LEVEL_NAMES, parse_criticality
from .metrics import GatewayMetrics, ModelMetrics
from .upstream import EndpointPool, UpstreamError, fetch

logger = logging.getLogger(__name__)

SHAPES = ("scheduler", "no-scheduler", "pd")
ROLES = ("both", "decode", "prefill")


@dataclass
class Limits:
    """Gateway-wide defaults for a service's admission settings."""

    max_concurrency: int = 0
    max_queue: int = 1024
    queue_timeout: float = 30.0


class Endpoint:
    """One engine replica in the gateway's view.

    `ready` comes from the controller. `healthy` is the gateway's own view: it is cleared when a
    connection fails or a stream dies, and set again by a passing health probe or when the
    controller turns the endpoint from not ready to ready. `draining` marks an endpoint
    removed from its service that still has requests in flight.
    """

    __slots__ = ("address", "role", "labels", "ready", "healthy", "draining", "in_flight", "pool")

    def __init__(self, address: str, role: str, labels: dict[str, str], ready: bool, pool: EndpointPool):
        self.address = address
        self.role = role
        self.labels = labels
        self.ready = ready
        self.healthy = True
        self.draining = False
        self.in_flight = 0
        self.pool = pool

    @property
    def eligible(self) -> bool:
        """Whether new requests may be sent here."""
        return self.ready and self.healthy and not self.draining

    def describe(self) -> dict[str, Any]:
        """Return the admin API view of this endpoint."""
        return {
            "address": self.address,
            "role": self.role,
            "labels": self.labels,
            "ready": self.ready,
            "healthy": self.healthy,
            "draining": self.draining,
            "in_flight": self.in_flight,
        }


class Service:
    """Routing state of one LLMInferenceService: its endpoints, admission and picker."""

    def __init__(self, namespace: str, name: str, metrics: GatewayMetrics):
        self.namespace = namespace
        self.name = name
        self.model = ""
        self.shape = "scheduler"
        self.scheduler_config: dict | None = None
        self.criticality = 1
        self.engine_api_key: str | None = None
        self.engine_authorization: bytes | None = None
        self.endpoints: dict[str, Endpoint] = {}
        self.admission = Admission()
        self.metrics: ModelMetrics | None = None
        self._gateway_metrics = metrics
        self._next = 0
        self._eligible: list[Endpoint] | None = None
        self.in_flight = 0
        # Set for the scheduler and pd shapes; the scrape task is owned by this service.
        self.scheduler: Scheduler | None = None
        self.datastore: Datastore | None = None
        self._scrape_task: asyncio.Task | None = None

    @property
    def key(self) -> str:
        """The `namespace/name` form used in logs and scheduler metrics."""
        return f"{self.namespace}/{self.name}"

    def sync_endpoint(self, endpoint: Endpoint) -> None:
        """Apply a change of `endpoint`'s health to the picker and the scheduler's datastore."""
        self._eligible = None
        if self.datastore is not None:
            self.datastore.set_ready(endpoint.address, endpoint.ready and endpoint.healthy)

    def saturated(self) -> bool:
        """Return the scheduler's saturation signal (always False under round robin)."""
        return self.scheduler is not None and self.scheduler.saturated()

    async def scrape(self, address: str) -> str:
        """Return `address`'s /metrics text, sent with the engine API key (the datastore's fetcher)."""
        endpoint = self.endpoints.get(address)
        if endpoint is None:
            raise ScrapeError(f"endpoint {address} is no longer part of {self.key}")
        headers = [(b"authorization", self.engine_authorization)] if self.engine_authorization else []
        timeout = self.datastore.scrape_timeout if self.datastore is not None else 1.0
        try:
            status, body = await fetch(endpoint.pool, "GET", "/metrics", headers=headers, timeout=timeout)
        except UpstreamError as exc:
            raise ScrapeError(str(exc)) from None
        if status != 200:
            raise ScrapeError(f"GET /metrics on {address} returned status {status}")
        return body.decode("utf-8", "replace")

    def close_scheduler(self) -> None:
        """Stop the scrape task and the scheduler's background work."""
        if self._scrape_task is not None:
            self._scrape_task.cancel()
            self._scrape_task = None
        if self.scheduler is not None:
            self.scheduler.close()
        self.scheduler = None
        self.datastore = None

    def invalidate(self) -> None:
        """Forget the cached list of eligible endpoints after a ready, health or drain change."""
        self._eligible = None

    def pick(self, exclude: tuple[Endpoint, ...] = (), role: str | None = None) -> Endpoint | None:
        """Return the next eligible endpoint in round-robin order, skipping `exclude`.

        `role` restricts the choice to endpoints of that role (`both` serves every role).
        Returns None when no endpoint qualifies.
        """
        if self._eligible is None:
            self._eligible = [e for e in self.endpoints.values() if e.eligible]
        candidates = self._eligible
        if exclude or role is not None:
            candidates = [
                e for e in candidates if e not in exclude and (role is None or e.role == role or e.role == "both")
            ]
        if not candidates:
            return None
        self._next += 1
        return candidates[self._next % len(candidates)]

    def has_alternative(self, exclude: tuple[Endpoint, ...], role: str | None = None) -> bool:
        """Return whether an eligible endpoint outside `exclude` exists."""
        if self._eligible is None:
            self._eligible = [e for e in self.endpoints.values() if e.eligible]
        for e in self._eligible:
            if e not in exclude and (role is None or e.role == role or e.role == "both"):
                return True
        return False

    def ready_count(self) -> int:
        """Return the number of endpoints new requests may be sent to."""
        return sum(1 for e in self.endpoints.values() if e.eligible)

    def describe(self) -> dict[str, Any]:
        """Return the admin API view of this service (the engine API key is never shown)."""
        return {
            "namespace": self.namespace,
            "name": self.name,
            "model": self.model,
            "shape": self.shape,
            "criticality": LEVEL_NAMES[self.criticality],
            "engine_api_key_set": self.engine_api_key is not None,
            "in_flight": self.in_flight,
            "queued": self.admission.queued,
            "max_concurrency": self.admission.max_concurrency,
            "endpoints": [e.describe() for e in self.endpoints.values()],
        }


class ServiceTable:
    """Every service the gateway routes, by (namespace, name) and by model name."""

    def __init__(
        self,
        metrics: GatewayMetrics,
        limits: Limits,
        loop: asyncio.AbstractEventLoop,
        connect_timeout: float,
        scrape_interval: float = 0.05,
        metrics_staleness: float | None = None,
    ):
        self._metrics = metrics
        self._limits = limits
        self._loop = loop
        self._connect_timeout = connect_timeout
        self._scrape_interval = scrape_interval
        # None keeps the Datastore's default window.
        self._metrics_staleness = metrics_staleness
        self.scheduler_metrics = SchedulerMetrics(metrics.registry)
        self.by_key: dict[tuple[str, str], Service] = {}
        self.by_model: dict[str, Service] = {}

    def put(self, namespace: str, name: str, entry: Any) -> Service:
        """Create or replace a service from its entry; raise BadRequestError naming the bad field.

        Endpoints absent from the new entry are drained: they take no new requests and are
        forgotten once their in-flight count reaches 0.
        """
        spec = _validate_entry(entry)
        service = self.by_key.get((namespace, name))
        scheduler_changed = service is None or (
            (service.shape, service.scheduler_config, service.model)
            != (spec["shape"], spec["scheduler_config"], spec["model"])
        )
        new_scheduler = None
        if scheduler_changed and spec["shape"] != "no-scheduler":
            # Built before anything changes, so an invalid config leaves the service as it was.
            new_scheduler = self._build_scheduler(namespace, name, spec)

        if service is None:
            service = Service(namespace, name, self._metrics)
            self.by_key[(namespace, name)] = service
        elif service.model != spec["model"] and self.by_model.get(service.model) is service:
            del self.by_model[service.model]

        service.model = spec["model"]
        service.shape = spec["shape"]
        service.scheduler_config = spec["scheduler_config"]
        service.criticality = spec["criticality"]
        service.engine_api_key = spec["engine_api_key"]
        service.engine_authorization = (
            b"Bearer " + spec["engine_api_key"].encode() if spec["engine_api_key"] else None
        )
        service.metrics = self._metrics.model(service.model)
        service.admission.configure(
            spec.get("max_concurrency", self._limits.max_concurrency),
            spec.get("max_queue", self._limits.max_queue),
            spec.get("queue_timeout", self._limits.queue_timeout),
        )
        owner = self.by_model.get(service.model)
        if owner is not None and owner is not service:
            logger.warning(
                "model %s is served by %s/%s and %s/%s; /v1 requests now go to %s/%s",
                service.model, owner.namespace, owner.name, namespace, name, namespace, name,
            )
        self.by_model[service.model] = service
        if scheduler_changed:
            service.close_scheduler()
            if new_scheduler is not None:
                service.scheduler = new_scheduler
                service.datastore = new_scheduler.datastore
                service._scrape_task = self._loop.create_task(service.datastore.run())
        self._update_endpoints(service, spec["endpoints"])
        logger.info(
            "service %s/%s set: model %s, shape %s, %d endpoints (%d ready)",
            namespace, name, service.model, service.shape, len(spec["endpoints"]), service.ready_count(),
        )
        return service

    def delete(self, namespace: str, name: str) -> Service | None:
        """Remove a service; its endpoints drain. Return the removed service or None."""
        service = self.by_key.pop((namespace, name), None)
        if service is None:
            return None
        if self.by_model.get(service.model) is service:
            del self.by_model[service.model]
        service.close_scheduler()
        service.invalidate()
        for endpoint in list(service.endpoints.values()):
            endpoint.draining = True
            self.forget_if_idle(service, endpoint)
        logger.info("service %s/%s deleted", namespace, name)
        return service

    def forget_if_idle(self, service: Service, endpoint: Endpoint) -> None:
        """Close a draining endpoint's connections once nothing is in flight on it."""
        if endpoint.draining and endpoint.in_flight == 0:
            if service.endpoints.get(endpoint.address) is endpoint:
                del service.endpoints[endpoint.address]
                self._remove_endpoint_series(service, endpoint.address)
            service.invalidate()
            endpoint.pool.close()

    def _remove_endpoint_series(self, service: Service, address: str) -> None:
        # A deleted service's datastore is closed and never reports the removal itself.
        self.scheduler_metrics.remove_endpoint(service.key, address)
        # Gateway series are per model, so they stay while another service of the same
        # model still routes to this address.
        for other in self.by_key.values():
            if other is not service and other.model == service.model and address in other.endpoints:
                return
        if service.metrics is not None:
            service.metrics.remove_endpoint(address)

    def _build_scheduler(self, namespace: str, name: str, spec: dict[str, Any]) -> Scheduler:
        async def fetch_metrics(address: str) -> str:
            # Scrapes go through the service's own pools and carry its engine API key.
            service = self.by_key.get((namespace, name))
            if service is None:
                raise ScrapeError(f"service {namespace}/{name} was deleted")
            return await service.scrape(address)

        datastore = Datastore(scrape_interval=self._scrape_interval, staleness=self._metrics_staleness, fetcher=fetch_metrics)
        try:
            return Scheduler.from_config(
                spec["scheduler_config"],
                shape=spec["shape"],
                datastore=datastore,
                model_name=spec["model"],
                service=f"{namespace}/{name}",
                metrics=self.scheduler_metrics,
            )
        except (ConfigError, ValueError) as exc:
            raise BadRequestError(f"scheduler_config: {exc}", param="scheduler_config") from None

    def _update_endpoints(self, service: Service, items: list[dict]) -> None:
        service.invalidate()
        seen = set()
        for item in items:
            address = item["address"]
            seen.add(address)
            endpoint = service.endpoints.get(address)
            if endpoint is None:
                pool = EndpointPool(address, self._loop, connect_timeout=self._connect_timeout)
                endpoint = Endpoint(address, item["role"], item["labels"], item["ready"], pool)
                service.endpoints[address] = endpoint
            else:
                if item["ready"] and not endpoint.ready and not endpoint.healthy:
                    # A probe that failed while the engine was still loading is out of date once
                    # the controller reports the engine ready, and the next probe may be seconds away.
                    endpoint.healthy = True
                    logger.info(
                        "endpoint %s of %s/%s is ready; health probe failures before that are cleared",
                        address, service.namespace, service.name,
                    )
                endpoint.role = item["role"]
                endpoint.labels = item["labels"]
                endpoint.ready = item["ready"]
                endpoint.draining = False
        for address, endpoint in list(service.endpoints.items()):
            if address not in seen and not endpoint.draining:
                endpoint.draining = True
                logger.info("endpoint %s of %s/%s draining", address, service.namespace, service.name)
                self.forget_if_idle(service, endpoint)
        if service.datastore is not None:
            service.datastore.set_endpoints(
                EndpointSpec(e.address, e.role, e.labels, e.ready and e.healthy)
                for e in service.endpoints.values()
                if not e.draining
            )

    def describe(self) -> list[dict[str, Any]]:
        """Return the admin API view of every service."""
        return [service.describe() for service in self.by_key.values()]


def _validate_entry(entry: Any) -> dict[str, Any]:
    """Check a service entry and return it normalised; raise BadRequestError naming the field."""
    if not isinstance(entry, dict):
        raise BadRequestError("service entry must be a JSON object", param="body")
    known = {
        "model", "shape", "scheduler_config", "criticality", "engine_api_key", "endpoints",
        "max_concurrency", "max_queue", "queue_timeout", "namespace", "name",
    }
    for key in entry:
        if key not in known:
            raise BadRequestError(f"{key}: unknown field; known fields are {', '.join(sorted(known))}", param=key)

    model = entry.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequestError("model: must be a non-empty string", param="model")
    shape = entry.get("shape", "scheduler")
    if shape not in SHAPES:
        raise BadRequestError(f"shape: must be one of {', '.join(SHAPES)}, got {shape!r}", param="shape")
    scheduler_config = entry.get("scheduler_config")
    if scheduler_config is not None and not isinstance(scheduler_config, dict):
        raise BadRequestError("scheduler_config: must be an object or null", param="scheduler_config")
    criticality = parse_criticality(entry.get("criticality") or "Standard")
    key = entry.get("engine_api_key")
    if key is not None and (not isinstance(key, str) or not key):
        raise BadRequestError("engine_api_key: must be a non-empty string or null", param="engine_api_key")

    spec: dict[str, Any] = {
        "model": model,
        "shape": shape,
        "scheduler_config": scheduler_config,
        "criticality": criticality,
        "engine_api_key": key,
        "endpoints": _validate_endpoints(entry.get("endpoints", [])),
    }

    for field, kind in (("max_concurrency", int), ("max_queue", int), ("queue_timeout", (int, float))):
        if field in entry:
            value = entry[field]
            if isinstance(value, bool) or not isinstance(value, kind) or value < 0:
                raise BadRequestError(f"{field}: must be a number >= 0, got {value!r}", param=field)
            spec[field] = value
    return spec


def _validate_endpoints(items: Any) -> list[dict]:
    if not isinstance(items, list):
        raise BadRequestError("endpoints: must be a list", param="endpoints")
    result = []
    for index, item in enumerate(items):
        path = f"endpoints[{index}]"
        if not isinstance(item, dict):
            raise BadRequestError(f"{path}: must be an object", param=path)
        address = item.get("address")
        host, sep, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise BadRequestError(f"{path}.address: must be host:port, got {address!r}", param=f"{path}.address")
        role = item.get("role", "both")
        if role not in ROLES:
            raise BadRequestError(f"{path}.role: must be one of {', '.join(ROLES)}, got {role!r}", param=f"{path}.role")
        ready = item.get("ready", True)
        if not isinstance(ready, bool):
            raise BadRequestError(f"{path}.ready: must be true or false", param=f"{path}.ready")
        labels = item.get("labels") or {}
        if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise BadRequestError(f"{path}.labels: must map strings to strings", param=f"{path}.labels")
        result.append({"address": address, "role": role, "ready": ready, "labels": {"llm-d.ai/role": role, **labels}})
    return result
