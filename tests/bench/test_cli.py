"""`llmisvc bench serve` against a real simulated engine: workloads, JSON keys, charts."""

from __future__ import annotations

import json
import subprocess

import pytest

from support import LLMISVC, free_port, start, stop, wait_http

pytestmark = pytest.mark.e2e

VLLM_KEYS = (
    "duration", "completed", "total_input_tokens", "total_output_tokens", "request_throughput", "output_throughput",
    "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
    "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms",
    "input_lens", "output_lens", "ttfts", "itls", "errors",
)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    port = free_port()
    process = start(
        ["sim", "--port", str(port), "--served-model-name", "sim", "--itl-ms", "1", "--ttft-overhead-ms", "1", "--prefill-ms-per-token", "0.01"],
        tmp_path_factory.mktemp("bench") / "sim.log",
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=60, process=process)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


def bench(tmp_path, base_url, *flags):
    result_file = tmp_path / "result.json"
    completed = subprocess.run(
        [*LLMISVC, "bench", "serve", "--base-url", base_url, "--model", "sim", "--no-progress", "--result-file", str(result_file), *flags],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return json.loads(result_file.read_text()), completed.stdout


def test_random_workload_keys(sim, tmp_path):
    result, stdout = bench(tmp_path, sim, "--workload", "random", "--num-prompts", "12", "--input-len", "40", "--output-len", "6", "--request-rate", "50")
    for key in VLLM_KEYS:
        assert key in result, key
    assert result["completed"] == 12
    assert result["total_output_tokens"] == 72
    assert len(result["ttfts"]) == 12
    assert result["cache_hit_rate"] == 0.0
    assert "Request throughput" in stdout


def test_shared_prefix_hits_cache(sim, tmp_path):
    result, _ = bench(tmp_path, sim, "--workload", "shared-prefix", "--num-groups", "2", "--prompts-per-group", "5", "--prefix-len", "200", "--input-len", "20", "--output-len", "4", "--max-concurrency", "1")
    assert result["completed"] == 10
    # 8 of 10 requests reuse their group's 200-token prefix (12 full blocks = 192 tokens).
    assert sum(1 for cached in result["cached_tokens"] if cached >= 192) == 8
    assert result["cache_hit_rate"] > 0.6


def test_multi_turn_chat(sim, tmp_path):
    result, _ = bench(tmp_path, sim, "--workload", "multi-turn", "--num-prompts", "3", "--turns", "3", "--prefix-len", "100", "--input-len", "10", "--output-len", "4", "--arrival", "fixed", "--request-rate", "20")
    assert result["completed"] == 9
    assert result["backend"] == "openai-chat"
    # Later turns resend the conversation, so they find its earlier blocks cached.
    assert sum(1 for cached in result["cached_tokens"] if cached > 0) >= 6


def test_prefix_repetition_and_plots(sim, tmp_path):
    pytest.importorskip("matplotlib")
    plots = tmp_path / "plots"
    result, _ = bench(tmp_path, sim, "--workload", "prefix-repetition", "--num-prefixes", "2", "--num-prompts", "8", "--prefix-len", "100", "--input-len", "10", "--output-len", "3", "--plot", str(plots))
    assert result["completed"] == 8
    assert sorted(p.name for p in plots.iterdir()) == ["requests_per_endpoint.png", "ttft_histogram.png", "ttft_over_time.png"]


def test_failures_counted_and_exit_code(tmp_path):
    port = free_port()  # nothing listens: every request fails
    completed = subprocess.run(
        [*LLMISVC, "bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--model", "sim", "--no-progress", "--num-prompts", "3", "--result-file", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 1
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["failed"] == 3
    assert all(result["errors"])
