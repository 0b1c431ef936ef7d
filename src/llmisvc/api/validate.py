"""Validation of LLMInferenceService documents: structure against the schema, then semantics.

`validate_document` collects every problem instead of stopping at the first, so a user fixes
a file in one pass. Structure checks reject unknown fields (suggesting the nearest known
name), wrong types, missing required fields, values outside an enum and numbers outside their
bounds. Semantic checks (`rules.py`) reject combinations that cannot work, such as an
InferencePool `spec` and `ref` together or `scaling` beside `replicas`.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from typing import Any as AnyValue

from llmisvc.api import rules
from llmisvc.api.errors import DOCUMENT, FieldError
from llmisvc.api.schema import (
    ANY, ARRAY, BOOLEAN, INT_OR_STRING, INTEGER, MAP, NUMBER, OBJECT, STRING, Node,
)

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def field_path(path: str, key: str) -> str:
    """Return the path of object field `key` under `path`, quoting names that are not identifiers."""
    if not _IDENTIFIER.match(key):
        return f"{path}[{json.dumps(key)}]" if path else f"[{json.dumps(key)}]"
    return f"{path}.{key}" if path else key


def map_key_path(path: str, key: str) -> str:
    """Return the path of map entry `key` under `path`, as `spec.labels[llm-d.ai/role]`."""
    return f"{path}[{key}]"


def type_of(value: AnyValue) -> str:
    """Return the JSON type name of a parsed YAML value, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _expected(node: Node) -> str:
    return {OBJECT: "object", ARRAY: "list", MAP: "object", INT_OR_STRING: "integer or string"}.get(
        node.kind, node.kind
    )


def _matches_type(node: Node, value: AnyValue) -> bool:
    if node.kind == ANY:
        return True
    if node.kind in (OBJECT, MAP):
        return isinstance(value, dict)
    if node.kind == ARRAY:
        return isinstance(value, list)
    if node.kind == STRING:
        return isinstance(value, str)
    if node.kind == BOOLEAN:
        return isinstance(value, bool)
    if node.kind == INTEGER:
        return isinstance(value, int) and not isinstance(value, bool)
    if node.kind == NUMBER:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if node.kind == INT_OR_STRING:
        return isinstance(value, (int, str)) and not isinstance(value, bool)
    return False


def check_structure(value: AnyValue, node: Node, path: str, errors: list[FieldError]) -> AnyValue:
    """Check `value` against `node`, appending problems to `errors`; return the cleaned value.

    The cleaned value drops fields set to null, because Kubernetes treats `field: null` as
    an absent field. Problems are reported with `path` as the prefix of their field paths.
    """
    if not _matches_type(node, value):
        if node.type_name == "Quantity" and isinstance(value, float):
            reason = f"must be an integer or a quantity string such as \"500m\", got number {value}"
        else:
            reason = f"must be {_expected(node)}, got {type_of(value)}"
        errors.append(FieldError(path, reason))
        return value

    if node.kind == OBJECT:
        return _check_object(value, node, path, errors)
    if node.kind == ARRAY:
        _check_items(value, node, path, errors)
        return [check_structure(item, node.item, f"{path}[{i}]", errors) for i, item in enumerate(value)]
    if node.kind == MAP:
        cleaned = {}
        for key, item in value.items():
            if not isinstance(key, str):
                errors.append(FieldError(path, f"keys must be strings, got {type_of(key)} {key!r}"))
                continue
            cleaned[key] = check_structure(item, node.value, map_key_path(path, key), errors)
        return cleaned

    _check_scalar(value, node, path, errors)
    return value


def _check_object(value: dict, node: Node, path: str, errors: list[FieldError]) -> dict:
    cleaned = {}
    for key, item in value.items():
        if not isinstance(key, str):
            errors.append(FieldError(path or DOCUMENT, f"field names must be strings, got {type_of(key)} {key!r}"))
            continue
        child = node.fields.get(key)
        child_path = field_path(path, key)
        if child is None:
            if node.open_fields:
                cleaned[key] = item
                continue
            errors.append(FieldError(child_path, _unknown_field_reason(key, node)))
            continue
        if item is None:
            continue
        cleaned[key] = check_structure(item, child, child_path, errors)

    for name in sorted(node.required):
        required_path = field_path(path, name)
        if name not in cleaned and not any(e.path == required_path for e in errors):
            errors.append(FieldError(required_path, "required field is missing"))
    return cleaned


