"""Loading LLMInferenceService and LLMInferenceServiceConfig YAML into validated resources."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any as AnyValue

import yaml

from llmisvc.api.errors import DOCUMENT, FieldError, SpecError
from llmisvc.api.types import API_VERSIONS, GROUP, KINDS, resource_schema
from llmisvc.api.validate import type_of, validate_document

logger = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "default"


@dataclass
class Resource:
    """A validated LLMInferenceService or LLMInferenceServiceConfig.

    `obj` is the whole document as a plain dict, with null fields dropped; `namespace` is
    `metadata.namespace` or `default`.
    """

    kind: str
    api_version: str
    name: str
    namespace: str
    obj: dict = field(repr=False)

    @property
    def version(self) -> str:
        """Return the version part of the API version (`v1alpha1` or `v1alpha2`)."""
        return self.api_version.rsplit("/", 1)[-1]

    @property
    def spec(self) -> dict:
        """Return the spec (an empty dict when the document has none)."""
        return self.obj.get("spec") or {}


class _Loader(yaml.SafeLoader):
    """A safe YAML loader that keeps timestamps as strings and rejects duplicate keys.

    The Kubernetes API keeps timestamps as strings. A duplicate key is almost always a
    mistake (two `replicas:` lines), and kubectl's strict decoding rejects it too, whereas
    plain PyYAML would silently keep the last value.
    """

    def construct_mapping(self, node, deep=False):
        seen: dict[str, yaml.Mark] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key_node.value in seen:
                first = seen[key_node.value]
                raise yaml.constructor.ConstructorError(
                    None, None,
                    f"duplicate key {key_node.value!r} (first defined on line {first.line + 1})",
                    key_node.start_mark,
                )
            seen[key_node.value] = key_node.start_mark
        return super().construct_mapping(node, deep)


_Loader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def parse_yaml(text: str) -> list[AnyValue]:
    """Parse a YAML stream into its documents, skipping empty ones.

    Raises SpecError with the line and column of a YAML syntax error.
    """
    try:
        return [doc for doc in yaml.load_all(text, Loader=_Loader) if doc is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError.single(DOCUMENT, f"invalid YAML: {where}{problem}") from exc
    except (ValueError, TypeError, RecursionError) as exc:
        # PyYAML raises these for values it cannot construct (huge numbers, deep nesting).
        raise SpecError.single(DOCUMENT, f"invalid YAML: {exc}") from exc


def load_documents(text: str) -> list[Resource]:
    """Parse and validate every document of a YAML stream.

    Returns the resources in stream order. Raises SpecError listing every problem of every
    document (each FieldError carries its document number when the stream has several).
    """
    documents = parse_yaml(text)
    if not documents:
        raise SpecError.single(DOCUMENT, "no documents found: expected an LLMInferenceService "
                                         "or LLMInferenceServiceConfig")
    resources: list[Resource] = []
    errors: list[FieldError] = []
    for index, doc in enumerate(documents, start=1):
        doc_resources, doc_errors = _load_entry(doc)
        if len(documents) > 1:
            doc_errors = [FieldError(e.path, e.reason, index) for e in doc_errors]
        errors.extend(doc_errors)
        resources.extend(doc_resources)
    if errors:
        raise SpecError(errors)
    return resources


def _load_entry(doc: AnyValue) -> tuple[list[Resource], list[FieldError]]:
    """Validate one document, expanding a `kind: List` (as `kubectl get -o yaml` writes)."""
    if not (isinstance(doc, dict) and doc.get("kind") == "List" and doc.get("apiVersion") == "v1"):
        resource, errors = load_document(doc)
        return ([resource] if resource is not None else []), errors

    items = doc.get("items")
    if not isinstance(items, list):
        return [], [FieldError("items", f"must be list, got {type_of(items)}")]
    resources, errors = [], []
    for i, item in enumerate(items):
        resource, item_errors = load_document(item)
        errors += [FieldError(f"items[{i}].{e.path}" if e.path != DOCUMENT else f"items[{i}]", e.reason)
                   for e in item_errors]
        if resource is not None:
            resources.append(resource)
    return resources, errors


def load_document(doc: AnyValue) -> tuple[Resource | None, list[FieldError]]:
    """Validate one parsed document; return the resource (None if invalid) and its errors."""
    if not isinstance(doc, dict):
        return None, [FieldError(DOCUMENT, f"must be a mapping (an object), got {type_of(doc)}")]

    errors: list[FieldError] = []
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if api_version not in API_VERSIONS:
        allowed = " or ".join(API_VERSIONS)
        reason = "required field is missing" if api_version is None else f"must be {allowed}, got {api_version!r}"
        errors.append(FieldError("apiVersion", reason))
    if kind not in KINDS:
        reason = "required field is missing" if kind is None else \
            f"must be {' or '.join(KINDS)}, got {kind!r}"
        errors.append(FieldError("kind", reason))
    if errors:
        return None, errors

    version = api_version.rsplit("/", 1)[-1]
    cleaned, errors = validate_document(doc, resource_schema(kind, version))
    if errors:
        return None, errors
    metadata = cleaned["metadata"]
    resource = Resource(
        kind=kind,
        api_version=api_version,
        name=metadata["name"],
        namespace=metadata.get("namespace") or DEFAULT_NAMESPACE,
        obj=cleaned,
    )
    return resource, []


def load_file(path: str | Path) -> list[Resource]:
    """Read and validate every document of a YAML file.

    Raises SpecError for invalid content and OSError when the file cannot be read.
    """
    text = Path(path).read_text(encoding="utf-8")
    resources = load_documents(text)
    logger.debug("loaded %d resources from %s", len(resources), path)
    return resources


__all__ = ["GROUP", "Resource", "load_document", "load_documents", "load_file", "parse_yaml"]
