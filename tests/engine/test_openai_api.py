"""The engine's OpenAI API end to end: one real engine process on the embedded model.

The engine runs with a 64-token step budget, so long prompts are prefilled in many chunks
and tests can observe decodes interleaving with them and disconnects landing mid-prefill.
"""

import concurrent.futures
import json
import threading
import time

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from support import free_port, start, stop, wait_http

pytestmark = pytest.mark.e2e

MODEL = "smol"
MAX_MODEL_LEN = 4096


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("engine") / "engine.log"
    args = ["engine", "--port", str(port), "--served-model-name", MODEL, "--threads", "2",
            "--max-num-batched-tokens", "64", "--max-num-seqs", "16", "--max-model-len", str(MAX_MODEL_LEN), "--seed", "0",
            # 1024 blocks (16k tokens, about 380 MB) instead of the default 10% of RAM keeps
            # several test engines within a shared machine's memory.
            "--num-gpu-blocks-override", "1024"]  # fmt: skip
    process = start(args, log)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=300, process=process)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=300, max_retries=0)


def metrics(base: str) -> dict[str, float]:
    """Return every sample of /metrics as {name{labels}: value}, parsed by prometheus_client."""
    samples = {}
    for family in text_string_to_metric_families(requests.get(f"{base}/metrics", timeout=10).text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def wait_idle(base: str, timeout: float = 60.0) -> dict[str, float]:
    """Wait until no request runs or waits and no KV block is in use; return the metrics."""
    deadline = time.monotonic() + timeout
    while True:
        current = metrics(base)
        idle = (
            current["vllm:num_requests_running{}"] == 0
            and current["vllm:num_requests_waiting{}"] == 0
            and current["vllm:kv_cache_usage_perc{}"] == 0
        )
        if idle:
            return current
        if time.monotonic() > deadline:
            raise AssertionError(f"engine not idle after {timeout}s: {current}")
        time.sleep(0.2)


def long_prompt_ids(length: int, offset: int = 0) -> list[int]:
    # Plain word tokens (ids well inside the vocabulary), varied so no prefix repeats.
    return [1000 + (offset + i * 7) % 20000 for i in range(length)]


# ---------------------------------------------------------------- skeleton


def test_completion(client):
    result = client.completions.create(model=MODEL, prompt="What is Kubernetes?", max_tokens=8, temperature=0)
    choice = result.choices[0]
    assert choice.text.strip()
    assert choice.finish_reason == "length"
    assert result.usage.completion_tokens == 8
    assert result.usage.prompt_tokens > 0
    assert result.usage.total_tokens == result.usage.prompt_tokens + 8


def test_streamed_chat(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a color."}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text.strip()
    assert finish in (["stop"], ["length"])
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens <= 12
    assert chunks[-1].usage.prompt_tokens > 10


def test_chat_matches_streamed_chat(client):
    messages = [{"role": "user", "content": "Count from one to five."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    streamed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == plain.choices[0].message.content


# ---------------------------------------------------------------- sampling


def test_seed_determinism(client):
    def sample(seed):
        return client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=1.0, seed=seed
        ).choices[0].text

    assert sample(1234) == sample(1234)
    assert len({sample(seed) for seed in (1, 2, 3)}) > 1


def test_n3_with_seed(client):
    def sample():
        result = client.completions.create(
            model=MODEL, prompt="My favourite animal is", max_tokens=12, temperature=1.0, n=3, seed=99
        )
        return [c.text for c in sorted(result.choices, key=lambda c: c.index)], result

    first, result = sample()
    second, _ = sample()
    assert [c.index for c in sorted(result.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert first == second
    assert len(set(first)) > 1
    assert result.usage.completion_tokens == 36


def test_stop_string_split_across_tokens(client):
    prompt = "The capital of France is"
    reference = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, logprobs=0)
    tokens = reference.choices[0].logprobs.tokens
    text = reference.choices[0].text
    # Find two neighbouring tokens with text, and a stop string that straddles them.
    for i in range(len(tokens) - 1):
        left, right = tokens[i], tokens[i + 1]
        if len(left.strip()) >= 2 and len(right.strip()) >= 1:
            stop = left[-2:] + right[:1]
            break
    else:
        pytest.fail(f"no straddling token pair in {tokens}")
    expected = text[: text.index(stop)]

    stopped = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop])
    assert stopped.choices[0].text == expected
    assert stopped.choices[0].finish_reason == "stop"

    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop], stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_token_ids_and_included_stop_string(base):
    prompt = "The three primary colors are"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    reference = requests.post(f"{base}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    ids = requests.post(f"{base}/tokenize", json={"prompt": reference, "add_special_tokens": False}, timeout=10).json()["tokens"]

    stopped = requests.post(f"{base}/v1/completions", json={**body, "stop_token_ids": [ids[2]]}, timeout=120).json()
    choice = stopped["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["stop_reason"] == ids[2]
    assert reference.startswith(choice["text"])
    assert len(choice["text"]) < len(reference)

    stop = reference.strip()[:3]
    included = {**body, "stop": [stop], "include_stop_str_in_output": True}
    choice = requests.post(f"{base}/v1/completions", json=included, timeout=120).json()["choices"][0]
    assert choice["text"] == reference[: reference.index(stop) + len(stop)]
    assert choice["stop_reason"] == stop


def test_continuous_usage_stats(base):
    body = {
        "model": MODEL,
        "prompt": "Hello there",
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "ignore_eos": True,
    }
    with requests.post(f"{base}/v1/completions", json=body, stream=True, timeout=120) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    counts = [chunk["usage"]["completion_tokens"] for chunk in chunks]
    assert all("usage" in chunk for chunk in chunks)
    assert counts == sorted(counts)
    assert counts[-1] == 6
    assert chunks[-1]["choices"] == []


def test_logprobs(client):
    result = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0, logprobs=3)
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == 5
    assert all(len(top) == 3 for top in logprobs.top_logprobs)
    assert "".join(logprobs.tokens) == result.choices[0].text
    # Greedy: each chosen token is the most likely one.
    assert all(lp == pytest.approx(max(top.values())) for lp, top in zip(logprobs.token_logprobs, logprobs.top_logprobs))

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 2 for entry in content)


def test_echo_token_ids_and_prompt_lists(client):
    echoed = client.completions.create(model=MODEL, prompt="Roses are red,", max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("Roses are red,")

    ids = requests.post(f"{client.base_url}".replace("/v1/", "/tokenize"), json={"prompt": "Roses are red,"}).json()["tokens"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0)
    assert "Roses are red," + by_ids.choices[0].text == echoed.choices[0].text

    several = client.completions.create(model=MODEL, prompt=["One", "Two"], max_tokens=2, temperature=0, n=2)
    assert sorted(c.index for c in several.choices) == [0, 1, 2, 3]


def test_max_completion_tokens_and_min_tokens(client):
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say yes."}], max_completion_tokens=3, temperature=0
    )
    assert chat.usage.completion_tokens <= 3
    forced = client.completions.create(
        model=MODEL, prompt="The end.", max_tokens=12, temperature=0, extra_body={"min_tokens": 12}
    )
    assert forced.usage.completion_tokens == 12


def test_emoji_and_cjk_stream_byte_exact(client):
    prompt = "Emoji and Japanese: 😀😃😄😁😆 東京は日本の首都です。大阪は"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0)
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stream=True)
    pieces = [c.choices[0].text for c in streamed]
    text = plain.choices[0].text
    assert any(ord(ch) > 0x2FFF for ch in text), f"output has no CJK or emoji: {text!r}"
    assert "".join(pieces).encode("utf-8") == text.encode("utf-8")
    assert not any("\ufffd" in piece for piece in pieces)


