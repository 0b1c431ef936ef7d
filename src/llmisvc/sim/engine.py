"""Request lifecycle of one simulated replica: admission, prefix-cached prefill, decode.

Continuous batching as vLLM does it, in time only. Up to `max_num_seqs` requests run at
once and later ones wait in arrival order. A request is admitted only when its prompt
and output blocks fit in the KV cache. Timing follows `LatencyModel`. Everything runs
on the event loop's clock (`loop.time()`), so the same code runs in real time behind
HTTP and in virtual time inside the routing benchmark.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from llmisvc.protocol.block_hash import hash_blocks
from llmisvc.protocol.kv_transfer import KVTransferParams
from llmisvc.sim.kv_cache import Allocation, KVCache
from llmisvc.sim.kv_events import KVEventPublisher
from llmisvc.sim.latency import LatencyModel
from llmisvc.sim.metrics import EngineMetrics

logger = logging.getLogger(__name__)

# Four-character pieces (one simulator token each) for generated text.
_WORDS = (" the", " cat", " sat", " on", " a", " mat", " and", " dog", " ran", " far", " sun", " sky")
_WORDS = tuple(word.ljust(4) for word in _WORDS)

FAILURE_TYPES = ("500", "drop", "hang", "cut")


class RequestTooLargeError(ValueError):
    """The prompt plus output can never fit this replica's context or KV cache."""


@dataclass(frozen=True)
class SimConfig:
    """Settings of one simulated replica."""

    served_model_names: tuple[str, ...] = ("sim",)
    max_model_len: int = 8192
    max_num_seqs: int = 256
    block_size: int = 16
    num_gpu_blocks: int = 8192
    enable_prefix_caching: bool = True
    hash_seed: str = ""
    latency: LatencyModel = LatencyModel()
    echo: bool = False
    seed: int = 0
    failure_rate: float = 0.0
    failure_types: tuple[str, ...] = ("500",)
    default_max_tokens: int = 128
    kv_hold_seconds: float = 30.0
    host: str = "127.0.0.1"
    port: int = 0


@dataclass
class SimRequest:
    """One generation request in the engine core's terms."""

    request_id: str
    token_ids: np.ndarray
    max_tokens: int
    output_pieces: list[str] | None = None
    seed: int | None = None
    kv_transfer: KVTransferParams | None = None
    # Filled in by the engine.
    cached_tokens: int = 0
    num_output_tokens: int = 0
    finish_reason: str = "length"
    kv_transfer_response: KVTransferParams | None = None
    arrival: float = 0.0
    first_token_time: float | None = None
    output_text: list[str] = field(default_factory=list)


