"""Gateway routing, client errors, admin API and API key, against real processes."""

from __future__ import annotations

import json
import socket
import time

import pytest
import requests

from gateway_harness import ADMIN_TOKEN, GatewayProcess, SimProcess, no_scheduler_entry, wait_until
from support import free_port, start, stop, wait_http

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    process = GatewayProcess(tmp_path_factory.mktemp("gateway"), "--health-interval", "0.5")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def sims(tmp_path_factory):
    process = SimProcess(tmp_path_factory.mktemp("sim"), "echo", "--echo", replicas=2)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def echo(gateway, sims):
    gateway.put_service("echo-svc", no_scheduler_entry("echo", sims.addresses), namespace="team")
    return sims


def read_response(reader) -> tuple[bytes, bytes]:
    """Read one Content-Length response from `sock.makefile("rb")`; return (head, body).

    The buffered reader keeps bytes of a following pipelined response for the next call.
    """
    lines = []
    while (line := reader.readline()) not in (b"\r\n", b""):
        lines.append(line)
    head = b"".join(lines)
    length = int(next(line.split(b":")[1] for line in lines if line.lower().startswith(b"content-length")))
    return head, reader.read(length)


def test_route_by_model_and_path(gateway, echo):
    by_model = requests.post(gateway.url + "/v1/completions", json={"model": "echo", "prompt": "by model"}, timeout=10)
    assert by_model.status_code == 200
    assert by_model.json()["choices"][0]["text"] == "by model"

    by_path = requests.post(
        gateway.url + "/team/echo-svc/v1/chat/completions",
        json={"model": "echo", "messages": [{"role": "user", "content": "by path"}]},
        timeout=10,
    )
    assert by_path.status_code == 200
    assert by_path.json()["choices"][0]["message"]["content"] == "by path"

    unknown_service = requests.post(gateway.url + "/team/other/v1/completions", json={"model": "echo", "prompt": "x"}, timeout=10)
    assert unknown_service.status_code == 404


def test_wrong_method_on_post_route(gateway):
    wrong = requests.get(gateway.url + "/v1/chat/completions", timeout=10)
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "POST"
    assert wrong.json()["error"]["type"] == "invalid_request_error"
    assert "POST" in wrong.json()["error"]["message"]

    unknown = requests.get(gateway.url + "/v1/no-such-route", timeout=10)
    assert unknown.status_code == 404


def test_round_robin_alternates(gateway, echo):
    used = [
        requests.post(gateway.url + "/v1/completions", json={"model": "echo", "prompt": "x"}, timeout=10).headers[
            "x-llmisvc-endpoint"
        ]
        for _ in range(6)
    ]
    assert sorted(set(used)) == sorted(echo.addresses)
    assert all(used[i] != used[i + 1] for i in range(5))


def test_models_lists_every_service(gateway, echo):
    gateway.put_service("second", no_scheduler_entry("second-model", echo.addresses[:1]))
    try:
        listed = requests.get(gateway.url + "/v1/models", timeout=10).json()
        ids = {m["id"] for m in listed["data"]}
        assert {"echo", "second-model"} <= ids
        one = requests.get(gateway.url + "/default/second/v1/models", timeout=10).json()
        assert [m["id"] for m in one["data"]] == ["second-model"]
    finally:
        gateway.delete_service("second")
    assert "second-model" not in {m["id"] for m in requests.get(gateway.url + "/v1/models", timeout=10).json()["data"]}


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{not json", 400, "body"),
        (b"[1, 2]", 400, "body"),
        (b"", 400, "body"),
        (b'{"prompt": "no model"}', 400, "model"),
        (b'{"model": "no-such-model", "prompt": "x"}', 404, "model"),
    ],
)
def test_client_errors_are_openai_objects(gateway, echo, body, status, param):
    response = requests.post(gateway.url + "/v1/completions", data=body, headers={"content-type": "application/json"}, timeout=10)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param
    assert error["message"]
    assert response.headers["x-request-id"]


def test_body_over_limit_is_413(gateway, echo):
    body = b'{"model": "echo", "prompt": "' + b"a" * (40 * 1024 * 1024) + b'"}'
    response = requests.post(gateway.url + "/v1/completions", data=body, timeout=60)
    assert response.status_code == 413
    assert str(32 * 1024 * 1024) in response.json()["error"]["message"]

    def chunks():
        yield b'{"model": "echo", "prompt": "'
        for _ in range(40):
            yield b"a" * (1024 * 1024)
        yield b'"}'

    chunked = requests.post(gateway.url + "/v1/completions", data=chunks(), timeout=60)
    assert chunked.status_code == 413
    assert "--max-body-bytes" in chunked.json()["error"]["message"]


