"""Prefill and decode leg bodies, and the usage rewrite of the decode response."""

from __future__ import annotations

import json

from llmisvc.gateway.pd import UsageRewriter, build_decode_body, build_prefill_body

CHAT = {
    "model": "m",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
    "stream_options": {"include_usage": True},
    "max_completion_tokens": 200,
    "min_tokens": 5,
    "stop": ["\n"],
    "stop_token_ids": [7],
    "n": 2,
    "logprobs": True,
    "top_logprobs": 3,
    "prompt_logprobs": 2,
    "temperature": 0.5,
}


def test_prefill_body_is_capped_json():
    body = build_prefill_body(CHAT)
    assert body["stream"] is False
    assert body["max_tokens"] == 1
    assert body["max_completion_tokens"] == 1
    assert body["ignore_eos"] is True
    assert body["kv_transfer_params"] == {"do_remote_decode": True}
    for field in ("stream_options", "min_tokens", "stop", "stop_token_ids", "n", "logprobs", "top_logprobs", "prompt_logprobs"):
        assert field not in body, field
    assert body["temperature"] == 0.5
    assert body["messages"] == CHAT["messages"]


def test_prefill_body_max_completion_only_if_sent():
    body = build_prefill_body({"model": "m", "prompt": "x", "max_tokens": 50})
    assert body["max_tokens"] == 1
    assert "max_completion_tokens" not in body


def test_prefill_body_leaves_request_alone():
    original = json.loads(json.dumps(CHAT))
    build_prefill_body(CHAT)
    assert CHAT == original


def test_decode_body_is_original_plus_params():
    params = {"do_remote_prefill": True, "remote_block_ids": [1, 2], "remote_host": "h", "remote_port": 1}
    body = build_decode_body(CHAT, params)
    assert body["kv_transfer_params"] == params
    assert {k: v for k, v in body.items() if k != "kv_transfer_params"} == CHAT


def test_decode_body_without_params_recomputes():
    body = build_decode_body({**CHAT, "kv_transfer_params": {"do_remote_decode": True}}, None)
    assert "kv_transfer_params" not in body


STREAM = (
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"Hel"}}],"usage":null}\n\n'
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"lo"}}],"usage":null}\n\n'
    b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":40,"completion_tokens":2,'
    b'"total_tokens":42,"prompt_tokens_details":{"cached_tokens":0}}}\n\n'
    b"data: [DONE]\n\n"
)


def _usage_events(stream: bytes) -> list[dict]:
    events = []
    for line in stream.split(b"\n"):
        if line.startswith(b"data: {"):
            event = json.loads(line[6:])
            if event.get("usage"):
                events.append(event["usage"])
    return events


def test_rewriter_unsplit_stream():
    rewriter = UsageRewriter(32)
    out = rewriter.feed(STREAM) + rewriter.flush()
    usage = _usage_events(out)
    assert len(usage) == 1
    assert usage[0]["prompt_tokens_details"]["cached_tokens"] == 32
    assert usage[0]["prompt_tokens"] == 40
    assert out.endswith(b"data: [DONE]\n\n")
    # Events without usage pass through byte for byte.
    assert out.startswith(STREAM[: STREAM.index(b'data: {"id":"c1","choices":[],')])


def test_rewriter_usage_split_at_every_byte():
    expected = UsageRewriter(32).feed(STREAM)
    for cut in range(1, len(STREAM)):
        rewriter = UsageRewriter(32)
        out = rewriter.feed(STREAM[:cut]) + rewriter.feed(STREAM[cut:]) + rewriter.flush()
        assert out == expected, cut


def test_rewriter_three_way_splits():
    expected = UsageRewriter(5).feed(STREAM)
    step = 17
    for first in range(1, len(STREAM) - step, step):
        rewriter = UsageRewriter(5)
        parts = (STREAM[:first], STREAM[first : first + step], STREAM[first + step :])
        out = b"".join(rewriter.feed(part) for part in parts) + rewriter.flush()
        assert out == expected, first


def test_rewriter_crlf_events():
    stream = STREAM.replace(b"\n\n", b"\r\n\r\n")
    rewriter = UsageRewriter(9)
    out = rewriter.feed(stream[:150]) + rewriter.feed(stream[150:]) + rewriter.flush()
    assert b'"cached_tokens":9' in out
    assert out.count(b"\r\n\r\n") == 4


def test_rewriter_json_body():
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 10, "prompt_tokens_details": None}}).encode()
    out = json.loads(UsageRewriter(8).rewrite_json(body))
    assert out["usage"]["prompt_tokens_details"] == {"cached_tokens": 8}


def test_rewriter_leaves_body_without_usage():
    body = b'{"choices": []}'
    assert UsageRewriter(8).rewrite_json(body) == body
