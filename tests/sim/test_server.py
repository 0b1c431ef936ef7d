"""The simulated engine over real HTTP: OpenAI surface, caching, latency model, PD, failures."""

from __future__ import annotations

import json
import time

import msgpack
import openai
import pytest
import requests
import zmq

from support import free_port, free_port_run, start, stop, wait_http

pytestmark = pytest.mark.e2e


def _start_sim(tmp_path, name, *flags):
    port = free_port()
    process = start(["sim", "--port", str(port), "--served-model-name", "sim", *flags], tmp_path / f"{name}.log")
    wait_http(f"http://127.0.0.1:{port}/health", timeout=60, process=process)
    return process, port


@pytest.fixture(scope="module")
def sims(tmp_path_factory):
    """Two replicas in one process (ports P and P+1) publishing KV events, fast latency."""
    tmp = tmp_path_factory.mktemp("sim")
    port = free_port_run(2)
    events_port = free_port_run(2)
    events = json.dumps({"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{events_port}"})
    process = start(
        ["sim", "--port", str(port), "--replicas", "2", "--served-model-name", "sim", "--max-num-seqs", "2",
         "--ttft-overhead-ms", "5", "--prefill-ms-per-token", "0.5", "--itl-ms", "2", "--kv-events-config", events,
         "--seed", "7"],
        tmp / "sims.log",
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=60, process=process)
        wait_http(f"http://127.0.0.1:{port + 1}/health", timeout=60, process=process)
        yield port, port + 1, events_port
    finally:
        stop(process)


def _client(port):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)


def test_completion_usage_and_prefix_cache(sims):
    port, _, _ = sims
    client = _client(port)
    prompt = "cache me please " * 13  # 208 characters = 52 tokens = 3 full blocks
    first = client.completions.create(model="sim", prompt=prompt, max_tokens=7)
    second = client.completions.create(model="sim", prompt=prompt, max_tokens=7)
    assert first.usage.prompt_tokens == 52
    assert first.usage.completion_tokens == 7
    assert first.choices[0].finish_reason == "length"
    assert len(first.choices[0].text) == 28
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == 48


def test_chat_streaming_with_usage(sims):
    port, _, _ = sims
    stream = _client(port).chat.completions.create(
        model="sim",
        messages=[{"role": "user", "content": "stream please " * 10}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 5
    assert chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_seeded_output_is_deterministic(sims):
    port, _, _ = sims
    client = _client(port)
    texts = {client.completions.create(model="sim", prompt="x", max_tokens=8, seed=42).choices[0].text for _ in range(3)}
    assert len(texts) == 1


def test_metrics_use_vllm_names(sims):
    port, _, _ = sims
    _client(port).completions.create(model="sim", prompt="metrics " * 20, max_tokens=2)
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:cache_config_info",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:e2e_request_latency_seconds_count",
    ):
        assert name in text, name


def test_errors_match_openai(sims):
    port, _, _ = sims
    client = _client(port)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="sim", prompt="x", temperature=-1)
    assert info.value.body["param"] == "temperature"


def test_unknown_fields_ignored(sims):
    # vLLM ignores top-level fields it does not define, and routers add their own.
    port, _, _ = sims
    client = _client(port)
    extra = {"no_stop_trim": True, "router_hint": {"session": "abc"}}
    completion = client.completions.create(model="sim", prompt="hello", max_tokens=2, extra_body=extra)
    assert completion.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_body=extra
    )
    assert chat.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=True, extra_body=extra
    )
    finish_reasons = [chunk.choices[0].finish_reason for chunk in stream if chunk.choices]
    assert finish_reasons[-1] == "length"
    tokenized = requests.post(
        f"http://127.0.0.1:{port}/tokenize",
        json={"model": "sim", "messages": [{"role": "user", "content": "hi"}], "add_special_tokens": False},
        timeout=10,
    )
    assert tokenized.status_code == 200, tokenized.text


def test_unimplemented_fields_still_400(sims):
    port, _, _ = sims
    client = _client(port)
    with pytest.raises(openai.BadRequestError) as suffix:
        client.completions.create(model="sim", prompt="x", suffix="tail", extra_body={"no_stop_trim": True})
    assert suffix.value.body["param"] == "suffix"
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError) as tools:
        client.chat.completions.create(model="sim", messages=[{"role": "user", "content": "hi"}], tools=[tool])
    assert tools.value.body["param"] == "tools"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"prompt_logprobs": 1}, "prompt_logprobs"),
        ({"echo": True, "logprobs": 2}, "logprobs"),
        ({"echo": True, "max_tokens": 0}, "max_tokens"),
    ],
)
def test_prompt_scoring_400(sims, fields, param):
    # Simulated tokens have no model to score a prompt with.
    port, _, _ = sims
    response = requests.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "sim", "prompt": "x", **fields}, timeout=10)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_chat_prompt_logprobs_400(sims):
    port, _, _ = sims
    with pytest.raises(openai.BadRequestError) as info:
        _client(port).chat.completions.create(
            model="sim", messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_body={"prompt_logprobs": 0}
        )
    assert info.value.body["param"] == "prompt_logprobs"


def test_echo_with_zero_logprobs_still_served(sims):
    port, _, _ = sims
    completion = _client(port).completions.create(model="sim", prompt="x", max_tokens=2, echo=True, logprobs=0)
    assert completion.choices[0].finish_reason == "length"


def test_tokenize_counts_four_chars(sims):
    port, _, _ = sims
    body = requests.post(f"http://127.0.0.1:{port}/tokenize", json={"prompt": "abcdefghi"}, timeout=5).json()
    assert body["count"] == 3
    text = requests.post(f"http://127.0.0.1:{port}/detokenize", json={"tokens": body["tokens"]}, timeout=5).json()
    assert text["prompt"] == "abcdefghi"
    bad = requests.post(f"http://127.0.0.1:{port}/detokenize", json={"tokens": "x"}, timeout=5)
    assert bad.status_code == 400