def test_no_ready_endpoint_is_503(gateway, echo):
    gateway.put_service("unready", {"model": "unready", "endpoints": [{"address": echo.addresses[0], "ready": False}]})
    gateway.put_service("empty", {"model": "empty", "endpoints": []})
    try:
        for model in ("unready", "empty"):
            response = requests.post(gateway.url + "/v1/completions", json={"model": model, "prompt": "x"}, timeout=10)
            assert response.status_code == 503, model
            assert "no ready endpoint" in response.json()["error"]["message"]
    finally:
        gateway.delete_service("unready")
        gateway.delete_service("empty")


def test_admin_api_auth_and_validation(gateway, tmp_path):
    url = gateway.url + "/admin/services"
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, headers={"x-llmisvc-admin-token": "wrong"}, timeout=10).status_code == 401
    assert requests.get(url, headers={"x-llmisvc-admin-token": ADMIN_TOKEN}, timeout=10).status_code == 200

    bad = requests.put(
        url + "/default/bad",
        json={"model": "m", "endpoints": [{"address": "no-port"}]},
        headers={"x-llmisvc-admin-token": ADMIN_TOKEN},
        timeout=10,
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "endpoints[0].address"
    unknown = requests.put(
        url + "/default/bad", json={"model": "m", "replicsa": 3}, headers={"x-llmisvc-admin-token": ADMIN_TOKEN}, timeout=10
    )
    assert unknown.status_code == 400
    assert "replicsa" in unknown.json()["error"]["message"]
    missing = requests.delete(url + "/default/never-created", headers={"x-llmisvc-admin-token": ADMIN_TOKEN}, timeout=10)
    assert missing.status_code == 404

    port = free_port()
    process = start(["gateway", "--port", str(port)], tmp_path / "no-admin.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=30, process=process)
        disabled = requests.get(f"http://127.0.0.1:{port}/admin/services", headers={"x-llmisvc-admin-token": ADMIN_TOKEN}, timeout=10)
        assert disabled.status_code == 404
    finally:
        stop(process)


def test_api_key_required(tmp_path, echo):
    keyed = GatewayProcess(tmp_path, env={"LLMISVC_API_KEY": "client-secret"})
    try:
        keyed.put_service("echo", no_scheduler_entry("echo", echo.addresses))
        body = {"model": "echo", "prompt": "x"}
        assert requests.post(keyed.url + "/v1/completions", json=body, timeout=10).status_code == 401
        wrong = requests.post(keyed.url + "/v1/completions", json=body, headers={"authorization": "Bearer nope"}, timeout=10)
        assert wrong.status_code == 401
        assert wrong.json()["error"]["type"] == "authentication_error"
        right = requests.post(keyed.url + "/v1/completions", json=body, headers={"authorization": "Bearer client-secret"}, timeout=10)
        assert right.status_code == 200
        assert requests.get(keyed.url + "/v1/models", timeout=10).status_code == 401
        assert requests.get(keyed.url + "/health", timeout=10).status_code == 200
    finally:
        keyed.stop()


def test_removed_endpoint_drains(gateway, tmp_path):
    sim = SimProcess(tmp_path, "drain", "--itl-ms", "20", "--ttft-overhead-ms", "0", replicas=2)
    try:
        first, second = sim.addresses
        gateway.put_service("drain", no_scheduler_entry("drain", [first]))
        sock = socket.create_connection(("127.0.0.1", gateway.port))
        body = json.dumps({"model": "drain", "prompt": "x", "max_tokens": 60}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        assert wait_until(lambda: gateway.service("drain")["in_flight"] == 1, timeout=10)

        view = gateway.put_service("drain", no_scheduler_entry("drain", [second]))
        old = next(e for e in view["endpoints"] if e["address"] == first)
        assert old["draining"] is True
        assert old["in_flight"] == 1
        routed = requests.post(gateway.url + "/v1/completions", json={"model": "drain", "prompt": "x", "max_tokens": 1}, timeout=10)
        assert routed.headers["x-llmisvc-endpoint"] == second

        head, _ = read_response(sock.makefile("rb"))
        assert head.startswith(b"HTTP/1.1 200")
        sock.close()
        assert wait_until(
            lambda: [e["address"] for e in gateway.service("drain")["endpoints"]] == [second], timeout=10
        )
    finally:
        sim.stop()
        gateway.delete_service("drain")


def test_expect_continue_chunked_and_pipelined(gateway, echo):
    sock = socket.create_connection(("127.0.0.1", gateway.port))
    sock.settimeout(10)
    reader = sock.makefile("rb")
    try:
        body = json.dumps({"model": "echo", "prompt": "continued"}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: %d\r\n\r\n" % len(body))
        assert reader.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert reader.readline() == b"\r\n"
        sock.sendall(body)
        head, reply = read_response(reader)
        assert head.startswith(b"HTTP/1.1 200")
        assert json.loads(reply)["choices"][0]["text"] == "continued"

        chunked_body = json.dumps({"model": "echo", "prompt": "chunked"}).encode()
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n" % (10, chunked_body[:10])
            + b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunked_body) - 10, chunked_body[10:])
        )
        head, reply = read_response(reader)
        assert json.loads(reply)["choices"][0]["text"] == "chunked"

        first = json.dumps({"model": "echo", "prompt": "first"}).encode()
        second = json.dumps({"model": "echo", "prompt": "second"}).encode()
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (len(first), first)
            + b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (len(second), second)
        )
        _, reply_one = read_response(reader)
        _, reply_two = read_response(reader)
        assert json.loads(reply_one)["choices"][0]["text"] == "first"
        assert json.loads(reply_two)["choices"][0]["text"] == "second"
    finally:
        reader.close()
        sock.close()


