"""CustomResourceDefinitions for LLMInferenceService and LLMInferenceServiceConfig, generated
from llmisvc's own API schema (`llmisvc.api.types.resource_schema`).

Group `serving.kserve.io`, versions v1alpha1 and v1alpha2 served (v1alpha2 stored), status
subresource, printer columns URL / Ready / Reason / Age, short name `llmisvc`. The schemas are
structural (every object typed), so the API server prunes and validates like KServe's CRD.
"""

from __future__ import annotations

from llmisvc.api import schema as s
from llmisvc.api.types import CONFIG_KIND, GROUP, SERVICE_KIND, resource_schema

VERSIONS = ("v1alpha1", "v1alpha2")
STORAGE_VERSION = "v1alpha2"

_READY_COLUMNS = [
    {"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type=='Ready')].status"},
    {"name": "Reason", "type": "string", "jsonPath": ".status.conditions[?(@.type=='Ready')].reason"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
_URL_COLUMN = {"name": "URL", "type": "string", "jsonPath": ".status.url"}


def openapi_schema(node: s.Node, *, describe: bool = True) -> dict:
    """Translate an API schema node into a structural OpenAPI v3 schema."""
    result: dict = {}
    if describe and node.description:
        result["description"] = node.description
    kind = node.kind

    if kind == s.OBJECT:
        result["type"] = "object"
        if node.fields:
            result["properties"] = {name: openapi_schema(child, describe=describe)
                                    for name, child in node.fields.items()}
        if node.required:
            result["required"] = sorted(node.required)
        if node.open_fields or not node.fields:
            result["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == s.ARRAY:
        result["type"] = "array"
        result["items"] = openapi_schema(node.item or s.Any, describe=describe)
    elif kind == s.MAP:
        result["type"] = "object"
        result["additionalProperties"] = openapi_schema(node.value or s.Str, describe=describe)
    elif kind == s.INT_OR_STRING:
        result["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        result["x-kubernetes-int-or-string"] = True
    elif kind == s.ANY:
        result["x-kubernetes-preserve-unknown-fields"] = True
    else:
        result["type"] = kind
        if node.format:
            result["format"] = node.format

    if node.enum:
        result["enum"] = list(node.enum)
    if node.minimum is not None:
        result["minimum"] = node.minimum
    if node.maximum is not None:
        result["maximum"] = node.maximum
    return result


def version_schema(kind: str, version: str, *, describe: bool = True) -> dict:
    """Return the openAPIV3Schema of `kind` at `version`.

    The root `metadata` is left to the API server (a CRD may not constrain it beyond name).
    """
    root = openapi_schema(resource_schema(kind, version), describe=describe)
    root["properties"]["metadata"] = {"type": "object"}
    root.pop("required", None)
    return root


def _crd(kind: str, plural: str, singular: str, short_names: list[str],
         columns: list[dict], describe: bool) -> dict:
    versions = []
    for version in VERSIONS:
        versions.append({
            "name": version,
            "served": True,
            "storage": version == STORAGE_VERSION,
            "subresources": {"status": {}},
            "additionalPrinterColumns": [dict(column) for column in columns],
            "schema": {"openAPIV3Schema": version_schema(kind, version, describe=describe)},
        })
    names = {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": singular}
    if short_names:
        names["shortNames"] = short_names
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "llmisvc"}},
        "spec": {
            "group": GROUP,
            "names": names,
            "scope": "Namespaced",
            # NOTE: no conversion webhook: the API server serves both versions from the stored
            # object by changing apiVersion only, which is exact for the fields both share.
            "versions": versions,
        },
    }


def generate_crds(*, describe: bool = True) -> list[dict]:
    """Return the CRDs for LLMInferenceService and LLMInferenceServiceConfig.

    `describe=False` drops field descriptions, for a smaller object (the API server limits an
    annotation-based client-side apply to 256 KiB).
    """
    return [
        _crd(SERVICE_KIND, "llminferenceservices", "llminferenceservice", ["llmisvc"],
             [_URL_COLUMN] + _READY_COLUMNS, describe),
        _crd(CONFIG_KIND, "llminferenceserviceconfigs", "llminferenceserviceconfig", [],
             _READY_COLUMNS, describe),
    ]
