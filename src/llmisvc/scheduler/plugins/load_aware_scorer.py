"""`load-aware-scorer`: prefer endpoints with short waiting queues.

Parameters: `threshold` (int, default 128): queue length at which the score reaches 0.
Formula, with q the endpoint's waiting requests (`vllm:num_requests_waiting`):
q = 0 -> 0.5; otherwise 0.5 x (1 - min(q, threshold) / threshold).
An idle endpoint thus scores 0.5, so a full prefix hit (weight 2 x 1) still beats idling.
Endpoints without metrics score as q = 0.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmisvc.scheduler.datastore import Endpoint
from llmisvc.scheduler.framework import CycleState, LifecycleHooks, Plugin, clamp
from llmisvc.scheduler.registry import Param, positive


def load_score(waiting: float, threshold: int) -> float:
    """Return the load-aware score for `waiting` queued requests."""
    if waiting <= 0:
        return 0.5
    return clamp(0.5 * (1.0 - min(waiting, threshold) / threshold))


class LoadAwareScorer(Plugin, LifecycleHooks):
    """Scores by waiting-queue length."""

    type_name = "load-aware-scorer"
    kind = "scorer"
    PARAMETERS = (Param("threshold", (int,), 128, positive),)

    def __init__(self, name: str, parameters: dict, context) -> None:
        super().__init__(name)
        self.threshold = parameters["threshold"]

    def score(self, state: CycleState, endpoints: Sequence[Endpoint]) -> dict[str, float]:
        return {e.address: load_score(e.metrics.waiting or 0, self.threshold) for e in endpoints}