def test_metrics_count_status_codes(gateway, echo):
    before = gateway.metric("llmisvc_gateway_requests_total", model="echo", code="200")
    rejected_before = gateway.metric("llmisvc_gateway_requests_total", model="echo", code="400")
    requests.post(gateway.url + "/v1/completions", json={"model": "echo", "prompt": "x"}, timeout=10)
    rejected = requests.post(gateway.url + "/v1/completions", json={"model": "echo", "prompt": "x", "n": 0}, timeout=10)
    assert rejected.status_code == 400
    assert gateway.metric("llmisvc_gateway_requests_total", model="echo", code="200") == before + 1
    assert gateway.metric("llmisvc_gateway_requests_total", model="echo", code="400") == rejected_before + 1
    assert gateway.metric("llmisvc_gateway_e2e_request_latency_seconds_count", model="echo") >= 1
    assert gateway.metric("llmisvc_gateway_endpoint_picks_total", model="echo") >= 1


def test_large_body_routed_by_scanned_model(gateway, echo):
    # Above the 16 KiB scan threshold and within the simulator's 8192-token context.
    content = 'padding with "quotes" and a nested "model": "wrong" ' * 400
    body = {"messages": [{"role": "system", "content": content}, {"role": "user", "content": "large"}], "model": "echo", "metadata": {"model": "wrong"}}
    response = requests.post(gateway.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "large"

    broken = b'{"model": "echo", "messages": [' + b'"x", ' * 5000
    rejected = requests.post(gateway.url + "/v1/chat/completions", data=broken, timeout=30)
    assert rejected.status_code == 400
    assert rejected.json()["error"]["param"] == "body"


def test_http10_stream_is_close_delimited(gateway, echo):
    body = json.dumps({"model": "echo", "prompt": "old client", "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", gateway.port))
    sock.settimeout(10)
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.0\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    head, _, stream = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower()
    assert b"connection: close" in head.lower()
    assert stream.startswith(b"data: ")
    assert stream.endswith(b"data: [DONE]\n\n")


def test_config_file_and_port_from_env(tmp_path, echo):
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "services:\n"
        "  - name: from-file\n"
        "    namespace: team\n"
        "    model: echo\n"
        "    shape: no-scheduler\n"
        f"    endpoints: [{{address: '{echo.addresses[0]}'}}]\n"
    )
    process = start(["gateway", "--config", str(config)], tmp_path / "config-gateway.log", env={"LLMISVC_GATEWAY_PORT": str(port)})
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=30, process=process)
        response = requests.post(f"http://127.0.0.1:{port}/team/from-file/v1/completions", json={"model": "echo", "prompt": "file"}, timeout=10)
        assert response.status_code == 200
        assert response.json()["choices"][0]["text"] == "file"
    finally:
        stop(process)
    log = (tmp_path / "config-gateway.log").read_text()
    assert "open-file limit is" in log


def test_idle_connections_closed(tmp_path):
    sim = SimProcess(tmp_path, "idle", "--itl-ms", "100", "--ttft-overhead-ms", "0")
    short = GatewayProcess(tmp_path, "--idle-timeout", "0.5")
    try:
        short.put_service("idle", no_scheduler_entry("idle", sim.addresses))
        silent = socket.create_connection(("127.0.0.1", short.port))
        silent.settimeout(10)
        started = time.monotonic()
        assert silent.recv(1) == b""
        assert time.monotonic() - started < 10

        # A stream that outlives the idle timeout is not cut: only idle connections are.
        body = json.dumps({"model": "idle", "prompt": "x", "max_tokens": 15, "stream": True}).encode()
        busy = socket.create_connection(("127.0.0.1", short.port))
        busy.settimeout(10)
        busy.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        while b"data: [DONE]" not in received:
            chunk = busy.recv(65536)
            assert chunk, "the gateway closed a connection with a request in flight"
            received += chunk
        started = time.monotonic()
        while busy.recv(65536):
            pass
        assert time.monotonic() - started < 10
        busy.close()
        silent.close()
    finally:
        short.stop()
        sim.stop()
