"""The schema accepts exactly the field set of KServe v0.20's LLMInferenceService CRDs.

The CRDs are read from the shared directory beside the repository and never copied into it.
The tests walk both trees and compare every field path with its type, required fields,
enum values and numeric bounds.
"""

import pytest
import yaml

from support import SHARED

from llmisvc.api.schema import ANY, ARRAY, INT_OR_STRING, MAP, OBJECT, walk
from llmisvc.api.types import CONFIG_KIND, SERVICE_KIND, resource_schema

CRD_DIR = SHARED / "k8s-crds"
CRD_FILES = {
    SERVICE_KIND: CRD_DIR / "serving.kserve.io_llminferenceservices.yaml",
    CONFIG_KIND: CRD_DIR / "serving.kserve.io_llminferenceserviceconfigs.yaml",
}


def _crd_kind(node: dict) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return INT_OR_STRING
    kind = node.get("type")
    if kind is None and node.get("x-kubernetes-preserve-unknown-fields"):
        return ANY
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return MAP
    return kind


def _crd_paths(node: dict, path: str = "", out: dict | None = None) -> dict:
    out = {} if out is None else out
    out[path] = node
    for name, child in (node.get("properties") or {}).items():
        _crd_paths(child, f"{path}.{name}" if path else name, out)
    if "items" in node:
        _crd_paths(node["items"], path + "[]", out)
    if isinstance(node.get("additionalProperties"), dict):
        _crd_paths(node["additionalProperties"], path + "{}", out)
    return out


@pytest.fixture(scope="module")
def crds() -> dict:
    loaded = {}
    for kind, path in CRD_FILES.items():
        if not path.exists():
            pytest.skip(f"{path} not present")
        document = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        for version in document["spec"]["versions"]:
            loaded[(kind, version["name"])] = _crd_paths(version["schema"]["openAPIV3Schema"])
    return loaded


CASES = [(kind, version) for kind in (SERVICE_KIND, CONFIG_KIND) for version in ("v1alpha1", "v1alpha2")]


def _ours(kind: str, version: str) -> dict:
    # ObjectMeta is left to the API server, so CRDs list no subfields under any `metadata`.
    return {
        p: n for p, n in walk(resource_schema(kind, version))
        if not p.startswith("metadata.") and ".metadata." not in p
    }


@pytest.mark.parametrize("kind,version", CASES)
def test_field_paths_equal_crd(crds, kind, version):
    ours, theirs = _ours(kind, version), crds[(kind, version)]
    assert sorted(set(theirs) - set(ours)) == []
    assert sorted(set(ours) - set(theirs)) == []


@pytest.mark.parametrize("kind,version", CASES)
def test_field_types_equal_crd(crds, kind, version):
    ours, theirs = _ours(kind, version), crds[(kind, version)]
    mismatched = []
    for path, node in ours.items():
        if path == "metadata" or path.endswith(".metadata"):
            continue
        expected = _crd_kind(theirs[path])
        actual = node.kind
        if actual == OBJECT and node.open_fields and not node.fields:
            actual = "object"
        if expected != actual:
            mismatched.append((path, expected, actual))
    assert mismatched == []


@pytest.mark.parametrize("kind,version", CASES)
def test_required_fields_equal_crd(crds, kind, version):
    ours, theirs = _ours(kind, version), crds[(kind, version)]
    mismatched = [
        (path, sorted(theirs[path].get("required") or []), sorted(node.required))
        for path, node in ours.items()
        if node.kind == OBJECT and path not in ("", "metadata") and not path.endswith(".metadata")
        and sorted(theirs[path].get("required") or []) != sorted(node.required)
    ]
    assert mismatched == []


# Bounds that the Kubernetes API server enforces beyond the CRD's OpenAPI schema. The
# schema states them so that llmisvc rejects such values before a cluster would.
SERVER_SIDE_BOUNDS = ("ports[].containerPort", "ports[].hostPort", "spec.router.scheduler.replicas")


@pytest.mark.parametrize("kind,version", CASES)
def test_enums_and_bounds_match_crd(crds, kind, version):
    ours, theirs = _ours(kind, version), crds[(kind, version)]
    mismatched = []
    for path, node in ours.items():
        crd = theirs.get(path, {})
        if tuple(crd.get("enum") or ()) != node.enum:
            mismatched.append((path, "enum", crd.get("enum"), node.enum))
        server_side = path.endswith(SERVER_SIDE_BOUNDS)
        for bound in ("minimum", "maximum"):
            expected, actual = crd.get(bound), getattr(node, bound)
            if expected != actual and not (server_side and expected is None):
                mismatched.append((path, bound, expected, actual))
    assert mismatched == []


def test_open_fields_only_where_crd_preserves_unknown(crds):
    theirs = crds[(SERVICE_KIND, "v1alpha2")]
    open_paths = sorted(p for p, n in _ours(SERVICE_KIND, "v1alpha2").items() if n.kind == OBJECT and n.open_fields)
    assert open_paths == sorted(
        p for p, n in theirs.items() if n.get("x-kubernetes-preserve-unknown-fields") and n.get("type") == "object"
    )


def test_every_array_and_map_has_element_node():
    for path, node in walk(resource_schema(SERVICE_KIND, "v1alpha2")):
        if node.kind == ARRAY:
            assert node.item is not None, path
        if node.kind == MAP:
            assert node.value is not None, path


CONSTRAINTS = (("pattern", "pattern", ""), ("minLength", "min_length", None), ("maxLength", "max_length", None),
               ("minItems", "min_items", None), ("maxItems", "max_items", None))


@pytest.mark.parametrize("kind,version", CASES)
def test_string_and_list_constraints_equal_crd(crds, kind, version):
    ours, theirs = _ours(kind, version), crds[(kind, version)]
    mismatched = []
    for path, node in ours.items():
        crd = theirs.get(path, {})
        for crd_key, attribute, empty in CONSTRAINTS:
            expected, actual = crd.get(crd_key, empty), getattr(node, attribute)
            if expected != actual:
                mismatched.append((path, crd_key, expected, actual))
    assert mismatched == []


@pytest.mark.parametrize("kind,version", CASES)
def test_defaults_equal_crd(crds, kind, version):
    ours, theirs = _ours(kind, version), crds[(kind, version)]
    mismatched = []
    for path, node in ours.items():
        crd = theirs.get(path, {})
        if ("default" in crd) != node.has_default or crd.get("default") != (node.default if node.has_default else None):
            mismatched.append((path, crd.get("default"), node.default))
    assert mismatched == []


@pytest.mark.parametrize("kind,version", CASES)
def test_list_types_equal_crd(crds, kind, version):
    ours, theirs = _ours(kind, version), crds[(kind, version)]
    mismatched = []
    for path, node in ours.items():
        crd = theirs.get(path, {})
        list_type = crd.get("x-kubernetes-list-type", "")
        expected = (list_type if list_type in ("map", "set") else "", tuple(crd.get("x-kubernetes-list-map-keys") or ()))
        if expected != (node.list_type, node.list_keys):
            mismatched.append((path, expected, (node.list_type, node.list_keys)))
    assert mismatched == []
