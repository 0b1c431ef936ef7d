"""`random-picker`: choose uniformly at random, ignoring scores.

Parameters: `maxNumOfEndpoints` (int, default 1).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from llmisvc.scheduler.datastore import Endpoint
from llmisvc.scheduler.framework import CycleState, LifecycleHooks, Plugin
from llmisvc.scheduler.registry import Param, positive


class RandomPicker(Plugin, LifecycleHooks):
    """Picks uniformly at random."""

    type_name = "random-picker"
    kind = "picker"
    PARAMETERS = (Param("maxNumOfEndpoints", (int,), 1, positive),)

    def __init__(self, name: str, parameters: dict, context) -> None:
        super().__init__(name)
        self.count = parameters["maxNumOfEndpoints"]
        self._random = random.Random(context.seed)

    def pick(self, state: CycleState, scored: Sequence[tuple[Endpoint, float]]) -> list[Endpoint]:
        endpoints = [endpoint for endpoint, _ in scored]
        return self._random.sample(endpoints, min(self.count, len(endpoints)))
