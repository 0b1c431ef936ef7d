"""The engine core: a background thread that steps the scheduler, the model runner and the sampler.

The asyncio server talks to the core only through thread-safe calls: `generate()` submits
requests and yields their outputs, `abort()` and `release_held()` may be called from any
thread. Everything else (scheduler, block pool, runner, sampler) is touched only by the
engine thread, so a step never blocks the event loop and no locks guard the core's state.
Two exceptions: `stats()` reads queue sizes and KV usage without a lock, and a KV pull
writes its own waiting request's rows of the runner's KV pool from an executor thread.
Commands reach the thread through an inbox that it drains before every step, which bounds
an abort's effect (blocks freed) to within one step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from llmisvc.engine.block_pool import BlockPool
from llmisvc.engine.metrics import EngineMetrics
from llmisvc.engine.model_runner import PromptLogprobsRequest, StepInput
from llmisvc.engine.sampler import PromptLogprobs, Sampler, SamplingRow
from llmisvc.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from llmisvc.engine.sequence import EngineRequest, FinishReason, Sequence, SequenceStatus
from llmisvc.engine.stop_checker import StopChecker
from llmisvc.protocol.errors import APIError, BadRequestError
from llmisvc.protocol.kv_transfer import KVTransferParams

logger = logging.getLogger(__name__)

# How long the idle engine thread sleeps between inbox checks while sequences wait on
# remote KV or on blocks held for other engines (seconds).
_BLOCKED_POLL_SECONDS = 0.01


@dataclass
class EngineConfig:
    """Core settings; the runner supplies block size, block count and context length."""

    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    long_prefill_token_threshold: int = 0
    enable_prefix_caching: bool = True
    prefix_caching_hash_seed: str = ""
    seed: int | None = None


@dataclass
class TokenLogprob:
    """Logprob of one generated token and its most likely alternatives as (token id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class SequenceDelta:
    """New output of one choice since its previous delta.

    `prompt_index` is the position of the prompt in the submitted list, `index` the choice
    within that prompt's `n`. `finish_reason` is set on the last delta of the choice.
    `prompt_logprobs` scores the prompt tokens after the first. It comes once, on the
    choice's first delta, when the request asked for prompt logprobs.
    """

    prompt_index: int
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None


@dataclass
class RequestOutput:
    """One batch of deltas for a `generate()` call, with running usage counts.

    `num_prompt_tokens` and `num_cached_tokens` are summed over the submitted prompts (each
    counted once, not once per choice). `kv_transfer_params` is set on the final output of a
    prefill whose blocks are held for a remote decode engine. `finished` marks the last output.
    """

    deltas: list[SequenceDelta]
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    finished: bool = False
    kv_transfer_params: dict[str, Any] | None = None


class EngineError(APIError):
    """The engine failed while serving a request (500)."""


@dataclass
class _Submission:
    """Engine-thread state of one `generate()` call (one or more prompts)."""

    requests: list[EngineRequest]
    out: asyncio.Queue
    seqs: list[Sequence] = field(default_factory=list)
    checkers: dict[int, StopChecker] = field(default_factory=dict)
    prompt_index: dict[int, int] = field(default_factory=dict)
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    # Prompt logprobs scored so far, per sequence, until its first delta carries them.
    prompt_logprobs: dict[str, PromptLogprobs] = field(default_factory=dict)
    pulls: dict[int, concurrent.futures.Future] = field(default_factory=dict)
    num_finished: int = 0
    kv_transfer_params: dict[str, Any] | None = None
    done: bool = False


class LLMEngine:
    """Continuous-batching engine over one `ModelRunner`.

    `metrics` and `kv_event_publisher` are optional; `connector` enables the prefill/decode
    KV-transfer paths (see `engine.kv_connector`). Call `start(loop)` once on the server's
    event loop, and `shutdown()` to stop the thread.
    """

    def __init__(
        self,
        runner: Any,
        config: EngineConfig,
        metrics: EngineMetrics | None = None,
        kv_event_publisher: Any = None,
        connector: Any = None,
    ):
        self.runner = runner
        self.config = config
        self.tokenizer = runner.tokenizer
        self.block_size = runner.block_size
        self.max_model_len = runner.max_model_len
        self.eos_token_ids = list(self.tokenizer.eos_token_ids)
        self.metrics = metrics
        self.connector = connector
        self._publisher = kv_event_publisher

        self.pool = BlockPool(
            runner.num_blocks,
            runner.block_size,
            enable_caching=config.enable_prefix_caching,
            record_events=kv_event_publisher is not None,
        )
        scheduler_config = SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            long_prefill_token_threshold=config.long_prefill_token_threshold,
            max_model_len=self.max_model_len,
            block_size=self.block_size,
        )
        self.scheduler = Scheduler(scheduler_config, self.pool, remote_prefill=self._takes_remote_prefill)
        self.sampler = Sampler(config.seed)

        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._submissions: dict[str, _Submission] = {}
        self._held: dict[str, list[Sequence]] = {}
        # (queue, output) pairs produced during a step, handed to the event loop after it.
        self._outbox: list[tuple[asyncio.Queue, RequestOutput | BaseException]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._last_preemptions = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the engine thread; outputs are delivered on `loop`."""
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="engine-core", daemon=True)
        self._thread.start()
        logger.info(
            "engine core started: %d blocks of %d tokens, max_num_seqs=%d, max_num_batched_tokens=%d, prefix caching %s",
            self.pool.num_blocks,
            self.block_size,
            self.config.max_num_seqs,
            self.config.max_num_batched_tokens,
            "on" if self.config.enable_prefix_caching else "off",
        )

    def shutdown(self) -> None:
        """Stop the engine thread after its current step; pending requests get no more output."""
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._publisher is not None:
            self._publisher.close()
        logger.info("engine core stopped")

    # ------------------------------------------------------------------ thread-safe API

    def resolve_max_tokens(self, num_prompt_tokens: int, max_tokens: int | None, param: str = "prompt") -> int:
        """Return the output cap for a prompt, capped to the context left after it.

        Raises BadRequestError naming both lengths when the prompt alone does not fit the
        context, and when it cannot fit the KV cache at all. A prompt that is only scored
        (`max_tokens` 0) may fill the whole context; any other needs room for one token.
        """
        if num_prompt_tokens == 0:
            raise BadRequestError("the prompt is empty", param=param)
        room = 0 if max_tokens == 0 else 1
        if num_prompt_tokens + room > self.max_model_len:
            raise BadRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                f"request has {num_prompt_tokens} input tokens. Please reduce the length of the input.",
                param=param,
            )
        capacity = self.pool.num_blocks * self.block_size
        if num_prompt_tokens + room > capacity:
            raise BadRequestError(
                f"the prompt has {num_prompt_tokens} tokens but the KV cache has room for {capacity} tokens; "
                "start the engine with a larger --kv-cache-memory",
                param=param,
            )
        left = self.max_model_len - num_prompt_tokens
        return left if max_tokens is None else min(max_tokens, left)

    async def generate(self, requests: list[EngineRequest]) -> AsyncIterator[RequestOutput]:
        """Run `requests` (one per prompt) and yield their outputs until all choices finish.

        Closing the iterator early, or cancelling the task that iterates it, aborts every
        unfinished choice and frees its blocks. Raises `EngineError` if the engine fails.
        """
        out: asyncio.Queue = asyncio.Queue()
        submission = _Submission(requests, out)
        request_ids = [request.request_id for request in requests]
        self._submit(lambda: self._add(submission))
        finished = False
        try:
            while True:
                item = await out.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                for request_id in request_ids:
                    self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks within one step; unknown or finished ids are ignored."""
        self._submit(lambda: self._abort(request_id))

    def release_held(self, request_id: str) -> None:
        """Free blocks held for a remote decode engine; idempotent, callable from any thread."""
        self._submit(lambda: self._release_held(request_id))

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn` on the engine thread between steps and return a future of its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller through the future
                future.set_exception(exc)

        self._submit(run)
        return future

    async def reset_prefix_cache(self) -> bool:
        """Forget every cached block hash; return False (and change nothing) while blocks are in use."""

        def reset() -> bool:
            done = self.pool.reset_prefix_cache()
            self._publish_events()
            return done

        return await asyncio.wrap_future(self.call(reset))

    def stats(self) -> dict[str, Any]:
        """Return a snapshot of queue sizes and KV usage (read without locking; approximate)."""
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting) + len(self.scheduler.remote_waiting),
            "kv_cache_usage": self.pool.usage(),
            "held_requests": len(self._held),
        }

    def _submit(self, command: Callable[[], None]) -> None:
        self._inbox.put(command)
        self._wakeup.set()

    # ------------------------------------------------------------------ engine thread

    @property
    def is_alive(self) -> bool:
        """True while the engine thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        # The engine thread never needs autograd; inference mode also lets the runner update
        # its inference tensors in place from any call (free_sequence, import_blocks).
        with torch.inference_mode():
            while not self._stopping:
                try:
                    self._drain_inbox()
                    stepped = self._step()
                    self._flush_outbox()
                    if not stepped:
                        self._wait_for_work()
                except Exception as exc:
                    logger.exception("engine step failed; failing all running requests")
                    self._fail_all(exc)
                    self._flush_outbox()

    def _wait_for_work(self) -> None:
        blocked = self.scheduler.num_unfinished > 0
        self._wakeup.wait(_BLOCKED_POLL_SECONDS if blocked else None)
        self._wakeup.clear()

    def _drain_inbox(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            command()

    def _add(self, submission: _Submission) -> None:
        for prompt_index, request in enumerate(submission.requests):
            self._submissions[request.request_id] = submission
            if self._declines_remote_prefill(request):
                self._free_remote_blocks(request)
            # NOTE: the n choices of a prompt are admitted together, so each computes the prompt
            # itself. Only later requests reuse those blocks through the prefix cache.
            for index in range(request.options.n):
                seq = Sequence(request, index, self.block_size, self.config.prefix_caching_hash_seed)
                submission.seqs.append(seq)
                submission.prompt_index[seq.seq_id] = prompt_index
                submission.checkers[seq.seq_id] = StopChecker(
                    self.tokenizer, request.options, request.max_tokens, self.eos_token_ids
                )
                if request.options.seed is not None:
                    # Choices of one seeded request differ from each other but repeat across runs.
                    submission.generators[seq.seq_id] = torch.Generator().manual_seed(request.options.seed + index)
                if request.prompt_logprobs is not None:
                    # NOTE: each of the n choices scores the prompt again, because each prefills it.
                    submission.prompt_logprobs[seq.seq_id] = PromptLogprobs()
                self.scheduler.add(seq)
        logger.debug("added %s", [r.request_id for r in submission.requests])

    def _step(self) -> bool:
        """Run one scheduled step; return False when there was nothing to compute."""
        plan = self.scheduler.schedule()
        self._after_schedule(plan)
        if not plan.chunks:
            self._update_gauges()
            return False

        now = time.monotonic()
        inputs = []
        for chunk in plan.chunks:
            seq = chunk.seq
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
                if self.metrics is not None and seq.index == 0:
                    self.metrics.queue_time.observe(now - seq.arrival_time)
            start = seq.num_computed_tokens
            end = start + chunk.num_tokens
            scored = self._prompt_rows_to_score(seq, end)
            inputs.append(StepInput(seq.seq_id, seq.token_ids[start:end], start, seq.block_ids, scored))
        step = self.runner.execute_step(inputs)

        sample_rows = []
        prompt_only = []
        for row, chunk in enumerate(plan.chunks):
            seq = chunk.seq
            scored = step.prompt_logprobs.get(seq.seq_id)
            if scored is not None:
                self._submissions[seq.request_id].prompt_logprobs[seq.seq_id].extend(scored)
                seq.num_prompt_logprobs += len(scored)
            seq.num_computed_tokens += chunk.num_tokens
            self.scheduler.register_computed_blocks(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                if seq.request.max_tokens == 0:
                    prompt_only.append(seq)
                else:
                    sample_rows.append(row)
        if sample_rows:
            self._sample_and_emit(step.logits, [plan.chunks[row].seq for row in sample_rows], sample_rows)
        if prompt_only:
            self._finish_prompt_only(prompt_only)

        self._publish_events()
        self._update_gauges()
        return True

    def _prompt_rows_to_score(self, seq: Sequence, end: int) -> PromptLogprobsRequest | None:
        """Return the prompt positions before `end` whose next-token logprobs `seq` still needs.

        The rows start at `seq.num_prompt_logprobs`, which is never before the chunk's start:
        the scheduler reads cached blocks only up to that position, and requests with prompt
        logprobs never take imported KV.
        """
        if not seq.prompt_logprobs_pending:
            return None
        first = seq.num_prompt_logprobs
        stop = min(end, seq.num_prompt_tokens - 1)
        if stop <= first:
            return None
        return PromptLogprobsRequest(first, seq.token_ids[first + 1 : stop + 1], seq.request.prompt_logprobs)

    def _after_schedule(self, plan: SchedulerOutput) -> None:
        for seq in plan.preempted:
            self.runner.free_sequence(seq.seq_id)
        for seq, first_uncached in plan.remote_pulls:
            self._start_pull(seq, first_uncached)
        if self.metrics is not None:
            if plan.new_prefix_queries:
                self.metrics.prefix_queries.inc(plan.new_prefix_queries)
                self.metrics.prefix_hits.inc(plan.new_prefix_hits)
            preemptions = self.scheduler.num_preemptions
            if preemptions != self._last_preemptions:
                self.metrics.preemptions.inc(preemptions - self._last_preemptions)
                self._last_preemptions = preemptions

    def _sample_and_emit(self, logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
        sampled_rows = []
        for seq in seqs:
            submission = self._submissions[seq.request_id]
            sampled_rows.append(
                SamplingRow(
                    options=seq.options,
                    token_ids=seq.token_ids,
                    num_prompt_tokens=seq.num_prompt_tokens,
                    generator=submission.generators.get(seq.seq_id),
                    eos_token_ids=self.eos_token_ids,
                )
            )
        selected = logits if len(rows) == logits.shape[0] else logits[torch.tensor(rows)]
        result = self.sampler.sample(selected, sampled_rows)

        now = time.monotonic()
        deltas: list[tuple[_Submission, SequenceDelta]] = []
        for i, seq in enumerate(seqs):
            token_id = result.token_ids[i]
            seq.token_ids.append(token_id)
            self._record_token_timing(seq, now)
            submission = self._submissions[seq.request_id]
            stop = submission.checkers[seq.seq_id].add_token(token_id)
            logprobs = None
            if result.logprobs is not None and seq.options.logprobs is not None:
                top = list(zip(result.top_ids[i], result.top_logprobs[i]))
                logprobs = [TokenLogprob(token_id, result.logprobs[i], top)]
            delta = SequenceDelta(
                submission.prompt_index[seq.seq_id],
                seq.index,
                stop.text,
                [token_id],
                logprobs,
                prompt_logprobs=submission.prompt_logprobs.pop(seq.seq_id, None),
            )
            if stop.finish_reason is not None:
                delta.finish_reason = stop.finish_reason.value
                delta.stop_reason = stop.stop_reason
                self._finish(seq, stop.finish_reason, stop.stop_reason, submission)
            deltas.append((submission, delta))

        if self.metrics is not None:
            self.metrics.generation_tokens.inc(len(seqs))
        self._emit_by_submission(deltas)

    def _finish_prompt_only(self, seqs: list[Sequence]) -> None:
        """End sequences with `max_tokens` 0 once their prompt is computed, without sampling.

        Each gets one final delta with no tokens, its prompt logprobs and finish reason
        "length", which vLLM also reports for an echo with `max_tokens` 0.
        """
        deltas: list[tuple[_Submission, SequenceDelta]] = []
        for seq in seqs:
            submission = self._submissions[seq.request_id]
            delta = SequenceDelta(
                submission.prompt_index[seq.seq_id],
                seq.index,
                "",
                [],
                [] if seq.options.logprobs is not None else None,
                finish_reason=FinishReason.LENGTH.value,
                prompt_logprobs=submission.prompt_logprobs.pop(seq.seq_id, None),
            )
            if self.metrics is not None and seq.index == 0:
                # Otherwise counted at the first output token, which these never produce.
                self.metrics.prompt_tokens.inc(seq.num_prompt_tokens)
            self._finish(seq, FinishReason.LENGTH, None, submission)
            deltas.append((submission, delta))
        self._emit_by_submission(deltas)

    def _emit_by_submission(self, deltas: list[tuple[_Submission, SequenceDelta]]) -> None:
        """Emit one output per submission with its deltas, in order."""
        grouped: dict[int, tuple[_Submission, list[SequenceDelta]]] = {}
        for submission, delta in deltas:
            grouped.setdefault(id(submission), (submission, []))[1].append(delta)
        for submission, group in grouped.values():
            self._emit(submission, group)

    def _record_token_timing(self, seq: Sequence, now: float) -> None:
        if seq.first_token_time is None:
            seq.first_token_time = now
            if self.metrics is not None and seq.index == 0:
                self.metrics.ttft.observe(now - seq.arrival_time)
                self.metrics.prompt_tokens.inc(seq.num_prompt_tokens)
        elif self.metrics is not None:
            self.metrics.itl.observe(now - seq.last_token_time)
        seq.last_token_time = now

    def _finish(
        self, seq: Sequence, reason: FinishReason, stop_reason: int | str | None, submission: _Submission
    ) -> None:
        """End a sequence: free or hold its blocks and account for it in the submission."""
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self.runner.free_sequence(seq.seq_id)
        if reason is FinishReason.LENGTH and self._wants_remote_decode(seq):
            params = self.connector.hold(seq.request_id, list(seq.block_ids), seq.num_computed_tokens)
            if params is not None:
                seq.hold_blocks = True
                self._held.setdefault(seq.request_id, []).append(seq)
                submission.kv_transfer_params = params
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        submission.num_finished += 1
        if self.metrics is not None:
            label = reason.value if reason.value in self.metrics.request_success else "abort"
            self.metrics.request_success[label].inc()
            self.metrics.e2e.observe(time.monotonic() - seq.arrival_time)
            self.metrics.generation_tokens_per_request.observe(seq.num_output_tokens)
            if seq.index == 0:
                self.metrics.prompt_tokens_per_request.observe(seq.num_prompt_tokens)

    def _emit(self, submission: _Submission, deltas: list[SequenceDelta]) -> None:
        finished = submission.num_finished == len(submission.seqs)
        prompt_tokens = sum(len(r.prompt_token_ids) for r in submission.requests)
        cached = sum(seq.num_cached_tokens for seq in submission.seqs if seq.index == 0)
        produced = sum(seq.num_output_tokens for seq in submission.seqs)
        output = RequestOutput(
            deltas,
            prompt_tokens,
            cached,
            produced,
            finished=finished,
            kv_transfer_params=submission.kv_transfer_params if finished else None,
        )
        if finished:
            self._forget(submission)
        self._deliver(submission, output)

    def _deliver(self, submission: _Submission, item: RequestOutput | BaseException) -> None:
        self._outbox.append((submission.out, item))

    def _flush_outbox(self) -> None:
        """Hand this step's outputs to the event loop in one wake-up instead of one per request."""
        if not self._outbox:
            return
        items, self._outbox = self._outbox, []
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_put_all, items)

    def _forget(self, submission: _Submission) -> None:
        submission.done = True
        for request in submission.requests:
            self._submissions.pop(request.request_id, None)

    # ------------------------------------------------------------------ aborts and KV transfer

    def _abort(self, request_id: str) -> None:
        submission = self._submissions.get(request_id)
        if submission is None:
            return
        for seq in submission.seqs:
            if seq.request_id != request_id or seq.is_finished:
                continue
            pull = submission.pulls.get(seq.seq_id)
            if seq.status is SequenceStatus.WAITING_FOR_REMOTE_KVS and pull is not None:
                # The pull may still write into these blocks; `_pull_done` frees them once it stops.
                pull.cancel()
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = FinishReason.ABORT
                submission.num_finished += 1
                continue
            self._finish(seq, FinishReason.ABORT, None, submission)
        logger.info("request %s aborted", request_id)
        if submission.num_finished == len(submission.seqs) and not submission.done:
            # The client is usually gone. The final output only unblocks a reader still waiting.
            self._emit(submission, [])
        self._update_gauges()

    def _release_held(self, request_id: str) -> None:
        for seq in self._held.pop(request_id, []):
            seq.hold_blocks = False
            self.scheduler.release_blocks(seq)
        self._update_gauges()

    def _offers_remote_kv(self, request: EngineRequest) -> bool:
        params = request.kv_transfer_params
        return self.connector is not None and bool(params and params.get("do_remote_prefill"))

    def _takes_remote_prefill(self, seq: Sequence) -> bool:
        return self._offers_remote_kv(seq.request) and seq.request.prompt_logprobs is None

    def _declines_remote_prefill(self, request: EngineRequest) -> bool:
        """True for a request that offers remote KV but needs prompt logprobs.

        Imported KV comes without the logits of the prompt positions, so such a request is
        prefilled here instead, and the response is the one a request without KV transfer
        would get.
        """
        return self._offers_remote_kv(request) and request.prompt_logprobs is not None

    def _free_remote_blocks(self, request: EngineRequest) -> None:
        """Tell the prefill engine to free the blocks a declined remote prefill holds."""
        logger.info(
            "request %s: prompt logprobs need logits at every prompt position, so the prompt is "
            "prefilled locally and the remote KV cache is not read",
            request.request_id,
        )
        coroutine = self._notify_remote_free(request.request_id, request.kv_transfer_params)
        asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    async def _notify_remote_free(self, request_id: str, raw_params: dict[str, Any]) -> None:
        try:
            params = KVTransferParams.from_json(raw_params)
            remote = list(params.remote_block_ids)
            # With first_uncached_block at the end, nothing is read or written, and
            # NixlConnector.pull sends the free notification whether it succeeds or not. The
            # block ids are placeholders of the expected length.
            await self.connector.pull(params, remote, len(remote))
        except Exception as exc:  # the prefill engine's lease frees the blocks anyway
            logger.warning("request %s: freeing the declined remote KV blocks failed: %s", request_id, exc)

    def _wants_remote_decode(self, seq: Sequence) -> bool:
        params = seq.request.kv_transfer_params
        return self.connector is not None and bool(params and params.get("do_remote_decode"))

    def _start_pull(self, seq: Sequence, first_uncached_block: int) -> None:
        submission = self._submissions[seq.request_id]
        params = KVTransferParams.from_json(seq.request.kv_transfer_params)
        block_ids = list(seq.block_ids)
        coroutine = self._pull(seq, params, block_ids, first_uncached_block)
        submission.pulls[seq.seq_id] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    async def _pull(self, seq: Sequence, params: KVTransferParams, block_ids: list[int], first: int) -> None:
        error: BaseException | None = None
        try:
            await self.connector.pull(params, block_ids, first)
        except asyncio.CancelledError as exc:
            error = exc
        except Exception as exc:  # any transport failure follows kv_load_failure_policy
            error = exc
        self._submit(lambda: self._pull_done(seq, error))
        if isinstance(error, asyncio.CancelledError):
            raise error

    def _pull_done(self, seq: Sequence, error: BaseException | None) -> None:
        submission = self._submissions.get(seq.request_id)
        if submission is not None:
            submission.pulls.pop(seq.seq_id, None)
        if seq.is_finished or submission is None:
            # Aborted while pulling: the blocks are safe to free only now.
            self.scheduler.remove(seq)
            self._update_gauges()
            return
        if error is None:
            self.scheduler.remote_finished(seq, seq.num_prompt_tokens - 1)
            return
        policy = getattr(self.connector.config, "kv_load_failure_policy", "recompute")
        logger.warning("request %s: pulling remote KV failed (%s); policy %s", seq.request_id, error, policy)
        if policy == "fail":
            self.scheduler.remove(seq)
            seq.status = SequenceStatus.FINISHED
            submission.num_finished += 1
            self._forget(submission)
            self._abort_submission(submission, EngineError(f"loading remote KV cache failed: {error}"))
            return
        self.scheduler.remote_finished(seq, seq.num_cached_tokens)

    def _abort_submission(self, submission: _Submission, error: BaseException) -> None:
        for seq in submission.seqs:
            if not seq.is_finished:
                self._finish(seq, FinishReason.ABORT, None, submission)
        self._forget(submission)
        self._deliver(submission, error)

    def _fail_all(self, exc: Exception) -> None:
        error = EngineError(f"engine step failed: {exc}")
        for submission in list({id(s): s for s in self._submissions.values()}.values()):
            for seq in submission.seqs:
                if not seq.is_finished:
                    seq.finish_reason = FinishReason.ERROR
                    try:
                        self.runner.free_sequence(seq.seq_id)
                    except Exception:
                        logger.exception("freeing sequence %s after a failed step failed", seq.seq_id)
                    self.scheduler.remove(seq)
                    seq.status = SequenceStatus.FINISHED
            self._forget(submission)
            self._deliver(submission, error)

    # ------------------------------------------------------------------ observability

    def _publish_events(self) -> None:
        if self._publisher is not None:
            self._publisher.publish(self.pool.take_events())

    def _update_gauges(self) -> None:
        if self.metrics is None:
            return
        self.metrics.running.set(len(self.scheduler.running))
        self.metrics.waiting.set(len(self.scheduler.waiting) + len(self.scheduler.remote_waiting))
        self.metrics.kv_usage.set(self.pool.usage())


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for out, item in items:
        out.put_nowait(item)
