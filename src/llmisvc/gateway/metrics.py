"""Prometheus metrics of the gateway, in one registry owned by the gateway object.

Metric families (label `model` is the served model name):

- `llmisvc_gateway_requests_total{model, code}`: finished requests by HTTP status.
- `llmisvc_gateway_time_to_first_token_seconds{model}`: request receipt to the first SSE
  event relayed to the client.
- `llmisvc_gateway_inter_token_latency_seconds{model}`: gap between consecutive SSE events
  relayed (a chunk carrying n events contributes n observations of gap / n).
- `llmisvc_gateway_e2e_request_latency_seconds{model}`: request receipt to the last byte.
- `llmisvc_gateway_requests_in_flight{model}`, `llmisvc_gateway_requests_queued{model}`.
- `llmisvc_gateway_retries_total{model}`, `llmisvc_gateway_cancellations_total{model}`.
- `llmisvc_gateway_upstream_errors_total{model, endpoint, kind}`: kind is `connect`,
  `status_5xx`, `closed` or `timeout`.
- `llmisvc_gateway_prompt_tokens_total{model}`, `llmisvc_gateway_generation_tokens_total{model}`:
  from the `usage` object of responses that carry one.
- `llmisvc_gateway_endpoint_picks_total{model, endpoint}`.

Series labelled with an endpoint are removed once it has left its service and has no request in flight.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import HistogramMetricFamily

# Bucket bounds follow vLLM's latency histograms so dashboards can compare the two sides.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_E2E_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)


class LoopHistogram:
    """A labelled Prometheus histogram for code that runs on one event loop thread.

    prometheus_client's Histogram takes a lock and walks its buckets in Python on every
    observation, and relayed streams observe once per token. So this class keeps plain
    counters per label set, finds the bucket with `bisect`, and builds the cumulative
    exposition only when /metrics is scraped. It is not thread-safe.
    """

    def __init__(self, name: str, documentation: str, labelnames: list[str], buckets: tuple[float, ...], registry: CollectorRegistry):
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.bounds = tuple(sorted(buckets))
        self._children: dict[tuple[str, ...], LoopHistogramChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> "LoopHistogramChild":
        """Return the child for one label set, creating it on first use."""
        child = self._children.get(values)
        if child is None:
            child = LoopHistogramChild(self.bounds)
            self._children[values] = child
        return child

    def describe(self) -> list:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> list:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self._children.items():
            cumulative = 0
            buckets = []
            for bound, count in zip((*map(_bound_text, self.bounds), "+Inf"), child.counts):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(list(values), buckets, child.sum)
        return [family]


class LoopHistogramChild:
    """Bucket counts and sum of one label set; `counts[i]` counts values in (bound[i-1], bound[i]]."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Record one value (seconds)."""
        self.counts[bisect_left(self._bounds, value)] += 1
        self.sum += value


def _bound_text(bound: float) -> str:
    return repr(float(bound))


