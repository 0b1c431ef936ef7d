"""Fixed pool of KV-cache blocks with reference counts and a prefix cache.

Every block is either in use (reference count > 0) or free. Free blocks wait in one LRU
queue. A free block may still be *cached*, meaning it contains the KV of a full block whose
chained hash is registered, so a later prompt with the same prefix can take it back instead
of computing it. Allocation takes the least recently freed block and, if it was cached, drops
its hash (a `BlockRemoved` event). Blocks freed without a hash go to the front of the queue,
because nobody can ever reuse their content.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from llmisvc.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

logger = logging.getLogger(__name__)


class NoFreeBlocksError(RuntimeError):
    """An allocation asked for more blocks than are free; callers check `num_free_blocks` first."""


class BlockPool:
    """Block ids `0 .. num_blocks - 1` with reference counts, an LRU free queue and a hash index.

    Not thread-safe: only the engine loop's thread uses it. Events are collected in order and
    handed out by `take_events()` once per step when `record_events` is true.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True, record_events: bool = False):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._record_events = record_events
        self._ref_counts = [0] * num_blocks
        # Free blocks, least recently freed first; the value is unused.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._hash_to_block: dict[int, int] = {}
        self._block_to_hash: dict[int, int] = {}
        self._events: list[KVEvent] = []

    # -- queries ---------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now, cached free blocks included."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks whose hash is registered, in use or free."""
        return len(self._hash_to_block)

    def usage(self) -> float:
        """Return the fraction of blocks in use, in [0, 1]."""
        return 1.0 - len(self._free) / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        """Return how many sequences use `block_id`."""
        return self._ref_counts[block_id]

    def find_cached_prefix(self, block_hashes: list[int]) -> list[int]:
        """Return the block ids of the longest cached prefix of `block_hashes` (no reference taken)."""
        if not self.enable_caching:
            return []
        blocks = []
        for block_hash in block_hashes:
            block_id = self._hash_to_block.get(block_hash)
            if block_id is None:
                break
            blocks.append(block_id)
        return blocks

    def num_free_among(self, block_ids: list[int]) -> int:
        """Return how many of `block_ids` are free (taking them shrinks the free count)."""
        return sum(1 for block_id in block_ids if self._ref_counts[block_id] == 0)

    # -- changes ---------------------------------------------------------------------------

    def touch(self, block_ids: list[int]) -> None:
        """Take one more reference on each of `block_ids` (prefix-cache hits)."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
            self._ref_counts[block_id] += 1

    def allocate(self, count: int) -> list[int]:
        """Take `count` free blocks with one reference each, evicting cached content as needed.

        Raises NoFreeBlocksError when fewer than `count` blocks are free.
        """
        if count > len(self._free):
            raise NoFreeBlocksError(f"requested {count} blocks, {len(self._free)} free")
        blocks = []
        evicted = []
        for _ in range(count):
            block_id, _ = self._free.popitem(last=False)
            block_hash = self._block_to_hash.pop(block_id, None)
            if block_hash is not None:
                del self._hash_to_block[block_hash]
                evicted.append(block_hash)
            self._ref_counts[block_id] = 1
            blocks.append(block_id)
        if evicted and self._record_events:
            self._events.append(BlockRemoved(evicted))
        return blocks

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference on each of `block_ids`; blocks reaching zero become free.

        Pass a sequence's blocks in order: they are released last block first, so that its
        tail (the part least likely shared) is evicted before its prefix.
        """
        for block_id in reversed(block_ids):
            count = self._ref_counts[block_id]
            if count <= 0:
                raise ValueError(f"block {block_id} freed more often than taken")
            self._ref_counts[block_id] = count - 1
            if count == 1:
                self._free[block_id] = None
                if block_id not in self._block_to_hash:
                    self._free.move_to_end(block_id, last=False)

    def cache_full_blocks(
        self,
        block_ids: list[int],
        block_hashes: list[int],
        token_ids: list[int],
        parent_hash: int | None,
    ) -> None:
        """Register consecutive full blocks of one sequence under their chained hashes.

        `token_ids` are the tokens of exactly these blocks. A hash that another block already
        holds keeps the earlier block (the duplicate stays private and is reused first once
        freed). One `BlockStored` event covers the newly registered run of blocks.
        """
        if not self.enable_caching or not block_ids:
            return
        stored_hashes = []
        stored_tokens: list[int] = []
        stored_parent = parent_hash
        size = self.block_size
        for i, (block_id, block_hash) in enumerate(zip(block_ids, block_hashes)):
            if block_hash in self._hash_to_block or block_id in self._block_to_hash:
                # A gap breaks the run: the next registered block starts a new event whose
                # parent is this block's hash.
                self._flush_stored(stored_hashes, stored_parent, stored_tokens)
                stored_hashes, stored_tokens, stored_parent = [], [], block_hash
                continue
            self._hash_to_block[block_hash] = block_id
            self._block_to_hash[block_id] = block_hash
            stored_hashes.append(block_hash)
            stored_tokens.extend(token_ids[i * size : (i + 1) * size])
        self._flush_stored(stored_hashes, stored_parent, stored_tokens)

    def _flush_stored(self, hashes: list[int], parent: int | None, tokens: list[int]) -> None:
        if hashes and self._record_events:
            self._events.append(BlockStored(hashes, parent, tokens, self.block_size))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refuse (return False) while any block is in use."""
        if len(self._free) != self.num_blocks:
            return False
        self._hash_to_block.clear()
        self._block_to_hash.clear()
        if self._record_events:
            self._events.append(AllBlocksCleared())
        logger.info("prefix cache reset")
        return True

    def take_events(self) -> list[KVEvent]:
        """Return and clear the events recorded since the last call."""
        events, self._events = self._events, []
        return events
