"""Forward-pass parity with Hugging Face `transformers`, in float32.

The embedded SmolLM2 reference is built from transformers' own GGUF conversion
(`load_gguf_checkpoint`), so it checks our dequantisation, tensor naming and q/k row order as
well as the forward pass. The Qwen2 reference is a random model saved by transformers.
"""

from __future__ import annotations

import pytest
import torch

from llmisvc.engine.loader import embedded_gguf_path
from llmisvc.engine.model_runner import ModelRunner, PromptLogprobsRequest, StepInput
from tiny_checkpoints import write_checkpoint

transformers = pytest.importorskip("transformers")

LLAMA_LOGIT_ATOL = 1e-3
# A log-softmax adds the rounding of the log-sum-exp to that of the logits.
LLAMA_LOGPROB_ATOL = 2e-3
# Random weights give small logits; float32 with a different reduction order differs by
# rounding only, well under these bounds.
QWEN2_LOGIT_RTOL = 1e-4
QWEN2_LOGIT_ATOL = 1e-4
GREEDY_TOKENS = 64


def _block_table(num_tokens: int, first_block: int, block_size: int = 16) -> list[int]:
    count = -(-num_tokens // block_size)
    return list(range(first_block, first_block + count))


@pytest.fixture(scope="module")
def llama_runner() -> ModelRunner:
    return ModelRunner("smollm2", dtype="float32", num_blocks=256, threads=1)


@pytest.fixture(scope="module")
def llama_reference():
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = str(embedded_gguf_path())
    settings = load_gguf_checkpoint(path, return_tensors=False)["config"]
    settings.pop("_model_name_or_path", None)
    config = LlamaConfig(**settings)
    config._attn_implementation = "eager"
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton)["tensors"]
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    state = {name: torch.as_tensor(value, dtype=torch.float32) for name, value in tensors.items()}
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model


def _prompt_ids(runner: ModelRunner, question: str) -> list[int]:
    text = runner.tokenizer.apply_chat_template([{"role": "user", "content": question}])
    return runner.tokenizer.encode(text, add_special_tokens=False)


def test_llama_logits_match_transformers(llama_runner, llama_reference):
    ids = _prompt_ids(llama_runner, "Explain in two sentences what a KV cache is and why it helps.")
    continuation = llama_runner.tokenizer.encode(" A KV cache stores keys and values so that", add_special_tokens=False)
    sequence = ids + continuation
    with torch.no_grad():
        expected = llama_reference(torch.tensor([sequence])).logits[0].float()

    table = _block_table(len(sequence), first_block=0)
    split = 20  # two prefill chunks, the second starting mid-block
    got = [llama_runner.execute([StepInput("parity", ids[:split], 0, table)])[0]]
    got.append(llama_runner.execute([StepInput("parity", ids[split:], split, table)])[0])
    for offset, token in enumerate(continuation):
        got.append(llama_runner.execute([StepInput("parity", [token], len(ids) + offset, table)])[0])
    llama_runner.free_sequence("parity")

    positions = [split - 1, len(ids) - 1] + [len(ids) + offset for offset in range(len(continuation))]
    for position, logits in zip(positions, got):
        difference = (logits - expected[position]).abs().max().item()
        assert difference < LLAMA_LOGIT_ATOL, f"position {position}: max |diff| {difference}"


def test_llama_prompt_logprobs_match_transformers(llama_runner, llama_reference):
    ids = _prompt_ids(llama_runner, "Why do evaluation harnesses score prompts with logprobs?")
    with torch.no_grad():
        expected = torch.log_softmax(llama_reference(torch.tensor([ids])).logits[0].float(), dim=-1)

    table = _block_table(len(ids), first_block=128)
    split = 21  # two prefill chunks, the second starting mid-block
    logprobs, top_logprobs = [], []
    for start, end in ((0, split), (split, len(ids))):
        request = PromptLogprobsRequest(start, ids[start + 1 : min(end, len(ids) - 1) + 1], 5)
        output = llama_runner.execute_step([StepInput("parity-scored", ids[start:end], start, table, request)])
        logprobs.extend(output.prompt_logprobs["parity-scored"].logprobs)
        top_logprobs.extend(output.prompt_logprobs["parity-scored"].top_logprobs)
    llama_runner.free_sequence("parity-scored")

    assert len(logprobs) == len(ids) - 1
    for position in range(len(ids) - 1):
        reference = expected[position]
        difference = abs(logprobs[position] - reference[ids[position + 1]].item())
        assert difference < LLAMA_LOGPROB_ATOL, f"position {position}: |diff| {difference}"
        top_difference = (torch.tensor(top_logprobs[position]) - reference.topk(5).values).abs().max().item()
        assert top_difference < LLAMA_LOGPROB_ATOL, f"position {position}: top-5 |diff| {top_difference}"


