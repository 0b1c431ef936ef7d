"""Scheduler pod discovery against the API server double: ready pods only, terminating pods
drained, and a pod deleted while the watch was down (its DELETED event lost) dropped by the
re-list on reconnect.

Not covered without a real cluster: pod IPs that actually route, and readiness gates beyond
the `Ready` condition.
"""

from __future__ import annotations

import asyncio

import pytest
from apiserver import ApiServer

from llmisvc.runtime.kubernetes.client import KubeClient
from llmisvc.runtime.kubernetes.discovery import PodDiscovery, pod_is_ready

NAMESPACE = "llm"
SELECTOR = {"app.kubernetes.io/name": "pool-a", "kserve.io/component": "workload"}


def pod(name: str, ip: str, ready: bool = True, role: str = "decode", labels: dict | None = None) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE,
                     "labels": {**SELECTOR, "llm-d.ai/role": role, **(labels or {})}},
        "spec": {"containers": [{"name": "main", "image": "engine"}]},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


@pytest.fixture
def server():
    double = ApiServer()
    double.start()
    yield double
    double.stop()


async def wait_until(check, what: str, timeout: float = 30.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if check():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def addresses(endpoints: list[dict]) -> list[str]:
    return [endpoint["address"] for endpoint in endpoints]


def test_pod_ready_rules():
    assert pod_is_ready(pod("a", "10.0.0.1"))
    assert not pod_is_ready(pod("a", "10.0.0.1", ready=False))
    unscheduled = pod("a", "")
    assert not pod_is_ready(unscheduled)
    terminating = pod("a", "10.0.0.1")
    terminating["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert not pod_is_ready(terminating)


def test_discovery_tracks_ready_pods(server):
    server.create(pod("pool-a-1", "10.0.0.1", role="decode"))
    server.create(pod("pool-a-2", "10.0.0.2", ready=False, role="prefill"))
    server.create(pod("other", "10.0.0.9", labels={"app.kubernetes.io/name": "other"}))

    async def scenario():
        client = KubeClient(server.url)
        seen: list[list[dict]] = []

        async def on_endpoints(endpoints):
            seen.append(endpoints)

        discovery = PodDiscovery(client, NAMESPACE, SELECTOR, 8000, on_endpoints, watch_timeout=30)
        task = asyncio.create_task(discovery.run())
        try:
            await wait_until(lambda: seen and addresses(seen[-1]) == ["10.0.0.1:8000"], "the ready pod")
            assert seen[-1][0]["role"] == "decode"

            server.set_status("v1", "Pod", NAMESPACE, "pool-a-2",
                              {"podIP": "10.0.0.2", "conditions": [{"type": "Ready", "status": "True"}]})
            await wait_until(lambda: addresses(seen[-1]) == ["10.0.0.1:8000", "10.0.0.2:8000"],
                             "the second pod to become ready")
            roles = {e["address"]: e["role"] for e in seen[-1]}
            assert roles["10.0.0.2:8000"] == "prefill"

            # A terminating pod is drained at once, before it is gone.
            server.patch("v1", "Pod", NAMESPACE, "pool-a-1",
                         {"metadata": {"finalizers": ["example.com/hold"]}})
            server.delete("v1", "Pod", NAMESPACE, "pool-a-1")
            await wait_until(lambda: addresses(seen[-1]) == ["10.0.0.2:8000"], "the drained pod to leave")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.close()

    asyncio.run(scenario())


def test_reconnect_drops_pod_deleted_unseen(server):
    server.create(pod("pool-a-1", "10.0.0.1"))
    server.create(pod("pool-a-2", "10.0.0.2"))

    async def scenario():
        client = KubeClient(server.url)
        seen: list[list[dict]] = []

        async def on_endpoints(endpoints):
            seen.append(endpoints)

        discovery = PodDiscovery(client, NAMESPACE, SELECTOR, 8000, on_endpoints, watch_timeout=300)
        task = asyncio.create_task(discovery.run())
        try:
            await wait_until(lambda: seen and len(seen[-1]) == 2, "both pods")
            relists = discovery.reflector.relists

            # The DELETED event is lost, then the watch reconnects.
            server.delete("v1", "Pod", NAMESPACE, "pool-a-1", silent=True)
            await asyncio.sleep(0.5)
            assert addresses(seen[-1]) == ["10.0.0.1:8000", "10.0.0.2:8000"]
            server.close_watches()

            await wait_until(lambda: discovery.reflector.relists > relists, "a re-list")
            await wait_until(lambda: addresses(seen[-1]) == ["10.0.0.2:8000"], "the deleted pod to go")
            assert ("llm", "pool-a-1") not in discovery.reflector.items
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.close()

    asyncio.run(scenario())
