"""Block pool: reference counts, prefix cache, LRU eviction and KV events."""

import pytest

from llmisvc.engine.block_pool import BlockPool, NoFreeBlocksError
from llmisvc.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from llmisvc.protocol.block_hash import hash_blocks

BLOCK = 4


def cache_prompt(pool: BlockPool, tokens: list[int]) -> list[int]:
    """Allocate blocks for the full blocks of `tokens`, register them and return their ids."""
    hashes = hash_blocks(tokens, BLOCK)
    blocks = pool.allocate(len(hashes))
    pool.cache_full_blocks(blocks, hashes, tokens[: len(hashes) * BLOCK], None)
    return blocks


def test_allocate_and_free_counts():
    pool = BlockPool(8, BLOCK)
    blocks = pool.allocate(3)
    assert len(set(blocks)) == 3
    assert pool.num_free_blocks == 5
    assert pool.usage() == pytest.approx(3 / 8)
    pool.free(blocks)
    assert pool.num_free_blocks == 8
    assert pool.usage() == 0.0


def test_allocate_beyond_free_raises():
    pool = BlockPool(2, BLOCK)
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(3)


def test_double_free_raises():
    pool = BlockPool(2, BLOCK)
    blocks = pool.allocate(1)
    pool.free(blocks)
    with pytest.raises(ValueError):
        pool.free(blocks)


def test_cached_prefix_found_after_free():
    pool = BlockPool(8, BLOCK)
    tokens = list(range(10))
    blocks = cache_prompt(pool, tokens)
    pool.free(blocks)

    hits = pool.find_cached_prefix(hash_blocks(tokens, BLOCK))
    assert hits == blocks
    assert pool.num_free_among(hits) == 2
    pool.touch(hits)
    assert pool.ref_count(hits[0]) == 1
    assert pool.num_free_blocks == 6


def test_prefix_lookup_stops_at_first_miss():
    pool = BlockPool(8, BLOCK)
    blocks = cache_prompt(pool, [1, 2, 3, 4, 5, 6, 7, 8])
    other = hash_blocks([1, 2, 3, 4, 9, 9, 9, 9], BLOCK)
    assert pool.find_cached_prefix(other) == blocks[:1]


def test_shared_block_needs_every_reference_freed():
    pool = BlockPool(4, BLOCK)
    blocks = cache_prompt(pool, [1, 2, 3, 4])
    pool.touch(blocks)
    pool.free(blocks)
    assert pool.num_free_blocks == 3
    pool.free(blocks)
    assert pool.num_free_blocks == 4


def test_uncached_blocks_are_reused_before_cached_ones():
    pool = BlockPool(4, BLOCK)
    cached = cache_prompt(pool, [1, 2, 3, 4])
    private = pool.allocate(1)
    pool.free(cached)
    pool.free(private)
    assert pool.allocate(1) == private
    assert pool.find_cached_prefix(hash_blocks([1, 2, 3, 4], BLOCK)) == cached


def test_eviction_is_least_recently_freed_first():
    pool = BlockPool(2, BLOCK)
    first = cache_prompt(pool, [1, 1, 1, 1])
    second = cache_prompt(pool, [2, 2, 2, 2])
    pool.free(first)
    pool.free(second)
    pool.allocate(1)
    assert pool.find_cached_prefix(hash_blocks([1, 1, 1, 1], BLOCK)) == []
    assert pool.find_cached_prefix(hash_blocks([2, 2, 2, 2], BLOCK)) == second


def test_sequence_tail_evicted_before_its_prefix():
    pool = BlockPool(3, BLOCK)
    tokens = list(range(12))
    blocks = cache_prompt(pool, tokens)
    pool.free(blocks)
    pool.allocate(1)
    assert pool.find_cached_prefix(hash_blocks(tokens, BLOCK)) == blocks[:2]


def test_caching_disabled_never_hits():
    pool = BlockPool(4, BLOCK, enable_caching=False)
    blocks = cache_prompt(pool, [1, 2, 3, 4])
    pool.free(blocks)
    assert pool.find_cached_prefix(hash_blocks([1, 2, 3, 4], BLOCK)) == []


def test_events_stored_removed_cleared():
    pool = BlockPool(2, BLOCK, record_events=True)
    tokens = [5, 6, 7, 8, 9, 10, 11, 12]
    hashes = hash_blocks(tokens, BLOCK)
    blocks = cache_prompt(pool, tokens)
    events = pool.take_events()
    assert events == [BlockStored(hashes, None, tokens, BLOCK)]

    pool.free(blocks)
    pool.allocate(2)
    removed = pool.take_events()
    assert removed == [BlockRemoved([hashes[1], hashes[0]])]

    pool.free([0, 1])
    assert pool.reset_prefix_cache() is True
    assert pool.take_events() == [AllBlocksCleared()]
    assert pool.take_events() == []


def test_duplicate_hash_keeps_first_block_and_splits_event():
    pool = BlockPool(6, BLOCK, record_events=True)
    tokens = list(range(12))
    hashes = hash_blocks(tokens, BLOCK)
    first = pool.allocate(1)
    pool.cache_full_blocks(first, hashes[:1], tokens[:4], None)
    pool.take_events()

    blocks = pool.allocate(3)
    pool.cache_full_blocks(blocks, hashes, tokens, None)
    assert pool.find_cached_prefix(hashes) == [first[0], blocks[1], blocks[2]]
    assert pool.take_events() == [BlockStored(hashes[1:], hashes[0], tokens[4:], BLOCK)]


def test_reset_refused_while_blocks_in_use():
    pool = BlockPool(2, BLOCK, record_events=True)
    pool.allocate(1)
    assert pool.reset_prefix_cache() is False
    assert pool.take_events() == []
