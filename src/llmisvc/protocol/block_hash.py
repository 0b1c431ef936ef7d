"""Chained block hashes over token ids, shared by the engine, the simulator and the scheduler.

A block's hash covers its parent's hash and its own token ids, so equal hashes mean equal
prefixes. Hashes are SHA-256 truncated to 64 bits: deterministic across processes and
restarts, unlike Python's `hash()`, and independent of PYTHONHASHSEED. The chain starts
from a root derived from a seed string (the engine's `--prefix-caching-hash-seed`, default
empty), so two engines agree on hashes exactly when they agree on seed and block size.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import numpy as np

_PARENT = struct.Struct("<Q")


def root_hash(seed: str = "") -> int:
    """Return the parent hash of a sequence's first block for `seed`."""
    digest = hashlib.sha256(b"llmisvc-block-root:" + seed.encode()).digest()
    return _PARENT.unpack_from(digest)[0]


def hash_block(parent: int, token_ids: Sequence[int], extra: bytes = b"") -> int:
    """Return the 64-bit hash of one block given its parent's hash and its token ids.

    `extra` distinguishes blocks whose KV differs for reasons other than tokens (for
    example a LoRA adapter name); empty for plain requests.
    """
    hasher = hashlib.sha256(_PARENT.pack(parent))
    hasher.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    if extra:
        hasher.update(extra)
    return _PARENT.unpack_from(hasher.digest())[0]


def hash_blocks(token_ids: Sequence[int], block_size: int, seed: str = "", extra: bytes = b"") -> list[int]:
    """Return the chained hashes of every full block of `token_ids`.

    A trailing partial block is not hashed: its content can still change, so it cannot be
    shared.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    tokens = np.asarray(token_ids, dtype=np.int64)
    hashes: list[int] = []
    parent = root_hash(seed)
    for start in range(0, len(tokens) - block_size + 1, block_size):
        hasher = hashlib.sha256(_PARENT.pack(parent))
        hasher.update(tokens[start : start + block_size].tobytes())
        if extra:
            hasher.update(extra)
        parent = _PARENT.unpack_from(hasher.digest())[0]
        hashes.append(parent)
    return hashes
