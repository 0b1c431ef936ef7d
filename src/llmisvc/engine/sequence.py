"""Per-request state inside the engine core: one `Sequence` per output choice.

A request with `n` choices becomes `n` sequences that share a request id and a prompt. A
sequence's `token_ids` is the prompt followed by the generated tokens. Its KV cache covers
`token_ids[:num_computed_tokens]` and lives in the blocks listed in `block_ids`, where block
`i` contains positions `[i * block_size, (i + 1) * block_size)`.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from llmisvc.protocol.block_hash import hash_block, root_hash
from llmisvc.protocol.openai import SamplingOptions

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    """Lifecycle of a sequence in the scheduler."""

    WAITING = "waiting"
    # Blocks are allocated and a KV connector is filling them from a remote prefill engine.
    WAITING_FOR_REMOTE_KVS = "waiting_for_remote_kvs"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    """Reason a sequence stopped, in OpenAI's `finish_reason` spelling (abort is engine-internal)."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass
class EngineRequest:
    """One prompt submitted to the engine core, already tokenised.

    `max_tokens` is resolved against the context length by the caller; 0 means score the
    prompt and finish without sampling. `hash_extra` salts the first block's hash (the
    request's `cache_salt`), so salted prompts never share cache with unsalted ones.
    `prompt_logprobs` asks for the raw logprobs of every prompt token after the first, each
    with that many top alternatives; None asks for none.
    """

    request_id: str
    prompt_token_ids: list[int]
    options: SamplingOptions
    max_tokens: int
    kv_transfer_params: dict[str, Any] | None = None
    hash_extra: bytes = b""
    prompt_logprobs: int | None = None
    arrival_time: float = field(default_factory=time.monotonic)


class Sequence:
    """One output choice of a request: its tokens, KV blocks and timing.

    Fields the scheduler changes: `status`, `num_computed_tokens`, `block_ids`,
    `num_cached_tokens` (prefix-cache hit at first admission). Fields the engine loop changes:
    the generated tokens, finish reason, timestamps and `num_prompt_logprobs`, the number of
    prompt positions (from 0) whose next-token logprobs are computed. It never decreases, so
    a recompute after preemption scores no prompt token twice.
    """

    def __init__(self, request: EngineRequest, index: int, block_size: int, hash_seed: str):
        self.seq_id = str(next(_seq_ids))
        self.request = request
        self.request_id = request.request_id
        self.index = index
        self.options = request.options
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.num_cached_tokens = 0
        self.num_prompt_logprobs = 0
        self.admitted_once = False
        self.num_preemptions = 0
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | str | None = None
        # Held for a remote decode engine after finishing: blocks stay allocated.
        self.hold_blocks = False

        self._block_size = block_size
        self._block_hashes: list[int] = []
        self._hash_parent = root_hash(hash_seed)
        self._hash_extra = request.hash_extra
        # Full blocks already registered in the prefix cache.
        self.num_registered_blocks = 0

        self.arrival_time = request.arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """Generated tokens only."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        """Number of generated tokens."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        """True once the sequence stopped for any reason."""
        return self.status is SequenceStatus.FINISHED

    @property
    def prompt_logprobs_pending(self) -> bool:
        """True while prompt logprobs are requested and some prompt token is still unscored."""
        return self.request.prompt_logprobs is not None and self.num_prompt_logprobs < self.num_prompt_tokens - 1

    @property
    def in_prefill(self) -> bool:
        """True while more than one token is still uncomputed (prompt or recompute after preemption)."""
        return self.num_tokens - self.num_computed_tokens > 1

    def block_hashes(self, num_blocks: int) -> list[int]:
        """Return the chained hashes of the first `num_blocks` full blocks, computing new ones once.

        Raises ValueError when fewer than `num_blocks` blocks are full.
        """
        if num_blocks * self._block_size > len(self.token_ids):
            raise ValueError(f"sequence {self.seq_id} has fewer than {num_blocks} full blocks")
        size = self._block_size
        while len(self._block_hashes) < num_blocks:
            i = len(self._block_hashes)
            parent = self._block_hashes[-1] if self._block_hashes else self._hash_parent
            # Only the first block carries the salt; later blocks inherit it through the chain.
            extra = self._hash_extra if i == 0 else b""
            self._block_hashes.append(hash_block(parent, self.token_ids[i * size : (i + 1) * size], extra))
        return self._block_hashes[:num_blocks]

    def parent_hash(self, block_index: int) -> int | None:
        """Return the hash of the block before `block_index` (None for the first block)."""
        return self._block_hashes[block_index - 1] if block_index > 0 else None

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, request={self.request_id}, index={self.index}, "
            f"status={self.status.value}, tokens={self.num_tokens}, computed={self.num_computed_tokens})"
        )
