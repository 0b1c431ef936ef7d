"""`weighted-random-picker`: choose at random with probability proportional to score.

Parameters: `maxNumOfEndpoints` (int, default 1).
Weighted sampling without replacement by A-Res (Efraimidis and Spirakis): each candidate
draws key = u^(1/score) with u uniform in (0, 1), and the largest keys win. Candidates
with score 0 are chosen only when every score is 0 (then uniformly).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from llmisvc.scheduler.datastore import Endpoint
from llmisvc.scheduler.framework import CycleState, LifecycleHooks, Plugin
from llmisvc.scheduler.registry import Param, positive


class WeightedRandomPicker(Plugin, LifecycleHooks):
    """Picks at random, weighted by total score."""

    type_name = "weighted-random-picker"
    kind = "picker"
    PARAMETERS = (Param("maxNumOfEndpoints", (int,), 1, positive),)

    def __init__(self, name: str, parameters: dict, context) -> None:
        super().__init__(name)
        self.count = parameters["maxNumOfEndpoints"]
        self._random = random.Random(context.seed)

    def pick(self, state: CycleState, scored: Sequence[tuple[Endpoint, float]]) -> list[Endpoint]:
        if all(score <= 0 for _, score in scored):
            endpoints = [endpoint for endpoint, _ in scored]
            return self._random.sample(endpoints, min(self.count, len(endpoints)))
        keyed = []
        for endpoint, score in scored:
            if score > 0:
                u = 1.0 - self._random.random()  # in (0, 1]
                keyed.append((u ** (1.0 / score), endpoint))
        keyed.sort(key=lambda item: item[0], reverse=True)
        return [endpoint for _, endpoint in keyed[: self.count]]