def _unknown_field_reason(key: str, node: Node) -> str:
    known = list(node.fields)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:
        lowered = {k.lower(): k for k in known}
        if key.lower() in lowered:
            close = [lowered[key.lower()]]
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown field {key!r}{hint}"


def _check_scalar(value: AnyValue, node: Node, path: str, errors: list[FieldError]) -> None:
    if node.enum and value not in node.enum:
        allowed = ", ".join(str(v) for v in node.enum)
        errors.append(FieldError(path, f"must be one of {allowed}, got {value!r}"))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if node.minimum is not None and value < node.minimum:
            errors.append(FieldError(path, f"must be >= {node.minimum}, got {value}"))
        if node.maximum is not None and value > node.maximum:
            errors.append(FieldError(path, f"must be <= {node.maximum}, got {value}"))
    if isinstance(value, str):
        _check_string(value, node, path, errors)


def _check_items(value: list, node: Node, path: str, errors: list[FieldError]) -> None:
    if node.min_items is not None and len(value) < node.min_items:
        errors.append(FieldError(path, f"must have at least {node.min_items} item(s), got {len(value)}"))
    if node.max_items is not None and len(value) > node.max_items:
        errors.append(FieldError(path, f"must have at most {node.max_items} items, got {len(value)}"))
    if node.list_type == "map":
        _check_unique_keys(value, node, path, errors)
    elif node.list_type == "set":
        seen: dict[str, int] = {}
        for index, item in enumerate(value):
            key = json.dumps(item, sort_keys=True, default=str)
            if key in seen:
                errors.append(FieldError(f"{path}[{index}]", f"duplicate value {item!r} (also at index {seen[key]})"))
            seen.setdefault(key, index)


def _check_unique_keys(value: list, node: Node, path: str, errors: list[FieldError]) -> None:
    """Report items of a list map that share their key fields (absent keys count as their default)."""
    key_nodes = {key: node.item.fields.get(key) for key in node.list_keys} if node.item is not None else {}
    seen: dict[tuple, int] = {}
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            continue
        key = tuple(
            item.get(name, key_node.default if key_node is not None and key_node.has_default else None)
            for name, key_node in key_nodes.items()
        )
        if not all(isinstance(part, (str, int)) for part in key):
            continue  # a missing or mistyped key is reported on its own
        if key in seen:
            described = " ".join(f"{name} {part!r}" for name, part in zip(node.list_keys, key))
            where = f"{path}[{index}].{node.list_keys[0]}" if len(node.list_keys) == 1 else f"{path}[{index}]"
            errors.append(FieldError(where, f"duplicate {described} (also at index {seen[key]})"))
        else:
            seen[key] = index


def _check_string(value: str, node: Node, path: str, errors: list[FieldError]) -> None:
    if node.min_length is not None and len(value) < node.min_length:
        reason = "must not be empty" if node.min_length == 1 else f"must be at least {node.min_length} characters"
        errors.append(FieldError(path, reason))
    if node.max_length is not None and len(value) > node.max_length:
        errors.append(FieldError(path, f"must be at most {node.max_length} characters, got {len(value)}"))
    if node.pattern and _compiled(node.pattern).search(value) is None:
        if node.type_name == "Quantity":
            errors.append(FieldError(path, f"invalid quantity {value!r}: use a number with an optional "
                                           "suffix such as 500m, 2, 4Gi"))
        else:
            errors.append(FieldError(path, f"invalid value {value!r}: must match {node.pattern}"))


@functools.cache
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def validate_document(doc: AnyValue, schema: Node) -> tuple[dict, list[FieldError]]:
    """Validate one parsed document against `schema` and the spec's cross-field rules.

    Returns the cleaned document (null fields dropped) and every problem found; the document
    is valid when the list is empty.
    """
    errors: list[FieldError] = []
    if not isinstance(doc, dict):
        errors.append(FieldError(DOCUMENT, f"must be a mapping (an object), got {type_of(doc)}"))
        return {}, errors
    cleaned = check_structure(doc, schema, "", errors)
    rules.check_metadata(cleaned, errors)
    if isinstance(cleaned.get("spec"), dict):
        # KServe v0.20's v1alpha2 config CRD leaves out the route path rules; see route_rules.
        relaxed = doc.get("kind") == "LLMInferenceServiceConfig" and str(doc.get("apiVersion")).endswith("/v1alpha2")
        rules.check_spec(cleaned["spec"], errors, check_route_paths=not relaxed)
    return cleaned, errors
