"""OpenAI request parsing and response builders shared by the engine, the simulator and the gateway.

`parse_completion_request` and `parse_chat_request` turn a decoded JSON body into typed
requests, raising `BadRequestError` that names the offending parameter. Parameters the
engines do not implement (tools, structured output, ...) are rejected, never ignored, and so
is any parameter OpenAI and vLLM do not define. Defaults follow vLLM where OpenAI is silent:
`max_tokens` is 16 for completions and "up to the context length" for chat, `top_k` -1 or 0
disables top-k, `stop` strings are excluded from the output.

The `*_response`, `*_chunk` and `usage` builders produce the JSON objects both engines send,
so the gateway and clients see one shape. `sse()` frames one server-sent event.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from llmisvc.protocol.errors import BadRequestError

# Bounds OpenAI documents for these parameters.
MAX_TOP_LOGPROBS = 20
MAX_STOP_SEQUENCES = 16
DEFAULT_COMPLETION_MAX_TOKENS = 16

# Parameters every generation request may carry (completions and chat).
_COMMON_KEYS = frozenset(
    {
        "model",
        "stream",
        "stream_options",
        "max_tokens",
        "min_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "stop_token_ids",
        "include_stop_str_in_output",
        "ignore_eos",
        "n",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logit_bias",
        "logprobs",
        "prompt_logprobs",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "user",
        "kv_transfer_params",
        "cache_salt",
        "request_id",
        "priority",
        # Accepted so the check below can name them in a precise error.
        "response_format",
        "best_of",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "structured_outputs",
        "use_beam_search",
        "length_penalty",
        "lora_request",
    }
)
_COMPLETION_KEYS = _COMMON_KEYS | {"prompt", "echo", "suffix"}
_CHAT_KEYS = _COMMON_KEYS | {
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "add_generation_prompt",
    "continue_final_message",
    "chat_template_kwargs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "web_search_options",
    "store",
    "metadata",
    "service_tier",
    "echo",
}
_CHAT_ROLES = frozenset({"system", "developer", "user", "assistant"})

# Every top-level field the parsers know, implemented or not. A server that ignores unknown
# fields (as vLLM does) drops the fields outside these sets before parsing.
COMPLETION_FIELDS = _COMPLETION_KEYS
CHAT_FIELDS = _CHAT_KEYS


@dataclass
class SamplingOptions:
    """Generation parameters of one request, validated and defaulted.

    `max_tokens` None means "until the context is full", and 0 (completions with `echo`
    only) scores the prompt without generating. `logprobs` is the number of top
    alternatives to return per token (0 returns only the sampled token's logprob), None
    returns none. `prompt_logprobs` (vLLM's extension) is the same count for every prompt
    token after the first. `logit_bias` maps token ids to additive biases.
    """

    max_tokens: int | None = None
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True


@dataclass
class CompletionRequest:
    """A validated `/v1/completions` request.

    `prompts` has one entry per prompt: a string or a list of token ids. A request with
    several prompts yields `len(prompts) * n` choices, indexed prompt-major.
    """

    model: str
    prompts: list[str | list[int]]
    options: SamplingOptions
    stream: bool = False
    include_usage: bool = False
    continuous_usage_stats: bool = False
    echo: bool = False
    kv_transfer_params: dict[str, Any] | None = None
    cache_salt: str | None = None
    request_id: str | None = None


@dataclass
class ChatMessage:
    """One chat message with its text content (text parts joined by newlines)."""

    role: str
    content: str
    name: str | None = None


@dataclass
class ChatCompletionRequest:
    """A validated `/v1/chat/completions` request."""

    model: str
    messages: list[ChatMessage]
    options: SamplingOptions
    stream: bool = False
    include_usage: bool = False
    continuous_usage_stats: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    kv_transfer_params: dict[str, Any] | None = None
    cache_salt: str | None = None
    request_id: str | None = None


# ---------------------------------------------------------------- parsing


def parse_completion_request(body: Any) -> CompletionRequest:
    """Validate a decoded `/v1/completions` body and return the typed request.

    Raises BadRequestError naming the parameter for a missing, mistyped, out-of-range,
    unknown or unimplemented parameter.
    """
    body = _require_object(body)
    _reject_unknown(body, _COMPLETION_KEYS)
    if body.get("suffix") not in (None, ""):
        raise _unsupported("suffix")

    options = _parse_options(body, chat=False)
    stream, include_usage, continuous = _parse_stream(body)
    echo = _bool(body, "echo", False)
    if options.max_tokens == 0 and not echo:
        raise BadRequestError("max_tokens must be at least 1 unless echo is true, got 0", param="max_tokens")

    return CompletionRequest(
        model=_model(body),
        prompts=_parse_prompts(body.get("prompt")),
        options=options,
        stream=stream,
        include_usage=include_usage,
        continuous_usage_stats=continuous,
        echo=echo,
        kv_transfer_params=_kv_transfer_params(body),
        cache_salt=_optional_str(body, "cache_salt"),
        request_id=_optional_str(body, "request_id"),
    )


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    """Validate a decoded `/v1/chat/completions` body and return the typed request.

    Raises BadRequestError naming the parameter, as `parse_completion_request` does.
    """
    body = _require_object(body)
    _reject_unknown(body, _CHAT_KEYS)
    _reject_chat_features(body)

    options = _parse_options(body, chat=True)
    stream, include_usage, continuous = _parse_stream(body)
    add_generation_prompt = _bool(body, "add_generation_prompt", True)
    continue_final_message = _bool(body, "continue_final_message", False)
    if add_generation_prompt and continue_final_message:
        raise BadRequestError(
            "continue_final_message and add_generation_prompt cannot both be true; "
            "set add_generation_prompt to false",
            param="continue_final_message",
        )
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise BadRequestError("chat_template_kwargs must be an object", param="chat_template_kwargs")

    messages = _parse_messages(body.get("messages"))
    if continue_final_message and messages[-1].role != "assistant":
        raise BadRequestError(
            "continue_final_message requires the last message to have role assistant",
            param="messages",
        )

    return ChatCompletionRequest(
        model=_model(body),
        messages=messages,
        options=options,
        stream=stream,
        include_usage=include_usage,
        continuous_usage_stats=continuous,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        chat_template_kwargs=kwargs,
        kv_transfer_params=_kv_transfer_params(body),
        cache_salt=_optional_str(body, "cache_salt"),
        request_id=_optional_str(body, "request_id"),
    )


def parse_json_body(raw: bytes) -> Any:
    """Decode a request body as JSON; raise BadRequestError for invalid JSON or UTF-8."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequestError(f"request body is not valid JSON: {exc}") from exc


def _require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequestError("request body must be a JSON object")
    return body


def _reject_unknown(body: dict[str, Any], known: frozenset[str]) -> None:
    for key in body:
        if key not in known:
            raise BadRequestError(f"Unrecognized request argument supplied: {key}", param=key)


def _unsupported(param: str, what: str | None = None) -> BadRequestError:
    return BadRequestError(f"{what or param} is not supported by this server", param=param)


def _reject_chat_features(body: dict[str, Any]) -> None:
    """Raise for chat features the engines do not implement, when the client actually uses them."""
    if body.get("tools"):
        raise _unsupported("tools", "tool calling (tools)")
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise _unsupported("tool_choice")
    for param in ("functions", "function_call", "audio", "prediction", "reasoning_effort", "web_search_options"):
        if body.get(param) is not None:
            raise _unsupported(param)
    if body.get("modalities") not in (None, ["text"]):
        raise _unsupported("modalities", "output modalities other than text")
    if body.get("store"):
        raise _unsupported("store", "storing completions (store: true)")
    if body.get("echo"):
        raise _unsupported("echo", "echo on chat completions")


def _parse_options(body: dict[str, Any], *, chat: bool) -> SamplingOptions:
    """Validate the sampling parameters shared by completions and chat."""
    _reject_structured_output(body)

    n = _int(body, "n", 1, minimum=1, maximum=128)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise _unsupported("best_of", "best_of different from n")
    if body.get("use_beam_search"):
        raise _unsupported("use_beam_search", "beam search")
    for param in ("length_penalty", "lora_request"):
        if body.get(param) is not None:
            raise _unsupported(param)
    if body.get("priority") not in (None, 0):
        raise _unsupported("priority", "request priorities")
    if body.get("spaces_between_special_tokens") is False:
        raise _unsupported("spaces_between_special_tokens", "spaces_between_special_tokens: false")

    options = SamplingOptions(
        max_tokens=_max_tokens(body, chat),
        min_tokens=_int(body, "min_tokens", 0, minimum=0),
        temperature=_float(body, "temperature", 1.0, minimum=0.0),
        top_p=_float(body, "top_p", 1.0, minimum=0.0, maximum=1.0, exclusive_minimum=True),
        top_k=_int(body, "top_k", -1, minimum=-1),
        min_p=_float(body, "min_p", 0.0, minimum=0.0, maximum=1.0),
        seed=_optional_int(body, "seed"),
        stop=_parse_stop(body.get("stop")),
        stop_token_ids=_int_list(body, "stop_token_ids"),
        include_stop_str_in_output=_bool(body, "include_stop_str_in_output", False),
        ignore_eos=_bool(body, "ignore_eos", False),
        n=n,
        presence_penalty=_float(body, "presence_penalty", 0.0, minimum=-2.0, maximum=2.0),
        frequency_penalty=_float(body, "frequency_penalty", 0.0, minimum=-2.0, maximum=2.0),
        repetition_penalty=_float(body, "repetition_penalty", 1.0, minimum=0.0, exclusive_minimum=True),
        logit_bias=_parse_logit_bias(body.get("logit_bias")),
        logprobs=_chat_logprobs(body) if chat else _completion_logprobs(body),
        prompt_logprobs=_prompt_logprobs(body),
        skip_special_tokens=_bool(body, "skip_special_tokens", True),
    )
    if options.max_tokens is not None and options.min_tokens > options.max_tokens:
        raise BadRequestError(
            f"min_tokens ({options.min_tokens}) must be less than or equal to max_tokens ({options.max_tokens})",
            param="min_tokens",
        )
    return options


def _reject_structured_output(body: dict[str, Any]) -> None:
    response_format = body.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict) or response_format.get("type") != "text":
            raise _unsupported("response_format", "response_format other than {\"type\": \"text\"}")
    for param in ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs"):
        if body.get(param) is not None:
            raise _unsupported(param, f"structured output ({param})")


def _max_tokens(body: dict[str, Any], chat: bool) -> int | None:
    """Return the output token cap; chat prefers max_completion_tokens over the deprecated max_tokens.

    Completions accept 0 here; `parse_completion_request` allows it only with `echo`.
    """
    if chat and body.get("max_completion_tokens") is not None:
        return _optional_int(body, "max_completion_tokens", minimum=1)
    value = _optional_int(body, "max_tokens", minimum=1 if chat else 0)
    if value is not None:
        return value
    return None if chat else DEFAULT_COMPLETION_MAX_TOKENS


def _completion_logprobs(body: dict[str, Any]) -> int | None:
    value = body.get("logprobs")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequestError("logprobs must be an integer for completions", param="logprobs")
    if not 0 <= value <= MAX_TOP_LOGPROBS:
        raise BadRequestError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {value}", param="logprobs")
    return value


def _prompt_logprobs(body: dict[str, Any]) -> int | None:
    """Return vLLM's `prompt_logprobs` count, or None when a response cannot carry it.

    vLLM's -1 (the whole vocabulary) is rejected like any count above MAX_TOP_LOGPROBS,
    which is also vLLM's default `--max-logprobs`. Streamed responses have no field for
    prompt logprobs, so a stream may ask for 0 (accepted and ignored, as vLLM does) but
    not more.
    """
    value = body.get("prompt_logprobs")
    if value is None:
        return None
    if not _is_int(value):
        raise BadRequestError(f"prompt_logprobs must be an integer, got {value!r}", param="prompt_logprobs")
    if value == -1:
        raise BadRequestError(
            f"prompt_logprobs -1 (the whole vocabulary) is not supported; use a count from 0 to {MAX_TOP_LOGPROBS}",
            param="prompt_logprobs",
        )
    if not 0 <= value <= MAX_TOP_LOGPROBS:
        raise BadRequestError(
            f"prompt_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {value}", param="prompt_logprobs"
        )
    if body.get("stream"):
        if value > 0:
            raise BadRequestError("prompt_logprobs are not available when stream is true", param="prompt_logprobs")
        return None
    return value


def _chat_logprobs(body: dict[str, Any]) -> int | None:
    enabled = _bool(body, "logprobs", False)
    top = _optional_int(body, "top_logprobs", minimum=0, maximum=MAX_TOP_LOGPROBS)
    if top is not None and top > 0 and not enabled:
        raise BadRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
    return (top or 0) if enabled else None


def _parse_stream(body: dict[str, Any]) -> tuple[bool, bool, bool]:
    """Return (stream, include_usage, continuous_usage_stats)."""
    stream = _bool(body, "stream", False)
    stream_options = body.get("stream_options")
    if stream_options is None:
        return stream, False, False
    if not stream:
        raise BadRequestError("stream_options can only be set when stream is true", param="stream_options")
    if not isinstance(stream_options, dict):
        raise BadRequestError("stream_options must be an object", param="stream_options")
    for key in stream_options:
        if key not in ("include_usage", "continuous_usage_stats"):
            raise BadRequestError(f"Unrecognized stream_options field: {key}", param=f"stream_options.{key}")
    include_usage = _bool(stream_options, "include_usage", False, path="stream_options.include_usage")
    continuous = _bool(stream_options, "continuous_usage_stats", False, path="stream_options.continuous_usage_stats")
    return stream, include_usage, continuous


def _parse_prompts(prompt: Any) -> list[str | list[int]]:
    """Normalise `prompt` (string, list of strings, token ids, list of token-id lists)."""
    if prompt is None:
        raise BadRequestError("prompt is required", param="prompt")
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise BadRequestError("prompt must be a string, a list of strings or a list of token ids", param="prompt")
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if all(_is_int(t) for t in prompt):
        return [_token_ids(prompt, "prompt")]
    if all(isinstance(p, list) for p in prompt):
        return [_token_ids(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    raise BadRequestError("prompt must be a string, a list of strings or a list of token ids", param="prompt")


def _token_ids(values: list[Any], path: str) -> list[int]:
    if not values:
        raise BadRequestError(f"{path} must not be empty", param="prompt")
    for value in values:
        if not _is_int(value) or value < 0:
            raise BadRequestError(f"{path} must contain non-negative integer token ids, got {value!r}", param="prompt")
    return list(values)


def _parse_messages(messages: Any) -> list[ChatMessage]:
    if not isinstance(messages, list) or not messages:
        raise BadRequestError("messages must be a non-empty list", param="messages")
    parsed = []
    for i, message in enumerate(messages):
        path = f"messages[{i}]"
        if not isinstance(message, dict):
            raise BadRequestError(f"{path} must be an object", param=path)
        role = message.get("role")
        if role not in _CHAT_ROLES:
            raise BadRequestError(
                f"{path}.role must be one of {sorted(_CHAT_ROLES)}, got {role!r}", param=f"{path}.role"
            )
        if message.get("tool_calls") or message.get("function_call"):
            raise _unsupported(f"{path}.tool_calls", "tool calls in messages")
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise BadRequestError(f"{path}.name must be a string", param=f"{path}.name")
        parsed.append(ChatMessage(role=role, content=_message_text(message.get("content"), path), name=name))
    return parsed


def _message_text(content: Any, path: str) -> str:
    """Return a message's text; content parts other than text are rejected."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequestError(f"{path}.content must be a string or a list of parts", param=f"{path}.content")
    texts = []
    for j, part in enumerate(content):
        part_path = f"{path}.content[{j}]"
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise _unsupported(part_path, f"content part of type {kind!r} in {part_path} (only text)")
        if not isinstance(part.get("text"), str):
            raise BadRequestError(f"{part_path}.text must be a string", param=part_path)
        texts.append(part["text"])
    return "\n".join(texts)


def _parse_stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequestError("stop must be a string or a list of strings", param="stop")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise BadRequestError(f"stop allows at most {MAX_STOP_SEQUENCES} sequences, got {len(stop)}", param="stop")
    if any(s == "" for s in stop):
        raise BadRequestError("stop sequences must not be empty", param="stop")
    return list(stop)


def _parse_logit_bias(bias: Any) -> dict[int, float]:
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise BadRequestError("logit_bias must be an object mapping token ids to biases", param="logit_bias")
    parsed = {}
    for key, value in bias.items():
        try:
            token_id = int(key)
        except (TypeError, ValueError):
            raise BadRequestError(f"logit_bias key {key!r} is not a token id", param="logit_bias") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise BadRequestError(
                f"logit_bias[{key}] must be a number between -100 and 100, got {value!r}", param="logit_bias"
            )
        parsed[token_id] = float(value)
    return parsed


def _kv_transfer_params(body: dict[str, Any]) -> dict[str, Any] | None:
    params = body.get("kv_transfer_params")
    if params is not None and not isinstance(params, dict):
        raise BadRequestError("kv_transfer_params must be an object", param="kv_transfer_params")
    return params


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequestError("model is required and must be a string", param="model")
    return model


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bool(body: dict[str, Any], key: str, default: bool, path: str | None = None) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequestError(f"{path or key} must be a boolean, got {value!r}", param=path or key)
    return value


def _optional_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRequestError(f"{key} must be a string, got {value!r}", param=key)
    return value


def _int(body: dict[str, Any], key: str, default: Any, *, minimum: int | None = None, maximum: int | None = None) -> Any:
    value = _optional_int(body, key, minimum=minimum, maximum=maximum)
    return default if value is None else value


def _optional_int(
    body: dict[str, Any], key: str, *, minimum: int | None = None, maximum: int | None = None
) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not _is_int(value):
        raise BadRequestError(f"{key} must be an integer, got {value!r}", param=key)
    if minimum is not None and value < minimum:
        raise BadRequestError(f"{key} must be at least {minimum}, got {value}", param=key)
    if maximum is not None and value > maximum:
        raise BadRequestError(f"{key} must be at most {maximum}, got {value}", param=key)
    return value


def _float(
    body: dict[str, Any],
    key: str,
    default: float,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequestError(f"{key} must be a number, got {value!r}", param=key)
    if minimum is not None and (value < minimum or (exclusive_minimum and value == minimum)):
        bound = "greater than" if exclusive_minimum else "at least"
        raise BadRequestError(f"{key} must be {bound} {minimum}, got {value}", param=key)
    if maximum is not None and value > maximum:
        raise BadRequestError(f"{key} must be at most {maximum}, got {value}", param=key)
    return float(value)


def _int_list(body: dict[str, Any], key: str) -> list[int]:
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(_is_int(v) and v >= 0 for v in value):
        raise BadRequestError(f"{key} must be a list of non-negative integers", param=key)
    return list(value)


# ---------------------------------------------------------------- responses


def new_request_id(kind: str) -> str:
    """Return a fresh OpenAI-style id: `cmpl-...` for completions, `chatcmpl-...` for chat."""
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    """Return the Unix time in seconds used for `created` fields."""
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
    """Build a `usage` object; `prompt_tokens_details.cached_tokens` is set when known."""
    body: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        body["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return body


def _response(
    object_name: str,
    request_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage_body: dict[str, Any],
    kv_transfer_params: dict[str, Any] | None,
) -> dict[str, Any]:
    body = {
        "id": request_id,
        "object": object_name,
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_body,
    }
    if kv_transfer_params is not None:
        body["kv_transfer_params"] = kv_transfer_params
    return body


def _chunk(
    object_name: str,
    request_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage_body: dict[str, Any] | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": request_id,
        "object": object_name,
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage_body is not None:
        body["usage"] = usage_body
    return body


def completion_choice(
    index: int,
    text: str,
    finish_reason: str | None,
    stop_reason: int | str | None = None,
    logprobs: dict[str, Any] | None = None,
    prompt_logprobs: list[dict[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """Build one choice of a completion response or chunk.

    `prompt_logprobs` (from `prompt_logprob_position`) is added only when given, on the
    choice as vLLM places it for completions.
    """
    choice = {
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
    }
    if prompt_logprobs is not None:
        choice["prompt_logprobs"] = prompt_logprobs
    return choice


def completion_response(
    request_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage_body: dict[str, Any],
    kv_transfer_params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build a non-streamed `/v1/completions` response."""
    return _response("text_completion", request_id, created, model, choices, usage_body, kv_transfer_params)


def completion_chunk(
    request_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage_body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build one streamed completion chunk; an empty `choices` with `usage` is the final usage chunk."""
    return _chunk("text_completion", request_id, created, model, choices, usage_body)


def chat_choice(
    index: int,
    content: str,
    finish_reason: str | None,
    stop_reason: int | str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build one choice of a non-streamed chat response."""
    return {
        "index": index,
        "message": {"role": "assistant", "content": content},
        "logprobs": logprobs,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
    }


def chat_response(
    request_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage_body: dict[str, Any],
    kv_transfer_params: dict[str, Any] | None = None,
    prompt_logprobs: list[dict[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """Build a non-streamed `/v1/chat/completions` response.

    `prompt_logprobs` is added only when given, at the top level as vLLM places it for chat.
    """
    body = _response("chat.completion", request_id, created, model, choices, usage_body, kv_transfer_params)
    if prompt_logprobs is not None:
        body["prompt_logprobs"] = prompt_logprobs
    return body


def chat_chunk_choice(
    index: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    stop_reason: int | str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build one choice of a streamed chat chunk; `delta` is {"role": ...} and/or {"content": ...}."""
    return {
        "index": index,
        "delta": delta,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
    }


def chat_chunk(
    request_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage_body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build one streamed chat chunk; an empty `choices` with `usage` is the final usage chunk."""
    return _chunk("chat.completion.chunk", request_id, created, model, choices, usage_body)


def completion_logprobs(
    tokens: list[str],
    token_logprobs: list[float | None],
    top_logprobs: list[dict[str, float] | None],
    text_offset: list[int],
) -> dict[str, Any]:
    """Build the legacy completions `logprobs` object (parallel lists, one entry per token)."""
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def prompt_logprob_position(entries: list[tuple[int, float, int, str]]) -> dict[str, dict[str, Any]]:
    """Build one position of vLLM's `prompt_logprobs` list from (token id, logprob, rank, text) entries.

    The result maps each token id, as a string key, to its logprob, its vocabulary rank
    (1 is the most likely token) and its decoded text. Pass the prompt token first and then
    its top alternatives, as vLLM orders them. An id listed twice keeps its first entry.
    The list itself has None for the first prompt token, which has no logprob.
    """
    position: dict[str, dict[str, Any]] = {}
    for token_id, logprob, rank, text in entries:
        position.setdefault(str(token_id), {"logprob": logprob, "rank": rank, "decoded_token": text})
    return position


def chat_logprob_entry(token: str, logprob: float, top: list[tuple[str, float]]) -> dict[str, Any]:
    """Build one entry of a chat `logprobs.content` list; `top` lists (token, logprob) pairs."""
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode("utf-8")),
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))} for t, lp in top],
    }


def models_response(names: list[str], root: str, max_model_len: int | None, created: int | None = None) -> dict:
    """Build a `/v1/models` list with one entry per served model name."""
    created = now() if created is None else created
    return {
        "object": "list",
        "data": [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "llmisvc",
                "root": root,
                "parent": None,
                "max_model_len": max_model_len,
            }
            for name in names
        ],
    }


def sse(obj: dict[str, Any]) -> bytes:
    """Frame one JSON object as a server-sent event."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
