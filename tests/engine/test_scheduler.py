"""Scheduler planning: budgets, chunked prefill, admission, prefix hits and preemption.

The unit tests drive the scheduler directly and play the engine's part themselves: they
advance `num_computed_tokens` and append a token. The end-to-end test at the bottom checks
preemption on a real engine process.
"""

import concurrent.futures

import pytest
import requests

from llmisvc.engine.block_pool import BlockPool
from llmisvc.engine.scheduler import Scheduler, SchedulerConfig
from llmisvc.engine.sequence import EngineRequest, Sequence, SequenceStatus
from llmisvc.protocol.openai import SamplingOptions
from support import free_port, start, stop, wait_http

BLOCK = 4


def make_scheduler(num_blocks=64, max_num_seqs=8, budget=32, caching=True, remote=None, long_prefill=0):
    pool = BlockPool(num_blocks, BLOCK, enable_caching=caching)
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=1024,
        block_size=BLOCK,
        long_prefill_token_threshold=long_prefill,
    )
    return Scheduler(config, pool, remote_prefill=remote)


def make_seq(tokens, request_id="r", kv=None, prompt_logprobs=None) -> Sequence:
    request = EngineRequest(
        request_id, list(tokens), SamplingOptions(), max_tokens=100, kv_transfer_params=kv, prompt_logprobs=prompt_logprobs
    )
    return Sequence(request, 0, BLOCK, "")


def run_step(scheduler: Scheduler, next_token: int = 1):
    """Apply one plan as the engine would and return {request_id: tokens computed}."""
    plan = scheduler.schedule()
    done = {}
    for chunk in plan.chunks:
        seq = chunk.seq
        seq.num_computed_tokens += chunk.num_tokens
        scheduler.register_computed_blocks(seq)
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(next_token)
        done[seq.request_id] = chunk.num_tokens
    return plan, done


def test_budget_must_cover_one_token_per_sequence():
    with pytest.raises(ValueError):
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4, max_model_len=64, block_size=BLOCK)


def test_long_prompt_is_chunked():
    scheduler = make_scheduler(budget=8)
    seq = make_seq(range(20))
    scheduler.add(seq)
    chunks = [run_step(scheduler)[1]["r"] for _ in range(3)]
    assert chunks == [8, 8, 4]
    assert seq.num_output_tokens == 1


def test_decodes_run_while_a_long_prompt_prefills():
    scheduler = make_scheduler(budget=8)
    short = make_seq(range(3), "short")
    scheduler.add(short)
    run_step(scheduler)
    long = make_seq(range(100, 140), "long")
    scheduler.add(long)
    for _ in range(4):
        _, done = run_step(scheduler)
        assert done["short"] == 1
        assert done["long"] == 7
    assert long.in_prefill


def test_long_prefill_threshold_caps_chunks():
    scheduler = make_scheduler(budget=32, long_prefill=6)
    first = make_seq(range(20), "first")
    second = make_seq(range(50, 70), "second")
    scheduler.add(first)
    scheduler.add(second)
    _, done = run_step(scheduler)
    assert done == {"first": 6, "second": 6}