def test_llama_greedy_matches_transformers(llama_runner, llama_reference):
    questions = ["What is Kubernetes?", "Write a haiku about the sea."]
    prompts = [_prompt_ids(llama_runner, question) for question in questions]
    eos_ids = llama_runner.tokenizer.eos_token_ids

    expected = []
    for prompt in prompts:
        with torch.no_grad():
            output = llama_reference.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=GREEDY_TOKENS,
                min_new_tokens=GREEDY_TOKENS,
                do_sample=False,
                pad_token_id=eos_ids[0],
            )
        expected.append(output[0, len(prompt) :].tolist())

    # Both prompts decode in one batch, as the engine runs them.
    tables = [_block_table(len(prompt) + GREEDY_TOKENS, first_block=64 * index) for index, prompt in enumerate(prompts)]
    generated: list[list[int]] = [[], []]
    steps = [StepInput(f"greedy-{index}", prompt, 0, tables[index]) for index, prompt in enumerate(prompts)]
    for _ in range(GREEDY_TOKENS):
        logits = llama_runner.execute(steps)
        # min_new_tokens in the reference forbids EOS; forbid it here the same way.
        logits[:, eos_ids] = float("-inf")
        next_ids = logits.argmax(dim=-1).tolist()
        steps = []
        for index, token in enumerate(next_ids):
            generated[index].append(token)
            position = len(prompts[index]) + len(generated[index]) - 1
            steps.append(StepInput(f"greedy-{index}", [token], position, tables[index]))
    for index in range(len(prompts)):
        llama_runner.free_sequence(f"greedy-{index}")

    assert generated[0] == expected[0]
    assert generated[1] == expected[1]


@pytest.mark.parametrize("tied", [False, True], ids=["separate-embeddings", "tied-embeddings"])
def test_qwen2_logits_match_transformers(tmp_path, tied):
    from transformers import Qwen2ForCausalLM

    directory = write_checkpoint(tmp_path / "qwen2", "Qwen2ForCausalLM", tie_word_embeddings=tied, seed=7)
    reference = Qwen2ForCausalLM.from_pretrained(directory, torch_dtype=torch.float32, attn_implementation="eager").eval()
    runner = ModelRunner(str(directory), dtype="float32", num_blocks=64, threads=1)
    assert runner.config.attention_bias
    assert runner.config.tie_word_embeddings == tied

    texts = ["Kubernetes schedules containers", "The quick brown fox jumps over the lazy dog", "你好 😀"]
    sequences = [runner.tokenizer.encode(text) for text in texts]
    tables = [_block_table(len(ids) + 4, first_block=16 * index) for index, ids in enumerate(sequences)]

    # Prefill all but the last 3 tokens together, then feed those one per step as a batch.
    prefill = [StepInput(str(index), ids[:-3], 0, tables[index]) for index, ids in enumerate(sequences)]
    results = {index: [(len(ids) - 4, row)] for index, (ids, row) in enumerate(zip(sequences, runner.execute(prefill)))}
    for back in (3, 2, 1):
        step = [StepInput(str(index), [ids[-back]], len(ids) - back, tables[index]) for index, ids in enumerate(sequences)]
        for index, row in enumerate(runner.execute(step)):
            results[index].append((len(sequences[index]) - back, row))

    for index, ids in enumerate(sequences):
        with torch.no_grad():
            expected = reference(torch.tensor([ids])).logits[0]
        for position, logits in results[index]:
            torch.testing.assert_close(
                logits, expected[position], rtol=QWEN2_LOGIT_RTOL, atol=QWEN2_LOGIT_ATOL,
                msg=lambda message: f"sequence {index} position {position}: {message}",
            )