# ---------------------------------------------------------------- errors


def test_context_length_400(client):
    ids = long_prompt_ids(MAX_MODEL_LEN + 10)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=ids, max_tokens=4)
    message = str(info.value)
    assert str(MAX_MODEL_LEN) in message
    assert str(MAX_MODEL_LEN + 10) in message


def test_unknown_and_unimplemented_params_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"frobnicate": True})
    assert "frobnicate" in str(info.value)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    assert "tools" in str(info.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)


def test_out_of_vocabulary_token_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=[1, 2, 10**6], max_tokens=2)
    assert "1000000" in str(info.value)
    after = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=2)
    assert after.usage.completion_tokens == 2


# ---------------------------------------------------------------- cache, batching, aborts


def test_metrics_parse_with_vllm_names(base, client):
    client.completions.create(model=MODEL, prompt="Metrics please", max_tokens=2)
    current = metrics(base)
    for name in (
        "vllm:num_requests_running{}",
        "vllm:num_requests_waiting{}",
        "vllm:kv_cache_usage_perc{}",
        "vllm:prefix_cache_queries_total{}",
        "vllm:prefix_cache_hits_total{}",
        "vllm:prompt_tokens_total{}",
        "vllm:generation_tokens_total{}",
        "vllm:time_to_first_token_seconds_count{}",
        "vllm:inter_token_latency_seconds_count{}",
        "vllm:e2e_request_latency_seconds_count{}",
        "vllm:request_queue_time_seconds_count{}",
    ):
        assert name in current, name
    info = [key for key in current if key.startswith("vllm:cache_config_info{")]
    assert len(info) == 1
    assert "block_size=16" in info[0]
    assert "num_gpu_blocks=" in info[0]
    assert current["vllm:generation_tokens_total{}"] >= 2


