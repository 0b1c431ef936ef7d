"""`llmisvc sidecar` against simulated prefill and decode engines (real processes, real HTTP).

The simulators stand in for engines where only the orchestration is under test: they hold
and release blocks by the same `kv_transfer_params` and count tokens in `/metrics`.
"""

from __future__ import annotations

import re
import urllib.request

import openai
import pytest
import requests

from support import free_port, start, stop, wait_http

pytestmark = pytest.mark.e2e

MODEL = "sim-model"


def _metric(url: str, name: str, labels: str = "") -> float:
    """Return the sum of samples of `name` whose label set contains `labels`."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (not labels or labels in line):
            match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.eE+-]+)$", line)
            if match:
                total += float(match.group(2))
    return total


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("sidecar")
    prefill_port, failing_port, decode_port, sidecar_port, dead_port = (free_port() for _ in range(5))
    sim = ["sim", "--served-model-name", MODEL, "--host", "127.0.0.1", "--ttft-overhead-ms", "1", "--itl-ms", "1"]
    processes = [
        start([*sim, "--port", str(prefill_port)], logs / "prefill.log"),
        start([*sim, "--port", str(failing_port), "--failure-rate", "1", "--failure-types", "500"], logs / "failing.log"),
        # No prefix caching on the decode replica: cached_tokens can then only come from the
        # prefill replica's response.
        start([*sim, "--port", str(decode_port), "--no-enable-prefix-caching"], logs / "decode.log"),
    ]
    pool = ",".join(f"127.0.0.1:{port}" for port in (prefill_port, failing_port, dead_port))
    processes.append(
        start(
            [
                "sidecar",
                "--host", "127.0.0.1",
                "--port", str(sidecar_port),
                "--vllm-port", str(decode_port),
                "--prefill-pool", pool,
                "--prefill-timeout", "20",
            ],
            logs / "sidecar.log",
        )
    )
    try:
        for port in (prefill_port, failing_port, decode_port):
            wait_http(f"http://127.0.0.1:{port}/health", timeout=60)
        wait_http(f"http://127.0.0.1:{sidecar_port}/sidecar/metrics", timeout=60, process=processes[-1])
        yield {
            "prefill": f"127.0.0.1:{prefill_port}",
            "failing": f"127.0.0.1:{failing_port}",
            "dead": f"127.0.0.1:{dead_port}",
            "decode": f"http://127.0.0.1:{decode_port}",
            "sidecar": f"http://127.0.0.1:{sidecar_port}",
            "logs": logs,
        }
    finally:
        for process in processes:
            stop(process)


def _client(cluster, prefiller: str | None) -> openai.OpenAI:
    headers = {"x-prefiller-host-port": prefiller} if prefiller else {}
    return openai.OpenAI(base_url=cluster["sidecar"] + "/v1", api_key="unused", default_headers=headers, max_retries=0)


def test_max_completion_tokens_prefill_one_token(cluster):
    prefill_metrics = f"http://{cluster['prefill']}/metrics"
    before = _metric(prefill_metrics, "vllm:generation_tokens_total")
    reply = _client(cluster, cluster["prefill"]).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "count to two hundred " * 20}],
        max_completion_tokens=200,
    )
    after = _metric(prefill_metrics, "vllm:generation_tokens_total")
    assert after - before == 1
    assert 1 <= reply.usage.completion_tokens <= 200
    assert reply.usage.completion_tokens > 1
    decisions = _metric(cluster["sidecar"] + "/sidecar/metrics", "llmisvc_pd_decisions_total", 'decision="prefill_decode"')
    assert decisions >= 1


def test_stream_chat_gets_sse_after_json_prefill(cluster):
    metrics_url = cluster["sidecar"] + "/sidecar/metrics"
    fallbacks_before = _metric(metrics_url, "llmisvc_pd_fallbacks_total")
    transferred_before = _metric(cluster["decode"] + "/metrics", "sim:kv_transfer_tokens_total")
    stream = _client(cluster, cluster["prefill"]).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "stream me a long story please " * 30}],
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(chunks) > 2
    assert text
    assert len(usage) == 1
    assert usage[0].completion_tokens == 20
    # A streamed (SSE) prefill response would not parse as JSON and would count a fallback.
    assert _metric(metrics_url, "llmisvc_pd_fallbacks_total") == fallbacks_before
    assert _metric(cluster["decode"] + "/metrics", "sim:kv_transfer_tokens_total") > transferred_before


def test_cached_tokens_come_from_prefill(cluster):
    prompt = "a prompt long enough to fill several KV blocks on the prefill replica " * 12
    client = _client(cluster, cluster["prefill"])
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=4)
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4)
    assert reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens > 0


def test_prefiller_outside_pool_forbidden(cluster):
    response = requests.post(
        cluster["sidecar"] + "/v1/completions",
        json={"model": MODEL, "prompt": "hello", "max_tokens": 2},
        headers={"x-prefiller-host-port": "10.1.2.3:8000"},
        timeout=30,
    )
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "permission_error"
    assert "10.1.2.3:8000" in response.json()["error"]["message"]


def test_prefill_5xx_falls_back(cluster):
    metrics_url = cluster["sidecar"] + "/sidecar/metrics"
    before = _metric(metrics_url, "llmisvc_pd_fallbacks_total", 'reason="prefill_5xx"')
    reply = _client(cluster, cluster["failing"]).completions.create(model=MODEL, prompt="hello there", max_tokens=5)
    assert reply.usage.completion_tokens == 5
    assert _metric(metrics_url, "llmisvc_pd_fallbacks_total", 'reason="prefill_5xx"') == before + 1


def test_prefill_refused_falls_back(cluster):
    metrics_url = cluster["sidecar"] + "/sidecar/metrics"
    before = _metric(metrics_url, "llmisvc_pd_fallbacks_total", 'reason="prefill_connect"')
    reply = _client(cluster, cluster["dead"]).completions.create(model=MODEL, prompt="hello there", max_tokens=5)
    assert reply.usage.completion_tokens == 5
    assert _metric(metrics_url, "llmisvc_pd_fallbacks_total", 'reason="prefill_connect"') == before + 1


def test_prefill_4xx_returned_to_client(cluster):
    response = requests.post(
        cluster["sidecar"] + "/v1/completions",
        json={"model": MODEL, "prompt": "hello", "max_tokens": 2, "temperature": -3},
        headers={"x-prefiller-host-port": cluster["prefill"]},
        timeout=30,
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_no_header_proxies_to_decode(cluster):
    decode_before = _metric(cluster["decode"] + "/metrics", "vllm:generation_tokens_total")
    prefill_before = _metric(f"http://{cluster['prefill']}/metrics", "vllm:generation_tokens_total")
    reply = _client(cluster, None).completions.create(model=MODEL, prompt="plain request", max_tokens=3)
    assert reply.usage.completion_tokens == 3
    assert _metric(cluster["decode"] + "/metrics", "vllm:generation_tokens_total") == decode_before + 3
    assert _metric(f"http://{cluster['prefill']}/metrics", "vllm:generation_tokens_total") == prefill_before


def test_scored_prompt_skips_prefill_leg(cluster):
    # Imported KV has no logits, so a prompt-scoring request goes to the decode engine alone
    # even when the header names a prefill host.
    prefill_before = _metric(f"http://{cluster['prefill']}/metrics", "vllm:prompt_tokens_total")
    decisions = cluster["sidecar"] + "/sidecar/metrics"
    decode_only_before = _metric(decisions, "llmisvc_pd_decisions_total", 'decision="decode_only"')
    reply = _client(cluster, cluster["prefill"]).completions.create(
        model=MODEL, prompt="score this prompt please", max_tokens=2, echo=True, logprobs=0
    )
    assert reply.usage.completion_tokens == 2
    assert _metric(f"http://{cluster['prefill']}/metrics", "vllm:prompt_tokens_total") == prefill_before
    assert _metric(decisions, "llmisvc_pd_decisions_total", 'decision="decode_only"') == decode_only_before + 1
