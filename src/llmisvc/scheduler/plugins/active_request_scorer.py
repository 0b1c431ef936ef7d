"""`active-request-scorer`: prefer endpoints with fewer requests in flight from this gateway.

Parameters: none (in-flight counts are exact, so no request timeout is needed).
Formula, with c the gateway's in-flight requests at each candidate and m the largest c:
m = 0 -> every score 1; otherwise (m - c) / m, so an idle endpoint scores 1 and the
busiest 0. Counts are updated when the gateway starts and finishes each request, with
no scrape delay.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmisvc.scheduler.datastore import Endpoint
from llmisvc.scheduler.framework import CycleState, LifecycleHooks, Plugin, clamp


def active_scores(counts: dict[str, int]) -> dict[str, float]:
    """Return scores for address -> in-flight count."""
    busiest = max(counts.values(), default=0)
    if busiest == 0:
        return {address: 1.0 for address in counts}
    return {address: clamp((busiest - count) / busiest) for address, count in counts.items()}


class ActiveRequestScorer(Plugin, LifecycleHooks):
    """Scores by exact in-flight request counts."""

    type_name = "active-request-scorer"
    kind = "scorer"
    PARAMETERS = ()

    def __init__(self, name: str, parameters: dict, context) -> None:
        super().__init__(name)

    def score(self, state: CycleState, endpoints: Sequence[Endpoint]) -> dict[str, float]:
        return active_scores({e.address: e.in_flight for e in endpoints})
