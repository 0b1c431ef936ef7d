"""`llmisvc discover` (a real process) feeding a real `llmisvc gateway` the ready pods that the
API server double reports, through the gateway's admin API.

Not covered without a real cluster: the in-cluster service-account login, because the test
passes the double's URL with --api-server. Pod IPs do not route to real engines either, so
the gateway's health probes of them fail, which does not change the endpoint list.
"""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
import yaml
from apiserver import ApiServer

from support import free_port, start, stop, wait_http

NAMESPACE = "llm"
SELECTOR = {"app.kubernetes.io/name": "sync-a", "app.kubernetes.io/part-of": "llminferenceservice",
            "kserve.io/component": "workload"}
TOKEN = "test-admin-token"


def pod(name: str, ip: str, role: str) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {**SELECTOR, "llm-d.ai/role": role}},
        "spec": {"containers": [{"name": "main", "image": "engine"}]},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
    }


def gateway_addresses(port: int) -> list[str] | None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/admin/services",
                                     headers={"x-llmisvc-admin-token": TOKEN})
    with urllib.request.urlopen(request, timeout=5) as response:
        body = json.loads(response.read())
    services = body.get("services", body) if isinstance(body, dict) else body
    for service in services:
        if service.get("name") == "sync-a":
            return sorted(endpoint["address"] for endpoint in service.get("endpoints", []))
    return None


def wait_for(check, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


def test_discover_feeds_gateway(tmp_path):
    server = ApiServer()
    server.start()
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN)
    config = tmp_path / "service.yaml"
    config.write_text(yaml.safe_dump({
        "namespace": NAMESPACE, "name": "sync-a",
        "entry": {"model": "sync-model", "shape": "pd", "scheduler_config": None,
                  "criticality": "Standard"},
        "discovery": {"namespace": NAMESPACE, "selector": SELECTOR, "targetPort": 8000},
    }))
    server.create(pod("sync-a-decode-1", "10.1.0.1", "decode"))
    server.create(pod("sync-a-prefill-1", "10.1.0.2", "prefill"))

    port = free_port()
    gateway = start(["gateway", "--host", "127.0.0.1", "--port", str(port),
                     "--admin-token-file", str(token_file)], tmp_path / "gateway.log")
    discover = start(["discover", "--config", str(config), "--gateway-url", f"http://127.0.0.1:{port}",
                      "--admin-token-file", str(token_file), "--api-server", server.url,
                      "--resend-seconds", "2", "--ready-file", str(tmp_path / "synced")],
                     tmp_path / "discover.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=60, process=gateway)
        wait_for(lambda: gateway_addresses(port) == ["10.1.0.1:8000", "10.1.0.2:8000"],
                 "both pods in the gateway")
        assert wait_for(lambda: (tmp_path / "synced").exists(), "the ready file")

        # A pod deleted while the watch is down, its DELETED event lost, leaves after the re-list.
        server.delete("v1", "Pod", NAMESPACE, "sync-a-prefill-1", silent=True)
        server.close_watches()
        wait_for(lambda: gateway_addresses(port) == ["10.1.0.1:8000"], "the deleted pod to leave")

        # A restarted gateway gets the service back from the periodic re-send.
        stop(gateway)
        gateway = start(["gateway", "--host", "127.0.0.1", "--port", str(port),
                         "--admin-token-file", str(token_file)], tmp_path / "gateway2.log")
        wait_http(f"http://127.0.0.1:{port}/health", timeout=60, process=gateway)
        wait_for(lambda: gateway_addresses(port) == ["10.1.0.1:8000"], "the service after a restart")
        assert discover.poll() is None, (tmp_path / "discover.log").read_text()[-3000:]
    finally:
        stop(discover)
        stop(gateway)
        server.stop()


def test_entry_reads_scheduler_config_file(tmp_path):
    from llmisvc.runtime.kubernetes.client import KubeClient
    from llmisvc.runtime.kubernetes.pool_sync import GatewaySync, SyncConfigError

    profile = tmp_path / "pd.yaml"
    profile.write_text("apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n")
    config = {
        "namespace": NAMESPACE, "name": "sync-b",
        "entry": {"model": "m", "shape": "scheduler", "scheduler_config": None, "criticality": "Standard"},
        "discovery": {"namespace": NAMESPACE, "selector": SELECTOR, "targetPort": 8000},
        "schedulerConfigFile": str(profile),
    }
    # The client is never used: entry() reads only the file.
    sync = GatewaySync(KubeClient("http://127.0.0.1:9"), config, "http://127.0.0.1:9", TOKEN)
    entry = sync.entry()
    assert entry["scheduler_config"]["plugins"] == [{"type": "queue-scorer"}]
    assert entry["endpoints"] == []

    profile.write_text("plugins:\n- type: random-picker\n")
    assert sync.entry()["scheduler_config"]["plugins"] == [{"type": "random-picker"}]

    profile.unlink()
    with pytest.raises(SyncConfigError, match="pd.yaml"):
        sync.entry()