class SimEngine:
    """One simulated replica: KV cache, waiting queue, running batch and metrics."""

    def __init__(self, config: SimConfig, publisher: KVEventPublisher | None = None):
        self.config = config
        self.model_name = config.served_model_names[0]
        self.engine_id = f"sim-{config.host}:{config.port}-{uuid.UUID(int=random.Random(config.seed).getrandbits(128))}"
        self.publisher = publisher
        self.cache = KVCache(
            config.num_gpu_blocks,
            config.block_size,
            config.enable_prefix_caching,
            on_removed=publisher.block_removed if publisher else None,
        )
        self.metrics = EngineMetrics(self.model_name)
        # Admitted requests, including those whose prefill has not started yet.
        self.running = 0
        # Admitted requests queued for the prefill lane: vLLM reports them as waiting,
        # because its scheduler has not given them any compute yet.
        self.prefill_queued = 0
        self._waiting: deque[tuple[SimRequest, int, asyncio.Future, list[int]]] = deque()
        self._prefill_free_at = 0.0
        self._rng = random.Random(config.seed)
        self._request_counter = 0
        self._held: dict[str, tuple[Allocation, asyncio.TimerHandle]] = {}

    @property
    def waiting(self) -> int:
        """Requests not yet computing: queued for admission or for the prefill lane."""
        return len(self._waiting) + self.prefill_queued

    @property
    def computing(self) -> int:
        """Requests in prefill or decode (vLLM's `num_requests_running`)."""
        return self.running - self.prefill_queued

    def render_metrics(self) -> str:
        """Return the Prometheus text of this replica's metrics."""
        return self.metrics.render(self.computing, self.waiting, self.cache.usage, self.config.block_size, self.config.num_gpu_blocks)

    def state(self) -> dict:
        """Return true cache contents and load (for oracle policies and tests)."""
        return {
            "engine_id": self.engine_id,
            "block_size": self.config.block_size,
            "hash_seed": self.config.hash_seed,
            "running": self.computing,
            "waiting": self.waiting,
            "kv_cache_usage": self.cache.usage,
            "num_gpu_blocks": self.config.num_gpu_blocks,
            "cached_block_hashes": [str(h) for h in self.cache.cached_hashes()],
            "held_transfers": len(self._held),
        }

    def prompt_hashes(self, token_ids: np.ndarray) -> list[int]:
        """Return the chained block hashes of a prompt, as this replica caches them."""
        return hash_blocks(token_ids, self.config.block_size, self.config.hash_seed)

    def draw_failure(self) -> str | None:
        """Return the failure type to inject into the next request, or None (seeded, so repeatable)."""
        if self.config.failure_rate <= 0:
            return None
        if self._rng.random() >= self.config.failure_rate:
            return None
        self.metrics.failures_injected += 1
        return self._rng.choice(self.config.failure_types)

    async def generate(self, request: SimRequest) -> AsyncIterator[str]:
        """Run `request` and yield each output piece when it is produced.

        Raises RequestTooLargeError when the request can never fit. Cancelling the
        consumer releases the request's blocks (a disconnected client frees its KV).
        """
        loop = asyncio.get_running_loop()
        request.arrival = loop.time()
        prompt_len = len(request.token_ids)
        max_tokens = 1 if request.kv_transfer and request.kv_transfer.do_remote_decode else request.max_tokens
        if request.output_pieces is not None:
            max_tokens = len(request.output_pieces)
        if prompt_len + max_tokens > self.config.max_model_len:
            raise RequestTooLargeError(
                f"prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds max_model_len {self.config.max_model_len}"
            )
        hashes = self.prompt_hashes(request.token_ids)
        total_blocks = -(-(prompt_len + max_tokens) // self.config.block_size)
        if total_blocks > self.config.num_gpu_blocks:
            raise RequestTooLargeError(f"request needs {total_blocks} KV blocks, the cache has {self.config.num_gpu_blocks}")

        allocation = await self._admit(request, hashes, total_blocks)
        keep_blocks = False
        try:
            start = loop.time()
            self.metrics.queue.observe(start - request.arrival)
            await self._prefill(request, allocation, hashes)
            request.first_token_time = loop.time()
            self.metrics.ttft.observe(request.first_token_time - request.arrival)
            pieces = request.output_pieces if request.output_pieces is not None else self._generated_pieces(request, max_tokens)

            previous = request.first_token_time
            for index, piece in enumerate(pieces):
                if index > 0:
                    delay = self.config.latency.inter_token_latency(self.computing, self.config.max_num_seqs)
                    if delay > 0:
                        await asyncio.sleep(delay)
                    now = loop.time()
                    self.metrics.itl.observe(now - previous)
                    previous = now
                request.num_output_tokens += 1
                self.metrics.generation_tokens += 1
                request.output_text.append(piece)
                yield piece

            request.finish_reason = "stop" if request.output_pieces is not None else "length"
            self.metrics.e2e.observe(loop.time() - request.arrival)
            self.metrics.requests_success += 1
            if request.kv_transfer and request.kv_transfer.do_remote_decode:
                keep_blocks = True
                request.kv_transfer_response = self._hold_for_transfer(request, allocation)
        finally:
            self.running -= 1
            if not keep_blocks:
                self.cache.free(allocation)
            self._admit_waiting()

    async def _admit(self, request: SimRequest, hashes: list[int], total_blocks: int) -> Allocation:
        """Wait for a batch slot and KV blocks, in arrival order."""
        if not self._waiting and self.running < self.config.max_num_seqs:
            allocation = self._allocate(request, hashes, total_blocks)
            if allocation is not None:
                self.running += 1
                return allocation
        future = asyncio.get_running_loop().create_future()
        entry = (request, total_blocks, future, hashes)
        self._waiting.append(entry)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # Admitted in the same loop turn the caller was cancelled: undo it.
                self.running -= 1
                self.cache.free(future.result())
                self._admit_waiting()
            else:
                self._waiting.remove(entry)
            raise

    def _allocate(self, request: SimRequest, hashes: list[int], total_blocks: int) -> Allocation | None:
        # vLLM recomputes at least the last prompt token, so a full hit is capped one block short.
        max_cached = (len(request.token_ids) - 1) // self.config.block_size
        allocation = self.cache.allocate(hashes, total_blocks, max_cached_blocks=max_cached)
        if allocation is not None and allocation.stored and self.publisher is not None:
            start = allocation.stored_start
            bs = self.config.block_size
            tokens = request.token_ids[start * bs : (start + len(allocation.stored)) * bs].tolist()
            parent = hashes[start - 1] if start > 0 else None
            self.publisher.block_stored(allocation.stored, parent, tokens)
        return allocation

    def _admit_waiting(self) -> None:
        while self._waiting and self.running < self.config.max_num_seqs:
            request, total_blocks, future, hashes = self._waiting[0]
            allocation = self._allocate(request, hashes, total_blocks)
            if allocation is None:
                break
            self._waiting.popleft()
            self.running += 1
            future.set_result(allocation)
        if self.publisher is not None:
            self.publisher.flush()

    async def _prefill(self, request: SimRequest, allocation: Allocation, hashes: list[int]) -> None:
        """Sleep for the prefill (or KV pull) of the uncached prompt tokens."""
        if self.publisher is not None:
            self.publisher.flush()
        loop = asyncio.get_running_loop()
        prompt_len = len(request.token_ids)
        cached = allocation.cached_blocks * self.config.block_size if self.config.enable_prefix_caching else 0
        request.cached_tokens = cached
        self.metrics.prompt_tokens += prompt_len
        self.metrics.prefix_queries += prompt_len
        self.metrics.prefix_hits += cached

        transfer = request.kv_transfer
        if transfer is not None and transfer.do_remote_prefill and transfer.remote_block_ids:
            remote_tokens = min(len(transfer.remote_block_ids) * self.config.block_size, prompt_len)
            transferred = max(remote_tokens - cached, 0)
            self.metrics.transferred_tokens += transferred
            duration = self.config.latency.transfer_time(transferred) + max(prompt_len - max(remote_tokens, cached), 0) * self.config.latency.prefill_per_token
            if duration > 0:
                await asyncio.sleep(duration)
            return

        duration = self.config.latency.prefill_time(prompt_len - cached)
        if self.config.latency.is_instant:
            return
        # Prefills share the accelerator: each starts when the previous one ends.
        # NOTE: a request cancelled while queued keeps its reserved slot of the lane, so
        # later prefills still wait for it (a real engine would reclaim that time).
        start = max(loop.time(), self._prefill_free_at)
        end = self._prefill_free_at = start + duration
        if start > loop.time():
            self.prefill_queued += 1
            try:
                await asyncio.sleep(start - loop.time())
            finally:
                self.prefill_queued -= 1
        await asyncio.sleep(end - loop.time())

    def _generated_pieces(self, request: SimRequest, count: int) -> list[str]:
        seed = request.seed if request.seed is not None else hash((self.config.seed, self._next_counter())) & 0xFFFFFFFF
        rng = random.Random(seed)
        return [rng.choice(_WORDS) for _ in range(count)]

    def _next_counter(self) -> int:
        self._request_counter += 1
        return self._request_counter

    def _hold_for_transfer(self, request: SimRequest, allocation: Allocation) -> KVTransferParams:
        """Keep a prefill's blocks for the decode engine and return the remote_* fields."""
        transfer_id = request.request_id or uuid.uuid4().hex
        timer = asyncio.get_running_loop().call_later(self.config.kv_hold_seconds, self.release_transfer, transfer_id)
        previous = self._held.pop(transfer_id, None)
        if previous is not None:
            previous[1].cancel()
            self.cache.free(previous[0])
        self._held[transfer_id] = (allocation, timer)
        return KVTransferParams(
            do_remote_prefill=True,
            remote_engine_id=self.engine_id,
            remote_block_ids=list(range(len(allocation.hashes))),
            remote_host=self.config.host,
            remote_port=self.config.port,
            tp_size=1,
            extra={"remote_request_id": transfer_id},
        )

    def release_transfer(self, transfer_id: str) -> bool:
        """Free blocks held for a decode engine; return False if none were held under that id."""
        held = self._held.pop(transfer_id, None)
        if held is None:
            return False
        allocation, timer = held
        timer.cancel()
        self.cache.free(allocation)
        self._admit_waiting()
        return True
