"""KV-block transfer between real engines (embedded SmolLM2, float32) through the sidecar.

Three engines run once for the module: a prefill engine, a decode engine and an aggregated
reference engine. `llmisvc sidecar` in front of the decode engine runs the two legs.
"""

from __future__ import annotations

import json
import random
import re
import socket
import time
import urllib.request

import pytest
import requests

from support import free_port, start, stop, wait_http

pytestmark = pytest.mark.e2e

MODEL = "smol"
URI = "hf://HuggingFaceTB/SmolLM2-135M-Instruct"
LEASE_SECONDS = 4
DECODE_MAX_MODEL_LEN = 2304
WORDS = (
    "river mountain quiet number silver garden engine violet harbor lantern copper meadow "
    "thunder pencil orchard window marble falcon winter canvas ribbon desert anchor velvet "
    "signal cedar puzzle comet basket meteor lemon saddle tunnel feather island"
).split()


def _metric(base: str, name: str, labels: str = "") -> float:
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (not labels or labels in line):
            match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.eE+-]+)$", line)
            if match:
                total += float(match.group(2))
    return total


def _prompt(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _engine_args(port: int, max_model_len: int, transfer: dict | None) -> list[str]:
    args = [
        "engine", "--model", URI, "--host", "127.0.0.1", "--port", str(port), "--served-model-name", MODEL,
        "--dtype", "float32", "--threads", "1", "--num-gpu-blocks-override", "700",
        "--max-model-len", str(max_model_len),
    ]
    if transfer is not None:
        args += ["--kv-transfer-config", json.dumps(transfer)]
    return args


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    logs = tmp_path_factory.mktemp("kv-transfer")
    prefill, decode, aggregated, sidecar = (free_port() for _ in range(4))
    transfer = {
        "kv_connector": "NixlConnector",
        "kv_role": "kv_both",
        "kv_buffer_size": 400_000_000,
        "kv_connector_extra_config": {"lease_seconds": LEASE_SECONDS, "transfer_timeout_seconds": 20},
    }
    # The decode engine reads over TCP, the path between hosts; transfers within one host
    # (shared memory) and over NIXL are covered by test_transfer_connector.py.
    decode_transfer = {**transfer, "kv_connector_extra_config": {**transfer["kv_connector_extra_config"], "transport": "tcp"}}
    processes = [
        start(_engine_args(prefill, 4096, transfer), logs / "prefill.log"),
        start(_engine_args(decode, DECODE_MAX_MODEL_LEN, decode_transfer), logs / "decode.log"),
        start(_engine_args(aggregated, 4096, None), logs / "aggregated.log"),
        start(
            ["sidecar", "--host", "127.0.0.1", "--port", str(sidecar), "--vllm-port", str(decode),
             "--prefill-pool", f"127.0.0.1:{prefill}"],
            logs / "sidecar.log",
        ),
    ]
    try:
        for port, process in zip((prefill, decode, aggregated, sidecar), processes):
            path = "/sidecar/metrics" if port == sidecar else "/health"
            wait_http(f"http://127.0.0.1:{port}{path}", timeout=300, process=process)
        yield {
            "prefill": f"http://127.0.0.1:{prefill}",
            "prefill_address": f"127.0.0.1:{prefill}",
            "decode": f"http://127.0.0.1:{decode}",
            "aggregated": f"http://127.0.0.1:{aggregated}",
            "sidecar": f"http://127.0.0.1:{sidecar}",
            "logs": logs,
        }
    finally:
        for process in processes:
            stop(process)


def _pd_completion(engines, body: dict, timeout: float = 120) -> requests.Response:
    return requests.post(
        engines["sidecar"] + "/v1/completions",
        json=body,
        headers={"x-prefiller-host-port": engines["prefill_address"]},
        timeout=timeout,
    )


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def test_engines_log_transport(engines):
    for role in ("prefill", "decode"):
        log = (engines["logs"] / f"{role}.log").read_text()
        assert re.search(r"KV transfer ready: transport=(nixl|tcp)", log), log[-2000:]


@pytest.mark.parametrize("words", [20, 150, 600, 1100, 1700])
def test_pd_tokens_match_aggregated(engines, words):
    prompt = _prompt(words, words)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    blocks_before = _metric(engines["decode"], "llmisvc_kv_transfer_blocks_total", 'transport="tcp"')

    split = _pd_completion(engines, body)
    reference = requests.post(engines["aggregated"] + "/v1/completions", json=body, timeout=120)

    assert split.status_code == 200, split.text
    assert reference.status_code == 200, reference.text
    assert split.json()["choices"][0]["text"] == reference.json()["choices"][0]["text"]
    assert split.json()["usage"]["completion_tokens"] == 12
    prompt_tokens = split.json()["usage"]["prompt_tokens"]
    # Every block of the prompt came from the prefill engine (the decode engine has never
    # seen this prompt, so nothing was cached locally).
    expected_blocks = -(-prompt_tokens // 16)
    assert _metric(engines["decode"], "llmisvc_kv_transfer_blocks_total", 'transport="tcp"') - blocks_before == expected_blocks


def test_prefill_blocks_freed_after_read(engines):
    body = {"model": MODEL, "prompt": _prompt(7, 300), "max_tokens": 4, "temperature": 0}
    assert _pd_completion(engines, body).status_code == 200
    assert _wait_for(lambda: _metric(engines["prefill"], "llmisvc_kv_transfer_held_blocks") == 0, 10)


def test_first_token_eos_no_hang(engines):
    eos = requests.post(engines["decode"] + "/tokenize", json={"model": MODEL, "prompt": "<|im_end|>", "add_special_tokens": False}, timeout=30)
    assert eos.status_code == 200, eos.text
    eos_id = eos.json()["tokens"][0]
    body = {
        "model": MODEL,
        "prompt": _prompt(11, 80),
        "max_tokens": 20,
        "temperature": 0,
        "logit_bias": {str(eos_id): 100},
    }
    reply = _pd_completion(engines, body, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"] == "stop"
    assert reply.json()["usage"]["completion_tokens"] <= 1


def test_decode_rejects_long_prompt_frees_prefill(engines):
    expired_before = _metric(engines["prefill"], "llmisvc_kv_transfer_lease_expired_total")
    body = {"model": MODEL, "prompt": _prompt(13, 2600), "max_tokens": 4, "temperature": 0}
    reply = _pd_completion(engines, body)
    assert reply.status_code == 400, reply.text
    assert str(DECODE_MAX_MODEL_LEN) in reply.json()["error"]["message"]
    # Freed by the sidecar's early release, or at the latest when the lease runs out.
    assert _wait_for(lambda: _metric(engines["prefill"], "llmisvc_kv_transfer_held_blocks") == 0, LEASE_SECONDS + 5)
    assert _metric(engines["prefill"], "llmisvc_kv_transfer_lease_expired_total") >= expired_before


@pytest.mark.parametrize("delay", [0.05, 0.4, 1.2])
def test_client_disconnect_frees_both_sides(engines, delay):
    """The client goes away during prefill, between the legs or during decode."""
    body = json.dumps(
        {"model": MODEL, "prompt": _prompt(100 + int(delay * 10), 1500), "max_tokens": 200, "temperature": 0,
         "ignore_eos": True, "stream": True}
    ).encode()
    host, port = engines["sidecar"].removeprefix("http://").split(":")
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"x-prefiller-host-port: {engines['prefill_address']}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        time.sleep(delay)

    def settled() -> bool:
        return (
            _metric(engines["prefill"], "llmisvc_kv_transfer_held_blocks") == 0
            and _metric(engines["decode"], "vllm:num_requests_running") == 0
            and _metric(engines["decode"], "vllm:num_requests_waiting") == 0
            and _metric(engines["prefill"], "vllm:num_requests_running") == 0
        )

    assert _wait_for(settled, LEASE_SECONDS + 30)
    after = _pd_completion(engines, {"model": MODEL, "prompt": "still alive after the disconnect", "max_tokens": 3})
    assert after.status_code == 200, after.text
