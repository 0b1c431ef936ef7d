"""ModelRunner step semantics: chunking, batching, prefix blocks, KV transfer, slot reuse,
prompt logprobs.

Most checks run a small random Llama checkpoint in float32 and compare logits of different
ways of computing the same positions (chunked vs whole prompt, batched vs alone, from pool
blocks vs computed), which must agree to rounding. One test runs the embedded model in
bfloat16 end to end.
"""

from __future__ import annotations

import pytest
import torch

from llmisvc.engine import model_runner
from llmisvc.engine.kv_cache import KVLayout
from llmisvc.engine.model_runner import ModelRunner, PromptLogprobsRequest, StepInput
from tiny_checkpoints import write_checkpoint

BLOCK = 16
ATOL = 1e-5


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> ModelRunner:
    directory = write_checkpoint(tmp_path_factory.mktemp("models") / "tiny-llama", "LlamaForCausalLM", seed=3)
    return ModelRunner(str(directory), dtype="float32", block_size=BLOCK, num_blocks=512, threads=1)


def _tokens(count: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 400, (count,), generator=generator).tolist()


def _blocks(first: int, positions: int) -> list[int]:
    return list(range(first, first + -(-positions // BLOCK)))


def _prefill_logits(runner: ModelRunner, seq_id: str, tokens: list[int], first_block: int) -> torch.Tensor:
    """Return the last-token logits of `tokens` computed in one step by a fresh sequence."""
    logits = runner.execute([StepInput(seq_id, tokens, 0, _blocks(first_block, len(tokens)))])[0]
    runner.free_sequence(seq_id)
    return logits


def test_chunked_prefill_matches_whole_prompt(runner):
    tokens = _tokens(70, seed=1)
    expected = _prefill_logits(runner, "whole", tokens, first_block=0)
    table = _blocks(10, len(tokens))
    runner.execute([StepInput("chunked", tokens[:5], 0, table)])
    runner.execute([StepInput("chunked", tokens[5:37], 5, table)])
    got = runner.execute([StepInput("chunked", tokens[37:], 37, table)])[0]
    runner.free_sequence("chunked")
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


def test_batched_decode_matches_each_alone(runner):
    prompts = [_tokens(length, seed=10 + length) for length in (3, 17, 40)]
    expected = [_prefill_logits(runner, f"alone-{i}", prompt, first_block=0) for i, prompt in enumerate(prompts)]

    tables = [_blocks(100 + 10 * i, len(prompt)) for i, prompt in enumerate(prompts)]
    runner.execute([StepInput(f"batch-{i}", prompt[:-1], 0, tables[i]) for i, prompt in enumerate(prompts)])
    got = runner.execute([StepInput(f"batch-{i}", prompt[-1:], len(prompt) - 1, tables[i]) for i, prompt in enumerate(prompts)])
    for i in range(len(prompts)):
        runner.free_sequence(f"batch-{i}")
        torch.testing.assert_close(got[i], expected[i], rtol=0, atol=ATOL, msg=f"sequence {i}")


def test_mixed_prefill_and_decode_step(runner):
    running = _tokens(20, seed=2)
    arriving = _tokens(33, seed=3)
    expected_running = _prefill_logits(runner, "ref-running", running, first_block=0)
    expected_arriving = _prefill_logits(runner, "ref-arriving", arriving, first_block=0)

    runner.execute([StepInput("running", running[:-1], 0, _blocks(200, 20))])
    # Entries come in any order: a prefill chunk first, then a decode.
    got = runner.execute(
        [StepInput("arriving", arriving, 0, _blocks(210, 33)), StepInput("running", running[-1:], 19, _blocks(200, 20))]
    )
    runner.free_sequence("running")
    runner.free_sequence("arriving")
    torch.testing.assert_close(got[0], expected_arriving, rtol=0, atol=ATOL)
    torch.testing.assert_close(got[1], expected_running, rtol=0, atol=ATOL)


def test_prefix_blocks_are_read_from_pool(runner):
    tokens = _tokens(45, seed=4)
    expected = _prefill_logits(runner, "owner", tokens, first_block=300)  # fills blocks 300, 301, 302
    # A new sequence whose first two blocks are cache hits on the owner's blocks 300 and 301.
    got = runner.execute([StepInput("sharer", tokens[32:], 32, [300, 301, 320])])[0]
    runner.free_sequence("sharer")
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


def test_exported_blocks_resume_in_new_blocks(runner):
    tokens = _tokens(40, seed=5)
    expected = _prefill_logits(runner, "prefill-side", tokens[:-1] + tokens[-1:], first_block=340)
    # free_sequence wrote the partial third block too, so all 39 computed positions travel.
    runner.execute([StepInput("prefill-side-2", tokens[:-1], 0, [340, 341, 342])])
    runner.free_sequence("prefill-side-2")
    blocks = runner.export_blocks([340, 341, 342])
    assert blocks.shape == (3, runner.config.num_layers, 2, BLOCK, runner.config.num_kv_heads, runner.config.head_dim)

    runner.import_blocks([350, 351, 352], blocks)
    got = runner.execute([StepInput("decode-side", tokens[-1:], 39, [350, 351, 352])])[0]
    runner.free_sequence("decode-side")
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


def test_import_rejects_wrong_shape(runner):
    with pytest.raises(ValueError, match="expected"):
        runner.import_blocks([1], torch.zeros(1, 2, 3))


def test_freeing_middle_sequence_keeps_others(runner):
    prompts = [_tokens(10 + 7 * i, seed=20 + i) for i in range(3)]
    expected = [_prefill_logits(runner, f"solo-{i}", prompt, first_block=0) for i, prompt in enumerate(prompts)]
    tables = [_blocks(400 + 5 * i, len(prompt)) for i, prompt in enumerate(prompts)]
    runner.execute([StepInput(f"seq-{i}", prompt[:-2], 0, tables[i]) for i, prompt in enumerate(prompts)])
    runner.free_sequence("seq-1")  # the last slot moves into the freed one

    for i in (0, 2):
        runner.execute([StepInput(f"seq-{i}", prompts[i][-2:-1], len(prompts[i]) - 2, tables[i])])
    got = runner.execute([StepInput(f"seq-{i}", prompts[i][-1:], len(prompts[i]) - 1, tables[i]) for i in (2, 0)])
    runner.free_sequence("seq-0")
    runner.free_sequence("seq-2")
    torch.testing.assert_close(got[0], expected[2], rtol=0, atol=ATOL)
    torch.testing.assert_close(got[1], expected[0], rtol=0, atol=ATOL)


def test_decode_subset_of_running_sequences(runner):
    # Decoding slots 0 and 2 without slot 1 takes the gather path instead of a view.
    prompts = [_tokens(12, seed=30 + i) for i in range(3)]
    expected = [_prefill_logits(runner, f"single-{i}", prompt, first_block=0) for i, prompt in enumerate(prompts)]
    tables = [_blocks(420 + 2 * i, 12) for i in range(3)]
    runner.execute([StepInput(f"part-{i}", prompt[:-1], 0, tables[i]) for i, prompt in enumerate(prompts)])
    got = runner.execute([StepInput(f"part-{i}", prompts[i][-1:], 11, tables[i]) for i in (0, 2)])
    for i in range(3):
        runner.free_sequence(f"part-{i}")
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=ATOL)
    torch.testing.assert_close(got[1], expected[2], rtol=0, atol=ATOL)


def test_decode_past_initial_capacity(runner):
    # 300 positions exceed the working buffer's first allocation, so it grows mid-sequence.
    tokens = _tokens(300, seed=6)
    expected = _prefill_logits(runner, "long-whole", tokens, first_block=0)
    table = _blocks(0, 300)
    runner.execute([StepInput("long-steps", tokens[:250], 0, table)])
    logits = None
    for position in range(250, 300):
        logits = runner.execute([StepInput("long-steps", [tokens[position]], position, table)])[0]
    runner.free_sequence("long-steps")
    torch.testing.assert_close(logits, expected, rtol=0, atol=ATOL)


def test_rewind_recomputes_from_start_pos(runner):
    tokens = _tokens(30, seed=7)
    other = _tokens(30, seed=8)
    expected = _prefill_logits(runner, "rewind-ref", tokens, first_block=0)
    table = _blocks(0, 30)
    runner.execute([StepInput("rewind", tokens[:20] + other[20:], 0, table)])
    got = runner.execute([StepInput("rewind", tokens[20:], 20, table)])[0]
    runner.free_sequence("rewind")
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


def test_logits_are_writable_float32(runner):
    logits = runner.execute([StepInput("writable", [5, 6, 7], 0, [0])])
    runner.free_sequence("writable")
    assert logits.dtype == torch.float32
    assert logits.shape == (1, runner.config.vocab_size)
    logits[0, 0] = float("-inf")  # samplers edit logits in place


def _scored_one_step(runner: ModelRunner, seq_id: str, tokens: list[int], top_k: int):
    """Return the prompt logprobs of `tokens` computed in one step by a fresh sequence."""
    request = PromptLogprobsRequest(0, tokens[1:], top_k)
    output = runner.execute_step([StepInput(seq_id, tokens, 0, _blocks(0, len(tokens)), request)])
    runner.free_sequence(seq_id)
    return output


def test_prompt_logprobs_match_last_row_logits(runner):
    tokens = _tokens(24, seed=40)
    output = _scored_one_step(runner, "scored", tokens, top_k=4)
    scored = output.prompt_logprobs["scored"]
    assert len(scored) == len(tokens) - 1

    # Reference: the ordinary last-row logits of every prefix, each computed on its own.
    for position in range(1, len(tokens)):
        reference = torch.log_softmax(_prefill_logits(runner, "prefix", tokens[:position], first_block=100), dim=-1)
        entry = position - 1
        expected = reference[tokens[position]].item()
        assert scored.logprobs[entry] == pytest.approx(expected, abs=ATOL), f"position {position}"
        assert scored.ranks[entry] == int((reference >= reference[tokens[position]]).sum())
        top_values, top_ids = reference.topk(4)
        assert scored.top_ids[entry] == top_ids.tolist()
        assert scored.top_logprobs[entry] == pytest.approx(top_values.tolist(), abs=ATOL)


def test_prompt_logprobs_leave_logits_unchanged(runner):
    tokens = _tokens(30, seed=41)
    expected = _prefill_logits(runner, "plain", tokens, first_block=0)
    output = _scored_one_step(runner, "scored-logits", tokens, top_k=2)
    torch.testing.assert_close(output.logits[0], expected, rtol=0, atol=ATOL)


def test_chunked_prompt_logprobs_match_one_step(runner):
    tokens = _tokens(70, seed=42)
    whole = _scored_one_step(runner, "whole-scored", tokens, top_k=3).prompt_logprobs["whole-scored"]

    # Chunks end mid-block; each chunk's last row scores the next chunk's first token.
    table = _blocks(20, len(tokens))
    chunked = []
    for start, end in ((0, 5), (5, 37), (37, 70)):
        request = PromptLogprobsRequest(start, tokens[start + 1 : min(end, 69) + 1], 3)
        output = runner.execute_step([StepInput("chunked-scored", tokens[start:end], start, table, request)])
        chunked.append(output.prompt_logprobs["chunked-scored"])
    runner.free_sequence("chunked-scored")

    assert [len(part) for part in chunked] == [5, 32, 32]
    logprobs = [value for part in chunked for value in part.logprobs]
    top_ids = [ids for part in chunked for ids in part.top_ids]
    assert logprobs == pytest.approx(whole.logprobs, abs=ATOL)
    assert [value for part in chunked for value in part.ranks] == whole.ranks
    assert top_ids == whole.top_ids


def test_prompt_logprobs_batched_with_other_sequences(runner, monkeypatch):
    first, second = _tokens(40, seed=43), _tokens(9, seed=44)
    expected_first = _scored_one_step(runner, "alone-first", first, top_k=5).prompt_logprobs["alone-first"]
    expected_second = _scored_one_step(runner, "alone-second", second, top_k=1).prompt_logprobs["alone-second"]
    decoding = _tokens(12, seed=45)
    runner.execute([StepInput("decoding", decoding[:-1], 0, _blocks(60, 12))])

    # Three rows per batch forces several batches that each mix rows of both sequences.
    monkeypatch.setattr(model_runner, "PROMPT_LOGPROBS_CHUNK_BYTES", 3 * 4 * runner.config.vocab_size)
    output = runner.execute_step(
        [
            StepInput("batched-first", first, 0, _blocks(30, 40), PromptLogprobsRequest(0, first[1:], 5)),
            StepInput("decoding", decoding[-1:], 11, _blocks(60, 12)),
            StepInput("batched-second", second, 0, _blocks(50, 9), PromptLogprobsRequest(0, second[1:], 1)),
        ]
    )
    for seq_id in ("batched-first", "batched-second", "decoding"):
        runner.free_sequence(seq_id)

    assert set(output.prompt_logprobs) == {"batched-first", "batched-second"}
    got_first, got_second = output.prompt_logprobs["batched-first"], output.prompt_logprobs["batched-second"]
    assert got_first.logprobs == pytest.approx(expected_first.logprobs, abs=ATOL)
    assert got_first.top_ids == expected_first.top_ids
    assert got_second.logprobs == pytest.approx(expected_second.logprobs, abs=ATOL)
    assert all(len(ids) == 1 for ids in got_second.top_ids)


def test_prompt_logprob_rows_outside_chunk_rejected(runner):
    tokens = _tokens(10, seed=46)
    runner.execute([StepInput("outside", tokens[:5], 0, [0])])
    before = PromptLogprobsRequest(2, tokens[3:8], 0)
    with pytest.raises(ValueError, match="outside positions"):
        runner.execute_step([StepInput("outside", tokens[5:], 5, [0], before)])
    past_end = PromptLogprobsRequest(5, tokens[6:10] + [1, 2], 0)
    with pytest.raises(ValueError, match="outside positions"):
        runner.execute_step([StepInput("outside", tokens[5:], 5, [0], past_end)])
    runner.free_sequence("outside")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (StepInput("bad", [], 0, [0]), "empty token_ids"),
        (StepInput("bad", [1] * 20, 0, [0]), "block table"),
        (StepInput("bad", [1], 600, list(range(40))), "max_model_len"),
    ],
    ids=["empty", "short-block-table", "too-long"],
)
def test_invalid_step_is_rejected(runner, entry, message):
    with pytest.raises(ValueError, match=message):
        runner.execute([entry])


