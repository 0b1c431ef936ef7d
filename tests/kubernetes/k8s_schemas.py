"""Schema validation of rendered Kubernetes objects for the kubernetes tests.

Core and apps kinds are checked with `kubernetes-validate` (the official OpenAPI schemas,
strict mode: unknown fields fail). Gateway API (v1.6.1), InferencePool (Inference Extension
v1.6.0) and KServe (v0.20.0) kinds are checked against the openAPIV3Schema of their upstream
CRDs. Unknown fields are rejected there too, as `kubectl apply --validate=strict` does, and
the CRDs' CEL rules (`x-kubernetes-validations`) are evaluated with cel-python. Transition
rules (those reading `oldSelf`) are skipped, because there is no previous object.
"""

from __future__ import annotations

import copy
import functools

import celpy
import jsonschema
import kubernetes_validate
import yaml

from support import SHARED

CRD_DIR = SHARED / "k8s-crds"
KUBERNETES_VERSION = kubernetes_validate.latest_version()
CORE_KINDS = {"Deployment", "Service", "ServiceAccount", "ConfigMap", "Role", "RoleBinding",
              "HorizontalPodAutoscaler", "Namespace", "ClusterRole", "ClusterRoleBinding",
              "CustomResourceDefinition"}
CRD_FILES = {
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "gateway.networking.k8s.io_httproutes.yaml",
    ("gateway.networking.k8s.io/v1", "Gateway"): "gateway.networking.k8s.io_gateways.yaml",
    ("inference.networking.k8s.io/v1", "InferencePool"): "inference.networking.k8s.io_inferencepools.yaml",
    ("serving.kserve.io/v1alpha1", "LLMInferenceService"): "serving.kserve.io_llminferenceservices.yaml",
    ("serving.kserve.io/v1alpha2", "LLMInferenceService"): "serving.kserve.io_llminferenceservices.yaml",
}


def strict_schema(schema: dict) -> dict:
    """Return `schema` with unknown fields rejected wherever the CRD does not preserve them.

    The root `metadata` is replaced by a plain object, as the API server validates it itself.
    """
    schema = copy.deepcopy(schema)

    def tighten(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                tighten(value)
        elif isinstance(node, list):
            for value in node:
                tighten(value)

    tighten(schema)
    schema.setdefault("properties", {})["metadata"] = {"type": "object"}
    return schema


def crd_version_schema(crd: dict, version: str) -> dict:
    """Return the strict openAPIV3Schema of `version` in a CRD document."""
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return strict_schema(entry["schema"]["openAPIV3Schema"])
    raise KeyError(f"{crd['metadata']['name']} has no version {version}")


@functools.cache
def _upstream_crd(file_name: str) -> dict:
    # The C loader, where PyYAML has it: KServe's CRDs are over 2 MB each.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load((CRD_DIR / file_name).read_text(), Loader=loader)


def upstream_schema(api_version: str, kind: str) -> dict:
    """Return the strict schema of an upstream CRD kind."""
    crd = _upstream_crd(CRD_FILES[(api_version, kind)])
    return crd_version_schema(crd, api_version.rsplit("/", 1)[-1])


def schema_errors(obj: dict, schema: dict) -> list[str]:
    """Return every jsonschema error of `obj` as `path: message`."""
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in validator.iter_errors(obj)
    ]


_CEL = celpy.Environment()


@functools.cache
def _cel_program(rule: str):
    return _CEL.program(_CEL.compile(rule))


def cel_errors(value, schema: dict, path: str = "") -> list[str]:
    """Return `path: message` for every CEL rule of `schema` that `value` fails."""
    if value is None or not isinstance(schema, dict):
        return []
    errors = []
    for validation in schema.get("x-kubernetes-validations") or []:
        rule = validation["rule"]
        if "oldSelf" in rule:
            continue
        try:
            result = _cel_program(rule).evaluate({"self": celpy.json_to_cel(value)})
        except celpy.CELEvalError as error:
            result = error
        if isinstance(result, celpy.CELEvalError) or not bool(result):
            message = validation.get("message") or f"failed rule {rule}"
            errors.append(f"{path or '<root>'}: {message}")
    if isinstance(value, dict):
        for key, child in value.items():
            if key in (schema.get("properties") or {}):
                errors += cel_errors(child, schema["properties"][key], f"{path}.{key}".lstrip("."))
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += cel_errors(child, schema["additionalProperties"], f"{path}.{key}".lstrip("."))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            errors += cel_errors(item, schema["items"], f"{path}[{index}]")
    return errors


def validate_object(obj: dict) -> list[str]:
    """Return validation errors of one rendered object; empty when valid.

    LeaderWorkerSet has no schema available offline, so only its pod templates are checked
    (as the pod templates of a Deployment).
    """
    kind, api_version = obj["kind"], obj["apiVersion"]
    if kind in CORE_KINDS:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            return [f"{'.'.join(str(p) for p in error.path)}: {error.message}"]
        return []
    if (api_version, kind) in CRD_FILES:
        schema = upstream_schema(api_version, kind)
        return schema_errors(obj, schema) + cel_errors(obj, schema)
    if kind == "LeaderWorkerSet":
        errors = []
        lws = obj["spec"]["leaderWorkerTemplate"]
        for key in ("leaderTemplate", "workerTemplate"):
            probe = {
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": obj["metadata"]["name"]},
                "spec": {"selector": {"matchLabels": lws[key]["metadata"]["labels"]},
                         "template": lws[key]},
            }
            errors += [f"{key}: {e}" for e in validate_object(probe)]
        return errors
    return [f"no schema for {api_version} {kind}"]