def test_queueing_beyond_max_num_seqs(sims):
    port, _, _ = sims
    import concurrent.futures

    client = _client(port)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client.completions.create, model="sim", prompt=f"{i} long", max_tokens=300) for i in range(4)]
        deadline = time.monotonic() + 20
        waiting_seen = 0.0
        while time.monotonic() < deadline and waiting_seen < 2:
            text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            line = next(l for l in text.splitlines() if l.startswith("vllm:num_requests_waiting"))
            waiting_seen = max(waiting_seen, float(line.split()[-1]))
            time.sleep(0.02)
        for future in futures:
            future.result()
    assert waiting_seen >= 2


def test_cached_prompt_has_shorter_ttft(sims):
    port, _, _ = sims
    prompt = "latency model " * 800  # 2,800 tokens at 0.5 ms each: about 1.4 s uncached

    def ttft():
        started = time.monotonic()
        stream = _client(port).completions.create(model="sim", prompt=prompt, max_tokens=2, stream=True)
        next(iter(stream))
        elapsed = time.monotonic() - started
        for _ in stream:
            pass
        return elapsed

    cold = ttft()
    warm = ttft()
    assert cold > 1.2
    # Generous on a loaded host: the cached prefill itself takes about 10 ms.
    assert warm < cold / 2


def test_kv_events_published(sims):
    port, _, events_port = sims
    context = zmq.Context.instance()
    socket_ = context.socket(zmq.SUB)
    socket_.setsockopt(zmq.SUBSCRIBE, b"kv@")
    socket_.connect(f"tcp://127.0.0.1:{events_port}")
    try:
        deadline = time.monotonic() + 20
        stored = []
        while time.monotonic() < deadline and not stored:
            _client(port).completions.create(model="sim", prompt=f"events {time.monotonic()} " * 20, max_tokens=1)
            if socket_.poll(500):
                topic, seq, payload = socket_.recv_multipart()
                batch = msgpack.unpackb(payload)
                stored = [e for e in batch[1] if e[0] == "BlockStored"]
        assert topic.decode() == f"kv@127.0.0.1:{port}@sim"
        assert len(seq) == 8
        assert stored and stored[0][4] == 16
        assert len(stored[0][3]) == 16 * len(stored[0][1])
    finally:
        socket_.close(0)


def test_kv_transfer_between_replicas(sims):
    prefill_port, decode_port, _ = sims
    prompt = "disaggregated prefill " * 20
    prefill = requests.post(
        f"http://127.0.0.1:{prefill_port}/v1/completions",
        json={"model": "sim", "prompt": prompt, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}},
        timeout=30,
    ).json()
    params = prefill["kv_transfer_params"]
    assert params["do_remote_prefill"] is True
    assert params["remote_port"] == prefill_port
    assert len(params["remote_block_ids"]) == len(prompt) // 4 // 16
    assert requests.get(f"http://127.0.0.1:{prefill_port}/sim/state", timeout=5).json()["held_transfers"] >= 1

    decode = requests.post(
        f"http://127.0.0.1:{decode_port}/v1/completions",
        json={"model": "sim", "prompt": prompt, "max_tokens": 4, "kv_transfer_params": params},
        timeout=30,
    ).json()
    assert decode["usage"]["completion_tokens"] == 4
    metrics = requests.get(f"http://127.0.0.1:{decode_port}/metrics", timeout=5).text
    transferred = next(l for l in metrics.splitlines() if l.startswith("sim:kv_transfer_tokens_total"))
    assert float(transferred.split()[-1]) > 0
    deadline = time.monotonic() + 10
    while requests.get(f"http://127.0.0.1:{prefill_port}/sim/state", timeout=5).json()["held_transfers"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert requests.get(f"http://127.0.0.1:{prefill_port}/sim/state", timeout=5).json()["held_transfers"] == 0


def test_echo_mode(tmp_path):
    process, port = _start_sim(tmp_path, "echo", "--echo")
    try:
        client = _client(port)
        started = time.monotonic()
        completion = client.completions.create(model="sim", prompt="say exactly this")
        chat = client.chat.completions.create(model="sim", messages=[{"role": "user", "content": "chat echo"}])
        assert completion.choices[0].text == "say exactly this"
        assert chat.choices[0].message.content == "chat echo"
        assert time.monotonic() - started < 5
    finally:
        stop(process)


def test_failure_injection_kinds(tmp_path):
    process, port = _start_sim(tmp_path, "failing", "--failure-rate", "1", "--failure-types", "500,drop,hang,cut", "--itl-ms", "1")
    seen = set()
    try:
        url = f"http://127.0.0.1:{port}/v1/completions"
        for i in range(24):
            body = {"model": "sim", "prompt": f"fail {i}", "max_tokens": 6, "stream": True}
            try:
                response = requests.post(url, json=body, timeout=1.5, stream=True)
                if response.status_code == 500:
                    seen.add("500")
                    continue
                data = b"".join(response.iter_content(None))
                if b"[DONE]" not in data:
                    seen.add("cut")
            except requests.exceptions.ReadTimeout:
                seen.add("hang")
            except requests.exceptions.ConnectionError as exc:
                seen.add("hang" if "timed out" in str(exc) else "drop")
            except requests.exceptions.ChunkedEncodingError:
                seen.add("cut")
        metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    finally:
        stop(process)
    assert seen == {"500", "drop", "hang", "cut"}
    assert "sim:failures_injected_total" in metrics
