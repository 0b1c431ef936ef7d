"""`prefix-cache-scorer`: prefer endpoints that probably cache the prompt's prefix.

Parameters:
- `blockSizeTokens` (int, default 16): index block size in tokens; a block is
  blockSizeTokens x 4 characters of prompt text.
- `blockSize` (int, default 0): block size in characters, overriding `blockSizeTokens`
  when > 0 (the older llm-d spelling).
- `maxPrefixBlocksToMatch` (int, default 256): only the first this many blocks count.
- `lruCapacityPerServer` (int, default 31250): index blocks remembered per endpoint.
- `autoTune` (bool, default true): size each endpoint's LRU from the engine's
  `vllm:cache_config_info` as num_gpu_blocks x engine block size / blockSizeTokens.
- `maxTotalEntries` (int, default 2000000): cap on entries over all endpoints (memory).
Formula: matched leading blocks / total blocks of the prompt (0 for prompts shorter
than one block). The index learns at pick time: the chosen endpoint (and the prefill
endpoint, when there is one) is recorded as holding every block of the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmisvc.scheduler.datastore import Endpoint
from llmisvc.scheduler.framework import CycleState, LifecycleHooks, Plugin, SchedulingResult
from llmisvc.scheduler.prefix_index import PrefixIndex, text_block_hashes
from llmisvc.scheduler.registry import Param, non_negative, positive

CHARS_PER_TOKEN = 4
STATE_KEY = "prefix-cache"


class PrefixMatch:
    """Block hashes of the prompt and matched block counts per endpoint, shared via CycleState."""

    def __init__(self, hashes: list[int], counts: dict[str, int], block_chars: int):
        self.hashes = hashes
        self.counts = counts
        self.block_chars = block_chars

    def uncached_chars(self, address: str, prompt_chars: int) -> int:
        """Return the prompt characters `address` probably does not cache."""
        return max(prompt_chars - self.counts.get(address, 0) * self.block_chars, 0)


class PrefixCacheScorer(Plugin, LifecycleHooks):
    """Scores by the fraction of the prompt's blocks an endpoint probably caches."""

    type_name = "prefix-cache-scorer"
    kind = "scorer"
    PARAMETERS = (
        Param("blockSizeTokens", (int,), 16, positive),
        Param("blockSize", (int,), 0, non_negative),
        Param("maxPrefixBlocksToMatch", (int,), 256, positive),
        Param("lruCapacityPerServer", (int,), 31_250, positive),
        Param("autoTune", (bool,), True),
        Param("maxTotalEntries", (int,), 2_000_000, positive),
    )

    def __init__(self, name: str, parameters: dict, context) -> None:
        super().__init__(name)
        self.block_tokens = parameters["blockSizeTokens"]
        self.block_chars = parameters["blockSize"] or self.block_tokens * CHARS_PER_TOKEN
        if parameters["blockSize"]:
            self.block_tokens = max(self.block_chars // CHARS_PER_TOKEN, 1)
        self.max_blocks = parameters["maxPrefixBlocksToMatch"]
        self.auto_tune = parameters["autoTune"]
        self.index = PrefixIndex(parameters["lruCapacityPerServer"], parameters["maxTotalEntries"])
        self.seed = context.model_name
        self._tuned: dict[str, int] = {}
        self._entries_gauge = context.metrics.prefix_entries.labels(context.service, name)
        self._hit_gauge = context.metrics.prefix_hit_ratio.labels(context.service, name)
        context.datastore.add_removal_listener(self.on_endpoint_removed)

    def match(self, state: CycleState) -> PrefixMatch:
        """Return (and cache in `state`) the prompt's block hashes and per-endpoint matches."""
        key = f"{STATE_KEY}:{self.name}"
        cached = state.values.get(key)
        if cached is None:
            hashes = text_block_hashes(state.prompt_text, self.block_chars, self.max_blocks, self.seed)
            counts = self.index.match(hashes) if hashes else {}
            cached = state.values[key] = PrefixMatch(hashes, counts, self.block_chars)
            state.values.setdefault(STATE_KEY, cached)
        return cached

    def score(self, state: CycleState, endpoints: Sequence[Endpoint]) -> dict[str, float]:
        if self.auto_tune:
            self._tune(endpoints)
        match = self.match(state)
        total = len(match.hashes)
        if total == 0:
            return {e.address: 0.0 for e in endpoints}
        return {e.address: match.counts.get(e.address, 0) / total for e in endpoints}

    def on_pick(self, state: CycleState, result: SchedulingResult) -> None:
        match = self.match(state)
        if match.hashes:
            self.index.add(result.target.address, match.hashes)
            if result.prefill is not None:
                self.index.add(result.prefill.address, match.hashes)
        self._entries_gauge.set(self.index.total_entries)
        self._hit_gauge.set(self.index.hit_ratio())

    def on_endpoint_removed(self, address: str) -> None:
        self.index.remove_endpoint(address)
        self._tuned.pop(address, None)
        self._entries_gauge.set(self.index.total_entries)

    def _tune(self, endpoints: Sequence[Endpoint]) -> None:
        for endpoint in endpoints:
            metrics = endpoint.metrics
            if metrics.num_gpu_blocks is None or metrics.block_size is None:
                continue
            capacity = max(metrics.num_gpu_blocks * metrics.block_size // self.block_tokens, 1)
            if self._tuned.get(endpoint.address) != capacity:
                self._tuned[endpoint.address] = capacity
                self.index.set_capacity(endpoint.address, capacity)
