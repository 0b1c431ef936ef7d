"""Exact prefix index fed by KV events: event handling, matching and mismatch detection."""

from __future__ import annotations

import msgpack

from llmisvc.protocol.block_hash import hash_blocks
from llmisvc.scheduler.kv_event_index import KVEventIndex


def stored(hashes, parent=None, tokens=(), block_size=16):
    return ["BlockStored", list(hashes), parent, list(tokens), block_size, None, "GPU"]


def test_match_after_stored_removed_cleared():
    index = KVEventIndex(16, "")
    index.apply_event("a", stored([1, 2, 3]))
    index.apply_event("b", stored([1, 2]))
    index.apply_event("c", stored([1]))
    assert index.match([1, 2, 3, 4]) == {"a": 3, "b": 2, "c": 1}
    index.apply_event("a", ["BlockRemoved", [3], "GPU"])
    assert index.match([1, 2, 3]) == {"a": 2, "b": 2, "c": 1}
    index.apply_event("b", ["AllBlocksCleared"])
    assert index.match([1, 2, 3]) == {"a": 2, "c": 1}
    assert index.blocks("b") == 0


def test_message_decoding_and_signed_hashes():
    index = KVEventIndex(16, "")
    tokens = list(range(32))
    hashes = hash_blocks(tokens, 16)
    # vLLM may send hashes as signed 64-bit integers.
    signed = [h - (1 << 64) if h >= 1 << 63 else h for h in hashes]
    payload = msgpack.packb([0.0, [stored(signed, None, tokens)], None])
    index.apply_message(b"kv@10.0.0.1:8000@m", payload)
    assert index.match(hashes) == {"10.0.0.1:8000": 2}


def test_map_layout_events():
    index = KVEventIndex(16, "")
    index.apply_event("a", {"type": "BlockStored", "block_hashes": [7, 8], "parent_block_hash": None, "token_ids": [], "block_size": 16})
    assert index.match([7, 8]) == {"a": 2}


def test_block_size_mismatch_reported():
    reports = []
    index = KVEventIndex(16, "", on_mismatch=lambda address, reason, detail: reports.append((address, reason)))
    index.apply_event("a", stored([1], block_size=32))
    assert reports == [("a", "block_size")]
    assert index.match([1]) == {}


def test_hash_seed_mismatch_reported():
    reports = []
    index = KVEventIndex(16, "scheduler-seed", on_mismatch=lambda address, reason, detail: reports.append(reason))
    tokens = list(range(16))
    index.apply_event("a", stored(hash_blocks(tokens, 16, "engine-seed"), None, tokens))
    assert reports == ["hash_seed"]
    index.apply_event("a", stored(hash_blocks(tokens, 16, "scheduler-seed"), None, tokens))
    assert reports == ["hash_seed"]
    assert index.blocks("a") == 1
