"""`max-score-picker`: choose the highest total score, breaking ties at random.

Parameters: `maxNumOfEndpoints` (int, default 1): how many targets to return, best first.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from llmisvc.scheduler.datastore import Endpoint
from llmisvc.scheduler.framework import CycleState, LifecycleHooks, Plugin
from llmisvc.scheduler.registry import Param, positive


class MaxScorePicker(Plugin, LifecycleHooks):
    """Picks the best-scored endpoints."""

    type_name = "max-score-picker"
    kind = "picker"
    PARAMETERS = (Param("maxNumOfEndpoints", (int,), 1, positive),)

    def __init__(self, name: str, parameters: dict, context) -> None:
        super().__init__(name)
        self.count = parameters["maxNumOfEndpoints"]
        self._random = random.Random(context.seed)

    def pick(self, state: CycleState, scored: Sequence[tuple[Endpoint, float]]) -> list[Endpoint]:
        if self.count == 1:
            best = max(score for _, score in scored)
            # Scores are sums of float products; treat near-equal totals as a tie.
            tied = [endpoint for endpoint, score in scored if score >= best - 1e-9]
            return [tied[0] if len(tied) == 1 else self._random.choice(tied)]
        shuffled = list(scored)
        self._random.shuffle(shuffled)
        shuffled.sort(key=lambda item: item[1], reverse=True)
        return [endpoint for endpoint, _ in shuffled[: self.count]]
