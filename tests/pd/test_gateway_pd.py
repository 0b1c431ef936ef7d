"""Prefill/decode through `llmisvc gateway` with simulated engines (real processes and HTTP).

Simulators stand in for engines: only the routing and the two legs are under test here
(real-engine KV transfer is in test_kv_transfer.py).
"""

from __future__ import annotations

import json
import time

import openai
import pytest
import requests

from pd_support import THRESHOLD_CONFIG, metric_sum
from support import free_port, start, stop, wait_http

pytestmark = pytest.mark.e2e

MODEL = "pdsim"
ROLE = "llm-d.ai/role"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    logs = tmp_path_factory.mktemp("gateway-pd")
    ports = {name: free_port() for name in ("prefill", "decode", "failing", "trap", "sidecar", "gateway")}
    sim = ["sim", "--served-model-name", MODEL, "--host", "127.0.0.1", "--ttft-overhead-ms", "1", "--itl-ms", "1"]
    processes = [
        start([*sim, "--port", str(ports["prefill"])], logs / "prefill.log"),
        start([*sim, "--port", str(ports["decode"]), "--no-enable-prefix-caching"], logs / "decode.log"),
        start([*sim, "--port", str(ports["failing"]), "--failure-rate", "1", "--failure-types", "500"], logs / "failing.log"),
        # Not part of any service: a client header naming it must not reach it.
        start([*sim, "--port", str(ports["trap"])], logs / "trap.log"),
    ]
    address = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    # A sidecar that would honour a prefill header naming the trap: it receives one only if the
    # gateway forwards the client's header.
    processes.append(
        start(
            ["sidecar", "--host", "127.0.0.1", "--port", str(ports["sidecar"]), "--vllm-port", str(ports["decode"]),
             "--prefill-pool", address["trap"]],
            logs / "sidecar.log",
        )
    )

    def service(name: str, model: str, endpoints: list[tuple[str, str]], config: dict | None = None) -> dict:
        return {
            "namespace": "default",
            "name": name,
            "model": model,
            "shape": "pd",
            "scheduler_config": config,
            "endpoints": [{"address": address[e], "role": role, "ready": True} for e, role in endpoints],
        }

    config = {
        "services": [
            service("always", MODEL, [("decode", "decode"), ("prefill", "prefill")]),
            service("noprefill", MODEL, [("decode", "decode")]),
            service("threshold", MODEL, [("decode", "decode"), ("prefill", "prefill")], THRESHOLD_CONFIG),
            service("failing", MODEL, [("decode", "decode"), ("failing", "prefill")]),
            {**service("viasidecar", MODEL, [("sidecar", "both")]), "shape": "scheduler"},
        ]
    }
    config_path = logs / "gateway.json"
    config_path.write_text(json.dumps(config))
    processes.append(
        start(
            ["gateway", "--host", "127.0.0.1", "--port", str(ports["gateway"]), "--config", str(config_path),
             "--health-interval", "0.5"],
            logs / "gateway.log",
        )
    )
    try:
        for name in ("prefill", "decode", "failing", "trap", "sidecar"):
            wait_http(f"http://{address[name]}/health", timeout=60)
        wait_http(f"http://{address['gateway']}/health", timeout=60, process=processes[-1])
        yield {"url": f"http://{address['gateway']}", **{name: f"http://{a}" for name, a in address.items()}}
    finally:
        for process in processes:
            stop(process)


def _client(gateway, service: str, headers: dict | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{gateway['url']}/default/{service}/v1", api_key="unused", default_headers=headers or {}, max_retries=0
    )


