"""The engine's HTTP server: loading state, API key, operational endpoints and CLI flags."""

import subprocess
import time
import urllib.error
import urllib.request

import openai
import pytest
import requests

from llmisvc.cli.main import build_parser
from support import LLMISVC, free_port, start, stop, wait_http

API_KEY = "test-key-123"
NAMES = ["smol", "smol-alias"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """An engine with an API key and two served names; records /health statuses while loading."""
    port = free_port()
    log = tmp_path_factory.mktemp("engine") / "engine.log"
    args = ["engine", "--port", str(port), "--served-model-name", *NAMES, "--threads", "2", "--api-key", API_KEY,
            "--num-gpu-blocks-override", "256"]  # fmt: skip
    process = start(args, log)
    base = f"http://127.0.0.1:{port}"
    statuses = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and 200 not in statuses:
            assert process.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    statuses.append(response.status)
            except urllib.error.HTTPError as exc:
                statuses.append(exc.code)
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.1)
        wait_http(f"{base}/health", timeout=10, process=process)
        yield base, statuses
    finally:
        stop(process)


def auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.e2e
def test_health_is_503_while_loading(server):
    _, statuses = server
    assert statuses[0] == 503
    assert statuses[-1] == 200


@pytest.mark.e2e
def test_api_key_required_on_v1(server):
    base, _ = server
    missing = requests.get(f"{base}/v1/models", timeout=10)
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    assert requests.get(f"{base}/v1/models", headers=auth("wrong"), timeout=10).status_code == 401
    assert requests.post(f"{base}/tokenize", json={"prompt": "x"}, timeout=10).status_code == 401
    models = requests.get(f"{base}/v1/models", headers=auth(), timeout=10)
    assert models.status_code == 200
    assert [m["id"] for m in models.json()["data"]] == NAMES


@pytest.mark.e2e
def test_health_metrics_version_stay_open(server):
    base, _ = server
    assert requests.get(f"{base}/health", timeout=10).status_code == 200
    metrics = requests.get(f"{base}/metrics", timeout=10)
    assert metrics.status_code == 200
    assert 'vllm:num_requests_running{model_name="smol"}' in metrics.text
    assert requests.get(f"{base}/version", timeout=10).json()["version"]


@pytest.mark.e2e
def test_openai_client_with_key_and_alias(server):
    base, _ = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    result = client.completions.create(model="smol-alias", prompt="Hello", max_tokens=3)
    assert result.model == "smol-alias"
    assert result.usage.completion_tokens <= 3
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0).models.list()


@pytest.mark.e2e
def test_tokenize_detokenize_round_trip(server):
    base, _ = server
    text = "Hello, world! 日本"
    tokens = requests.post(f"{base}/tokenize", json={"prompt": text}, headers=auth(), timeout=10).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    assert tokens["max_model_len"] > 0
    back = requests.post(f"{base}/detokenize", json={"tokens": tokens["tokens"]}, headers=auth(), timeout=10).json()
    assert back["prompt"] == text

    chat = requests.post(
        f"{base}/tokenize", json={"messages": [{"role": "user", "content": text}]}, headers=auth(), timeout=10
    ).json()
    assert chat["count"] > tokens["count"]

    bad = requests.post(f"{base}/detokenize", json={"tokens": [-1]}, headers=auth(), timeout=10)
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "tokens"


@pytest.mark.e2e
def test_error_bodies(server):
    base, _ = server
    malformed = requests.post(
        f"{base}/v1/completions", data=b"{nope", headers={**auth(), "Content-Type": "application/json"}, timeout=10
    )
    assert malformed.status_code == 400
    assert malformed.json()["error"]["type"] == "invalid_request_error"
    unknown_path = requests.get(f"{base}/v1/nothing", headers=auth(), timeout=10)
    assert unknown_path.status_code == 404
    assert "error" in unknown_path.json()
    wrong_model = requests.post(
        f"{base}/v1/completions", json={"model": "other", "prompt": "x"}, headers=auth(), timeout=10
    )
    assert wrong_model.status_code == 404
    assert wrong_model.json()["error"]["param"] == "model"


@pytest.mark.e2e
def test_request_id_echoed(server):
    base, _ = server
    response = requests.post(
        f"{base}/v1/completions",
        json={"model": "smol", "prompt": "Hi", "max_tokens": 1},
        headers={**auth(), "x-request-id": "abc-123"},
        timeout=60,
    )
    assert response.headers["x-request-id"] == "abc-123"


def test_unknown_flag_rejected():
    result = subprocess.run([*LLMISVC, "engine", "--no-such-flag"], capture_output=True, timeout=60)
    assert result.returncode == 2
    assert b"--no-such-flag" in result.stderr


def test_batched_tokens_below_max_num_seqs_rejected():
    args = ["engine", "--max-num-batched-tokens", "8", "--max-num-seqs", "16"]
    result = subprocess.run([*LLMISVC, *args], capture_output=True, timeout=60)
    assert result.returncode == 1
    assert b"--max-num-batched-tokens (8) must be at least --max-num-seqs (16)" in result.stderr


def test_parallelism_above_one_rejected():
    with pytest.raises(SystemExit):
        build_parser("engine").parse_args(["engine", "--tensor-parallel-size", "2"])


def test_flags_mirror_vllm(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    args = build_parser("engine").parse_args(
        ["engine", "--served-model-name", "a", "b", "--served-model-name", "c", "--no-enable-prefix-caching",
         "--kv-cache-memory", "2GiB", "--kv-events-config", '{"enable_kv_cache_events": true}']  # fmt: skip
    )
    assert args.served_model_name == ["a", "b", "c"]
    assert args.enable_prefix_caching is False
    assert args.kv_cache_memory == 2 * 2**30
    assert args.kv_events_config == {"enable_kv_cache_events": True}
    assert args.api_key == "from-env"
    assert args.block_size == 16
    assert args.host == "127.0.0.1"
