"""examples/default-scheduler.yaml end to end: real engines, the gateway, the openai client."""

from __future__ import annotations

import os
import signal
import time

import pytest
from openai import OpenAI

from support import REPO, free_port, pids_with_env, run_cli

pytestmark = pytest.mark.e2e

EXAMPLE = REPO / "examples" / "default-scheduler.yaml"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    home = tmp_path_factory.mktemp("default-example") / "home"
    port = free_port()
    env = {"LLMISVC_HOME": str(home), "LLMISVC_GATEWAY_PORT": str(port)}
    applied = run_cli(["apply", "-f", str(EXAMPLE)], env, timeout=900)
    try:
        assert applied.returncode == 0, applied.stdout + applied.stderr
        yield {"env": env, "port": port, "home": home, "apply": applied}
    finally:
        run_cli(["delete", "smollm2"], env, timeout=120)
        deadline = time.monotonic() + 60
        while pids_with_env("LLMISVC_HOME", str(home)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in pids_with_env("LLMISVC_HOME", str(home)):
            os.kill(pid, signal.SIGKILL)


def client_for(service, path: str = "") -> OpenAI:
    return OpenAI(base_url=f"http://127.0.0.1:{service['port']}{path}/v1", api_key="not-needed", timeout=300)


def test_apply_prints_url_and_progress(service):
    assert f"http://127.0.0.1:{service['port']}/default/smollm2/v1" in service["apply"].stdout
    assert "replicas ready, waiting for" in service["apply"].stderr


def test_get_shows_ready(service):
    listing = run_cli(["get", "-o", "wide"], service["env"])
    row = listing.stdout.splitlines()[1].split()
    assert row[0] == "smollm2"
    assert row[2] == "True"
    assert "3/3" in row


def test_completion(service):
    completion = client_for(service).completions.create(
        model="smollm2", prompt="What is Kubernetes?", max_tokens=16, temperature=0
    )
    choice = completion.choices[0]
    assert choice.text.strip()
    assert choice.finish_reason in ("length", "stop")
    assert completion.usage.prompt_tokens > 0
    assert 0 < completion.usage.completion_tokens <= 16
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_streamed_chat_by_service_path(service):
    stream = client_for(service, "/default/smollm2").chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Name one planet."}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish_reasons, usage = [], [], None
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish_reasons.append(choice.finish_reason)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces).strip()
    assert finish_reasons in (["length"], ["stop"])
    assert usage is not None
    assert 0 < usage.completion_tokens <= 12
    assert len(pieces) <= usage.completion_tokens


def test_misspelled_field_rejected_with_path(tmp_path):
    home = tmp_path / "home"
    env = {"LLMISVC_HOME": str(home), "LLMISVC_GATEWAY_PORT": str(free_port())}
    bad = tmp_path / "typo.yaml"
    bad.write_text(EXAMPLE.read_text().replace("replicas: 3", "replicsa: 3"))
    result = run_cli(["apply", "-f", str(bad)], env)
    assert result.returncode == 1
    assert "spec.replicsa" in result.stderr
    assert not (home / "control.sock").exists()


def test_negative_replicas_rejected_with_path(tmp_path):
    home = tmp_path / "home"
    env = {"LLMISVC_HOME": str(home), "LLMISVC_GATEWAY_PORT": str(free_port())}
    bad = tmp_path / "negative.yaml"
    bad.write_text(EXAMPLE.read_text().replace("replicas: 3", "replicas: -1"))
    result = run_cli(["apply", "-f", str(bad)], env)
    assert result.returncode == 1
    assert "spec.replicas" in result.stderr
    assert "-1" in result.stderr
    assert not (home / "control.sock").exists()
    assert pids_with_env("LLMISVC_HOME", str(home)) == []
