"""`no-hit-lru-scorer`: spread requests without a cache hit over the least recently used endpoints.

Parameters:
- `prefixPluginName` (string, default "prefix-cache-scorer"): the prefix scorer whose
  match this plugin reads; it must run earlier in the same profile.
- `lruSize` (int, default 1024): endpoints remembered.
Formula: for a cold request (no candidate matches any block), endpoints that never
served a cold request score 1. The other n candidates, ranked 0 (least recently used for
a cold request) to n - 1 (most recent), score 1 - (rank + 1) / (n + 1). Requests with a hit score 0.5 everywhere (neutral). A prompt too short
to hash counts as cold.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from llmisvc.scheduler.datastore import Endpoint
from llmisvc.scheduler.framework import CycleState, LifecycleHooks, Plugin, SchedulingResult, clamp
from llmisvc.scheduler.plugins.prefix_cache_scorer import STATE_KEY
from llmisvc.scheduler.registry import Param, positive


class NoHitLRUScorer(Plugin, LifecycleHooks):
    """Scores cold requests by how long ago each endpoint last took one."""

    type_name = "no-hit-lru-scorer"
    kind = "scorer"
    PARAMETERS = (
        Param("prefixPluginName", (str,), "prefix-cache-scorer"),
        Param("lruSize", (int,), 1024, positive),
    )

    def __init__(self, name: str, parameters: dict, context) -> None:
        super().__init__(name)
        self.prefix_plugin = parameters["prefixPluginName"]
        self.size = parameters["lruSize"]
        self._recent: OrderedDict[str, None] = OrderedDict()  # least recent first
        context.datastore.add_removal_listener(self.on_endpoint_removed)

    def _is_cold(self, state: CycleState) -> bool:
        match = state.values.get(f"{STATE_KEY}:{self.prefix_plugin}")
        return match is None or not any(match.counts.values())

    def score(self, state: CycleState, endpoints: Sequence[Endpoint]) -> dict[str, float]:
        if not self._is_cold(state):
            return {e.address: 0.5 for e in endpoints}
        used = [address for address in self._recent if any(e.address == address for e in endpoints)]
        rank = {address: position for position, address in enumerate(used)}
        n = len(used)
        return {e.address: 1.0 if e.address not in rank else clamp(1.0 - (rank[e.address] + 1) / (n + 1)) for e in endpoints}

    def on_pick(self, state: CycleState, result: SchedulingResult) -> None:
        if self._is_cold(state):
            self._recent.pop(result.target.address, None)
            self._recent[result.target.address] = None
            while len(self._recent) > self.size:
                self._recent.popitem(last=False)

    def on_endpoint_removed(self, address: str) -> None:
        self._recent.pop(address, None)