def _wait_ready(gateway, service: str) -> None:
    """Wait until the gateway's health probes have marked the service's endpoints ready."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        response = requests.post(
            f"{gateway['url']}/default/{service}/v1/completions",
            json={"model": MODEL, "prompt": "warm", "max_tokens": 1},
            timeout=30,
        )
        # 429 also means "not yet": the scheduler filters out endpoints whose first health
        # probe or metrics scrape failed until the next one passes.
        if response.status_code == 200 or service == "noprefill":
            return
        time.sleep(0.3)


def test_chat_max_completion_tokens_prefill_one_token(gateway):
    _wait_ready(gateway, "always")
    before = metric_sum(gateway["prefill"] + "/metrics", "vllm:generation_tokens_total")
    reply = _client(gateway, "always").chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "tell me everything you know " * 10}],
        max_completion_tokens=200,
    )
    assert metric_sum(gateway["prefill"] + "/metrics", "vllm:generation_tokens_total") - before == 1
    assert 1 < reply.usage.completion_tokens <= 200


def test_stream_chat_sse_with_prefill_cache_hits(gateway):
    _wait_ready(gateway, "always")
    client = _client(gateway, "always")
    messages = [{"role": "user", "content": "a long shared system context for caching " * 20}]
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    fallbacks = metric_sum(gateway["url"] + "/metrics", "llmisvc_pd_fallbacks_total")
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    usage = [c.usage for c in chunks if c.usage is not None]
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 1
    assert len(usage) == 1
    assert usage[0].completion_tokens == 8
    # The decode simulator caches nothing, so cached tokens can only be the prefill's hits.
    assert usage[0].prompt_tokens_details.cached_tokens > 0
    assert metric_sum(gateway["url"] + "/metrics", "llmisvc_pd_fallbacks_total") == fallbacks


def test_always_split_no_prefill_is_503(gateway):
    response = requests.post(
        f"{gateway['url']}/default/noprefill/v1/completions",
        json={"model": MODEL, "prompt": "hello", "max_tokens": 2},
        timeout=30,
    )
    assert response.status_code == 503
    assert "prefill" in response.json()["error"]["message"]


def test_threshold_short_prompt_decode_only(gateway):
    _wait_ready(gateway, "threshold")
    prefill_before = metric_sum(gateway["prefill"] + "/metrics", "vllm:prompt_tokens_total")
    reply = _client(gateway, "threshold").completions.create(model=MODEL, prompt="short prompt", max_tokens=3)
    assert reply.usage.completion_tokens == 3
    assert metric_sum(gateway["prefill"] + "/metrics", "vllm:prompt_tokens_total") == prefill_before
    assert metric_sum(gateway["url"] + "/metrics", "llmisvc_pd_decisions_total", 'decision="decode_only"') >= 1


def test_threshold_long_prompt_splits(gateway):
    _wait_ready(gateway, "threshold")
    prefill_before = metric_sum(gateway["prefill"] + "/metrics", "vllm:prompt_tokens_total")
    prompt = "an uncached prompt well over two hundred tokens " * 40
    reply = _client(gateway, "threshold").completions.create(model=MODEL, prompt=prompt, max_tokens=3)
    assert reply.usage.completion_tokens == 3
    assert metric_sum(gateway["prefill"] + "/metrics", "vllm:prompt_tokens_total") > prefill_before


def test_failing_prefill_falls_back(gateway):
    _wait_ready(gateway, "failing")
    before = metric_sum(gateway["url"] + "/metrics", "llmisvc_pd_fallbacks_total", 'reason="prefill_5xx"')
    reply = _client(gateway, "failing").completions.create(model=MODEL, prompt="hello again", max_tokens=4)
    assert reply.usage.completion_tokens == 4
    assert metric_sum(gateway["url"] + "/metrics", "llmisvc_pd_fallbacks_total", 'reason="prefill_5xx"') > before


def test_client_prefiller_header_stripped(gateway):
    _wait_ready(gateway, "viasidecar")
    trap_host = gateway["trap"].removeprefix("http://")
    reply = _client(gateway, "viasidecar", {"x-prefiller-host-port": trap_host}).completions.create(
        model=MODEL, prompt="route me somewhere else please", max_tokens=2
    )
    assert reply.usage.completion_tokens == 2
    assert metric_sum(gateway["trap"] + "/metrics", "vllm:prompt_tokens_total") == 0
    assert metric_sum(gateway["sidecar"] + "/sidecar/metrics", "llmisvc_pd_decisions_total") == 0


def test_sidecar_honours_header_directly(gateway):
    """Control for the test above: the same header sent to the sidecar does reach the trap."""
    trap_host = gateway["trap"].removeprefix("http://")
    reply = openai.OpenAI(
        base_url=gateway["sidecar"] + "/v1", api_key="unused", default_headers={"x-prefiller-host-port": trap_host}, max_retries=0
    ).completions.create(model=MODEL, prompt="direct to the sidecar", max_tokens=2)
    assert reply.usage.completion_tokens == 2
    assert metric_sum(gateway["trap"] + "/metrics", "vllm:prompt_tokens_total") > 0


def test_prompt_logprobs_stay_decode_only(gateway):
    # Imported KV has no logits, so a request scoring its prompt skips the prefill leg.
    _wait_ready(gateway, "always")
    prefill_before = metric_sum(gateway["prefill"] + "/metrics", "vllm:prompt_tokens_total")
    decode_only_before = metric_sum(gateway["url"] + "/metrics", "llmisvc_pd_decisions_total", 'decision="decode_only"')
    reply = _client(gateway, "always").completions.create(
        model=MODEL, prompt="score this prompt", max_tokens=2, echo=True, logprobs=0
    )
    assert reply.usage.completion_tokens == 2
    assert metric_sum(gateway["prefill"] + "/metrics", "vllm:prompt_tokens_total") == prefill_before
    decode_only = metric_sum(gateway["url"] + "/metrics", "llmisvc_pd_decisions_total", 'decision="decode_only"')
    assert decode_only == decode_only_before + 1
