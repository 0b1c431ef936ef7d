"""`llmisvc gateway --pd-legs sidecar` in front of `llmisvc sidecar` (real processes, real HTTP).

This is the Kubernetes topology on one machine: the gateway picks the decode endpoint (the
sidecar) and the prefill endpoint, and names the latter in `x-prefiller-host-port`; the
sidecar runs both legs. Simulators stand in for the engines, because only the routing of
the legs is under test (real-engine KV transfer is in test_kv_transfer.py). The sidecar
learns its pool from the static `--prefill-pool` option instead of the Kubernetes API.
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

MODEL = "legsim"

@pytest.fixture(scope="module")
def legs(tmp_path_factory):
    logs = tmp_path_factory.mktemp("sidecar-legs")
    names = ("prefill_a", "prefill_b", "decode", "trap", "sidecar", "gateway")
    ports = {name: free_port() for name in names}
    address = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    sim = ["sim", "--served-model-name", MODEL, "--host", "127.0.0.1", "--ttft-overhead-ms", "1", "--itl-ms", "1"]
    processes = [
        start([*sim, "--port", str(ports["prefill_a"])], logs / "prefill_a.log"),
        start([*sim, "--port", str(ports["prefill_b"])], logs / "prefill_b.log"),
        # No prefix caching on the decode replica, so its transfer counter moves only with a split.
        start([*sim, "--port", str(ports["decode"]), "--no-enable-prefix-caching"], logs / "decode.log"),
        # Outside the gateway's service but inside the sidecar's pool: only a client header
        # leaking through the gateway could send a prefill leg here.
        start([*sim, "--port", str(ports["trap"])], logs / "trap.log"),
    ]
    pool = ",".join(address[name] for name in ("prefill_a", "prefill_b", "trap"))
    processes.append(
        start(
            ["sidecar", "--host", "127.0.0.1", "--port", str(ports["sidecar"]), "--vllm-port", str(ports["decode"]),
             "--prefill-pool", pool, "--prefill-timeout", "20"],
            logs / "sidecar.log",
        )
    )

    def service(name: str, config: dict | None) -> dict:
        endpoints = [("sidecar", "decode"), ("prefill_a", "prefill"), ("prefill_b", "prefill")]
        return {
            "namespace": "default",
            "name": name,
            "model": MODEL,
            "shape": "pd",
            "scheduler_config": config,
            "endpoints": [{"address": address[e], "role": role, "ready": True} for e, role in endpoints],
        }

    config_path = logs / "gateway.json"
    config_path.write_text(json.dumps({"services": [service("always", None), service("threshold", THRESHOLD_CONFIG)]}))
    processes.append(
        start(
            ["gateway", "--host", "127.0.0.1", "--port", str(ports["gateway"]), "--config", str(config_path),
             "--pd-legs", "sidecar", "--health-interval", "0.5"],
            logs / "gateway.log",
        )
    )
    try:
        for name in ("prefill_a", "prefill_b", "decode", "trap"):
            wait_http(f"http://{address[name]}/health", timeout=60)
        wait_http(f"http://{address['sidecar']}/sidecar/metrics", timeout=60, process=processes[4])
        wait_http(f"http://{address['gateway']}/health", timeout=60, process=processes[5])
        urls = {name: f"http://{a}" for name, a in address.items()}
        for name in ("always", "threshold"):
            _wait_ready(urls["gateway"], name)
        yield {"address": address, **urls}
    finally:
        for process in processes:
            stop(process)


def _wait_ready(gateway_url: str, service: str) -> None:
    """Wait until a request through the service succeeds.

    The gateway's health probes and metric scrapes may have caught the sidecar before the
    decode sim behind it answered; until they pass again requests get 503 or 429.
    """
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        response = requests.post(
            f"{gateway_url}/default/{service}/v1/completions",
            json={"model": MODEL, "prompt": "warm", "max_tokens": 1},
            timeout=30,
        )
        if response.status_code == 200:
            return
        time.sleep(0.3)
    raise AssertionError(f"service {service} still answers {response.status_code} after 30 s")


def _client(legs, service: str, headers: dict | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{legs['gateway']}/default/{service}/v1", api_key="unused", default_headers=headers or {}, max_retries=0
    )


def _prefill_state(legs) -> dict[str, tuple[float, float]]:
    """Return, per prefill sim, (gateway prefill picks of it, generation tokens it produced)."""
    state = {}
    for name in ("prefill_a", "prefill_b"):
        picks = metric_sum(legs["gateway"] + "/metrics", "scheduler_picks_total",
                        f'profile="prefill",endpoint="{legs["address"][name]}"')
        tokens = metric_sum(legs[name] + "/metrics", "vllm:generation_tokens_total")
        state[name] = (picks, tokens)
    return state


def test_prefill_leg_runs_where_the_gateway_chose(legs):
    sidecar_metrics = legs["sidecar"] + "/sidecar/metrics"
    gateway_metrics = legs["gateway"] + "/metrics"
    sidecar_splits = metric_sum(sidecar_metrics, "llmisvc_pd_decisions_total", 'decision="prefill_decode"')
    gateway_splits = metric_sum(gateway_metrics, "llmisvc_pd_decisions_total", 'decision="prefill_decode"')
    transferred = metric_sum(legs["decode"] + "/metrics", "sim:kv_transfer_tokens_total")
    client = _client(legs, "always")
    requests_sent = 6
    before = _prefill_state(legs)
    for index in range(requests_sent):
        reply = client.completions.create(
            model=MODEL, prompt=f"request {index} asks about topic {index * 7} in some detail " * 8, max_tokens=5
        )
        assert reply.usage.completion_tokens == 5
    after = _prefill_state(legs)

    picks = {name: after[name][0] - before[name][0] for name in after}
    tokens = {name: after[name][1] - before[name][1] for name in after}
    assert sum(picks.values()) == requests_sent
    # Each prefill leg generates exactly one token, on the endpoint the gateway picked.
    assert tokens == picks
    assert metric_sum(gateway_metrics, "llmisvc_pd_decisions_total", 'decision="prefill_decode"') - gateway_splits == requests_sent
    # The sidecar ran the legs: it counted the splits, and the decode sim pulled KV blocks.
    assert metric_sum(sidecar_metrics, "llmisvc_pd_decisions_total", 'decision="prefill_decode"') - sidecar_splits == requests_sent
    assert metric_sum(sidecar_metrics, "llmisvc_pd_fallbacks_total") == 0
    assert metric_sum(legs["decode"] + "/metrics", "sim:kv_transfer_tokens_total") > transferred
    # The gateway ran no leg itself: its own prefill-leg histogram stays empty.
    assert metric_sum(gateway_metrics, "llmisvc_pd_prefill_duration_seconds_count") == 0


def test_streaming_through_sidecar(legs):
    stream = _client(legs, "always").chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "stream a story through the sidecar " * 10}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    usage = [c.usage for c in chunks if c.usage is not None]
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 1
    assert len(usage) == 1
    assert usage[0].completion_tokens == 12


def test_client_prefill_header_is_replaced_by_the_gateway(legs):
    trap_before = metric_sum(legs["trap"] + "/metrics", "vllm:prompt_tokens_total")
    before = _prefill_state(legs)
    reply = _client(legs, "always", {"x-prefiller-host-port": legs["address"]["trap"]}).completions.create(
        model=MODEL, prompt="a request that tries to choose its own prefill host " * 6, max_tokens=3
    )
    assert reply.usage.completion_tokens == 3
    assert metric_sum(legs["trap"] + "/metrics", "vllm:prompt_tokens_total") == trap_before
    after = _prefill_state(legs)
    assert sum(after[name][1] - before[name][1] for name in after) == 1


def test_client_prefill_header_stripped_on_decode_only(legs):
    trap_before = metric_sum(legs["trap"] + "/metrics", "vllm:prompt_tokens_total")
    reply = _client(legs, "threshold", {"x-prefiller-host-port": legs["address"]["trap"]}).completions.create(
        model=MODEL, prompt="short one", max_tokens=2
    )
    assert reply.usage.completion_tokens == 2
    assert metric_sum(legs["trap"] + "/metrics", "vllm:prompt_tokens_total") == trap_before


def test_decode_only_reaches_sidecar_without_header(legs):
    sidecar_metrics = legs["sidecar"] + "/sidecar/metrics"
    gateway_metrics = legs["gateway"] + "/metrics"
    sidecar_splits = metric_sum(sidecar_metrics, "llmisvc_pd_decisions_total")
    decode_only = metric_sum(gateway_metrics, "llmisvc_pd_decisions_total", 'decision="decode_only"')
    decode_prompts = metric_sum(legs["decode"] + "/metrics", "vllm:prompt_tokens_total")
    prefill_prompts = sum(metric_sum(legs[name] + "/metrics", "vllm:prompt_tokens_total") for name in ("prefill_a", "prefill_b"))

    reply = _client(legs, "threshold").completions.create(model=MODEL, prompt="short prompt", max_tokens=3)

    assert reply.usage.completion_tokens == 3
    assert metric_sum(gateway_metrics, "llmisvc_pd_decisions_total", 'decision="decode_only"') - decode_only == 1
    # The sidecar saw no x-prefiller-host-port: it ran no legs, and no prefill sim saw the prompt.
    assert metric_sum(sidecar_metrics, "llmisvc_pd_decisions_total") == sidecar_splits
    assert sum(metric_sum(legs[name] + "/metrics", "vllm:prompt_tokens_total") for name in ("prefill_a", "prefill_b")) == prefill_prompts
    # The only decode endpoint is the sidecar, so the reply came from the decode sim through it.
    assert metric_sum(legs["decode"] + "/metrics", "vllm:prompt_tokens_total") > decode_prompts


def test_threshold_long_prompt_split(legs):
    sidecar_metrics = legs["sidecar"] + "/sidecar/metrics"
    splits = metric_sum(sidecar_metrics, "llmisvc_pd_decisions_total", 'decision="prefill_decode"')
    prompt = "an uncached prompt well over two hundred tokens for the threshold " * 40
    reply = _client(legs, "threshold").completions.create(model=MODEL, prompt=prompt, max_tokens=3)
    assert reply.usage.completion_tokens == 3
    assert metric_sum(sidecar_metrics, "llmisvc_pd_decisions_total", 'decision="prefill_decode"') - splits == 1
