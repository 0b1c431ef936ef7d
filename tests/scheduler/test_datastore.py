"""Datastore scraping of real simulated engines, and the precise scorer fed by their KV events."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import requests

from llmisvc.scheduler import Datastore, EndpointSpec, Scheduler, SchedulingRequest
from llmisvc.scheduler.metrics_scrape import parse_engine_metrics
from support import free_port, start, stop, wait_http

pytestmark = pytest.mark.e2e

EXPOSITION = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m",engine="0"} 3.0
vllm:num_requests_running{model_name="m",engine="1"} 1.0
vllm:num_requests_waiting_extra{model_name="m"} 99
vllm:num_requests_waiting{model_name="m"} 7
vllm:kv_cache_usage_perc{engine="0"} 0.25
vllm:kv_cache_usage_perc{engine="1"} 0.5
vllm:cache_config_info{block_size="32",enable_prefix_caching="True",num_gpu_blocks="1234"} 1.0
"""


def test_parser_reads_only_needed_series():
    metrics = parse_engine_metrics(EXPOSITION)
    assert metrics.running == 4.0
    assert metrics.waiting == 7.0
    assert metrics.kv_usage == 0.5
    assert metrics.block_size == 32
    assert metrics.num_gpu_blocks == 1234


def test_parser_missing_series_are_none():
    metrics = parse_engine_metrics("# nothing here\n")
    assert metrics.running is None
    assert metrics.num_gpu_blocks is None


@pytest.fixture(scope="module")
def sim_with_events(tmp_path_factory):
    """One sim replica that connects to a KV event endpoint the scheduler binds."""
    tmp = tmp_path_factory.mktemp("ds")
    port, events_port = free_port(), free_port()
    events = json.dumps({"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://127.0.0.1:{events_port}"})
    process = start(
        ["sim", "--port", str(port), "--served-model-name", "m", "--num-gpu-blocks", "500", "--itl-ms", "1",
         "--ttft-overhead-ms", "1", "--prefill-ms-per-token", "0", "--kv-events-config", events],
        tmp / "sim.log",
    )
    wait_http(f"http://127.0.0.1:{port}/health", timeout=60, process=process)
    yield port, events_port
    stop(process)


def test_scrape_real_engine(sim_with_events):
    port, _ = sim_with_events
    address = f"127.0.0.1:{port}"

    async def scenario():
        datastore = Datastore(scrape_interval=0.05)
        datastore.set_endpoints([EndpointSpec(address)])
        task = asyncio.create_task(datastore.run())
        try:
            deadline = time.monotonic() + 10
            while datastore.get(address).metrics_time is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            first = datastore.get(address).metrics_time
            await asyncio.sleep(0.3)
            return datastore.get(address), first, datastore
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    endpoint, first, datastore = asyncio.run(scenario())
    assert endpoint.metrics.num_gpu_blocks == 500
    assert endpoint.metrics.waiting == 0
    assert endpoint.metrics_time > first  # refreshed on the interval
    assert endpoint.scrape_errors == 0


def test_scrape_failure_keeps_old_values_and_ages():
    port = free_port()  # nothing listens here

    async def scenario():
        datastore = Datastore(scrape_interval=0.05, staleness=0.2)
        address = f"127.0.0.1:{port}"
        datastore.set_endpoints([EndpointSpec(address)])
        datastore.update_metrics(address, EXPOSITION)
        task = asyncio.create_task(datastore.run())
        await asyncio.sleep(0.5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return datastore, datastore.get(address)

    datastore, endpoint = asyncio.run(scenario())
    assert endpoint.scrape_errors > 3
    assert endpoint.metrics.waiting == 7.0
    assert datastore.is_stale(endpoint)
    assert datastore.metrics_age(endpoint) >= 0.4


def test_precise_scorer_follows_kv_events(sim_with_events):
    port, events_port = sim_with_events
    address = f"127.0.0.1:{port}"
    datastore = Datastore()
    datastore.set_endpoints([EndpointSpec(address), EndpointSpec("127.0.0.1:1")])
    config = {
        "plugins": [{"type": "precise-prefix-cache-scorer", "parameters": {"kvEventsConfig": {"zmqEndpoint": f"tcp://*:{events_port}"}}}],
        "schedulingProfiles": [{"name": "p", "plugins": [{"pluginRef": "precise-prefix-cache-scorer"}]}],
    }
    scheduler = Scheduler.from_config(config, datastore=datastore, model_name="m")
    scorer = scheduler.plugins["precise-prefix-cache-scorer"]
    try:
        deadline = time.monotonic() + 20
        attempt = 0
        # ZMQ drops messages sent before the subscription is connected, and a cached prompt
        # is not stored again, so each attempt uses a new prompt until one's events land.
        while scorer.index.blocks(address) == 0 and time.monotonic() < deadline:
            attempt += 1
            prompt = f"{attempt:04d} precise routing prompt " * 30  # 840 chars = 210 tokens = 13 full blocks
            requests.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 1}, timeout=10)
            time.sleep(0.2)
        result = scheduler.schedule(SchedulingRequest("r", "m", prompt_text=prompt))
        assert result.scores["p"][address]["precise-prefix-cache-scorer"] == 1.0
        assert result.scores["p"]["127.0.0.1:1"]["precise-prefix-cache-scorer"] == 0.0
        assert result.target.address == address
    finally:
        scheduler.close()


def test_precise_scorer_reports_seed_mismatch(sim_with_events):
    port, events_port = sim_with_events
    address = f"127.0.0.1:{port}"
    datastore = Datastore()
    datastore.set_endpoints([EndpointSpec(address)])
    config = {
        "plugins": [{"type": "precise-prefix-cache-scorer", "parameters": {"hashSeed": "other-seed", "kvEventsConfig": {"zmqEndpoint": f"tcp://*:{events_port}"}}}],
        "schedulingProfiles": [{"name": "p", "plugins": [{"pluginRef": "precise-prefix-cache-scorer"}]}],
    }
    scheduler = Scheduler.from_config(config, datastore=datastore, model_name="m", service="svc")
    labels = {"service": "svc", "plugin": "precise-prefix-cache-scorer", "reason": "hash_seed"}

    def mismatches():
        return scheduler.metrics.registry.get_sample_value("scheduler_kv_events_mismatch_total", labels) or 0

    try:
        deadline = time.monotonic() + 20
        attempt = 0
        while mismatches() == 0 and time.monotonic() < deadline:
            attempt += 1
            requests.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "m", "prompt": f"{attempt} seed check " * 30, "max_tokens": 1}, timeout=10)
            time.sleep(0.2)
        assert mismatches() >= 1
        assert scheduler.plugins["precise-prefix-cache-scorer"].index.blocks(address) == 0
    finally:
        scheduler.close()
