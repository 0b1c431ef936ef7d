"""Defaulting of absent fields from schema defaults, as the Kubernetes API server does.

A field's default is filled in when the field is absent and its parent object is present:
a route `spec` without `rules` gets the default rule, while a service without
`router.route` gets no route at all.
"""

from __future__ import annotations

import copy
from typing import Any as AnyValue

from llmisvc.api.schema import ARRAY, MAP, OBJECT, Node


def apply_defaults(value: AnyValue, node: Node) -> AnyValue:
    """Fill in schema defaults throughout `value` in place and return it.

    Values that do not have the schema's type are left alone, because validation reports them.
    """
    if node.kind == OBJECT and isinstance(value, dict):
        for name, child in node.fields.items():
            if name not in value and child.has_default:
                value[name] = copy.deepcopy(child.default)
            if name in value:
                value[name] = apply_defaults(value[name], child)
    elif node.kind == ARRAY and isinstance(value, list) and node.item is not None:
        for index, item in enumerate(value):
            value[index] = apply_defaults(item, node.item)
    elif node.kind == MAP and isinstance(value, dict) and node.value is not None:
        for key, item in value.items():
            value[key] = apply_defaults(item, node.value)
    return value
