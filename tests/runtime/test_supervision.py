"""Supervision by the local runtime, end to end on simulated engines.

Every test drives the real `llmisvc` CLI against one control process, one gateway and
simulator replicas (`llmisvc.io/engine: sim`), so crashes, rollouts and restarts involve
real processes, sockets and HTTP, without loading a model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from support import LLMISVC, free_port, pids_with_env, run_cli

pytestmark = pytest.mark.e2e

SIM_ARGS = ["--ttft-overhead-ms", "5", "--itl-ms", "2", "--prefill-ms-per-token", "0.01"]


def service_yaml(name: str, model: str, replicas: int = 2, args: list[str] | None = None,
                 annotations: dict[str, str] | None = None, memory_limit: str | None = None,
                 grace_s: int = 10) -> str:
    """Return an LLMInferenceService document for simulator replicas."""
    document = {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "LLMInferenceService",
        "metadata": {"name": name, "annotations": {"llmisvc.io/engine": "sim", **(annotations or {})}},
        "spec": {
            "model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct", "name": model},
            "replicas": replicas,
            "template": {
                "terminationGracePeriodSeconds": grace_s,
                "containers": [{"name": "main", "args": SIM_ARGS + (args or [])}],
            },
            "router": {"scheduler": {}, "route": {}, "gateway": {}},
        },
    }
    if memory_limit:
        document["spec"]["template"]["containers"][0]["resources"] = {"limits": {"memory": memory_limit}}
    return json.dumps(document)  # JSON is YAML


class Runtime:
    """One isolated LLMISVC_HOME and gateway port shared by this module's tests."""

    def __init__(self, home: Path, port: int):
        self.home = home
        self.port = port
        self.env = {"LLMISVC_HOME": str(home), "LLMISVC_GATEWAY_PORT": str(port)}
        self.gateway = f"http://127.0.0.1:{port}"

    def cli(self, *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess:
        return run_cli(list(args), self.env, timeout=timeout)

    def apply(self, text: str, check: bool = True, timeout: float = 180.0) -> subprocess.CompletedProcess:
        path = self.home.parent / f"spec-{time.monotonic_ns()}.yaml"
        path.write_text(text)
        result = self.cli("apply", "-f", str(path), timeout=timeout)
        if check:
            assert result.returncode == 0, result.stderr + result.stdout
        return result

    def describe(self, name: str) -> dict:
        """Return the control process's describe result as data."""
        from llmisvc.runtime.local.client import ControlClient
        from llmisvc.runtime.local.paths import Home

        return ControlClient(Home(self.home)).call("describe", name=name)

    def complete(self, model: str, path: str = "", max_tokens: int = 4, timeout: float = 30.0) -> requests.Response:
        return requests.post(
            f"{self.gateway}{path}/v1/completions",
            json={"model": model, "prompt": "Say hello", "max_tokens": max_tokens},
            timeout=timeout,
        )

    def control_pid(self) -> int:
        return int((self.home / "control.pid").read_text())


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    home = tmp_path_factory.mktemp("supervision") / "home"
    rt = Runtime(home, free_port())
    yield rt
    # Stop whatever the tests left running: SIGTERM to the control process drains and
    # stops its replicas and gateway.
    if (home / "control.pid").exists():
        try:
            os.kill(rt.control_pid(), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass
    deadline = time.monotonic() + 60
    while pids_with_env("LLMISVC_HOME", str(home)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in pids_with_env("LLMISVC_HOME", str(home)):
        os.kill(pid, signal.SIGKILL)


def replica_pids(info: dict) -> list[int]:
    return [replica["pid"] for replica in info["replicas"]]


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.25):
    """Poll `predicate` until it returns a truthy value; return it or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"condition not met within {timeout}s")


class SteadyLoad:
    """Send completions back to back from `workers` threads and record every outcome."""

    def __init__(self, runtime: Runtime, model: str, workers: int = 3):
        self.runtime = runtime
        self.model = model
        self.failures: list[str] = []
        self.successes = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]
        self._lock = threading.Lock()

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            try:
                response = session.post(
                    f"{self.runtime.gateway}/v1/completions",
                    json={"model": self.model, "prompt": "Count to five", "max_tokens": 8},
                    timeout=30,
                )
                ok = response.status_code == 200 and response.json()["choices"][0]["finish_reason"] is not None
                outcome = None if ok else f"{response.status_code}: {response.text[:200]}"
            except requests.RequestException as exc:
                outcome = f"{exc.__class__.__name__}: {exc}"
            with self._lock:
                if outcome is None:
                    self.successes += 1
                else:
                    self.failures.append(outcome)

    def __enter__(self) -> "SteadyLoad":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def test_apply_serves_and_get_lists(runtime):
    result = runtime.apply(service_yaml("alpha", "alpha-model"))
    assert "http://127.0.0.1:%d/default/alpha" % runtime.port in result.stdout

    response = runtime.complete("alpha-model")
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 4

    by_path = runtime.complete("alpha-model", path="/default/alpha")
    assert by_path.status_code == 200

    listing = runtime.cli("get")
    assert listing.returncode == 0
    header, row = listing.stdout.splitlines()[:2]
    assert header.split() == ["NAME", "URL", "READY", "REASON", "AGE"]
    assert row.split()[:3] == ["alpha", f"http://127.0.0.1:{runtime.port}/default/alpha", "True"]


def test_kill_replica_restarts_without_failed_requests(runtime):
    runtime.apply(service_yaml("alpha", "alpha-model"))
    before = runtime.describe("alpha")
    victim = before["replicas"][0]
    os.kill(victim["pid"], signal.SIGKILL)

    # Requests right after the kill: the gateway retries before the first byte.
    statuses = [runtime.complete("alpha-model").status_code for _ in range(10)]
    assert statuses == [200] * 10

    def restarted():
        info = runtime.describe("alpha")
        replica = next(r for r in info["replicas"] if r["id"] == victim["id"])
        return replica if replica["restarts"] >= 1 and replica["ready"] else None

    replica = wait_for(restarted)
    assert replica["pid"] != victim["pid"]
    assert replica["last_termination"]["exit_code"] == 137
    assert "SIGKILL" in replica["last_termination"]["message"]
    assert runtime.complete("alpha-model").status_code == 200


def test_rollout_under_load_has_no_failures(runtime):
    runtime.apply(service_yaml("alpha", "alpha-model"))
    old_ids = {replica["id"] for replica in runtime.describe("alpha")["replicas"]}

    with SteadyLoad(runtime, "alpha-model") as load:
        time.sleep(1.0)
        runtime.apply(service_yaml("alpha", "alpha-model", args=["--itl-ms", "3"]))
        time.sleep(1.0)

    info = runtime.describe("alpha")
    new_ids = {replica["id"] for replica in info["replicas"]}
    assert load.failures == []
    assert load.successes > 20
    assert len(new_ids) == 2
    assert new_ids.isdisjoint(old_ids)
    assert all(replica["ready"] for replica in info["replicas"])
    assert "RolledOut" in [event["reason"] for event in info["events"]]


def test_invalid_apply_leaves_service_serving(runtime):
    runtime.apply(service_yaml("alpha", "alpha-model"))
    pids = replica_pids(runtime.describe("alpha"))

    typo = service_yaml("alpha", "alpha-model").replace('"replicas": 2', '"replicsa": 3')
    result = runtime.apply(typo, check=False)
    assert result.returncode == 1
    assert "spec.replicsa" in result.stderr

    unknown_flag = service_yaml("alpha", "alpha-model", args=["--no-such-flag", "1"])
    result = runtime.apply(unknown_flag, check=False)
    assert result.returncode == 1
    assert "spec.template.containers[main].args" in result.stderr
    assert "--no-such-flag" in result.stderr

    assert replica_pids(runtime.describe("alpha")) == pids
    assert runtime.complete("alpha-model").status_code == 200


def test_two_services_share_one_gateway(runtime):
    runtime.apply(service_yaml("alpha", "alpha-model"))
    runtime.apply(service_yaml("beta", "beta-model", replicas=1))

    alpha = runtime.complete("alpha-model")
    beta = runtime.complete("beta-model")
    assert alpha.status_code == 200
    assert beta.status_code == 200
    assert alpha.json()["model"] == "alpha-model"
    assert beta.json()["model"] == "beta-model"

    models = requests.get(f"{runtime.gateway}/v1/models", timeout=10).json()
    assert {"alpha-model", "beta-model"} <= {model["id"] for model in models["data"]}

    listing = runtime.cli("get", "-o", "wide").stdout
    assert "alpha-model" in listing
    assert "beta-model" in listing


def test_scale_down_and_up(runtime):
    runtime.apply(service_yaml("beta", "beta-model", replicas=3))
    assert len(runtime.describe("beta")["replicas"]) == 3
    runtime.apply(service_yaml("beta", "beta-model", replicas=1))
    info = runtime.describe("beta")
    assert len(info["replicas"]) == 1
    assert info["replicas_ready"] == 1
    assert runtime.complete("beta-model").status_code == 200


def test_crash_loop_reports_log_tail(runtime):
    # The simulator rejects a non-numeric --max-model-len at start-up and exits with code 2.
    crashing = service_yaml("gamma", "gamma-model", replicas=1, args=["--max-model-len", "lots"])
    result = runtime.apply(crashing, check=False, timeout=120)
    assert result.returncode == 1
    assert "CrashLoopBackOff" in result.stderr

    info = runtime.describe("gamma")
    replica = info["replicas"][0]
    assert replica["state"] == "CrashLoopBackOff"
    assert replica["restarts"] >= 2
    assert replica["last_termination"]["exit_code"] == 2
    assert "invalid int value" in replica["last_termination"]["log_tail"]

    text = runtime.cli("describe", "gamma").stdout
    assert "Last log lines before termination:" in text
    assert "invalid int value" in text
    assert "CrashLoopBackOff" in runtime.cli("get", "gamma").stdout
    assert runtime.cli("delete", "gamma").returncode == 0


def test_memory_limit_reports_oomkilled(runtime):
    result = runtime.apply(service_yaml("delta", "delta-model", replicas=1, memory_limit="8Mi"), check=False, timeout=120)
    assert result.returncode == 1

    info = runtime.describe("delta")
    assert info["replicas"][0]["last_termination"]["reason"] == "OOMKilled"
    assert "OOMKilled" in [event["reason"] for event in info["events"]]
    assert runtime.cli("delete", "delta").returncode == 0


def test_delete_interrupts_waiting_apply(runtime):
    # A readiness probe on a path the simulator does not serve keeps the replica unready,
    # so apply keeps waiting until the delete interrupts it.
    document = json.loads(service_yaml("epsilon", "epsilon-model", replicas=1))
    document["spec"]["template"]["containers"][0]["readinessProbe"] = {"httpGet": {"path": "/not-served", "port": 8000}, "periodSeconds": 1}
    path = runtime.home.parent / "epsilon.yaml"
    path.write_text(json.dumps(document))
    applying = subprocess.Popen(LLMISVC + ["apply", "-f", str(path)], env={**os.environ, **runtime.env},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: "epsilon" in runtime.cli("get").stdout, timeout=60)

        def probe_failed():
            replicas = runtime.describe("epsilon")["replicas"]
            return replicas and "404" in replicas[0]["last_probe"]

        wait_for(probe_failed, timeout=60)
        assert runtime.describe("epsilon")["replicas"][0]["ready"] is False

        started = time.monotonic()
        deleted = runtime.cli("delete", "epsilon", timeout=60)
        assert deleted.returncode == 0, deleted.stderr
        assert time.monotonic() - started < 30
        _, stderr = applying.communicate(timeout=30)
        assert applying.returncode == 1
        assert "interrupted" in stderr
    finally:
        if applying.poll() is None:
            applying.kill()


def test_liveness_failure_restarts_replica(runtime):
    document = json.loads(service_yaml("zeta", "zeta-model", replicas=1, grace_s=2))
    document["spec"]["template"]["containers"][0]["livenessProbe"] = {
        "httpGet": {"path": "/not-served", "port": 8000},
        "initialDelaySeconds": 0,
        "periodSeconds": 1,
        "failureThreshold": 2,
    }
    runtime.apply(json.dumps(document), check=False, timeout=120)

    def restarted_for_liveness():
        replicas = runtime.describe("zeta")["replicas"]
        last = replicas[0]["last_termination"] if replicas else None
        return last if last and replicas[0]["restarts"] >= 1 else None

    last = wait_for(restarted_for_liveness, timeout=90)
    assert last["reason"] == "Unhealthy"
    assert "liveness probe failed" in last["message"]
    assert "404" in last["message"]
    assert runtime.cli("delete", "zeta").returncode == 0


def test_logs_follow_prints_new_lines(runtime):
    runtime.apply(service_yaml("beta", "beta-model", replicas=1))
    tail = runtime.cli("logs", "beta", "--tail", "3")
    assert tail.returncode == 0
    assert 1 <= len(tail.stdout.splitlines()) <= 3

    log_path = Path(runtime.describe("beta")["replicas"][0]["log_path"])
    follower = subprocess.Popen(
        LLMISVC + ["logs", "beta", "-f", "--tail", "0"],
        env={**os.environ, **runtime.env}, stdout=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(1.0)
        marker = f"follow-marker-{time.monotonic_ns()}"
        with open(log_path, "a") as log:
            log.write(marker + "\n")
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(follower.stdout.readline()), daemon=True)
        reader.start()
        reader.join(30)
        assert lines and marker in lines[0]
    finally:
        follower.terminate()
        follower.wait(10)


def test_stop_annotation_stops_and_restarts(runtime):
    runtime.apply(service_yaml("beta", "beta-model", replicas=1, annotations={"serving.kserve.io/stop": "true"}))
    info = runtime.describe("beta")
    assert info["replicas"] == []
    assert info["reason"] == "Stopped"
    assert runtime.complete("beta-model").status_code == 404

    runtime.apply(service_yaml("beta", "beta-model", replicas=1))
    assert runtime.complete("beta-model").status_code == 200


def test_control_restart_keeps_services_reachable(runtime):
    runtime.apply(service_yaml("alpha", "alpha-model"))
    pids = sorted(replica_pids(runtime.describe("alpha")))

    # A crashed control process leaves replicas and gateway serving.
    os.kill(runtime.control_pid(), signal.SIGKILL)
    time.sleep(0.5)
    assert runtime.complete("alpha-model").status_code == 200

    # The next command starts a control process that adopts the running replicas.
    listing = runtime.cli("get", "alpha")
    assert listing.returncode == 0
    assert sorted(replica_pids(runtime.describe("alpha"))) == pids
    assert runtime.complete("alpha-model").status_code == 200

    # SIGTERM drains and stops everything; the stored services come back on demand.
    control = runtime.control_pid()
    os.kill(control, signal.SIGTERM)
    wait_for(lambda: not pids_with_env("LLMISVC_HOME", str(runtime.home)), timeout=60)
    runtime.apply(service_yaml("alpha", "alpha-model"))
    assert runtime.complete("alpha-model").status_code == 200
    assert runtime.complete("beta-model").status_code == 200


def test_gateway_crash_is_restarted(runtime):
    runtime.apply(service_yaml("alpha", "alpha-model"))
    gateway_pid = runtime.describe("alpha")["gateway"]["pid"]
    os.kill(gateway_pid, signal.SIGKILL)

    def serving_again():
        try:
            return runtime.complete("alpha-model", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    wait_for(serving_again, timeout=60)
    gateway = runtime.describe("alpha")["gateway"]
    assert gateway["pid"] != gateway_pid
    assert gateway["restarts"] >= 1


def test_delete_leaves_no_process(runtime):
    for name in ("alpha", "beta"):
        result = runtime.cli("delete", name)
        assert result.returncode == 0, result.stderr
        assert f'"{name}" deleted' in result.stdout

    assert wait_for(lambda: not pids_with_env("LLMISVC_HOME", str(runtime.home)), timeout=30)
    listing = runtime.cli("get")
    assert "No resources found" in listing.stderr
