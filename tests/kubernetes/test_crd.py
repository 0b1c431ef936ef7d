"""Generated CRDs: their shape, and KServe-style samples validating against both KServe's
CRD and llmisvc's generated one (unknown fields rejected in both)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from k8s_schemas import cel_errors, crd_version_schema, schema_errors, upstream_schema, validate_object

from llmisvc.runtime.kubernetes.crd import generate_crds
from support import LLMISVC, REPO

HERE = Path(__file__).parent
SAMPLES = sorted((HERE / "samples").glob("*.yaml")) + sorted((REPO / "examples").glob("*.yaml"))


def llmisvc_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text())
            if isinstance(doc, dict) and doc.get("kind") == "LLMInferenceService"]


@pytest.fixture(scope="module")
def crds() -> dict[str, dict]:
    return {crd["spec"]["names"]["kind"]: crd for crd in generate_crds()}


def test_crd_names_and_versions(crds):
    service = crds["LLMInferenceService"]
    assert service["metadata"]["name"] == "llminferenceservices.serving.kserve.io"
    assert service["spec"]["group"] == "serving.kserve.io"
    assert service["spec"]["names"]["shortNames"] == ["llmisvc"]
    versions = {v["name"]: v for v in service["spec"]["versions"]}
    assert set(versions) == {"v1alpha1", "v1alpha2"}
    assert all(v["served"] for v in versions.values())
    assert [name for name, v in versions.items() if v["storage"]] == ["v1alpha2"]
    for version in versions.values():
        assert version["subresources"] == {"status": {}}
        columns = [c["name"] for c in version["additionalPrinterColumns"]]
        assert columns == ["URL", "Ready", "Reason", "Age"]
    config = crds["LLMInferenceServiceConfig"]
    assert config["metadata"]["name"] == "llminferenceserviceconfigs.serving.kserve.io"


def test_crds_validate_as_kubernetes_objects(crds):
    for crd in crds.values():
        assert validate_object(crd) == []


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_sample_valid_for_kserve_and_llmisvc(path, crds):
    documents = llmisvc_documents(path)
    if not documents:
        pytest.skip(f"{path.name} has no LLMInferenceService")
    for doc in documents:
        version = doc["apiVersion"].rsplit("/", 1)[-1]
        kserve = upstream_schema(doc["apiVersion"], doc["kind"])
        assert schema_errors(doc, kserve) == []
        assert cel_errors(doc, kserve) == []
        ours = crd_version_schema(crds["LLMInferenceService"], version)
        assert schema_errors(doc, ours) == []


def test_generated_crd_rejects_unknown_field(crds):
    doc = llmisvc_documents(HERE / "samples" / "pd.yaml")[0]
    doc["spec"]["prefill"]["replica"] = 2
    ours = crd_version_schema(crds["LLMInferenceService"], "v1alpha2")
    errors = schema_errors(doc, ours)
    assert errors
    assert "replica" in errors[0]


def test_generated_crd_rejects_wrong_type(crds):
    doc = llmisvc_documents(HERE / "samples" / "scheduler.yaml")[0]
    doc["spec"]["replicas"] = "two"
    assert schema_errors(doc, crd_version_schema(crds["LLMInferenceService"], "v1alpha2"))


def test_install_print_emits_valid_manifests():
    result = subprocess.run(LLMISVC + ["install", "--print"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    # The C loader, where PyYAML has it: the pure-Python one takes tens of seconds on 4 MB.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    documents = [doc for doc in yaml.load_all(result.stdout, Loader=loader) if doc]
    kinds = [doc["kind"] for doc in documents]
    assert kinds.count("CustomResourceDefinition") == 2
    for kind in ("Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment"):
        assert kind in kinds
    for doc in documents:
        assert validate_object(doc) == [], doc["kind"]
    deployment = next(doc for doc in documents if doc["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["llmisvc", "operator"]


def test_kserve_cel_rules_enforced():
    doc = llmisvc_documents(HERE / "samples" / "scaling.yaml")[0]
    del doc["spec"]["scaling"]["wva"]
    errors = cel_errors(doc, upstream_schema(doc["apiVersion"], doc["kind"]))
    assert any("wva is required" in error for error in errors), errors


def structural_problems(node: dict, path: str = "") -> list[str]:
    """Return where `node` breaks the API server's structural-schema rules for CRDs."""
    problems = []
    int_or_string = node.get("x-kubernetes-int-or-string")
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if not node.get("type") and not int_or_string and not preserve:
        problems.append(f"{path or '<root>'}: no type")
    if "anyOf" in node and not int_or_string:
        problems.append(f"{path}: anyOf outside int-or-string")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: both properties and additionalProperties")
    for name, child in (node.get("properties") or {}).items():
        problems += structural_problems(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        problems += structural_problems(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        problems += structural_problems(node["additionalProperties"], f"{path}{{}}")
    return problems


def test_generated_schemas_structural(crds):
    for crd in crds.values():
        for version in crd["spec"]["versions"]:
            schema = version["schema"]["openAPIV3Schema"]
            assert structural_problems(schema) == [], (crd["metadata"]["name"], version["name"])
            assert schema["properties"]["metadata"] == {"type": "object"}
