"""KV block accounting of the simulated engine, with prefix caching.

Blocks contain no data. The cache tracks which chained block hashes
(`llmisvc.protocol.block_hash`) a replica has, how many requests use each, and which
unused blocks are kept for reuse. Unused cached blocks are evicted least recently
used first when a new allocation needs room, as in vLLM's block pool. Blocks that never
fill (the prompt's partial tail and the output) are counted but not hashed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class Allocation:
    """Blocks held by one request: its hashed prompt blocks and its unhashed block count."""

    hashes: list[int]
    anonymous: int
    cached_blocks: int
    # Blocks this allocation added to the cache, and the index of the first in `hashes`.
    stored: list[int]
    stored_start: int


class KVCache:
    """Block pool of `num_blocks` blocks with a prefix cache keyed by block hash.

    `on_removed(hashes)` is called when cached blocks are evicted or cleared, for KV
    events; blocks entering the cache are reported in `Allocation.stored`.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        on_removed: Callable[[list[int]], None] | None = None,
    ):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._refs: dict[int, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._anonymous = 0
        self._on_removed = on_removed

    @property
    def used_blocks(self) -> int:
        """Blocks referenced by at least one request."""
        return len(self._refs) - len(self._evictable) + self._anonymous

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, as vLLM's `kv_cache_usage_perc` (cached free blocks count as free)."""
        return self.used_blocks / self.num_blocks

    def cached_hashes(self) -> list[int]:
        """Return every block hash the cache holds, in use or not."""
        return list(self._refs)

    def contains(self, block_hash: int) -> bool:
        """Return True if a block with this hash is cached."""
        return block_hash in self._refs

    def match_prefix(self, hashes: Sequence[int]) -> int:
        """Return how many leading blocks of `hashes` are cached (no side effects)."""
        if not self.enable_prefix_caching:
            return 0
        matched = 0
        for block_hash in hashes:
            if block_hash not in self._refs:
                break
            matched += 1
        return matched

    def allocate(self, hashes: Sequence[int], total_blocks: int, max_cached_blocks: int | None = None) -> Allocation | None:
        """Reserve `total_blocks` blocks, reusing cached leading blocks of `hashes`.

        `hashes` are the request's full prompt blocks; the remaining
        `total_blocks - len(hashes)` blocks are unhashed. `max_cached_blocks` caps reuse
        (an engine recomputes at least the last prompt token). Returns None, changing
        nothing, when the free and evictable blocks do not suffice.
        """
        cached = self.match_prefix(hashes)
        if max_cached_blocks is not None:
            cached = min(cached, max_cached_blocks)
        hit = hashes[:cached]
        new_hashed = [h for h in hashes[cached:]]
        anonymous = max(total_blocks - len(hashes), 0)

        # Blocks beyond the reused prefix that are already cached (a shared tail after a
        # capped match) are reused too rather than stored twice.
        fresh = [h for h in new_hashed if h not in self._refs] if self.enable_prefix_caching else new_hashed
        needed = len(fresh) + anonymous
        reusable_evictable = sum(1 for h in hashes if h in self._evictable)
        free = self.num_blocks - len(self._refs) - self._anonymous
        if needed > free + len(self._evictable) - reusable_evictable:
            return None

        for block_hash in hit + [h for h in new_hashed if h in self._refs]:
            self._acquire(block_hash)
        self._make_room(needed - free)
        for block_hash in fresh:
            self._refs[block_hash] = self._refs.get(block_hash, 0) + 1
        self._anonymous += anonymous

        stored_start = hashes.index(fresh[0]) if fresh else len(hashes)
        return Allocation(list(hashes), anonymous, cached, fresh, stored_start)

    def free(self, allocation: Allocation) -> None:
        """Release a request's blocks; hashed blocks stay cached until evicted."""
        for block_hash in allocation.hashes:
            refs = self._refs.get(block_hash)
            if refs is None:
                continue
            if refs <= 1:
                self._refs[block_hash] = 0
                if self.enable_prefix_caching:
                    self._evictable[block_hash] = None
                else:
                    del self._refs[block_hash]
            else:
                self._refs[block_hash] = refs - 1
        self._anonymous -= allocation.anonymous
        allocation.hashes = []
        allocation.anonymous = 0

    def clear(self) -> None:
        """Drop every unused cached block (in-use blocks stay)."""
        removed = list(self._evictable)
        for block_hash in removed:
            del self._refs[block_hash]
        self._evictable.clear()
        if removed and self._on_removed is not None:
            self._on_removed(removed)

    def _acquire(self, block_hash: int) -> None:
        refs = self._refs[block_hash]
        if refs == 0:
            del self._evictable[block_hash]
        self._refs[block_hash] = refs + 1

    def _make_room(self, count: int) -> None:
        removed = []
        for _ in range(max(count, 0)):
            block_hash, _ = self._evictable.popitem(last=False)
            del self._refs[block_hash]
            removed.append(block_hash)
        if removed and self._on_removed is not None:
            self._on_removed(removed)
