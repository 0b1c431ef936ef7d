"""`llmisvc validate|render|explain` run as real processes.

Golden files under tests/api/golden hold `llmisvc render -f examples/<name>`; after an
intended change to the examples or presets, regenerate them with
`LLMISVC_UPDATE_GOLDEN=1 pytest tests/cli/test_spec_commands.py` and review the diff.
"""

import importlib.util
import os
import subprocess

import pytest
import yaml

from support import LLMISVC, REPO

EXAMPLES = REPO / "examples"
GOLDEN = REPO / "tests" / "api" / "golden"
SHAPE_FILES = ("default-scheduler.yaml", "no-scheduler.yaml", "prefill-decode.yaml")


def llmisvc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(LLMISVC + list(args), capture_output=True, text=True, timeout=120, cwd=REPO)


def _write(path, *documents) -> str:
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return str(path)


def _service(**spec) -> dict:
    return {
        "apiVersion": "serving.kserve.io/v1alpha2",
        "kind": "LLMInferenceService",
        "metadata": {"name": "svc"},
        "spec": {"model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"}, **spec},
    }


@pytest.mark.parametrize("name", SHAPE_FILES)
def test_validate_examples(name):
    result = llmisvc("validate", "-f", str(EXAMPLES / name))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(": valid")


def test_validate_lists_every_error(tmp_path):
    path = _write(tmp_path / "bad.yaml", _service(replicsa=3, replicas=-1, prefill={"replicas": -1}))
    result = llmisvc("validate", "-f", path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert f"{path}: spec.replicsa: unknown field 'replicsa'; did you mean 'replicas'?" in lines
    assert f"{path}: spec.replicas: must be >= 0, got -1" in lines
    assert f"{path}: spec.prefill.replicas: must be >= 0, got -1" in lines
    assert lines[-1] == "invalid: 3 error(s)"
    assert result.stdout == ""


def test_validate_missing_base_ref(tmp_path):
    path = _write(tmp_path / "svc.yaml", _service(baseRefs=[{"name": "shared-settings"}]))
    result = llmisvc("validate", "-f", path)
    assert result.returncode == 1
    assert "spec.baseRefs[0].name: LLMInferenceServiceConfig 'shared-settings' not found" in result.stderr


def test_validate_base_ref_from_second_file(tmp_path):
    service = _write(tmp_path / "svc.yaml", _service(baseRefs=[{"name": "shared-settings"}]))
    config = _write(tmp_path / "config.yaml", {
        "apiVersion": "serving.kserve.io/v1alpha2", "kind": "LLMInferenceServiceConfig",
        "metadata": {"name": "shared-settings"}, "spec": {"replicas": 2},
    })
    result = llmisvc("validate", "-f", service, "-f", config)
    assert result.returncode == 0, result.stderr
    assert "LLMInferenceServiceConfig default/shared-settings: valid" in result.stdout


def test_validate_unreadable_file(tmp_path):
    result = llmisvc("validate", "-f", str(tmp_path / "missing.yaml"))
    assert result.returncode == 1
    assert "cannot read file" in result.stderr


@pytest.mark.parametrize("name", SHAPE_FILES)
def test_render_matches_golden(name):
    result = llmisvc("render", "-f", str(EXAMPLES / name))
    assert result.returncode == 0, result.stderr
    golden = GOLDEN / name
    if os.environ.get("LLMISVC_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(result.stdout)
    assert result.stdout == golden.read_text()


def test_render_is_stable():
    first = llmisvc("render", "-f", str(EXAMPLES / "prefill-decode.yaml"))
    second = llmisvc("render", "-f", str(EXAMPLES / "prefill-decode.yaml"))
    assert first.stdout == second.stdout


def test_render_pd_shows_roles():
    result = llmisvc("render", "-f", str(EXAMPLES / "prefill-decode.yaml"))
    assert result.returncode == 0, result.stderr
    header, body = result.stdout.split("apiVersion:", 1)
    assert "(shape: pd)" in header
    assert "# presets: kserve-config-llm-decode-template, kserve-config-llm-prefill-template" in header
    rendered = yaml.safe_load("apiVersion:" + body)
    assert rendered["spec"]["labels"]["llm-d.ai/role"] == "decode"
    assert rendered["spec"]["prefill"]["labels"]["llm-d.ai/role"] == "prefill"
    assert rendered["spec"]["model"]["name"] == "smollm2-pd"


def test_render_shows_base_refs(tmp_path):
    path = _write(tmp_path / "svc.yaml", {
        "apiVersion": "serving.kserve.io/v1alpha2", "kind": "LLMInferenceServiceConfig",
        "metadata": {"name": "site"}, "spec": {"replicas": 4},
    }, _service(baseRefs=[{"name": "site"}]))
    result = llmisvc("render", "-f", path)
    assert result.returncode == 0, result.stderr
    assert "# baseRefs: site" in result.stdout
    assert yaml.safe_load(result.stdout)["spec"]["replicas"] == 4


def test_render_invalid_file_fails(tmp_path):
    path = _write(tmp_path / "bad.yaml", _service(replicas=-1))
    result = llmisvc("render", "-f", path)
    assert result.returncode == 1
    assert "spec.replicas: must be >= 0, got -1" in result.stderr


def test_render_kubernetes_target():
    result = llmisvc("render", "-f", str(EXAMPLES / "prefill-decode.yaml"), "--target", "kubernetes")
    if importlib.util.find_spec("llmisvc.runtime.kubernetes.render") is None:
        assert result.returncode == 1
        assert "kubernetes rendering not available" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    objects = list(yaml.safe_load_all(result.stdout))
    deployments = [o for o in objects if o and o.get("kind") == "Deployment"]
    roles = {d["spec"]["template"]["metadata"]["labels"].get("llm-d.ai/role") for d in deployments}
    assert {"prefill", "decode"} <= roles


def test_explain_field():
    result = llmisvc("explain", "llmisvc.spec.router.scheduler")
    assert result.returncode == 0, result.stderr
    assert "FIELD: scheduler <SchedulerSpec>" in result.stdout
    assert "  pool\t<InferencePoolSpecRef>" in result.stdout


def test_explain_unknown_field():
    result = llmisvc("explain", "llmisvc.spec.routr")
    assert result.returncode == 1
    assert "did you mean 'router'?" in result.stderr
