"""`llmisvc gateway` command-line flags, checked on real gateway and simulator processes."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from gateway_harness import GatewayProcess, SimProcess
from support import run_cli

pytestmark = pytest.mark.e2e


def test_scrape_slower_than_staleness(tmp_path):
    # Every scrape result is stale 0.2 s after it is read, and the next one is 5 s away.
    gateway = GatewayProcess(tmp_path, "--metrics-scrape-interval", "5", "--metrics-staleness", "0.2")
    sims = SimProcess(tmp_path, "stale", "--echo", replicas=2)
    try:
        entry = {"model": "stale", "shape": "scheduler", "endpoints": [{"address": a} for a in sims.addresses]}
        gateway.put_service("stale", entry)
        time.sleep(0.5)

        def send(number: int) -> tuple[int, float]:
            started = time.monotonic()
            response = requests.post(
                gateway.url + "/v1/completions",
                json={"model": "stale", "prompt": f"stale prompt {number} " * 20, "max_tokens": 2, "stream": number % 2 == 1},
                timeout=30,
            )
            return response.status_code, time.monotonic() - started

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(send, range(40)))
        statuses = [status for status, _ in results]
        assert statuses == [200] * 40
        slowest = max(elapsed for _, elapsed in results)
        assert slowest < 10, f"a request took {slowest:.1f} s"

        # Stale metrics count as saturation, which sheds Sheddable requests. So a 429 here
        # shows that the staleness flag reached the scheduler's datastore.
        shed = requests.post(
            gateway.url + "/v1/completions",
            json={"model": "stale", "prompt": "x", "max_tokens": 1},
            headers={"x-llmisvc-criticality": "Sheddable"},
            timeout=30,
        )
        assert shed.status_code == 429, shed.text
        assert shed.headers["x-llmisvc-drop-reason"] == "saturated"
        assert "Traceback" not in gateway.log()
    finally:
        gateway.stop()
        sims.stop()


@pytest.mark.parametrize("flag", ["--metrics-scrape-interval", "--metrics-staleness"])
def test_metrics_timing_flags_reject_zero(flag):
    result = run_cli(["gateway", flag, "0"], env={}, timeout=60)
    assert result.returncode == 2
    assert "must be greater than 0 seconds" in result.stderr
