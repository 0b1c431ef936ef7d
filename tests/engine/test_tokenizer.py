"""Tokenizer, incremental detokenizer and chat template of the embedded SmolLM2 model.

The reference is the tokenizer that Hugging Face `transformers` builds from the same GGUF file
with its own converter, so vocabulary, merges, pre-tokenisation and special tokens are all
checked against an independent implementation.
"""

from __future__ import annotations

import pytest

from llmisvc.engine.chat_template import ChatTemplate
from llmisvc.engine.gguf_loader import read_gguf_fields
from llmisvc.engine.loader import embedded_gguf_path
from llmisvc.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from llmisvc.protocol.errors import BadRequestError

TEXTS = [
    "Hello world!",
    "What is Kubernetes?",
    "Numbers 1234567890 and 3.14159, dates 2024-12-04.",
    "  leading spaces,\ttabs\tand\n\nnewlines  \n",
    "Contractions: don't, I'll, we've, she'd, THEY'RE.",
    "héllo wörld — naïve café, Ελληνικά, русский",
    "CJK 你好世界, こんにちは, 안녕하세요",
    "Emoji 😀👍🏽🇩🇪 and symbols ∑∫√≈ ©®™",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    _reader, fields = read_gguf_fields(embedded_gguf_path())
    return Tokenizer.from_gguf_fields(fields)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("gguf")
    (directory / "model.gguf").symlink_to(embedded_gguf_path())
    return transformers.AutoTokenizer.from_pretrained(str(directory), gguf_file="model.gguf")


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tokenizer, reference, text):
    assert tokenizer.encode(text) == reference(text)["input_ids"]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text


def test_special_tokens_and_ids(tokenizer):
    assert tokenizer.encode("<|im_start|>") == [1]
    assert tokenizer.encode("<|im_end|>") == [2]
    assert tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.eos_token_ids == [2]
    assert tokenizer.vocab_size == 49152


def test_decode_skips_special_tokens(tokenizer):
    ids = tokenizer.encode("<|im_start|>assistant\nHi<|im_end|>")
    assert tokenizer.decode(ids) == "assistant\nHi"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>assistant\nHi<|im_end|>"


def test_encode_batch_matches_encode(tokenizer):
    assert tokenizer.encode_batch(TEXTS[:4]) == [tokenizer.encode(text) for text in TEXTS[:4]]


def test_emoji_spans_several_tokens(tokenizer):
    # The property the incremental detokenizer guards against must hold for this model.
    assert len(tokenizer.encode("😀")) > 1


def test_detokenizer_holds_partial_character(tokenizer):
    first, *rest = tokenizer.encode("😀")
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.add([first]) == ""
    assert detokenizer.add(rest) == "😀"
    assert detokenizer.finish() == ""


@pytest.mark.parametrize("text", [text for text in TEXTS if text])
def test_detokenizer_streams_without_replacement(tokenizer, text):
    ids = tokenizer.encode(text)
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    pieces = [detokenizer.add([token]) for token in ids]
    pieces.append(detokenizer.finish())
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == text
    assert detokenizer.text == text


def test_detokenizer_finish_flushes_truncated_character(tokenizer):
    first = tokenizer.encode("😀")[0]
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.add([first]) == ""
    assert detokenizer.finish() == "\ufffd"


def test_chat_template_renders_smollm_prompt(tokenizer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is Kubernetes?"}])
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is Kubernetes?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_template_honours_system_and_no_generation_prompt(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
    )


def test_chat_template_exposes_special_tokens_and_tojson(tokenizer):
    template = "{{ bos_token }}|{{ eos_token }}|{{ messages[0] | tojson }}"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "café"}], chat_template=template)
    assert prompt == '<|im_start|>|<|im_end|>|{"role": "user", "content": "café"}'


def test_chat_template_raise_exception_is_bad_request():
    template = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}")
    with pytest.raises(BadRequestError, match="first must be user"):
        template.render([{"role": "assistant", "content": "x"}], add_generation_prompt=True)


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.append({'role': 'user'}) }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    ],
    ids=["mutation", "python-internals"],
)
def test_chat_template_sandbox_blocks_unsafe_code(source):
    with pytest.raises(BadRequestError):
        ChatTemplate(source).render([{"role": "user", "content": "x"}], add_generation_prompt=True)


def test_chat_template_syntax_error_is_bad_request():
    with pytest.raises(BadRequestError, match="invalid chat template"):
        ChatTemplate("{% for %}")
