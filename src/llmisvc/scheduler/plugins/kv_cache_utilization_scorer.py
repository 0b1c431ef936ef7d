"""`kv-cache-utilization-scorer`: prefer endpoints with free KV cache.

Parameters: none.
Formula: 1 - kv_usage, with kv_usage from `vllm:kv_cache_usage_perc` in [0, 1];
missing metrics count as usage 0.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmisvc.scheduler.datastore import Endpoint
from llmisvc.scheduler.framework import CycleState, LifecycleHooks, Plugin, clamp


class KVCacheUtilizationScorer(Plugin, LifecycleHooks):
    """Scores by free KV cache fraction."""

    type_name = "kv-cache-utilization-scorer"
    kind = "scorer"
    PARAMETERS = ()

    def __init__(self, name: str, parameters: dict, context) -> None:
        super().__init__(name)

    def score(self, state: CycleState, endpoints: Sequence[Endpoint]) -> dict[str, float]:
        return {e.address: clamp(1.0 - (e.metrics.kv_usage or 0.0)) for e in endpoints}
