"""Field documentation for `llmisvc explain`, in the layout of `kubectl explain`."""

from __future__ import annotations

import difflib
import json

from llmisvc.api.schema import ARRAY, MAP, OBJECT, Node
from llmisvc.api.types import API_VERSIONS, CONFIG_KIND, GROUP, SERVICE_KIND, resource_schema

# Names accepted for the resource in front of a path, lower-cased.
KIND_ALIASES = {
    "llminferenceservice": SERVICE_KIND,
    "llminferenceservices": SERVICE_KIND,
    "llmisvc": SERVICE_KIND,
    "llminferenceserviceconfig": CONFIG_KIND,
    "llminferenceserviceconfigs": CONFIG_KIND,
}


class ExplainError(LookupError):
    """Raised for a path that names no field; the message suggests the nearest field."""


def _element(node: Node) -> Node:
    while node.kind in (ARRAY, MAP):
        node = node.item if node.kind == ARRAY else node.value
    return node


def _constraints(node: Node) -> list[str]:
    notes = []
    if node.enum:
        notes.append("one of: " + ", ".join(str(v) for v in node.enum))
    if node.minimum is not None:
        notes.append(f"minimum: {node.minimum}")
    if node.maximum is not None:
        notes.append(f"maximum: {node.maximum}")
    if node.pattern:
        notes.append(f"pattern: {node.pattern}")
    if node.min_length is not None or node.max_length is not None:
        notes.append(f"length: {node.min_length or 0} to {node.max_length if node.max_length is not None else 'any'}")
    if node.min_items is not None or node.max_items is not None:
        notes.append(f"items: {node.min_items or 0} to {node.max_items if node.max_items is not None else 'any'}")
    if node.list_type == "map":
        notes.append(f"unique by: {', '.join(node.list_keys)}")
    if node.has_default:
        notes.append(f"default: {json.dumps(node.default)}")
    return notes


def explain(path: str, api_version: str = API_VERSIONS[-1], recursive: bool = False) -> str:
    """Return the documentation of the field at `path` (`llmisvc.spec.router.scheduler`).

    The first path element may name the resource (`llmisvc`, `llminferenceservice`,
    `llminferenceserviceconfig`); without it the path starts at an LLMInferenceService's top
    level. `api_version` may omit the group (`v1alpha1`). With `recursive`, the whole
    subtree's field names and types are listed.
    Raises ExplainError for an unknown field or API version.
    """
    if "/" not in api_version:
        api_version = f"{GROUP}/{api_version}"
    if api_version not in API_VERSIONS:
        raise ExplainError(f"unknown API version {api_version!r}: use {' or '.join(API_VERSIONS)}")
    parts = [p for p in path.split(".") if p]
    kind = SERVICE_KIND
    if parts and parts[0].lower() in KIND_ALIASES:
        kind = KIND_ALIASES[parts.pop(0).lower()]
    node = resource_schema(kind, api_version.rsplit("/", 1)[-1])

    walked: list[str] = []
    for part in parts:
        current = _element(node)
        if current.kind != OBJECT or part not in current.fields:
            known = list(current.fields) if current.kind == OBJECT else []
            close = difflib.get_close_matches(part, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            where = ".".join(walked) or kind
            raise ExplainError(f"field {part!r} does not exist in {where}{hint}")
        node = current.fields[part]
        walked.append(part)

    lines = [f"KIND:     {kind}", f"VERSION:  {api_version}", ""]
    if walked:
        lines.append(f"FIELD: {walked[-1]} <{node.display_type}>")
        lines.append("")
    lines.append("DESCRIPTION:")
    description = node.description or _element(node).description or "(no description)"
    lines.append(f"    {description}")
    notes = _constraints(node) if _element(node) is node else _constraints(node) + _constraints(_element(node))
    for note in notes:
        lines.append(f"    {note}")

    element = _element(node)
    if element.kind == OBJECT and element.fields:
        lines += ["", "FIELDS:"]
        if recursive:
            lines += _recursive_fields(element, 1)
        else:
            for name, child in element.fields.items():
                flag = " -required-" if name in element.required else ""
                lines.append(f"  {name}\t<{child.display_type}>{flag}")
                text = child.description or _element(child).description
                if text:
                    lines.append(f"    {text}")
                lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _recursive_fields(node: Node, depth: int, seen: tuple[int, ...] = ()) -> list[str]:
    lines = []
    for name, child in node.fields.items():
        flag = " -required-" if name in node.required else ""
        lines.append(f"{'   ' * depth}{name}\t<{child.display_type}>{flag}")
        element = _element(child)
        if element.kind == OBJECT and element.fields and id(element) not in seen:
            lines += _recursive_fields(element, depth + 1, seen + (id(element),))
    return lines
