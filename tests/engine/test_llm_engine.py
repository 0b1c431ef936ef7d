"""The engine core in process, on a small random Llama in float32: prompt logprobs across
preemption, prompt-only requests and remote KV that prompt logprobs cannot use.

Each test runs its own `LLMEngine` thread on an asyncio loop and compares prompt logprobs
with one forward step of the runner, which agree to float32 rounding.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
import torch

from llmisvc.engine.llm_engine import EngineConfig, LLMEngine
from llmisvc.engine.model_runner import ModelRunner, PromptLogprobsRequest, StepInput
from llmisvc.engine.sequence import EngineRequest
from llmisvc.protocol.errors import BadRequestError
from llmisvc.protocol.openai import SamplingOptions
from tiny_checkpoints import write_checkpoint

BLOCK = 16
ATOL = 1e-5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("models") / "tiny-llama", "LlamaForCausalLM", seed=5)


def _runner(checkpoint, num_blocks: int) -> ModelRunner:
    return ModelRunner(str(checkpoint), dtype="float32", block_size=BLOCK, num_blocks=num_blocks, threads=1)


def _tokens(count: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 400, (count,), generator=generator).tolist()


def _request(request_id: str, tokens: list[int], max_tokens: int, **fields) -> EngineRequest:
    options = SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return EngineRequest(request_id, tokens, options, max_tokens, **fields)


def _one_step_logprobs(runner: ModelRunner, tokens: list[int], top_k: int):
    table = list(range(-(-len(tokens) // BLOCK)))
    request = PromptLogprobsRequest(0, tokens[1:], top_k)
    output = runner.execute_step([StepInput("reference", tokens, 0, table, request)])
    runner.free_sequence("reference")
    return output.prompt_logprobs["reference"]


async def _run(engine: LLMEngine, *submissions: list[EngineRequest]) -> list[list]:
    """Run each submission through `generate` concurrently; return each one's deltas."""
    engine.start(asyncio.get_running_loop())

    async def collect(requests: list[EngineRequest]) -> list:
        return [delta async for output in engine.generate(requests) for delta in output.deltas]

    try:
        return await asyncio.gather(*(collect(requests) for requests in submissions))
    finally:
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)


def test_preempted_prefill_scores_each_token_once(checkpoint):
    # Five blocks: the decoding request needs its second block while the scored prompt
    # holds the other four, so the scored prompt is preempted before its prefill ends.
    engine = LLMEngine(_runner(checkpoint, num_blocks=5), EngineConfig(max_num_seqs=4, max_num_batched_tokens=8))
    preempted: list[tuple[str, int]] = []
    preempt = engine.scheduler._preempt

    def record(seq, output):
        preempted.append((seq.request_id, seq.num_prompt_logprobs))
        preempt(seq, output)

    engine.scheduler._preempt = record
    decoding = _request("decoding", _tokens(8, seed=1), max_tokens=40)
    scored_tokens = _tokens(64, seed=2)
    scored = _request("scored", scored_tokens, max_tokens=2, prompt_logprobs=3)

    decoding_deltas, scored_deltas = asyncio.run(_run(engine, [decoding], [scored]))

    partial = [count for request_id, count in preempted if request_id == "scored"]
    assert partial, f"the scored prompt was never preempted: {preempted}"
    assert 0 < partial[0] < len(scored_tokens) - 1
    carrying = [delta for delta in scored_deltas if delta.prompt_logprobs is not None]
    assert len(carrying) == 1
    assert carrying[0] is scored_deltas[0]
    assert sum(len(delta.token_ids) for delta in scored_deltas) == 2
    assert sum(len(delta.token_ids) for delta in decoding_deltas) == 40

    expected = _one_step_logprobs(_runner(checkpoint, num_blocks=8), scored_tokens, top_k=3)
    got = carrying[0].prompt_logprobs
    assert len(got) == len(scored_tokens) - 1
    assert got.logprobs == pytest.approx(expected.logprobs, abs=ATOL)
    assert got.ranks == expected.ranks
    assert got.top_ids == expected.top_ids


def test_zero_max_tokens_finishes_after_prompt(checkpoint):
    runner = _runner(checkpoint, num_blocks=16)
    engine = LLMEngine(runner, EngineConfig(max_num_seqs=4, max_num_batched_tokens=16))
    tokens = _tokens(40, seed=3)
    (deltas,) = asyncio.run(_run(engine, [_request("prompt-only", tokens, max_tokens=0, prompt_logprobs=0)]))

    assert len(deltas) == 1
    assert deltas[0].token_ids == []
    assert deltas[0].text == ""
    assert deltas[0].finish_reason == "length"
    assert len(deltas[0].prompt_logprobs) == len(tokens) - 1
    assert all(ids == [] for ids in deltas[0].prompt_logprobs.top_ids)
    assert engine.pool.usage() == 0


@dataclass
class _RecordingConnector:
    """A KV connector that performs no transfer and records the pulls it is asked for."""

    pulls: list[tuple[list[int], int]] = field(default_factory=list)
    config: object = None

    async def pull(self, params, block_ids, first_uncached_block) -> None:
        self.pulls.append((list(block_ids), first_uncached_block))

    def hold(self, request_id, block_ids, num_tokens):
        return None


def test_remote_kv_declined_for_prompt_logprobs(checkpoint):
    runner = _runner(checkpoint, num_blocks=16)
    connector = _RecordingConnector()
    engine = LLMEngine(runner, EngineConfig(max_num_seqs=4, max_num_batched_tokens=64), connector=connector)
    tokens = _tokens(40, seed=4)
    remote = {"do_remote_prefill": True, "remote_block_ids": [7, 8, 9], "remote_host": "127.0.0.1", "remote_port": 1}
    request = _request("declined", tokens, max_tokens=1, kv_transfer_params=remote, prompt_logprobs=1)
    (deltas,) = asyncio.run(_run(engine, [request]))

    # The prompt was prefilled here, and the only pull sent the prefill engine a free notification.
    assert connector.pulls == [([7, 8, 9], 3)]
    expected = _one_step_logprobs(runner, tokens, top_k=1)
    assert deltas[0].prompt_logprobs.logprobs == pytest.approx(expected.logprobs, abs=ATOL)


def test_scored_prompt_may_fill_context(checkpoint):
    runner = ModelRunner(str(checkpoint), dtype="float32", block_size=BLOCK, num_blocks=16, max_model_len=48, threads=1)
    engine = LLMEngine(runner, EngineConfig(max_num_seqs=4, max_num_batched_tokens=16))
    assert engine.resolve_max_tokens(48, 0) == 0
    assert engine.resolve_max_tokens(47, None) == 1
    for max_tokens in (None, 1):
        with pytest.raises(BadRequestError, match="48"):
            engine.resolve_max_tokens(48, max_tokens)

    tokens = _tokens(48, seed=4)
    (deltas,) = asyncio.run(_run(engine, [_request("full", tokens, max_tokens=0, prompt_logprobs=1)]))
    assert deltas[0].finish_reason == "length"
    assert deltas[0].token_ids == []
    assert len(deltas[0].prompt_logprobs) == 47
