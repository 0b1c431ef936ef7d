"""Scheduler and prefill/decode paths of the gateway: scraping, saturation, filtering, PD legs."""

from __future__ import annotations

import json

import pytest
import requests

from gateway_harness import BackendConnection, GatewayProcess, ScriptedBackend, SimProcess, scrape, wait_until

pytestmark = pytest.mark.e2e

PD_CONFIG = {
    "apiVersion": "llm-d.ai/v1alpha1",
    "kind": "EndpointPickerConfig",
    "plugins": [
        {"type": "pd-profile-handler", "parameters": {"threshold": 0}},
        {"type": "prefill-filter"},
        {"type": "decode-filter"},
        {"type": "queue-scorer"},
        {"type": "max-score-picker"},
    ],
    "schedulingProfiles": [
        {"name": "prefill", "plugins": [{"pluginRef": "prefill-filter"}, {"pluginRef": "queue-scorer"}, {"pluginRef": "max-score-picker"}]},
        {"name": "decode", "plugins": [{"pluginRef": "decode-filter"}, {"pluginRef": "queue-scorer"}, {"pluginRef": "max-score-picker"}]},
    ],
}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    process = GatewayProcess(tmp_path_factory.mktemp("gateway"), "--health-interval", "0.5")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def sims(tmp_path_factory):
    process = SimProcess(tmp_path_factory.mktemp("sim"), "sched", replicas=3)
    yield process
    process.stop()


def engine_script(waiting: int, kv_usage: float):
    """Return a script for an engine whose /metrics reports `waiting` queued requests."""

    def script(connection: BackendConnection) -> bool:
        path = connection.request.path
        if path == "/metrics":
            text = (
                f'vllm:num_requests_running{{model_name="busy"}} 1.0\n'
                f'vllm:num_requests_waiting{{model_name="busy"}} {waiting}.0\n'
                f'vllm:kv_cache_usage_perc{{model_name="busy"}} {kv_usage}\n'
            ).encode()
            connection.send_head(200, {"content-type": "text/plain", "content-length": str(len(text))})
            connection.send(text)
        elif path == "/health":
            connection.send_json(200, {})
        else:
            connection.send_json(200, {"choices": [{"index": 0, "text": "ok"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
        return True

    return script


def test_default_scheduler_routes(gateway, sims):
    gateway.put_service("sched", {"model": "sched", "shape": "scheduler", "endpoints": [{"address": a} for a in sims.addresses]})
    try:
        for _ in range(6):
            response = requests.post(gateway.url + "/v1/completions", json={"model": "sched", "prompt": "shared prefix " * 20, "max_tokens": 2}, timeout=10)
            assert response.status_code == 200
            assert response.headers["x-llmisvc-endpoint"] in sims.addresses
        assert scrape(gateway.url + "/metrics", "scheduler_e2e_duration_seconds_count", service="default/sched") >= 6
        assert gateway.metric("llmisvc_gateway_requests_total", model="sched", code="200") >= 6
    finally:
        gateway.delete_service("sched")


def test_scrape_carries_engine_key_and_sheds(gateway):
    backend = ScriptedBackend(engine_script(waiting=50, kv_usage=0.95))
    try:
        gateway.put_service(
            "busy",
            {"model": "busy", "shape": "scheduler", "engine_api_key": "scrape-secret", "endpoints": [{"address": backend.address}]},
        )
        assert wait_until(lambda: any(r.path == "/metrics" for r in backend.requests), timeout=10)
        scrapes = [r for r in backend.requests if r.path == "/metrics"]
        assert all(r.headers.get("authorization") == "Bearer scrape-secret" for r in scrapes)

        shed = requests.post(
            gateway.url + "/v1/completions",
            json={"model": "busy", "prompt": "x"},
            headers={"x-llmisvc-criticality": "Sheddable"},
            timeout=10,
        )
        assert shed.status_code == 429
        assert shed.headers["x-llmisvc-drop-reason"] == "saturated"
        standard = requests.post(gateway.url + "/v1/completions", json={"model": "busy", "prompt": "x"}, timeout=10)
        assert standard.status_code == 200

        tokenize = requests.post(gateway.url + "/default/busy/tokenize", json={"model": "busy", "prompt": "x"}, timeout=10)
        assert tokenize.status_code == 200
        tokenize_calls = [r for r in backend.requests if r.path == "/tokenize"]
        assert len(tokenize_calls) == 1
        assert tokenize_calls[0].headers["authorization"] == "Bearer scrape-secret"
    finally:
        backend.stop()
        gateway.delete_service("busy")


def test_all_filtered_is_429_and_bad_config_400(gateway, sims):
    config = {
        "plugins": [{"type": "label-selector-filter", "parameters": {"matchLabels": {"zone": "nowhere"}}}, {"type": "max-score-picker"}],
        "schedulingProfiles": [{"name": "default", "plugins": [{"pluginRef": "label-selector-filter"}, {"pluginRef": "max-score-picker"}]}],
    }
    gateway.put_service(
        "filtered", {"model": "filtered", "scheduler_config": config, "endpoints": [{"address": sims.addresses[0]}]}
    )
    try:
        response = requests.post(gateway.url + "/v1/completions", json={"model": "filtered", "prompt": "x"}, timeout=10)
        assert response.status_code == 429
        assert response.headers["x-llmisvc-drop-reason"].startswith("filtered:")
    finally:
        gateway.delete_service("filtered")

    bad = requests.put(
        gateway.url + "/admin/services/default/bad-config",
        json={"model": "m", "scheduler_config": {"plugins": [{"type": "no-such-plugin"}]}, "endpoints": []},
        headers={"x-llmisvc-admin-token": "gateway-test-admin-token"},
        timeout=10,
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "scheduler_config"


def test_prefill_decode_legs(gateway, sims):
    decode, prefill_one, prefill_two = sims.addresses
    gateway.put_service(
        "pd",
        {
            "model": "sched",
            "shape": "pd",
            "scheduler_config": PD_CONFIG,
            "endpoints": [
                {"address": decode, "role": "decode"},
                {"address": prefill_one, "role": "prefill"},
                {"address": prefill_two, "role": "prefill"},
            ],
        },
    )
    try:
        split_before = scrape(gateway.url + "/metrics", "llmisvc_pd_decisions_total", model="sched", decision="prefill_decode")
        response = requests.post(
            gateway.url + "/default/pd/v1/completions",
            json={"model": "sched", "prompt": "a long prompt " * 40, "max_tokens": 4},
            timeout=20,
        )
        assert response.status_code == 200
        assert response.headers["x-llmisvc-endpoint"] == decode
        assert response.headers["content-length"] == str(len(response.content))
        assert response.json()["usage"]["completion_tokens"] == 4
        after = scrape(gateway.url + "/metrics", "llmisvc_pd_decisions_total", model="sched", decision="prefill_decode")
        assert after == split_before + 1
        prefill_work = sum(scrape(f"http://{a}/metrics", "vllm:prompt_tokens_total") for a in (prefill_one, prefill_two))
        assert prefill_work > 0

        stream = requests.post(
            gateway.url + "/default/pd/v1/completions",
            json={"model": "sched", "prompt": "another prompt " * 40, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}},
            timeout=20,
        )
        events = [line[5:].strip() for line in stream.content.split(b"\n") if line.startswith(b"data:")]
        assert events[-1] == b"[DONE]"
        usage = json.loads(events[-2])["usage"]
        assert usage["completion_tokens"] == 3
    finally:
        gateway.delete_service("pd")
