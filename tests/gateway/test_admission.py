"""Admission control: the priority queue itself, and its status codes through a real gateway."""

from __future__ import annotations

import asyncio
import threading

import pytest
import requests

from gateway_harness import GatewayProcess, SimProcess, no_scheduler_entry, wait_until
from llmisvc.gateway.admission import CRITICAL, SHEDDABLE, STANDARD, Admission, parse_criticality
from llmisvc.protocol.errors import BadRequestError, ServiceUnavailableError, TooManyRequestsError


def run(coroutine):
    return asyncio.run(coroutine)


def test_queue_orders_by_criticality():
    async def scenario() -> list[str]:
        admission = Admission(max_concurrency=1, max_queue=10, queue_timeout=5)
        assert admission.try_acquire()
        order: list[str] = []

        async def waiter(name: str, level: int) -> None:
            await admission.acquire(level)
            order.append(name)
            admission.release()

        tasks = [
            asyncio.create_task(waiter("sheddable", SHEDDABLE)),
            asyncio.create_task(waiter("standard-1", STANDARD)),
            asyncio.create_task(waiter("critical", CRITICAL)),
            asyncio.create_task(waiter("standard-2", STANDARD)),
        ]
        await asyncio.sleep(0.01)
        assert admission.queued == 4
        admission.release()
        await asyncio.gather(*tasks)
        assert admission.active == 0
        return order

    assert run(scenario()) == ["critical", "standard-1", "standard-2", "sheddable"]


def test_full_queue_displaces_lower_level():
    async def scenario() -> None:
        admission = Admission(max_concurrency=1, max_queue=1, queue_timeout=5)
        assert admission.try_acquire()
        sheddable = asyncio.create_task(admission.acquire(SHEDDABLE))
        await asyncio.sleep(0.01)
        critical = asyncio.create_task(admission.acquire(CRITICAL))
        await asyncio.sleep(0.01)
        with pytest.raises(TooManyRequestsError) as displaced:
            await sheddable
        assert displaced.value.drop_reason == "displaced"

        with pytest.raises(TooManyRequestsError) as full:
            await admission.acquire(STANDARD)
        assert full.value.drop_reason == "queue-full"

        admission.release()
        await critical
        assert admission.active == 1
        assert admission.queued == 0

    run(scenario())


def test_queue_timeout_is_503_and_cancel_frees():
    async def scenario() -> None:
        admission = Admission(max_concurrency=1, max_queue=4, queue_timeout=0.05)
        assert admission.try_acquire()
        with pytest.raises(ServiceUnavailableError):
            await admission.acquire(STANDARD)
        assert admission.queued == 0

        admission.queue_timeout = 5
        waiter = asyncio.create_task(admission.acquire(STANDARD))
        await asyncio.sleep(0.01)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert admission.queued == 0
        admission.release()
        assert admission.active == 0

    run(scenario())


def test_parse_criticality():
    assert parse_criticality(b"critical") == CRITICAL
    assert parse_criticality("Sheddable") == SHEDDABLE
    assert parse_criticality(None, default=CRITICAL) == CRITICAL
    with pytest.raises(BadRequestError):
        parse_criticality(b"urgent")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    process = GatewayProcess(tmp_path_factory.mktemp("gateway"))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def slow_sim(tmp_path_factory):
    process = SimProcess(tmp_path_factory.mktemp("sim"), "slow", "--itl-ms", "25", "--ttft-overhead-ms", "0")
    yield process
    process.stop()


def hold_request(gateway: GatewayProcess, service: str, max_tokens: int, headers: dict[str, str] | None = None) -> dict:
    """Send a request to `service` in a thread; the returned dict gets `status` and `headers` when it ends."""
    result: dict = {}

    def send() -> None:
        response = requests.post(
            f"{gateway.url}/default/{service}/v1/completions",
            json={"model": "slow", "prompt": "x", "max_tokens": max_tokens},
            headers=headers or {},
            timeout=30,
        )
        result["status"] = response.status_code
        result["headers"] = response.headers
        result["body"] = response.json()

    thread = threading.Thread(target=send)
    thread.start()
    result["thread"] = thread
    return result


@pytest.mark.e2e
def test_status_codes_over_capacity(gateway, slow_sim):
    gateway.put_service(
        "limited",
        {**no_scheduler_entry("slow", slow_sim.addresses), "max_concurrency": 1, "max_queue": 1, "queue_timeout": 1.0},
    )
    try:
        running = hold_request(gateway, "limited", 120)
        assert wait_until(lambda: gateway.service("limited")["in_flight"] == 1, timeout=10)
        queued = hold_request(gateway, "limited", 1)
        assert wait_until(lambda: gateway.service("limited")["queued"] == 1, timeout=10)
        assert gateway.metric("llmisvc_gateway_requests_queued", model="slow") == 1

        rejected = requests.post(gateway.url + "/default/limited/v1/completions", json={"model": "slow", "prompt": "x"}, timeout=10)
        assert rejected.status_code == 429
        assert rejected.headers["x-llmisvc-drop-reason"] == "queue-full"
        assert rejected.json()["error"]["type"] == "rate_limit_error"

        queued["thread"].join(15)
        assert queued["status"] == 503
        running["thread"].join(15)
        assert running["status"] == 200

        invalid = requests.post(
            gateway.url + "/default/limited/v1/completions",
            json={"model": "slow", "prompt": "x"},
            headers={"x-llmisvc-criticality": "urgent"},
            timeout=10,
        )
        assert invalid.status_code == 400
        assert invalid.json()["error"]["param"] == "x-llmisvc-criticality"
    finally:
        gateway.delete_service("limited")


@pytest.mark.e2e
def test_critical_displaces_sheddable(gateway, slow_sim):
    gateway.put_service(
        "priority",
        {
            **no_scheduler_entry("slow", slow_sim.addresses),
            "criticality": "Sheddable",
            "max_concurrency": 1,
            "max_queue": 1,
            "queue_timeout": 20.0,
        },
    )
    try:
        running = hold_request(gateway, "priority", 40)
        assert wait_until(lambda: gateway.service("priority")["in_flight"] == 1, timeout=10)
        sheddable = hold_request(gateway, "priority", 1)
        assert wait_until(lambda: gateway.service("priority")["queued"] == 1, timeout=10)
        critical = hold_request(gateway, "priority", 1, headers={"x-llmisvc-criticality": "Critical"})

        sheddable["thread"].join(15)
        assert sheddable["status"] == 429
        assert sheddable["headers"]["x-llmisvc-drop-reason"] == "displaced"
        critical["thread"].join(15)
        assert critical["status"] == 200
        running["thread"].join(15)
        assert running["status"] == 200
        assert gateway.service("priority")["in_flight"] == 0
    finally:
        gateway.delete_service("priority")
