"""Continuous-batching scheduler: which sequences run in the next step, and how many tokens each.

Each step has a token budget (`max_num_batched_tokens`). Running sequences that are
decoding come first and get one token each, so a long prompt never stalls them. Sequences
still in prefill (a new prompt, or a recompute after preemption) then get chunks of the
remaining budget. Last, waiting sequences are admitted in arrival order while the budget,
the free blocks and `max_num_seqs` allow, reusing prefix-cached blocks (except for prompt
positions whose logprobs a request still needs). When a running sequence
needs a block and none is free, the most recently admitted unscheduled sequence is
preempted: its blocks are freed and it returns to the front of the waiting queue to be
recomputed later (its generated tokens are kept, so greedy output is unchanged).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from llmisvc.engine.block_pool import BlockPool
from llmisvc.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass
class SchedulerConfig:
    """Limits of one engine.

    `max_num_batched_tokens` must be at least `max_num_seqs`, so that every running sequence
    can always decode one token per step. `long_prefill_token_threshold` (0: off) caps one
    sequence's prefill chunk per step, which bounds the step time that decodes wait for.
    """

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    block_size: int
    long_prefill_token_threshold: int = 0

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({self.max_num_seqs})"
            )


@dataclass
class ScheduledChunk:
    """Compute `num_tokens` tokens of `seq` starting at `seq.num_computed_tokens`."""

    seq: Sequence
    num_tokens: int


@dataclass
class SchedulerOutput:
    """One step's plan.

    `remote_pulls` lists sequences that just got blocks and now wait for a KV connector,
    with the index of their first block the local prefix cache did not cover.
    `new_prefix_queries` / `new_prefix_hits` count prompt tokens looked up and found in the
    prefix cache by sequences admitted this step. Sequences that may not read the cache (they
    need prompt logprobs) are not counted, as in vLLM.
    """

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    remote_pulls: list[tuple[Sequence, int]] = field(default_factory=list)
    new_prefix_queries: int = 0
    new_prefix_hits: int = 0

    @property
    def num_tokens(self) -> int:
        """Tokens computed in this step."""
        return sum(chunk.num_tokens for chunk in self.chunks)


class Scheduler:
    """Waiting and running queues over one `BlockPool`. Used only by the engine thread.

    `remote_prefill` decides whether a waiting sequence takes the remote-KV path (a
    connector is configured and the request sets `do_remote_prefill`).
    """

    def __init__(self, config: SchedulerConfig, pool: BlockPool, remote_prefill=None):
        self.config = config
        self.pool = pool
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.remote_waiting: dict[int, Sequence] = {}
        self._remote_prefill = remote_prefill or (lambda seq: False)
        self.num_preemptions = 0

    # -- queries -----------------------------------------------------------------------------

    @property
    def num_unfinished(self) -> int:
        """Sequences waiting, waiting for remote KV, or running."""
        return len(self.waiting) + len(self.running) + len(self.remote_waiting)

    def blocks_for(self, num_tokens: int) -> int:
        """Return how many blocks hold `num_tokens` tokens."""
        return -(-num_tokens // self.config.block_size)

    # -- queue changes ------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Append a new sequence to the waiting queue."""
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take `seq` out of whichever queue holds it and free its blocks unless it holds them."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq.seq_id in self.remote_waiting:
            del self.remote_waiting[seq.seq_id]
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        if not seq.hold_blocks:
            self.release_blocks(seq)

    def release_blocks(self, seq: Sequence) -> None:
        """Give `seq`'s blocks back to the pool."""
        if seq.block_ids:
            self.pool.free(seq.block_ids)
            seq.block_ids = []

    def remote_finished(self, seq: Sequence, num_computed_tokens: int) -> None:
        """Move a sequence whose remote KV arrived (or was given up) to the running queue."""
        self.remote_waiting.pop(seq.seq_id, None)
        seq.num_computed_tokens = num_computed_tokens
        seq.status = SequenceStatus.RUNNING
        self.register_computed_blocks(seq)
        self.running.append(seq)

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Enter `seq`'s newly completed full blocks into the prefix cache."""
        size = self.config.block_size
        full = min(seq.num_computed_tokens, seq.num_tokens) // size
        start = seq.num_registered_blocks
        if full <= start:
            return
        hashes = seq.block_hashes(full)
        self.pool.cache_full_blocks(
            seq.block_ids[start:full],
            hashes[start:full],
            seq.token_ids[start * size : full * size],
            seq.parent_hash(start),
        )
        seq.num_registered_blocks = full

    # -- scheduling ---------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Plan the next step: decodes first, then prefill chunks, then admissions."""
        output = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled: set[int] = set()

        decoding = [seq for seq in self.running if not seq.in_prefill]
        prefilling = [seq for seq in self.running if seq.in_prefill]
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            requested = self._chunk_size(seq.num_tokens - seq.num_computed_tokens, budget)
            granted = self._grow(seq, requested, scheduled, output)
            if granted:
                output.chunks.append(ScheduledChunk(seq, granted))
                scheduled.add(seq.seq_id)
                budget -= granted

        if not output.preempted:
            budget = self._admit(budget, output)
        return output

    def _chunk_size(self, remaining: int, budget: int) -> int:
        """Return how many of a sequence's `remaining` uncomputed tokens to run this step."""
        size = min(remaining, budget)
        threshold = self.config.long_prefill_token_threshold
        if threshold > 0:
            size = min(size, threshold)
        return size

    def _grow(self, seq: Sequence, requested: int, scheduled: set[int], output: SchedulerOutput) -> int:
        """Give `seq` blocks for up to `requested` more tokens, preempting others if needed.

        Returns the number of tokens granted (0 when `seq` itself was preempted). A sequence
        in prefill takes a smaller chunk before anyone is preempted for it.
        """
        while True:
            have = len(seq.block_ids)
            target = seq.num_computed_tokens + requested
            missing = self.blocks_for(target) - have
            if missing <= self.pool.num_free_blocks:
                if missing > 0:
                    seq.block_ids.extend(self.pool.allocate(missing))
                return requested
            if seq.in_prefill:
                fits = (have + self.pool.num_free_blocks) * self.config.block_size - seq.num_computed_tokens
                if fits > 0:
                    requested = min(requested, fits)
                    continue
            victim = self._pick_victim(scheduled)
            self._preempt(victim, output)
            if victim is seq:
                return 0

    def _pick_victim(self, scheduled: set[int]) -> Sequence:
        for seq in reversed(self.running):
            if seq.seq_id not in scheduled:
                return seq
        # Unreachable while the pool can hold one full-context sequence per running sequence
        # already scheduled; raise rather than loop forever.
        raise RuntimeError("no sequence left to preempt")

    def _preempt(self, seq: Sequence, output: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.release_blocks(seq)
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        output.preempted.append(seq)
        logger.debug("preempted %s", seq)

    def _admit(self, budget: int, output: SchedulerOutput) -> int:
        """Admit waiting sequences in order while budget, blocks and max_num_seqs allow."""
        size = self.config.block_size
        while self.waiting and budget > 0:
            if len(self.running) + len(self.remote_waiting) >= self.config.max_num_seqs:
                break
            seq = self.waiting[0]

            # Keep at least one token uncached: its logits produce the first output token.
            cacheable = (seq.num_tokens - 1) // size
            reads_cache = not seq.prompt_logprobs_pending
            if not reads_cache:
                # Cached positions are never computed, so they have no logits to score prompt
                # tokens with. Read only positions already scored: none at first admission.
                cacheable = min(cacheable, seq.num_prompt_logprobs // size)
            hits = self.pool.find_cached_prefix(seq.block_hashes(cacheable)) if cacheable else []
            num_cached = len(hits) * size
            free_after_hits = self.pool.num_free_blocks - self.pool.num_free_among(hits)

            if self._remote_prefill(seq):
                needed = self.blocks_for(seq.num_prompt_tokens) - len(hits)
                if needed > free_after_hits:
                    break
                self._take_blocks(seq, hits, needed, output, reads_cache)
                self.waiting.popleft()
                seq.status = SequenceStatus.WAITING_FOR_REMOTE_KVS
                self.remote_waiting[seq.seq_id] = seq
                output.remote_pulls.append((seq, len(hits)))
                continue

            requested = self._chunk_size(seq.num_tokens - num_cached, budget)
            capacity = (len(hits) + free_after_hits) * size - num_cached
            granted = min(requested, capacity)
            if granted <= 0:
                break
            needed = self.blocks_for(num_cached + granted) - len(hits)
            self._take_blocks(seq, hits, needed, output, reads_cache)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            output.chunks.append(ScheduledChunk(seq, granted))
            budget -= granted
        return budget

    def _take_blocks(
        self, seq: Sequence, hits: list[int], needed: int, output: SchedulerOutput, reads_cache: bool
    ) -> None:
        self.pool.touch(hits)
        seq.block_ids = hits + self.pool.allocate(needed)
        seq.num_computed_tokens = len(hits) * self.config.block_size
        seq.num_registered_blocks = len(hits)
        if not seq.admitted_once:
            # Count each prompt once, as vLLM's prefix-cache counters do for new requests.
            seq.admitted_once = True
            seq.num_cached_tokens = seq.num_computed_tokens
            if reads_cache:
                output.new_prefix_queries += seq.num_prompt_tokens
                output.new_prefix_hits += seq.num_computed_tokens
