"""Schema nodes: a declarative, machine-readable description of a resource's field tree.

`types.py` builds the LLMInferenceService tree from these nodes; `validate.py` checks
documents against it, `explain.py` documents it, and the Kubernetes CRD generator walks it.
Each node carries its type, description, enum, minimum/maximum and, for objects, the field
map and the set of required field names.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

# Node kinds. "int-or-string" is Kubernetes' IntOrString and resource.Quantity; "any" is a
# value of any JSON type (x-kubernetes-preserve-unknown-fields without a type).
STRING = "string"
INTEGER = "integer"
NUMBER = "number"
BOOLEAN = "boolean"
INT_OR_STRING = "int-or-string"
ANY = "any"
OBJECT = "object"
ARRAY = "array"
MAP = "map"
SCALAR_KINDS = (STRING, INTEGER, NUMBER, BOOLEAN, INT_OR_STRING, ANY)


class _NoDefault:
    """Marker for a node without a default value (None is a valid default)."""

    def __repr__(self) -> str:
        return "NO_DEFAULT"


NO_DEFAULT = _NoDefault()


@dataclass(frozen=True)
class Node:
    """One schema node.

    `fields` (objects) maps field names to nodes in document order, and `required` names the
    fields an object must have. `item` is an array's element node and `value` a map's value
    node. `open_fields` marks an object that also accepts fields outside `fields` (free-form
    configuration such as an inline EndpointPickerConfig). `type_name` names a Kubernetes
    type (`Container`, `Probe`) for documentation. `pattern` (a regular expression),
    `min_length`/`max_length` (characters) and `min_items`/`max_items` constrain strings and
    arrays as the OpenAPI keywords of the same names do. `default` is the value the API
    server fills in for an absent field whose parent object is present. `list_type` "map"
    requires array items to be unique by the fields `list_keys`, and "set" requires distinct
    items, as Kubernetes' `x-kubernetes-list-type` does.
    """

    kind: str
    description: str = ""
    type_name: str = ""
    fields: dict[str, "Node"] = field(default_factory=dict)
    required: frozenset[str] = frozenset()
    item: "Node | None" = None
    value: "Node | None" = None
    enum: tuple = ()
    minimum: int | float | None = None
    maximum: int | float | None = None
    format: str = ""
    open_fields: bool = False
    pattern: str = ""
    min_length: int | None = None
    max_length: int | None = None
    min_items: int | None = None
    max_items: int | None = None
    default: object = NO_DEFAULT
    list_type: str = ""
    list_keys: tuple[str, ...] = ()

    @property
    def has_default(self) -> bool:
        """Return True when the node declares a default value."""
        return self.default is not NO_DEFAULT

    def defaulting(self, value: object) -> "Node":
        """Return a copy of this node whose absent value defaults to `value`."""
        return dataclasses.replace(self, default=value)

    def matching(self, pattern: str) -> "Node":
        """Return a copy of this string node that must match the regular expression `pattern`."""
        return dataclasses.replace(self, pattern=pattern)

    def length(self, minimum: int | None = None, maximum: int | None = None) -> "Node":
        """Return a copy of this string node with inclusive length bounds in characters."""
        return dataclasses.replace(self, min_length=minimum, max_length=maximum)

    def keyed(self, *keys: str) -> "Node":
        """Return a copy of this array node whose items must be unique by the fields `keys`.

        This is Kubernetes' `x-kubernetes-list-type: map` with `keys` as its list map keys.
        """
        return dataclasses.replace(self, list_type="map", list_keys=tuple(keys))

    def unique(self) -> "Node":
        """Return a copy of this array node whose items must be distinct (a list of type set)."""
        return dataclasses.replace(self, list_type="set")

    def sized(self, minimum: int | None = None, maximum: int | None = None) -> "Node":
        """Return a copy of this array node with inclusive bounds on its number of items."""
        return dataclasses.replace(self, min_items=minimum, max_items=maximum)

    def doc(self, description: str) -> "Node":
        """Return a copy of this node with `description` as its documentation."""
        return dataclasses.replace(self, description=description)

    def named(self, type_name: str) -> "Node":
        """Return a copy of this node documented as the Kubernetes type `type_name`."""
        return dataclasses.replace(self, type_name=type_name)

    def bounded(self, minimum: int | None = None, maximum: int | None = None) -> "Node":
        """Return a copy of this node with inclusive numeric bounds."""
        return dataclasses.replace(self, minimum=minimum, maximum=maximum)

    def one_of(self, *values) -> "Node":
        """Return a copy of this node that accepts only `values`."""
        return dataclasses.replace(self, enum=tuple(values))

    def requiring(self, *names: str) -> "Node":
        """Return a copy of this object node with `names` added to its required fields."""
        return dataclasses.replace(self, required=self.required | frozenset(names))

    def extended(self, **fields: "Node") -> "Node":
        """Return a copy of this object node with `fields` added (or replaced)."""
        return dataclasses.replace(self, fields={**self.fields, **fields})

    def without(self, *names: str) -> "Node":
        """Return a copy of this object node without the fields `names`."""
        kept = {k: v for k, v in self.fields.items() if k not in names}
        return dataclasses.replace(self, fields=kept, required=self.required - frozenset(names))

    @property
    def display_type(self) -> str:
        """Return the type as `kubectl explain` shows it: `<string>`, `<[]Container>`, ..."""
        if self.kind == ARRAY and self.item is not None:
            return f"[]{self.item.display_type}"
        if self.kind == MAP and self.value is not None:
            return f"map[string]{self.value.display_type}"
        if self.kind == OBJECT:
            return self.type_name or "Object"
        return self.type_name or self.kind


def obj(type_name: str = "", description: str = "", *, required: tuple[str, ...] = (),
        fields: dict[str, Node] | None = None, open_fields: bool = False, **kwargs: Node) -> Node:
    """Build an object node from keyword fields (or `fields` for names that are not identifiers)."""
    all_fields = {**(fields or {}), **kwargs}
    unknown = set(required) - set(all_fields)
    if unknown:
        raise ValueError(f"required fields {sorted(unknown)} are not fields of {type_name or 'object'}")
    return Node(OBJECT, description, type_name, all_fields, frozenset(required), open_fields=open_fields)


def array(item: Node, description: str = "") -> Node:
    """Build an array node of `item` elements."""
    return Node(ARRAY, description, item=item)


def string_map(value: Node | None = None, description: str = "") -> Node:
    """Build a map node with string keys (labels, annotations, resource lists)."""
    return Node(MAP, description, value=value or Node(STRING))


def scalar(kind: str, description: str = "", **kwargs) -> Node:
    """Build a scalar node of `kind` (one of SCALAR_KINDS)."""
    if kind not in SCALAR_KINDS:
        raise ValueError(f"unknown scalar kind {kind!r}")
    return Node(kind, description, **kwargs)


Str = scalar(STRING)
Int = scalar(INTEGER, format="int32")
Int64 = scalar(INTEGER, format="int64")
Num = scalar(NUMBER)
Bool = scalar(BOOLEAN)
IntOrStr = scalar(INT_OR_STRING)
# Kubernetes' resource.Quantity string format ("500m", "4Gi", "1e3"), as its OpenAPI schema states it.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]"
    r"|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
Quantity = scalar(INT_OR_STRING, type_name="Quantity", pattern=QUANTITY_PATTERN)
Any = scalar(ANY)
Strs = array(Str)
Labels = string_map(Str)


def walk(node: Node, path: str = "") -> Iterator[tuple[str, Node]]:
    """Yield (path, node) for `node` and every node below it.

    Paths use `.name` for object fields, `[]` for array elements and `{}` for map values,
    so `spec.template.containers[].env[].name` names every container's env var names.
    """
    yield path, node
    if node.kind == OBJECT:
        for name, child in node.fields.items():
            yield from walk(child, f"{path}.{name}" if path else name)
    elif node.kind == ARRAY and node.item is not None:
        yield from walk(node.item, path + "[]")
    elif node.kind == MAP and node.value is not None:
        yield from walk(node.value, path + "{}")


def lookup(node: Node, dotted: str) -> Node | None:
    """Return the node at a dotted path such as `spec.template.containers.env`, or None.

    Arrays and maps are stepped through implicitly, the way `kubectl explain` reads paths.
    """
    current = node
    for part in [p for p in dotted.split(".") if p]:
        while current.kind in (ARRAY, MAP):
            current = current.item if current.kind == ARRAY else current.value
        if current is None or current.kind != OBJECT or part not in current.fields:
            return None
        current = current.fields[part]
    return current


def _path_tokens(path: str) -> list[str]:
    """Split a `walk` path into field names, "[]" and "{}" steps."""
    return [token for token in re.split(r"\.|(\[\]|\{\})", path) if token]


def replace_at(root: Node, path: str, change: Callable[[Node], Node]) -> Node:
    """Return a copy of `root` where the node at `path` (a `walk` path) is `change(node)`.

    Raises KeyError when `path` names no node.
    """
    tokens = _path_tokens(path)
    if not tokens:
        return change(root)
    head, rest = tokens[0], "".join(f".{t}" if t not in ("[]", "{}") else t for t in tokens[1:]).lstrip(".")
    if head == "[]" and root.kind == ARRAY and root.item is not None:
        return dataclasses.replace(root, item=replace_at(root.item, rest, change))
    if head == "{}" and root.kind == MAP and root.value is not None:
        return dataclasses.replace(root, value=replace_at(root.value, rest, change))
    if root.kind == OBJECT and head in root.fields:
        return dataclasses.replace(root, fields={**root.fields, head: replace_at(root.fields[head], rest, change)})
    raise KeyError(f"no schema node at {path!r}")