def test_rejected_step_admits_nothing(runner):
    valid = StepInput("valid-first", [1, 2], 0, [0])
    with pytest.raises(ValueError, match="same seq_id"):
        runner.execute([valid, StepInput("valid-first", [3], 2, [0])])
    with pytest.raises(ValueError, match="block table"):
        runner.execute([valid, StepInput("invalid-second", [1] * 20, 0, [1])])
    assert runner.num_running == 0


def test_start_pos_beyond_computed_is_rejected(runner):
    runner.execute([StepInput("gap", [1, 2, 3], 0, [0])])
    with pytest.raises(ValueError, match="skips past"):
        runner.execute([StepInput("gap", [4], 5, [0])])
    runner.free_sequence("gap")


def test_num_blocks_from_memory_budget(runner, tmp_path):
    layout = KVLayout(runner.config.num_layers, runner.config.num_kv_heads, runner.config.head_dim)
    block_bytes = layout.bytes_per_token(torch.float32) * BLOCK
    sized = ModelRunner(str(runner.model_path), dtype="float32", block_size=BLOCK, kv_cache_memory=block_bytes * 37 + 5)
    assert sized.num_blocks == 37
    assert sized.kv.pool.shape[0] == 37


def test_embedded_model_bfloat16_tracks_float32():
    runners = {dtype: ModelRunner("smollm2", dtype=dtype, num_blocks=64, threads=1) for dtype in ("bfloat16", "float32")}
    tokenizer = runners["float32"].tokenizer
    prompt = tokenizer.encode(
        tokenizer.apply_chat_template([{"role": "user", "content": "What is Kubernetes?"}]), add_special_tokens=False
    )
    table = list(range(8))
    logits = {dtype: runner.execute([StepInput("chat", prompt, 0, table)]) for dtype, runner in runners.items()}

    # bfloat16 keeps 8 mantissa bits, so logits differ by tenths while their direction and
    # the top token agree (measured cosine similarity above 0.9999).
    similarity = torch.nn.functional.cosine_similarity(logits["bfloat16"][0], logits["float32"][0], dim=0)
    assert similarity > 0.999
    assert logits["bfloat16"][0].argmax() == logits["float32"][0].argmax()

    answer = []
    step_logits = logits["bfloat16"]
    for position in range(len(prompt), len(prompt) + 16):
        token = int(step_logits[0].argmax())
        answer.append(token)
        step_logits = runners["bfloat16"].execute([StepInput("chat", [token], position, table)])
    assert "Kubernetes" in tokenizer.decode(answer)


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_bfloat16_linear_matches_f_linear(rows, with_bias):
    from llmisvc.engine.models.llama import Linear

    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 64, generator=generator).bfloat16()
    bias = torch.randn(96, generator=generator).bfloat16() if with_bias else None
    x = torch.randn(rows, 64, generator=generator).bfloat16()
    expected = torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
    got = Linear(weight, bias)(x)
    assert got.shape == (rows, 96)
    # bfloat16 output rounding: relative 2^-8 of values up to about 30.
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=0.25)


