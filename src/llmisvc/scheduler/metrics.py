"""Prometheus metrics of the scheduler, in a registry the gateway serves on its `/metrics`.

One `SchedulerMetrics` can be shared by every service's scheduler in a gateway; series
carry a `service` label. Series of an endpoint that leaves are removed, so a departed
replica disappears from the output.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# 0.1 ms to 100 ms: a decision is expected well under a millisecond.
DECISION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class SchedulerMetrics:
    """Scheduler metrics registered in `registry` (a fresh one when None)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.e2e_duration = Histogram(
            "scheduler_e2e_duration_seconds",
            "Time to make one scheduling decision, in seconds.",
            ["service"],
            buckets=DECISION_BUCKETS,
            registry=self.registry,
        )
        self.plugin_duration = Histogram(
            "scheduler_plugin_duration_seconds",
            "Time spent in one plugin per scheduling decision, in seconds.",
            ["service", "profile", "plugin_type", "plugin"],
            buckets=DECISION_BUCKETS,
            registry=self.registry,
        )
        self.picks = Counter(
            "scheduler_picks",
            "Requests routed to each endpoint.",
            ["service", "profile", "endpoint"],
            registry=self.registry,
        )
        self.failures = Counter(
            "scheduler_failures",
            "Scheduling decisions that failed, by reason (no_ready_endpoints, all_filtered).",
            ["service", "reason"],
            registry=self.registry,
        )
        self.prefix_entries = Gauge(
            "scheduler_prefix_index_entries",
            "Block entries in the approximate prefix index.",
            ["service", "plugin"],
            registry=self.registry,
        )
        self.prefix_hit_ratio = Gauge(
            "scheduler_prefix_index_hit_ratio",
            "Fraction of looked-up prompt blocks found on the best endpoint since start.",
            ["service", "plugin"],
            registry=self.registry,
        )
        self.kv_event_mismatch = Counter(
            "scheduler_kv_events_mismatch",
            "KV events whose block size or hash seed differ from the scheduler's (reason label).",
            ["service", "plugin", "reason"],
            registry=self.registry,
        )
        self.kv_events = Counter(
            "scheduler_kv_events",
            "KV events applied to the precise prefix index, by type.",
            ["service", "plugin", "type"],
            registry=self.registry,
        )

    def remove_endpoint(self, service: str, address: str) -> None:
        """Drop every series of `address` for `service`."""
        for labels in list(self.picks._metrics):  # prometheus_client has no label-prefix removal
            if labels[0] == service and labels[2] == address:
                self.picks.remove(*labels)