def test_prefix_cache_hits_counted(base, client):
    ids = long_prompt_ids(200, offset=5)
    before = metrics(base)
    first = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0)
    second = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0)
    after = metrics(base)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == 192
    assert after["vllm:prefix_cache_queries_total{}"] - before["vllm:prefix_cache_queries_total{}"] == 400
    assert after["vllm:prefix_cache_hits_total{}"] - before["vllm:prefix_cache_hits_total{}"] == 192
    assert second.choices[0].text == first.choices[0].text


def test_decode_continues_during_long_prefill(base, client):
    stream = client.completions.create(
        model=MODEL, prompt="List many numbers:", max_tokens=600, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    arrivals: list[float] = []
    window: dict[str, float] = {}

    def long_request():
        window["start"] = time.monotonic()
        client.completions.create(model=MODEL, prompt=long_prompt_ids(2000, offset=11), max_tokens=1)
        window["end"] = time.monotonic()

    worker = threading.Thread(target=long_request)
    for chunk in stream:
        arrivals.append(time.monotonic())
        if len(arrivals) == 5:
            worker.start()
        if "end" in window:
            break
    stream.close()
    worker.join(timeout=300)

    during = [t for t in arrivals if window["start"] < t < window["end"]]
    # 2000 prompt tokens at 64 per step take about 32 steps; the decode gets a token in each.
    assert len(during) >= 10, f"only {len(during)} decode tokens during a {window['end'] - window['start']:.1f}s prefill"
    wait_idle(base)


def test_disconnect_mid_stream_frees_blocks(base):
    before = metrics(base)
    body = {"model": MODEL, "prompt": "Tell a long story.", "max_tokens": 2000, "stream": True, "ignore_eos": True}
    with requests.post(f"{base}/v1/completions", json=body, stream=True, timeout=60) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
    assert any(line.startswith(b"data: ") for line in received)

    after = wait_idle(base)
    aborted = 'vllm:request_success_total{finished_reason=abort}'
    assert after[aborted] == before[aborted] + 1
    assert after["vllm:generation_tokens_total{}"] - before["vllm:generation_tokens_total{}"] < 2000


def test_disconnect_mid_prefill_frees_blocks(base):
    before = metrics(base)
    body = {"model": MODEL, "prompt": long_prompt_ids(3000, offset=23), "max_tokens": 5}
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{base}/v1/completions", json=body, timeout=(5, 1.5))

    after = wait_idle(base)
    aborted = 'vllm:request_success_total{finished_reason=abort}'
    assert after[aborted] == before[aborted] + 1
    # Aborted before its first token: nothing was generated for it.
    assert after["vllm:generation_tokens_total{}"] == before["vllm:generation_tokens_total{}"]


def test_concurrent_requests_all_complete(base, client):
    prompts = [f"Fact number {i}:" for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda p: client.completions.create(model=MODEL, prompt=p, max_tokens=10), prompts))
    assert all(r.usage.completion_tokens <= 10 and r.choices[0].finish_reason for r in results)
    wait_idle(base)
