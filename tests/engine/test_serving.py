"""OpenAIServing's echo logprobs on a small tokenizer, without an engine thread."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from llmisvc.engine.sampler import PromptLogprobs
from llmisvc.engine.serving import OpenAIServing, _Choice
from llmisvc.engine.tokenizer import Tokenizer
from tiny_checkpoints import write_checkpoint


@pytest.fixture(scope="module")
def serving(tmp_path_factory) -> OpenAIServing:
    directory = write_checkpoint(tmp_path_factory.mktemp("models") / "tiny-llama", "LlamaForCausalLM", seed=1)
    tokenizer = Tokenizer.from_directory(directory)
    engine = SimpleNamespace(tokenizer=tokenizer, runner=SimpleNamespace(config=SimpleNamespace(vocab_size=400)))
    return OpenAIServing(engine, ["tiny"])


def _scores(count: int) -> PromptLogprobs:
    return PromptLogprobs([-1.0] * count, [1] * count, [[5]] * count, [[-0.5]] * count)


def test_echo_offsets_skip_added_special_token(serving):
    # A BOS-like special token the tokenizer added to a string prompt is not in its echo.
    tokenizer = serving.tokenizer
    text = "Kubernetes schedules containers"
    ids = [tokenizer.encode("<|endoftext|>", add_special_tokens=False)[0], *tokenizer.encode(text)]
    choice = _Choice()
    serving._add_echo_logprobs(choice, ids, text, _scores(len(ids) - 1), top=1)

    assert choice.logprob_tokens[0] == "<|endoftext|>"
    assert "".join(choice.logprob_tokens[1:]) == text
    assert choice.text_offsets[:2] == [0, 0]
    assert choice.text_offsets == sorted(choice.text_offsets)
    assert choice.text_offsets[-1] == len(text) - len(choice.logprob_tokens[-1])
    assert choice.logprob_values[0] is None
    assert choice.logprob_tops[0] is None
    assert choice.logprob_tops[1] == [(tokenizer.decode([5], skip_special_tokens=False), -0.5)]


def test_echo_offsets_count_rendered_special_token(serving):
    # A token-id prompt echoes its special tokens as text, so they take characters.
    tokenizer = serving.tokenizer
    ids = [tokenizer.encode("<|endoftext|>", add_special_tokens=False)[0], *tokenizer.encode("the lazy dog")]
    echo_text = tokenizer.decode(ids, skip_special_tokens=False)
    choice = _Choice()
    serving._add_echo_logprobs(choice, ids, echo_text, _scores(len(ids) - 1), top=0)

    assert "".join(choice.logprob_tokens) == echo_text
    assert choice.text_offsets[1] == len("<|endoftext|>")
    assert choice.logprob_tops[1] == []
