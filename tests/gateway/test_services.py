"""Service table behaviour seen through a real gateway: endpoint series removal and readiness."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from gateway_harness import GatewayProcess, ScriptedBackend, SimProcess, no_scheduler_entry, wait_until

pytestmark = pytest.mark.e2e

COMPLETION = {"id": "cmpl-1", "object": "text_completion", "model": "m", "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}]}


@pytest.fixture(scope="module")
def sims(tmp_path_factory):
    process = SimProcess(tmp_path_factory.mktemp("sim"), "lifecycle", "--echo", replicas=2)
    yield process
    process.stop()


def metric_lines(gateway: GatewayProcess, address: str) -> list[str]:
    """Return the /metrics sample lines that mention `address`."""
    text = requests.get(gateway.url + "/metrics", timeout=10).text
    return [line for line in text.splitlines() if not line.startswith("#") and f'"{address}"' in line]


def failing_backend() -> ScriptedBackend:
    """Return a backend whose /health passes and whose every other request gets a 500."""

    def script(connection):
        if connection.request.path == "/health":
            connection.send_json(200, {})
        else:
            connection.send_json(500, {"error": {"message": "scripted failure"}})
        return True

    return ScriptedBackend(script)


def test_removed_endpoint_series_dropped(tmp_path, sims):
    gateway = GatewayProcess(tmp_path)
    failing = failing_backend()
    try:
        healthy = sims.addresses[0]
        gateway.put_service("rr", no_scheduler_entry("lifecycle", [healthy, failing.address]))
        for number in range(4):
            response = requests.post(
                gateway.url + "/v1/completions", json={"model": "lifecycle", "prompt": f"p{number}", "max_tokens": 1}, timeout=10
            )
            assert response.status_code == 200, response.text
        assert gateway.metric("llmisvc_gateway_upstream_errors_total", endpoint=failing.address) >= 1
        assert gateway.metric("llmisvc_gateway_endpoint_picks_total", endpoint=failing.address) >= 1
        assert gateway.metric("llmisvc_gateway_endpoint_picks_total", endpoint=healthy) >= 1

        gateway.put_service("rr", no_scheduler_entry("lifecycle", [healthy]))
        assert wait_until(lambda: not metric_lines(gateway, failing.address), timeout=10), metric_lines(gateway, failing.address)
        assert metric_lines(gateway, healthy), "the remaining endpoint's series must stay"

        gateway.delete_service("rr")
        assert wait_until(lambda: not metric_lines(gateway, healthy), timeout=10), metric_lines(gateway, healthy)
    finally:
        gateway.stop()
        failing.stop()


def test_deleted_scheduler_service_series_dropped(tmp_path, sims):
    gateway = GatewayProcess(tmp_path)
    try:
        address = sims.addresses[1]
        gateway.put_service("sched", {"model": "lifecycle", "shape": "scheduler", "endpoints": [{"address": address}]})
        for number in range(3):
            response = requests.post(
                gateway.url + "/v1/completions", json={"model": "lifecycle", "prompt": f"p{number}", "max_tokens": 1}, timeout=10
            )
            assert response.status_code == 200, response.text
        assert any(line.startswith("scheduler_picks") for line in metric_lines(gateway, address))
        assert any(line.startswith("llmisvc_gateway_endpoint_picks") for line in metric_lines(gateway, address))

        gateway.delete_service("sched")
        assert wait_until(lambda: not metric_lines(gateway, address), timeout=10), metric_lines(gateway, address)
    finally:
        gateway.stop()


def test_endpoint_turned_ready_is_routable_at_once(tmp_path):
    # With 2 s between probes, the next probe comes long after the request below.
    gateway = GatewayProcess(tmp_path, "--health-interval", "2")
    loaded = threading.Event()

    def script(connection):
        # Like an engine still loading its weights: /health fails until `loaded` is set.
        if connection.request.path == "/health":
            connection.send_json(200 if loaded.is_set() else 503, {})
        else:
            connection.send_json(200, COMPLETION)
        return True

    backend = ScriptedBackend(script)
    try:
        entry = {"model": "loading", "shape": "no-scheduler", "endpoints": [{"address": backend.address, "ready": False}]}
        gateway.put_service("loading", entry)
        assert wait_until(lambda: gateway.service("loading")["endpoints"][0]["healthy"] is False, timeout=10)

        loaded.set()
        entry["endpoints"][0]["ready"] = True
        view = gateway.put_service("loading", entry)
        assert view["endpoints"][0]["healthy"] is True
        response = requests.post(gateway.url + "/v1/completions", json={"model": "loading", "prompt": "x"}, timeout=10)
        assert response.status_code == 200, response.text
    finally:
        gateway.stop()
        backend.stop()


def test_probe_from_loading_time_ignored(tmp_path):
    gateway = GatewayProcess(tmp_path, "--health-interval", "1")
    loaded = threading.Event()
    release_probe = threading.Event()

    def script(connection):
        # A probe sent while loading is held until `release_probe`, then fails.
        if connection.request.path == "/health":
            if loaded.is_set():
                connection.send_json(200, {})
            else:
                release_probe.wait(10)
                connection.send_json(503, {})
        else:
            connection.send_json(200, COMPLETION)
        return True

    backend = ScriptedBackend(script)
    try:
        entry = {"model": "slow-probe", "shape": "no-scheduler", "endpoints": [{"address": backend.address, "ready": False}]}
        gateway.put_service("slow-probe", entry)
        assert wait_until(lambda: any(r.path == "/health" for r in backend.requests), timeout=10)

        loaded.set()
        entry["endpoints"][0]["ready"] = True
        gateway.put_service("slow-probe", entry)
        release_probe.set()
        # The held probe's 503 arrives within milliseconds; the next probe is about 1 s away.
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            assert gateway.service("slow-probe")["endpoints"][0]["healthy"] is True
            time.sleep(0.05)
        response = requests.post(gateway.url + "/v1/completions", json={"model": "slow-probe", "prompt": "x"}, timeout=10)
        assert response.status_code == 200, response.text
    finally:
        release_probe.set()
        gateway.stop()
        backend.stop()
