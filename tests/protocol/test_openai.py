"""OpenAI request parsing and response builders."""

import json

import pytest

from llmisvc.protocol import openai
from llmisvc.protocol.errors import BadRequestError


def completion(**fields):
    return openai.parse_completion_request({"model": "m", "prompt": "hi", **fields})


def chat(**fields):
    return openai.parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def rejected_param(parse, **fields) -> str:
    with pytest.raises(BadRequestError) as info:
        parse(**fields)
    return info.value.param


def test_completion_defaults():
    request = completion()
    assert request.prompts == ["hi"]
    assert request.options.max_tokens == 16
    assert request.options.temperature == 1.0
    assert request.options.top_k == -1
    assert request.options.n == 1
    assert request.stream is False


def test_chat_defaults_to_no_token_cap():
    request = chat()
    assert request.options.max_tokens is None
    assert request.add_generation_prompt is True


def test_prompt_forms():
    assert completion(prompt=["a", "b"]).prompts == ["a", "b"]
    assert completion(prompt=[1, 2, 3]).prompts == [[1, 2, 3]]
    assert completion(prompt=[[1, 2], [3]]).prompts == [[1, 2], [3]]


@pytest.mark.parametrize("prompt", [None, [], [[]], [1, "a"], [-1], 5])
def test_invalid_prompts(prompt):
    assert rejected_param(completion, prompt=prompt) == "prompt"


def test_max_completion_tokens_wins_over_max_tokens():
    assert chat(max_tokens=5, max_completion_tokens=9).options.max_tokens == 9
    assert chat(max_tokens=5).options.max_tokens == 5


def test_stop_and_logit_bias():
    options = completion(stop="\n", logit_bias={"42": -100, "7": 2.5}).options
    assert options.stop == ["\n"]
    assert options.logit_bias == {42: -100.0, 7: 2.5}


def test_chat_logprobs_count():
    assert chat(logprobs=True, top_logprobs=3).options.logprobs == 3
    assert chat(logprobs=True).options.logprobs == 0
    assert chat().options.logprobs is None
    assert rejected_param(chat, top_logprobs=2) == "top_logprobs"


def test_stream_options():
    request = chat(stream=True, stream_options={"include_usage": True})
    assert request.include_usage is True
    assert rejected_param(chat, stream_options={"include_usage": True}) == "stream_options"
    assert rejected_param(chat, stream=True, stream_options={"bogus": 1}) == "stream_options.bogus"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logprobs": 21}, "logprobs"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"logit_bias": {"a": 1}}, "logit_bias"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"seed": "1"}, "seed"),
    ],
)
def test_invalid_values_name_the_parameter(fields, param):
    assert rejected_param(completion, **fields) == param


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"best_of": 3}, "best_of"),
        ({"guided_json": {}}, "guided_json"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"spaces_between_special_tokens": False}, "spaces_between_special_tokens"),
        ({"echo": True}, "echo"),
    ],
)
def test_unimplemented_chat_params_rejected(fields, param):
    assert rejected_param(chat, **fields) == param


def test_harmless_chat_fields_accepted():
    request = chat(tools=[], tool_choice="none", response_format={"type": "text"}, user="u", store=False)
    assert request.model == "m"


def test_completion_rejects_suffix():
    assert rejected_param(completion, suffix="x") == "suffix"


def test_echo_accepts_logprobs_and_zero_max_tokens():
    request = completion(echo=True, logprobs=2, max_tokens=0)
    assert request.echo is True
    assert request.options.logprobs == 2
    assert request.options.max_tokens == 0
    assert request.options.prompt_logprobs is None


def test_zero_max_tokens_needs_echo():
    assert rejected_param(completion, max_tokens=0) == "max_tokens"
    assert rejected_param(chat, max_tokens=0) == "max_tokens"
    assert rejected_param(chat, max_completion_tokens=0) == "max_completion_tokens"


def test_prompt_logprobs_parsed():
    assert completion(prompt_logprobs=3).options.prompt_logprobs == 3
    assert completion(prompt_logprobs=0).options.prompt_logprobs == 0
    assert chat(prompt_logprobs=20).options.prompt_logprobs == 20
    assert chat().options.prompt_logprobs is None


