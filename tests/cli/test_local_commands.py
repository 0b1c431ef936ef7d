"""The local CLI commands against a real control process with simulator replicas."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from llmisvc.cli.local_commands import _age
from support import LLMISVC, free_port, pids_with_env, run_cli, wait_http

pytestmark = pytest.mark.e2e


def sim_service(name: str, replicas: int = 1, prefill: int | None = None, args: list[str] | None = None) -> dict:
    spec = {
        "model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct", "name": name},
        "replicas": replicas,
        "template": {"containers": [{"name": "main", "args": ["--itl-ms", "2"] + (args or [])}]},
        "router": {"scheduler": {}, "route": {}, "gateway": {}},
    }
    if prefill is not None:
        spec["prefill"] = {"replicas": prefill}
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "LLMInferenceService",
        "metadata": {"name": name, "annotations": {"llmisvc.io/engine": "sim"}},
        "spec": spec,
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    home = root / "home"
    values = {"LLMISVC_HOME": str(home), "LLMISVC_GATEWAY_PORT": str(free_port()), "ROOT": str(root)}
    yield values
    pid_file = home / "control.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass
    deadline = time.monotonic() + 60
    while pids_with_env("LLMISVC_HOME", str(home)) and time.monotonic() < deadline:
        time.sleep(0.5)


def write(env: dict, name: str, *documents: dict) -> Path:
    path = Path(env["ROOT"]) / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all(documents))
    return path


def cli(env: dict, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return run_cli(list(args), {k: v for k, v in env.items() if k != "ROOT"}, timeout=timeout)


def test_age_format():
    assert _age(5) == "5s"
    assert _age(119) == "119s"
    assert _age(600) == "10m"
    assert _age(3 * 3600) == "3h"
    assert _age(2 * 86400) == "2d"


def test_dry_run_starts_nothing(env):
    path = write(env, "dry", sim_service("dry", replicas=2))
    result = cli(env, "apply", "-f", str(path), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "llminferenceservice.serving.kserve.io/dry create (dry run)" in result.stdout
    assert "2 x sim engine" in result.stdout
    assert "--served-model-name dry" in result.stdout
    assert not Path(env["LLMISVC_HOME"], "control.sock").exists()


def test_get_without_services(env):
    result = cli(env, "get")
    assert result.returncode == 0
    assert "No resources found." in result.stderr
    missing = cli(env, "get", "nothing")
    assert missing.returncode == 1
    assert '"nothing" not found' in missing.stderr


def test_apply_get_and_outputs(env):
    path = write(env, "one", sim_service("one", replicas=2))
    applied = cli(env, "apply", "-f", str(path))
    assert applied.returncode == 0, applied.stderr
    assert "llminferenceservice.serving.kserve.io/one ready" in applied.stdout

    table = cli(env, "get").stdout.splitlines()
    assert table[0].split() == ["NAME", "URL", "READY", "REASON", "AGE"]
    assert table[1].split()[0] == "one"

    wide = cli(env, "get", "one", "-o", "wide").stdout.splitlines()
    assert wide[0].split() == ["NAME", "URL", "READY", "REASON", "AGE", "REPLICAS", "MODEL", "SHAPE", "GENERATION", "POOLS"]
    assert wide[1].split()[-5:] == ["2/2", "one", "scheduler", "1", "both:2/2"]

    document = json.loads(cli(env, "get", "one", "-o", "json").stdout)
    assert document["kind"] == "LLMInferenceService"
    assert document["spec"]["replicas"] == 2
    conditions = {c["type"]: c["status"] for c in document["status"]["conditions"]}
    assert conditions["Ready"] == "True"
    assert conditions["MainWorkloadReady"] == "True"
    assert document["status"]["url"].endswith("/default/one")

    listing = yaml.safe_load(cli(env, "get", "-o", "yaml").stdout)
    assert listing["kind"] == "List"
    assert [item["metadata"]["name"] for item in listing["items"]] == ["one"]


def test_dry_run_against_running_service(env):
    changed = sim_service("one", replicas=3, args=["--seed", "4"])
    result = cli(env, "apply", "-f", str(write(env, "one-changed", changed)), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "one configure (dry run)" in result.stdout
    assert "roll out main revision" in result.stdout
    assert "scale main 2 -> 3" in result.stdout
    listing = json.loads(cli(env, "get", "one", "-o", "json").stdout)
    assert listing["spec"]["replicas"] == 2


def test_reapply_unchanged_keeps_generation(env):
    path = write(env, "one", sim_service("one", replicas=2))
    result = cli(env, "apply", "-f", str(path))
    assert result.returncode == 0
    assert "unchanged (generation 1)" in result.stderr


def test_describe_sections(env):
    text = cli(env, "describe", "one").stdout
    for heading in ("Name:         one", "Conditions:", "Replicas:", "Events:", "Workloads:"):
        assert heading in text
    assert text.count("    PID:") == 2
    assert "ScaledUp" in text
    missing = cli(env, "describe", "nothing")
    assert missing.returncode == 1
    assert "not found" in missing.stderr


def test_logs_selection(env):
    replica0 = cli(env, "logs", "one", "--replica", "0")
    assert replica0.returncode == 0
    assert "sim replica serving one" in replica0.stdout

    both = cli(env, "logs", "one", "--tail", "1").stdout.splitlines()
    assert len(both) == 2
    assert all(line.startswith("[one-kserve-") for line in both)

    scheduler = cli(env, "logs", "one", "--scheduler")
    assert scheduler.returncode == 0
    assert scheduler.stdout.strip()

    out_of_range = cli(env, "logs", "one", "--replica", "5")
    assert out_of_range.returncode == 1
    assert "out of range" in out_of_range.stderr

    no_prefill = cli(env, "logs", "one", "--prefill")
    assert no_prefill.returncode == 1
    assert "no prefill replicas" in no_prefill.stderr


def test_prefill_decode_runs_split(env):
    path = write(env, "pd", sim_service("pd", replicas=1, prefill=2))
    applied = cli(env, "apply", "-f", str(path))
    assert applied.returncode == 0, applied.stderr
    assert "serve aggregated" not in applied.stdout

    row = cli(env, "get", "pd", "-o", "wide").stdout.splitlines()[1].split()
    assert row[2] == "True"
    assert row[-2:] == ["1", "decode:1/1,prefill:2/2"]
    assert cli(env, "logs", "pd", "--prefill", "--replica", "1").returncode == 0
    info = cli(env, "describe", "pd").stdout
    assert "pd-kserve-prefill" in info
    assert "PrefillWorkloadReady" in info


def sim_config(name: str, args: list[str]) -> dict:
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "LLMInferenceServiceConfig",
        "metadata": {"name": name},
        "spec": {"template": {"containers": [{"name": "main", "args": args}]}},
    }


def test_config_change_reconciles_dependents(env):
    service = sim_service("based", replicas=1)
    del service["spec"]["template"]
    service["spec"]["baseRefs"] = [{"name": "sim-args"}]
    applied = cli(env, "apply", "-f", str(write(env, "based", sim_config("sim-args", ["--itl-ms", "2"]), service)))
    assert applied.returncode == 0, applied.stderr
    assert "llminferenceserviceconfig.serving.kserve.io/default/sim-args configured" in applied.stdout
    before = json.loads(cli(env, "get", "based", "-o", "json").stdout)

    invalid = cli(env, "apply", "-f", str(write(env, "bad-config", sim_config("sim-args", ["--no-such-flag"]))))
    assert invalid.returncode == 1
    assert "its baseRefs name a config in this file" in invalid.stderr
    assert "--no-such-flag" in invalid.stderr

    changed = cli(env, "apply", "-f", str(write(env, "new-config", sim_config("sim-args", ["--itl-ms", "3"]))))
    assert changed.returncode == 0, changed.stderr
    assert "default/based configured (generation 2)" in changed.stderr
    text = cli(env, "describe", "based").stdout
    assert "--itl-ms 3" in text
    assert "RolledOut" in text
    assert before["status"]["observedGeneration"] == 1

    config_only = write(env, "config-only", sim_config("sim-args", ["--itl-ms", "3"]))
    removed = cli(env, "delete", "-f", str(config_only))
    assert removed.returncode == 0, removed.stderr
    assert '"sim-args" deleted' in removed.stdout
    assert "default/based" in removed.stderr
    missing = cli(env, "delete", "-f", str(config_only))
    assert missing.returncode == 1
    assert "not found" in missing.stderr
    assert cli(env, "delete", "based").returncode == 0


def test_gateway_port_mismatch_warns(env):
    path = write(env, "one", sim_service("one", replicas=2))
    result = cli(env, "apply", "-f", str(path), "--gateway-port", str(free_port()))
    assert result.returncode == 0
    assert "applies only when it starts" in result.stderr


def test_delete_by_file(env):
    result = cli(env, "delete", "-f", str(write(env, "both", sim_service("one"), sim_service("pd"))))
    assert result.returncode == 0, result.stderr
    assert '"one" deleted' in result.stdout
    assert '"pd" deleted' in result.stdout
    home = env["LLMISVC_HOME"]
    deadline = time.monotonic() + 30
    while pids_with_env("LLMISVC_HOME", home) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert pids_with_env("LLMISVC_HOME", home) == []


def test_control_in_foreground(env, tmp_path):
    home = tmp_path / "home"
    port = free_port()
    control_env = {"LLMISVC_HOME": str(home), "LLMISVC_GATEWAY_PORT": "1"}
    control = subprocess.Popen(
        LLMISVC + ["control", "--gateway-port", str(port)],
        env={**os.environ, **control_env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", timeout=60, process=control)
        deadline = time.monotonic() + 30
        while not (home / "control.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (home / "control.sock").stat().st_mode & 0o777 == 0o600
        assert home.stat().st_mode & 0o777 == 0o700

        second = run_cli(["control"], control_env, timeout=60)
        assert second.returncode == 3
        assert "already runs" in second.stderr
    finally:
        control.send_signal(signal.SIGINT)
        control.wait(60)
        leftover = pids_with_env("LLMISVC_HOME", str(home))
        for pid in leftover:
            os.kill(pid, signal.SIGKILL)
    assert leftover == []
    assert control.returncode == 0
    assert not (home / "control.sock").exists()
