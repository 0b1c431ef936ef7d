"""The sidecar's prefill pool: static entries and pods read from a Kubernetes API.

No cluster runs here, so a small aiohttp server on 127.0.0.1 plays the API server with the
two reads the sidecar makes (the InferencePool and the pods its selector matches).
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from llmisvc.gateway.sidecar import KubernetesPoolSource, PrefillPool, parse_pool


def test_parse_pool_entries():
    assert parse_pool("10.0.0.1:8000, host-b:9000,") == {"10.0.0.1:8000", "host-b:9000"}


@pytest.mark.parametrize("entry", ["10.0.0.1", "host:port", ":8000", "host:70000"])
def test_parse_pool_rejects_entry(entry):
    with pytest.raises(ValueError, match="is not host:port"):
        parse_pool(entry)


def test_static_pool_exact_port():
    pool = PrefillPool({"10.0.0.1:8000"})
    assert pool.allows("10.0.0.1:8000")
    assert not pool.allows("10.0.0.1:8001")
    assert not pool.allows("10.0.0.2:8000")
    assert not pool.allows("garbage")


def _api(pool_api: str, selector: dict, pods: list[dict], seen: list[tuple[str, str | None, str | None]]) -> web.Application:
    async def inference_pool(request: web.Request) -> web.Response:
        seen.append((request.path, None, request.headers.get("Authorization")))
        if request.match_info["api"] != pool_api:
            return web.json_response({"kind": "Status", "code": 404}, status=404)
        return web.json_response({"kind": "InferencePool", "spec": {"selector": selector}})

    async def list_pods(request: web.Request) -> web.Response:
        seen.append((request.path, request.query.get("labelSelector"), request.headers.get("Authorization")))
        return web.json_response({"kind": "PodList", "items": pods})

    app = web.Application()
    app.router.add_get("/apis/inference.networking.{group}/{api}/namespaces/{ns}/inferencepools/{name}", inference_pool)
    app.router.add_get("/api/v1/namespaces/{ns}/pods", list_pods)
    return app


async def _refresh(pool_api: str, selector: dict, pods: list[dict]) -> tuple[PrefillPool, list]:
    seen: list = []
    runner = web.AppRunner(_api(pool_api, selector, pods, seen))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    pool = PrefillPool(set())
    source = KubernetesPoolSource(pool, "team", "smol-pool", api_url=f"http://127.0.0.1:{port}", token="secret-token")
    try:
        async with aiohttp.ClientSession() as session:
            await source.refresh(session)
    finally:
        await runner.cleanup()
    return pool, seen


PODS = [
    {"metadata": {"name": "p1"}, "status": {"phase": "Running", "podIP": "10.1.0.5"}},
    {"metadata": {"name": "p2"}, "status": {"phase": "Pending", "podIP": "10.1.0.6"}},
    {"metadata": {"name": "p3"}, "status": {"phase": "Running"}},
]


def test_pool_from_v1_inference_pool():
    pool, seen = asyncio.run(_refresh("v1", {"matchLabels": {"app": "smol", "llm-d.ai/role": "prefill"}}, PODS))
    assert pool.hosts == {"10.1.0.5"}
    assert pool.allows("10.1.0.5:8000")
    assert pool.allows("10.1.0.5:9999")
    assert not pool.allows("10.1.0.6:8000")
    pods_call = [entry for entry in seen if entry[0].endswith("/pods")][0]
    assert pods_call[0] == "/api/v1/namespaces/team/pods"
    assert pods_call[1] == "app=smol,llm-d.ai/role=prefill"
    assert all(entry[2] == "Bearer secret-token" for entry in seen)


def test_pool_from_v1alpha2_inference_pool():
    pool, _ = asyncio.run(_refresh("v1alpha2", {"app": "smol"}, PODS))
    assert pool.hosts == {"10.1.0.5"}