class GatewayMetrics:
    """The gateway's metric families and a per-model cache of bound label children."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        # Latency and request counts.
        self.requests = Counter("llmisvc_gateway_requests", "Finished requests by status code", ["model", "code"], registry=r)
        self.ttft = LoopHistogram(
            "llmisvc_gateway_time_to_first_token_seconds",
            "Time from request receipt to the first streamed event relayed",
            ["model"],
            _TTFT_BUCKETS,
            r,
        )
        self.itl = LoopHistogram(
            "llmisvc_gateway_inter_token_latency_seconds",
            "Gap between consecutive streamed events relayed",
            ["model"],
            _ITL_BUCKETS,
            r,
        )
        self.e2e = LoopHistogram(
            "llmisvc_gateway_e2e_request_latency_seconds",
            "Time from request receipt to the last response byte",
            ["model"],
            _E2E_BUCKETS,
            r,
        )

        # Admission, retries and upstream failures.
        self.in_flight = Gauge("llmisvc_gateway_requests_in_flight", "Requests admitted and not finished", ["model"], registry=r)
        self.queued = Gauge("llmisvc_gateway_requests_queued", "Requests waiting for admission", ["model"], registry=r)
        self.retries = Counter("llmisvc_gateway_retries", "Requests sent to another endpoint after a failure", ["model"], registry=r)
        self.cancellations = Counter(
            "llmisvc_gateway_cancellations", "Requests whose client disconnected before the response ended", ["model"], registry=r
        )
        self.upstream_errors = Counter(
            "llmisvc_gateway_upstream_errors", "Failed upstream calls by endpoint and kind", ["model", "endpoint", "kind"], registry=r
        )

        # Token usage and endpoint picks.
        self.prompt_tokens = Counter("llmisvc_gateway_prompt_tokens", "Prompt tokens reported in usage", ["model"], registry=r)
        self.generation_tokens = Counter(
            "llmisvc_gateway_generation_tokens", "Completion tokens reported in usage", ["model"], registry=r
        )
        self.picks = Counter("llmisvc_gateway_endpoint_picks", "Requests sent to each endpoint", ["model", "endpoint"], registry=r)

        self._models: dict[str, ModelMetrics] = {}

    def model(self, name: str) -> "ModelMetrics":
        """Return the bound children for model `name`, creating them on first use."""
        bound = self._models.get(name)
        if bound is None:
            bound = ModelMetrics(self, name)
            self._models[name] = bound
        return bound

    def register(self, collector: object) -> None:
        """Expose another component's collector (the scheduler's) on the gateway's /metrics."""
        self.registry.register(collector)  # type: ignore[arg-type]

    def render(self) -> bytes:
        """Return the Prometheus text exposition of every registered metric."""
        return generate_latest(self.registry)


class ModelMetrics:
    """Label children bound to one model, so the hot path skips label lookups."""

    __slots__ = (
        "_parent",
        "model",
        "_codes",
        "ttft",
        "itl",
        "e2e",
        "in_flight",
        "queued",
        "retries",
        "cancellations",
        "prompt_tokens",
        "generation_tokens",
        "_picks",
        "_upstream_errors",
    )

    def __init__(self, parent: GatewayMetrics, model: str):
        self._parent = parent
        self.model = model
        self._codes: dict[int, object] = {}
        self.ttft = parent.ttft.labels(model)
        self.itl = parent.itl.labels(model)
        self.e2e = parent.e2e.labels(model)
        self.in_flight = parent.in_flight.labels(model)
        self.queued = parent.queued.labels(model)
        self.retries = parent.retries.labels(model)
        self.cancellations = parent.cancellations.labels(model)
        self.prompt_tokens = parent.prompt_tokens.labels(model)
        self.generation_tokens = parent.generation_tokens.labels(model)
        self._picks: dict[str, object] = {}
        self._upstream_errors: dict[tuple[str, str], object] = {}

    def count_request(self, status: int) -> None:
        """Count one finished request with HTTP status `status`."""
        child = self._codes.get(status)
        if child is None:
            child = self._parent.requests.labels(self.model, str(status))
            self._codes[status] = child
        child.inc()

    def count_pick(self, endpoint: str) -> None:
        """Count one request sent to `endpoint`."""
        child = self._picks.get(endpoint)
        if child is None:
            child = self._parent.picks.labels(self.model, endpoint)
            self._picks[endpoint] = child
        child.inc()

    def count_upstream_error(self, endpoint: str, kind: str) -> None:
        """Count one failed upstream call."""
        child = self._upstream_errors.get((endpoint, kind))
        if child is None:
            child = self._parent.upstream_errors.labels(self.model, endpoint, kind)
            self._upstream_errors[(endpoint, kind)] = child
        child.inc()

    def remove_endpoint(self, endpoint: str) -> None:
        """Drop every series labelled with `endpoint`, so a departed replica leaves /metrics."""
        if self._picks.pop(endpoint, None) is not None:
            self._parent.picks.remove(self.model, endpoint)
        for address, kind in list(self._upstream_errors):
            if address == endpoint:
                del self._upstream_errors[(address, kind)]
                self._parent.upstream_errors.remove(self.model, address, kind)

    def count_usage(self, usage: dict) -> None:
        """Add the token counts of an OpenAI `usage` object."""
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        if isinstance(prompt, int) and prompt >= 0:
            self.prompt_tokens.inc(prompt)
        if isinstance(completion, int) and completion >= 0:
            self.generation_tokens.inc(completion)
