"""Approximate prefix index: which endpoint probably caches which prompt prefix.

The prompt text is cut into blocks of `block_chars` characters (block size in tokens x 4,
the usual characters per token). Each block gets a chained 64-bit hash, BLAKE2b of the
parent hash and the block's text. The chain is seeded with the model name, so two models
never share entries. At most `max_blocks` leading blocks are hashed. Each endpoint has an LRU
of block hashes with `capacity` entries. A reverse map from hash to endpoints makes a
lookup cost one dict probe per block. The index learns at pick time, not from the
engine, so prefixes of requests still in flight count, and its total size is capped by
`max_total_entries`, evicting from the largest endpoint first.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict

_U64 = struct.Struct("<Q")


def text_block_hashes(text: str, block_chars: int, max_blocks: int, seed: str) -> list[int]:
    """Return the chained hashes of the full `block_chars`-character blocks of `text`.

    A trailing partial block is not hashed, because the engine cannot share it either.
    """
    parent = _U64.unpack(hashlib.blake2b(seed.encode(), digest_size=8, person=b"llmisvc-pfx").digest())[0]
    count = min(len(text) // block_chars, max_blocks)
    # ASCII text encodes once and is sliced as bytes; otherwise blocks stay aligned to
    # characters, so the same text always splits the same way.
    ascii_bytes = text.encode() if text.isascii() else None
    hashes = []
    for index in range(count):
        start, end = index * block_chars, (index + 1) * block_chars
        chunk = ascii_bytes[start:end] if ascii_bytes is not None else text[start:end].encode("utf-8", "surrogatepass")
        parent = _U64.unpack(hashlib.blake2b(_U64.pack(parent) + chunk, digest_size=8).digest())[0]
        hashes.append(parent)
    return hashes


class PrefixIndex:
    """Per-endpoint LRUs of block hashes with a reverse map for matching.

    `capacity` is the default per-endpoint size; `set_capacity` overrides it for one
    endpoint (auto-sizing from the engine's KV cache size). The reverse map stores, per
    block hash, a bit mask of the endpoints that have it. Plain ints are not tracked by
    Python's cyclic garbage collector, so a million entries cost the collector nothing,
    while a set per hash would add a million tracked objects.
    """

    def __init__(self, capacity: int = 31_250, max_total_entries: int = 2_000_000):
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.default_capacity = capacity
        self.max_total_entries = max_total_entries
        self._lrus: dict[str, OrderedDict[int, None]] = {}
        self._capacities: dict[str, int] = {}
        self._holders: dict[int, int] = {}
        self._bits: dict[str, int] = {}
        self._addresses: dict[int, str] = {}
        self._total = 0
        self.lookup_blocks = 0
        self.hit_blocks = 0

    @property
    def total_entries(self) -> int:
        """Number of (endpoint, block) entries across all endpoints."""
        return self._total

    def entries(self, address: str) -> int:
        """Number of blocks indexed for `address`."""
        lru = self._lrus.get(address)
        return len(lru) if lru is not None else 0

    def capacity(self, address: str) -> int:
        """Per-endpoint LRU size in blocks."""
        return self._capacities.get(address, self.default_capacity)

    def set_capacity(self, address: str, capacity: int) -> None:
        """Set one endpoint's LRU size, evicting its oldest blocks if it shrank."""
        self._capacities[address] = max(capacity, 1)
        lru = self._lrus.get(address)
        if lru is not None:
            self._trim(address, lru, self._capacities[address])

    def match(self, hashes: list[int]) -> dict[str, int]:
        """Return address -> number of leading blocks of `hashes` indexed for it (0 omitted)."""
        counts: dict[str, int] = {}
        alive = -1  # every bit: endpoints still matching all blocks so far
        matched = 0
        for block_hash in hashes:
            holders = self._holders.get(block_hash, 0) & alive
            if not holders:
                break
            dropped = alive & ~holders if alive != -1 else 0
            self._record(counts, dropped, matched)
            alive = holders
            matched += 1
        if matched:
            self._record(counts, alive, matched)
        self.lookup_blocks += len(hashes)
        self.hit_blocks += matched
        return counts

    def _record(self, counts: dict[str, int], mask: int, matched: int) -> None:
        while mask and matched:
            low = mask & -mask
            counts[self._addresses[low.bit_length() - 1]] = matched
            mask ^= low

    def add(self, address: str, hashes: list[int]) -> None:
        """Record that `address` now caches the blocks `hashes` (most recently used)."""
        lru = self._lrus.get(address)
        if lru is None:
            lru = self._lrus[address] = OrderedDict()
            self._assign_bit(address)
        bit = 1 << self._bits[address]
        holders = self._holders
        for block_hash in hashes:
            if block_hash in lru:
                lru.move_to_end(block_hash)
                continue
            lru[block_hash] = None
            holders[block_hash] = holders.get(block_hash, 0) | bit
            self._total += 1
        self._trim(address, lru, self.capacity(address))
        if self._total > self.max_total_entries:
            self._enforce_total()

    def remove_endpoint(self, address: str) -> None:
        """Forget every block of `address`."""
        lru = self._lrus.pop(address, None)
        self._capacities.pop(address, None)
        if lru is None:
            return
        for block_hash in lru:
            self._drop_holder(block_hash, address)
        self._total -= len(lru)
        self._addresses.pop(self._bits.pop(address))

    def hit_ratio(self) -> float:
        """Fraction of looked-up blocks found on the best endpoint, since creation."""
        return self.hit_blocks / self.lookup_blocks if self.lookup_blocks else 0.0

    def _assign_bit(self, address: str) -> None:
        bit = 0
        while bit in self._addresses:
            bit += 1
        self._bits[address] = bit
        self._addresses[bit] = address

    def _trim(self, address: str, lru: OrderedDict[int, None], capacity: int) -> None:
        while len(lru) > capacity:
            block_hash, _ = lru.popitem(last=False)
            self._drop_holder(block_hash, address)
            self._total -= 1

    def _drop_holder(self, block_hash: int, address: str) -> None:
        holders = self._holders.get(block_hash)
        if holders is not None:
            holders &= ~(1 << self._bits[address])
            if holders:
                self._holders[block_hash] = holders
            else:
                del self._holders[block_hash]

    def _enforce_total(self) -> None:
        # Shrink the largest endpoints first: they have the most stale tail to lose.
        excess = self._total - self.max_total_entries
        for address, lru in sorted(self._lrus.items(), key=lambda item: -len(item[1])):
            if excess <= 0:
                return
            drop = min(excess, len(lru))
            self._trim(address, lru, len(lru) - drop)
            excess -= drop