@pytest.mark.parametrize("kernel", ["onednn", "mv", "native"])
@pytest.mark.parametrize("rows", [1, 3])
def test_few_row_kernels_agree(kernel, rows):
    from llmisvc.engine.kernels import load
    from llmisvc.engine.models.llama import Linear

    native = load()
    if kernel == "native" and native is None:
        pytest.skip("native kernels unavailable (CPU without AVX512-BF16 or no C compiler)")
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(96, 64, generator=generator).bfloat16()
    bias = torch.randn(96, generator=generator).bfloat16()
    x = torch.randn(rows, 64, generator=generator).bfloat16()
    linear = Linear(weight, bias, native)
    linear.single_row_mv = kernel == "mv"
    linear.native_max_rows = 8 if kernel == "native" else 0
    linear.release_unused()
    assert (linear.weight is None) == (kernel != "mv")
    assert linear.has_native == (kernel == "native")
    expected = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
    torch.testing.assert_close(linear(x).float(), expected, rtol=1e-2, atol=0.25)


def test_kernel_choice_covers_every_linear(tmp_path):
    # A bfloat16 runner measures the few-row kernels at load and configures every linear.
    directory = write_checkpoint(tmp_path / "llama", "LlamaForCausalLM", seed=3)
    model = ModelRunner(str(directory), dtype="bfloat16", num_blocks=64).model
    choice = model.kernel_choice
    assert choice["single_row"] in ("onednn", "mv", "native")
    assert (choice["native_max_rows"] > 0) == (choice["single_row"] == "native")
    linears = [layer[kind] for layer in model.layers for kind in ("qkv", "o", "gate_up", "down")] + [model.lm_head]
    for linear in linears:
        assert linear.native_max_rows == choice["native_max_rows"]
        assert linear.single_row_mv == (choice["single_row"] == "mv")


def test_float32_model_skips_kernel_choice(runner):
    assert runner.model.kernel_choice == {}