def test_streamed_prompt_logprobs_zero_is_ignored():
    assert completion(stream=True, prompt_logprobs=0).options.prompt_logprobs is None
    assert chat(stream=True, prompt_logprobs=0).options.prompt_logprobs is None


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt_logprobs": -1},
        {"prompt_logprobs": 21},
        {"prompt_logprobs": -2},
        {"prompt_logprobs": "3"},
        {"prompt_logprobs": True},
        {"prompt_logprobs": 1.5},
        {"prompt_logprobs": 2, "stream": True},
    ],
)
def test_invalid_prompt_logprobs_rejected(fields):
    assert rejected_param(completion, **fields) == "prompt_logprobs"
    assert rejected_param(chat, **fields) == "prompt_logprobs"


def test_prompt_logprob_position_shape():
    position = openai.prompt_logprob_position([(7, -2.5, 3, " b"), (9, -0.5, 1, " a"), (7, -2.5, 2, " b")])
    assert list(position) == ["7", "9"]
    assert position["7"] == {"logprob": -2.5, "rank": 3, "decoded_token": " b"}
    assert position["9"] == {"logprob": -0.5, "rank": 1, "decoded_token": " a"}


def test_prompt_logprobs_placement():
    plain = openai.completion_choice(0, "x", "length")
    assert "prompt_logprobs" not in plain
    listed = [None, {"5": {"logprob": -1.0, "rank": 1, "decoded_token": "x"}}]
    assert openai.completion_choice(0, "x", "length", prompt_logprobs=listed)["prompt_logprobs"] == listed
    usage = openai.usage(2, 1)
    assert "prompt_logprobs" not in openai.chat_response("id", 0, "m", [], usage)
    assert openai.chat_response("id", 0, "m", [], usage, prompt_logprobs=listed)["prompt_logprobs"] == listed


def test_messages_validation():
    parse = openai.parse_chat_request
    with pytest.raises(BadRequestError) as info:
        parse({"model": "m", "messages": [{"role": "robot", "content": "x"}]})
    assert info.value.param == "messages[0].role"
    with pytest.raises(BadRequestError) as info:
        parse({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    assert info.value.param == "messages[0].content[0]"
    request = parse(
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    )
    assert request.messages[0].content == "a\nb"


def test_continue_final_message_needs_assistant_last():
    with pytest.raises(BadRequestError):
        chat(continue_final_message=True, add_generation_prompt=False)
    request = openai.parse_chat_request(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}],
            "continue_final_message": True,
            "add_generation_prompt": False,
        }
    )
    assert request.continue_final_message is True


def test_missing_model_and_bad_json():
    with pytest.raises(BadRequestError) as info:
        openai.parse_completion_request({"prompt": "x"})
    assert info.value.param == "model"
    with pytest.raises(BadRequestError):
        openai.parse_json_body(b"{not json")
    with pytest.raises(BadRequestError):
        openai.parse_completion_request(["not", "an", "object"])


def test_usage_and_final_chunk_shapes():
    usage = openai.usage(10, 5, cached_tokens=8)
    assert usage == {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 8},
    }
    chunk = openai.chat_chunk("id", 1, "m", [], usage)
    assert chunk["choices"] == []
    assert chunk["usage"]["total_tokens"] == 15
    assert chunk["object"] == "chat.completion.chunk"


def test_sse_framing_keeps_unicode():
    event = openai.sse({"text": "日本🙂"})
    assert event.startswith(b"data: ")
    assert event.endswith(b"\n\n")
    assert json.loads(event[6:-2].decode("utf-8")) == {"text": "日本🙂"}
    assert openai.SSE_DONE == b"data: [DONE]\n\n"


def test_chat_logprob_entry_bytes():
    entry = openai.chat_logprob_entry("é", -0.5, [("é", -0.5), ("e", -1.0)])
    assert entry["bytes"] == [0xC3, 0xA9]
    assert entry["top_logprobs"][1] == {"token": "e", "logprob": -1.0, "bytes": [0x65]}


def test_response_builders_carry_kv_transfer_params():
    params = {"do_remote_prefill": True}
    body = openai.completion_response("id", 1, "m", [], openai.usage(1, 1), params)
    assert body["kv_transfer_params"] == params
    assert "kv_transfer_params" not in openai.chat_response("id", 1, "m", [], openai.usage(1, 1))