def test_admission_limited_by_max_num_seqs():
    scheduler = make_scheduler(max_num_seqs=2, budget=64)
    seqs = [make_seq(range(i, i + 5), f"r{i}") for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    _, done = run_step(scheduler)
    assert set(done) == {"r0", "r1"}
    assert seqs[2].status is SequenceStatus.WAITING


def test_admission_limited_by_free_blocks():
    scheduler = make_scheduler(num_blocks=4, budget=64)
    first = make_seq(range(12), "first")
    second = make_seq(range(50, 62), "second")
    scheduler.add(first)
    scheduler.add(second)
    _, done = run_step(scheduler)
    assert done == {"first": 12, "second": 4}
    assert scheduler.pool.num_free_blocks == 0


def test_prefix_hit_skips_cached_blocks():
    scheduler = make_scheduler()
    first = make_seq(range(10), "first")
    scheduler.add(first)
    run_step(scheduler)
    scheduler.remove(first)

    second = make_seq(list(range(10)) + [77, 78], "second")
    scheduler.add(second)
    plan, done = run_step(scheduler)
    assert second.num_cached_tokens == 8
    assert done["second"] == 4
    assert plan.new_prefix_queries == 12
    assert plan.new_prefix_hits == 8


def test_fully_cached_prompt_still_computes_last_token():
    scheduler = make_scheduler()
    first = make_seq(range(8), "first")
    scheduler.add(first)
    run_step(scheduler)
    scheduler.remove(first)

    again = make_seq(range(8), "again")
    scheduler.add(again)
    _, done = run_step(scheduler)
    assert again.num_cached_tokens == 4
    assert done["again"] == 4


def cache_prompt(scheduler: Scheduler, seq: Sequence) -> None:
    """Prefill `seq` in one step and remove it, leaving its full blocks in the prefix cache."""
    scheduler.add(seq)
    run_step(scheduler)
    scheduler.remove(seq)


def test_prompt_logprobs_skip_cache_reads():
    scheduler = make_scheduler()
    cache_prompt(scheduler, make_seq(range(10), "first"))

    scored = make_seq(range(10), "scored", prompt_logprobs=2)
    scheduler.add(scored)
    plan, done = run_step(scheduler)
    assert scored.num_cached_tokens == 0
    assert done["scored"] == 10
    # vLLM counts no prefix-cache query for a request that may not read the cache.
    assert plan.new_prefix_queries == 0
    assert plan.new_prefix_hits == 0


def test_prompt_logprobs_still_store_blocks():
    scheduler = make_scheduler()
    cache_prompt(scheduler, make_seq(range(50, 60), "scored", prompt_logprobs=1))

    plain = make_seq(range(50, 60), "plain")
    scheduler.add(plain)
    run_step(scheduler)
    assert plain.num_cached_tokens == 8


def test_preempted_scoring_reads_only_scored_blocks():
    scheduler = make_scheduler()
    cache_prompt(scheduler, make_seq(range(20), "owner"))

    # Preempted after its first chunk scored positions 0..8: blocks 0 and 1 may be read.
    scored = make_seq(range(20), "scored", prompt_logprobs=0)
    scored.admitted_once = True
    scored.num_prompt_logprobs = 9
    scheduler.add(scored)
    _, done = run_step(scheduler)
    assert scored.num_computed_tokens == 20
    assert done["scored"] == 12

    # Once every prompt token is scored, the cap no longer applies.
    scored.num_prompt_logprobs = 19
    assert not scored.prompt_logprobs_pending


def test_caching_disabled_computes_everything():
    scheduler = make_scheduler(caching=False)
    first = make_seq(range(10), "first")
    scheduler.add(first)
    run_step(scheduler)
    scheduler.remove(first)
    second = make_seq(range(10), "second")
    scheduler.add(second)
    _, done = run_step(scheduler)
    assert done["second"] == 10


def test_preemption_frees_blocks_and_requeues():
    scheduler = make_scheduler(num_blocks=4, budget=64)
    first = make_seq(range(8), "first")
    second = make_seq(range(20, 28), "second")
    scheduler.add(first)
    scheduler.add(second)
    run_step(scheduler)
    assert scheduler.pool.num_free_blocks == 0

    plan, done = run_step(scheduler)
    assert plan.preempted == [second]
    assert done == {"first": 1}
    assert second.status is SequenceStatus.WAITING
    assert second.num_computed_tokens == 0
    assert second.output_token_ids == [1]
    assert scheduler.waiting[0] is second
    assert scheduler.num_preemptions == 1


@pytest.mark.parametrize("caching, recomputed", [(False, 9), (True, 5)])
def test_preempted_sequence_recomputes_prompt_and_output(caching, recomputed):
    scheduler = make_scheduler(num_blocks=4, budget=64, caching=caching)
    first = make_seq(range(8), "first")
    second = make_seq(range(20, 28), "second")
    scheduler.add(first)
    scheduler.add(second)
    run_step(scheduler)
    run_step(scheduler)
    scheduler.remove(first)

    # Prompt (8) plus one generated token. With caching, the first prompt block is still
    # cached; the second was evicted when `first` took a block (tail blocks go first).
    _, done = run_step(scheduler)
    assert done == {"second": recomputed}
    assert second.output_token_ids == [1, 1]


def test_remote_prefill_takes_blocks_and_waits():
    scheduler = make_scheduler(remote=lambda seq: True)
    seq = make_seq(range(10), "remote", kv={"do_remote_prefill": True})
    scheduler.add(seq)
    plan = scheduler.schedule()
    assert plan.chunks == []
    assert plan.remote_pulls == [(seq, 0)]
    assert seq.status is SequenceStatus.WAITING_FOR_REMOTE_KVS
    assert len(seq.block_ids) == 3

    scheduler.remote_finished(seq, seq.num_prompt_tokens - 1)
    _, done = run_step(scheduler)
    assert done == {"remote": 1}


def test_remove_is_safe_for_any_state():
    scheduler = make_scheduler()
    seq = make_seq(range(5))
    scheduler.add(seq)
    scheduler.remove(seq)
    scheduler.remove(seq)
    assert scheduler.num_unfinished == 0
    assert scheduler.pool.num_free_blocks == 64


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def small_engine(tmp_path_factory):
    """An engine with room for about 20 blocks, so concurrent requests must preempt."""
    port = free_port()
    log = tmp_path_factory.mktemp("engine") / "engine.log"
    args = ["engine", "--port", str(port), "--served-model-name", "smol", "--threads", "2",
            "--num-gpu-blocks-override", "20", "--max-num-seqs", "4", "--dtype", "float32"]  # fmt: skip
    process = start(args, log)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=300, process=process)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


def complete(base: str, prompt: str) -> str:
    body = {"model": "smol", "prompt": prompt, "max_tokens": 100, "temperature": 0, "ignore_eos": True}
    response = requests.post(f"{base}/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def preemptions(base: str) -> float:
    for line in requests.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm:num_preemptions_total"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("vllm:num_preemptions_total missing")


@pytest.mark.e2e
def test_preemption_keeps_greedy_output(small_engine):
    prompts = [f"Write a long list of fruits, number {i}:" for i in range(4)]
    alone = [complete(small_engine, prompt) for prompt in prompts]
    assert preemptions(small_engine) == 0

    # Four sequences of about 112 tokens need 28 blocks of 16 together, more than the 20
    # the pool has, so some are preempted as they grow and recomputed later.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: complete(small_engine, p), prompts))
    assert preemptions(small_engine) > 0
    assert together == alone
