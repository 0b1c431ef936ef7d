"""`queue-scorer`: prefer endpoints with fewer waiting requests, relative to the others.

Parameters: none.
Formula, with q the waiting requests of each candidate: (max_q - q) / (max_q - min_q).
When all candidates have the same q, every score is 1. Missing metrics count as q = 0.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmisvc.scheduler.datastore import Endpoint
from llmisvc.scheduler.framework import CycleState, LifecycleHooks, Plugin, clamp


def queue_scores(queues: dict[str, float]) -> dict[str, float]:
    """Return min-max normalised scores for address -> queue length."""
    if not queues:
        return {}
    low, high = min(queues.values()), max(queues.values())
    if high == low:
        return {address: 1.0 for address in queues}
    return {address: clamp((high - q) / (high - low)) for address, q in queues.items()}


class QueueScorer(Plugin, LifecycleHooks):
    """Scores by waiting-queue length, min-max normalised."""

    type_name = "queue-scorer"
    kind = "scorer"
    PARAMETERS = ()

    def __init__(self, name: str, parameters: dict, context) -> None:
        super().__init__(name)

    def score(self, state: CycleState, endpoints: Sequence[Endpoint]) -> dict[str, float]:
        return queue_scores({e.address: e.metrics.waiting or 0 for e in endpoints})
