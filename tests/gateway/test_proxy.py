"""Gateway proxy behaviour against real backends: byte-exact SSE, errors, retries, cancellation.

One gateway process serves the whole module; each test registers its own service through
the admin API. Backends are `llmisvc sim` processes, or ScriptedBackend servers where a test
needs bytes the simulator does not produce.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import weakref

import openai
import pytest
import requests

from gateway_harness import (
    BackendConnection,
    GatewayProcess,
    ScriptedBackend,
    SimProcess,
    no_scheduler_entry,
    wait_until,
)
from support import free_port

pytestmark = pytest.mark.e2e

# An SSE stream with multi-byte UTF-8 text; the usage event and [DONE] are separate events.
SSE_PAYLOAD = (
    'data: {"choices":[{"index":0,"delta":{"content":"h\u00e9llo \u4e16\u754c \U0001F642"}}]}\n\n'
    'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}\n\n'
    "data: [DONE]\n\n"
).encode()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("gateway")
    process = GatewayProcess(tmp_path, "--upstream-timeout", "2", "--health-interval", "0.5", "--connect-timeout", "2")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def sims(tmp_path_factory):
    """Two echo replicas of model `echo` in one process."""
    process = SimProcess(tmp_path_factory.mktemp("sim"), "echo", "--echo", replicas=2)
    yield process
    process.stop()


def split_sse_script(connection: BackendConnection) -> bool:
    """Send SSE_PAYLOAD chunked: one byte per chunk, or in two chunks at offset x-split."""
    split = connection.request.headers.get("x-split", "bytes")
    connection.send_head(200, {"content-type": "text/event-stream", "transfer-encoding": "chunked"})
    if split == "bytes":
        for index in range(len(SSE_PAYLOAD)):
            connection.send_chunk(SSE_PAYLOAD[index : index + 1])
            time.sleep(0.0005)
    else:
        offset = int(split)
        connection.send_chunk(SSE_PAYLOAD[:offset])
        time.sleep(0.002)
        connection.send_chunk(SSE_PAYLOAD[offset:])
    connection.end_chunks()
    return True


def test_sse_split_at_every_byte(gateway):
    backend = ScriptedBackend(split_sse_script)
    try:
        gateway.put_service("split", no_scheduler_entry("split", [backend.address]))
        body = {"model": "split", "prompt": "x", "stream": True}
        before = gateway.metric("llmisvc_gateway_prompt_tokens_total", model="split")
        with requests.Session() as session:
            response = session.post(gateway.url + "/v1/completions", json=body, headers={"x-split": "bytes"}, stream=True, timeout=30)
            received = b"".join(response.iter_content(None))
            assert response.status_code == 200
            assert received == SSE_PAYLOAD

            for offset in range(1, len(SSE_PAYLOAD)):
                response = session.post(gateway.url + "/v1/completions", json=body, headers={"x-split": str(offset)}, timeout=30)
                assert response.content == SSE_PAYLOAD, f"bytes differ when split at offset {offset}"

        # Usage was found in every stream, wherever the split fell.
        after = gateway.metric("llmisvc_gateway_prompt_tokens_total", model="split")
        assert after - before == 7 * len(SSE_PAYLOAD)
    finally:
        backend.stop()


def test_upstream_400_to_stream(gateway):
    def script(connection: BackendConnection) -> bool:
        body = json.dumps({"error": {"message": "max_tokens is too large", "type": "invalid_request_error", "param": "max_tokens", "code": 400}}).encode()
        connection.send_head(400, {"content-type": "application/json", "transfer-encoding": "chunked"})
        connection.send_chunk(body[:10])
        connection.send_chunk(body[10:])
        connection.end_chunks()
        return True

    backend = ScriptedBackend(script)
    try:
        gateway.put_service("bad", no_scheduler_entry("bad", [backend.address]))
        response = requests.post(
            gateway.url + "/v1/completions", json={"model": "bad", "prompt": "x", "stream": True, "max_tokens": 10**9}, timeout=10
        )
        assert response.status_code == 400
        assert response.headers["content-length"] == str(len(response.content))
        assert "transfer-encoding" not in response.headers
        assert response.json()["error"]["param"] == "max_tokens"
    finally:
        backend.stop()


def test_stream_options_usage_and_metrics(gateway, sims):
    gateway.put_service("echo", no_scheduler_entry("echo", sims.addresses))
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    cases = [("absent", None), ("empty", {}), ("usage", {"include_usage": True})]
    for label, stream_options in cases:
        ttft_before = gateway.metric("llmisvc_gateway_time_to_first_token_seconds_count", model="echo")
        itl_before = gateway.metric("llmisvc_gateway_inter_token_latency_seconds_count", model="echo")
        extra = {} if stream_options is None else {"stream_options": stream_options}
        chunks = list(
            client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "one two three four"}], stream=True, **extra
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "one two three four", label
        with_usage = [c for c in chunks if c.usage is not None]
        if label == "usage":
            assert len(with_usage) == 1
            assert chunks[-1].usage is not None
            assert chunks[-1].choices == []
            assert chunks[-1].usage.completion_tokens > 0
        else:
            assert with_usage == [], label
            assert chunks[-1].choices != [], label
        assert gateway.metric("llmisvc_gateway_time_to_first_token_seconds_count", model="echo") == ttft_before + 1, label
        assert gateway.metric("llmisvc_gateway_inter_token_latency_seconds_count", model="echo") > itl_before, label


def test_replica_killed_mid_stream(gateway, tmp_path):
    first = SimProcess(tmp_path, "victim", "--itl-ms", "50", "--ttft-overhead-ms", "0")
    second = SimProcess(tmp_path, "victim", "--itl-ms", "50", "--ttft-overhead-ms", "0")
    processes = {first.addresses[0]: first, second.addresses[0]: second}
    try:
        gateway.put_service("victim", no_scheduler_entry("victim", list(processes)))
        body = {"model": "victim", "prompt": "hello", "max_tokens": 400, "stream": True}
        response = requests.post(gateway.url + "/v1/completions", json=body, stream=True, timeout=15)
        assert response.status_code == 200
        served_by = response.headers["x-llmisvc-endpoint"]
        lines = response.iter_lines()
        events = []
        for line in lines:
            if line.startswith(b"data:"):
                events.append(line)
            if len(events) == 3:
                break
        os.killpg(processes[served_by].process.pid, signal.SIGKILL)

        started = time.monotonic()
        rest = [line for line in lines if line.startswith(b"data:")]
        assert time.monotonic() - started < 10
        assert rest, "the stream ended without an error event"
        last = json.loads(rest[-1][5:])
        assert "error" in last
        assert served_by in last["error"]["message"]

        survivor = next(a for a in processes if a != served_by)
        for _ in range(4):
            quick = requests.post(gateway.url + "/v1/completions", json={**body, "max_tokens": 2, "stream": False}, timeout=15)
            assert quick.status_code == 200
            assert quick.headers["x-llmisvc-endpoint"] == survivor
        assert gateway.metric("llmisvc_gateway_upstream_errors_total", model="victim", endpoint=served_by) >= 1
    finally:
        first.stop()
        second.stop()
        gateway.delete_service("victim")


def test_retry_on_5xx_and_connect_failure(gateway, sims):
    def failing(connection: BackendConnection) -> bool:
        if connection.request.path == "/health":
            connection.send_json(200, {})
        else:
            connection.send_json(500, {"error": {"message": "engine failed", "type": "internal_server_error", "code": 500}})
        return True

    backend = ScriptedBackend(failing)
    dead = f"127.0.0.1:{free_port()}"
    try:
        gateway.put_service("retry", {**no_scheduler_entry("echo", [backend.address, sims.addresses[0]]), "model": "retry5"})
        retries_before = gateway.metric("llmisvc_gateway_retries_total", model="retry5")
        for _ in range(4):
            response = requests.post(gateway.url + "/default/retry/v1/completions", json={"model": "echo", "prompt": "ok"}, timeout=10)
            assert response.status_code == 200
            assert response.headers["x-llmisvc-endpoint"] == sims.addresses[0]
        assert [r for r in backend.requests if r.path == "/v1/completions"], "the failing endpoint was never tried"
        assert gateway.metric("llmisvc_gateway_retries_total", model="retry5") > retries_before

        gateway.put_service("refused", {**no_scheduler_entry("echo", [dead, sims.addresses[1]]), "model": "refused"})
        for _ in range(4):
            response = requests.post(gateway.url + "/default/refused/v1/completions", json={"model": "echo", "prompt": "ok"}, timeout=10)
            assert response.status_code == 200
        view = gateway.service("refused")
        dead_view = next(e for e in view["endpoints"] if e["address"] == dead)
        assert dead_view["healthy"] is False
        assert gateway.metric("llmisvc_gateway_upstream_errors_total", model="refused", endpoint=dead, kind="connect") >= 1
    finally:
        backend.stop()


def test_no_retry_after_first_byte(gateway):
    def cut(connection: BackendConnection) -> bool:
        connection.send_head(200, {"content-type": "text/event-stream", "transfer-encoding": "chunked"})
        connection.send_chunk(b'data: {"choices":[{"index":0,"text":"partial"}]}\n\n')
        time.sleep(0.05)
        return False

    first = ScriptedBackend(cut)
    second = ScriptedBackend(cut)
    try:
        gateway.put_service("cut", no_scheduler_entry("cut", [first.address, second.address]))
        response = requests.post(gateway.url + "/v1/completions", json={"model": "cut", "prompt": "x", "stream": True}, timeout=10)
        events = [line for line in response.content.split(b"\n") if line.startswith(b"data:")]
        assert events[0] == b'data: {"choices":[{"index":0,"text":"partial"}]}'
        assert "error" in json.loads(events[-1][5:])
        proxied = [r for r in first.requests + second.requests if r.path == "/v1/completions"]
        assert len(proxied) == 1
    finally:
        first.stop()
        second.stop()


def test_client_disconnect_aborts_engine(gateway, tmp_path):
    sim = SimProcess(tmp_path, "slow", "--itl-ms", "20", "--ttft-overhead-ms", "0")
    try:
        gateway.put_service("slow", no_scheduler_entry("slow", sim.addresses))
        cancellations_before = gateway.metric("llmisvc_gateway_cancellations_total", model="slow")
        body = json.dumps({"model": "slow", "prompt": "count", "max_tokens": 5000}).encode()
        sock = socket.create_connection(("127.0.0.1", gateway.port))
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        assert wait_until(lambda: sim.metric(0, "vllm:num_requests_running") == 1, timeout=10)
        assert gateway.metric("llmisvc_gateway_requests_in_flight", model="slow") == 1
        time.sleep(1.0)
        sock.close()

        assert wait_until(lambda: sim.metric(0, "vllm:num_requests_running") == 0, timeout=5)
        assert wait_until(lambda: gateway.metric("llmisvc_gateway_requests_in_flight", model="slow") == 0, timeout=5)
        assert gateway.metric("llmisvc_gateway_cancellations_total", model="slow") == cancellations_before + 1
        assert gateway.service("slow")["endpoints"][0]["in_flight"] == 0
    finally:
        sim.stop()


def test_client_gone_before_first_token(gateway):
    closed_after: list[float] = []

    def silent(connection: BackendConnection) -> bool:
        if connection.request.path == "/health":
            connection.send_json(200, {})
            return True
        closed_at = connection.wait_closed(timeout=10)
        if closed_at is not None:
            closed_after.append(closed_at)
        return False

    backend = ScriptedBackend(silent)
    try:
        gateway.put_service("prefill", no_scheduler_entry("prefill", [backend.address]))
        body = json.dumps({"model": "prefill", "prompt": "a" * 100_000, "stream": True}).encode()
        sock = socket.create_connection(("127.0.0.1", gateway.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        proxied = lambda: [r for r in backend.requests if r.path == "/v1/completions"]  # noqa: E731
        assert wait_until(lambda: len(proxied()) == 1, timeout=10)
        assert len(proxied()[0].body) == len(body)
        client_closed = time.monotonic()
        sock.close()

        assert wait_until(lambda: bool(closed_after), timeout=5), "the upstream connection stayed open"
        # The benchmark figure is 100 ms; a loaded test machine gets a generous bound.
        assert closed_after[0] - client_closed < 5.0
    finally:
        backend.stop()


def test_upstream_timeout_is_504(gateway):
    def stall(connection: BackendConnection) -> bool:
        connection.wait_closed(timeout=10)
        return False

    backend = ScriptedBackend(stall)
    try:
        gateway.put_service("stall", no_scheduler_entry("stall", [backend.address]))
        started = time.monotonic()
        response = requests.post(gateway.url + "/v1/completions", json={"model": "stall", "prompt": "x"}, timeout=20)
        assert response.status_code == 504
        assert response.json()["error"]["type"] == "timeout_error"
        assert time.monotonic() - started < 10
    finally:
        backend.stop()


def test_engine_api_key_on_gateway_calls(gateway):
    def engine(connection: BackendConnection) -> bool:
        if connection.request.path == "/health":
            connection.send_json(200, {})
        else:
            connection.send_json(200, {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
        return True

    backend = ScriptedBackend(engine)
    try:
        gateway.put_service("keyed", {**no_scheduler_entry("keyed", [backend.address]), "engine_api_key": "engine-secret"})
        response = requests.post(
            gateway.url + "/v1/completions",
            json={"model": "keyed", "prompt": "x"},
            headers={"authorization": "Bearer client-token"},
            timeout=10,
        )
        assert response.status_code == 200
        proxied = [r for r in backend.requests if r.path == "/v1/completions"]
        assert proxied[0].headers["authorization"] == "Bearer engine-secret"

        assert wait_until(lambda: any(r.path == "/health" for r in backend.requests), timeout=10)
        probes = [r for r in backend.requests if r.path == "/health"]
        assert all(r.headers.get("authorization") == "Bearer engine-secret" for r in probes)
    finally:
        backend.stop()
        gateway.delete_service("keyed")


def test_headers_stripped_and_request_id(gateway):
    def engine(connection: BackendConnection) -> bool:
        body = b'{"ok": true}'
        connection.send_head(
            200,
            {"content-type": "application/json", "content-length": str(len(body)), "keep-alive": "timeout=5", "x-engine": "1"},
        )
        connection.send(body)
        return True

    backend = ScriptedBackend(engine)
    try:
        gateway.put_service("headers", no_scheduler_entry("headers", [backend.address]))
        response = requests.post(
            gateway.url + "/v1/completions",
            json={"model": "headers", "prompt": "x"},
            headers={
                "x-prefiller-host-port": "10.0.0.1:8000",
                "x-gateway-destination-endpoint": "10.0.0.1:8000",
                "connection": "keep-alive, x-hop",
                "x-hop": "1",
                "te": "trailers",
                "x-request-id": "client-id-1",
                "x-custom": "kept",
            },
            timeout=10,
        )
        assert response.status_code == 200
        proxied = [r for r in backend.requests if r.path == "/v1/completions"]
        seen = proxied[-1].headers
        for name in ("x-prefiller-host-port", "x-gateway-destination-endpoint", "x-hop", "te", "connection"):
            assert name not in seen, name
        assert seen["x-custom"] == "kept"
        assert seen["x-request-id"] == "client-id-1"
        assert response.headers["x-request-id"] == "client-id-1"
        assert response.headers["x-engine"] == "1"
        assert "keep-alive" not in response.headers
        assert response.headers["x-llmisvc-endpoint"] == backend.address

        generated = requests.post(gateway.url + "/v1/completions", json={"model": "headers", "prompt": "x"}, timeout=10)
        assert len(generated.headers["x-request-id"]) == 32
        proxied = [r for r in backend.requests if r.path == "/v1/completions"]
        assert proxied[-1].headers["x-request-id"] == generated.headers["x-request-id"]
    finally:
        backend.stop()


def test_many_concurrent_streams(gateway, sims):
    gateway.put_service("echo", no_scheduler_entry("echo", sims.addresses))
    errors: list[str] = []

    def stream() -> None:
        try:
            response = requests.post(
                gateway.url + "/v1/completions",
                json={"model": "echo", "prompt": "a b c d", "stream": True},
                timeout=60,
            )
            if response.status_code != 200 or not response.content.endswith(b"data: [DONE]\n\n"):
                errors.append(f"{response.status_code} {response.content[-80:]!r}")
        except requests.RequestException as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=stream) for _ in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []


def test_stale_keepalive_connection_retried(gateway):
    """An engine that closes a reused keep-alive connection without a response costs no attempt."""
    # Keyed by the socket itself (weakly), so a new connection never inherits a count.
    seen_on_connection: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def close_reused(connection: BackendConnection) -> bool:
        count = seen_on_connection.get(connection.sock, 0) + 1
        seen_on_connection[connection.sock] = count
        if connection.request.path == "/v1/completions" and count > 1:
            return False
        connection.send_json(200, {"choices": [{"index": 0, "text": "ok"}]})
        return True

    backend = ScriptedBackend(close_reused)
    try:
        gateway.put_service("stale", no_scheduler_entry("stale", [backend.address]))
        retries_before = gateway.metric("llmisvc_gateway_retries_total", model="stale")
        with requests.Session() as session:
            for _ in range(4):
                response = session.post(gateway.url + "/v1/completions", json={"model": "stale", "prompt": "x"}, timeout=10)
                assert response.status_code == 200
        assert gateway.metric("llmisvc_gateway_retries_total", model="stale") == retries_before
    finally:
        backend.stop()
        gateway.delete_service("stale")
