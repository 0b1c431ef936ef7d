"""`utilization-detector`: drop saturated endpoints, keeping all when all are saturated.

Parameters:
- `queueDepthThreshold` (int, default 5): saturated when waiting requests > this.
- `kvCacheUtilThreshold` (float in [0, 1], default 0.8): saturated when KV usage > this.
An endpoint whose metrics are stale (older than the datastore's staleness window, or
never read) counts as saturated. If every candidate is saturated, all are kept, so the
scorers choose; the gateway's admission control sheds load, not this filter. As a
filter it lets traffic spill off a replica whose cached prefix would outweigh any load
score.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmisvc.scheduler.datastore import Datastore, Endpoint
from llmisvc.scheduler.framework import CycleState, LifecycleHooks, Plugin
from llmisvc.scheduler.registry import Param, fraction, non_negative


class UtilizationDetector(Plugin, LifecycleHooks):
    """Filters out endpoints with a long queue, a full KV cache or stale metrics."""

    type_name = "utilization-detector"
    kind = "filter"
    PARAMETERS = (
        Param("queueDepthThreshold", (int,), 5, non_negative),
        Param("kvCacheUtilThreshold", (float,), 0.8, fraction),
    )

    def __init__(self, name: str, parameters: dict, context) -> None:
        super().__init__(name)
        self.queue_threshold = parameters["queueDepthThreshold"]
        self.kv_threshold = parameters["kvCacheUtilThreshold"]

    def is_saturated(self, datastore: Datastore, endpoint: Endpoint) -> bool:
        """Return True when `endpoint` is saturated or its metrics are stale."""
        if datastore.is_stale(endpoint):
            return True
        metrics = endpoint.metrics
        if metrics.waiting is not None and metrics.waiting > self.queue_threshold:
            return True
        return metrics.kv_usage is not None and metrics.kv_usage > self.kv_threshold

    def filter(self, state: CycleState, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        unsaturated = [e for e in endpoints if not self.is_saturated(state.datastore, e)]
        return unsaturated if unsaturated else list(endpoints)
