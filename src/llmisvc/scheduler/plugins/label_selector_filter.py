"""`label-selector-filter`: keep endpoints whose labels match a selector.

Parameters:
- `matchLabels` (map of string to string, default {}): every pair must be present.
- `matchExpressions` (list, default []): Kubernetes selector requirements
  `{key, operator: In|NotIn|Exists|DoesNotExist, values}`; all must hold.
An empty selector keeps every endpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from llmisvc.scheduler.datastore import Endpoint
from llmisvc.scheduler.framework import CycleState, LifecycleHooks, Plugin
from llmisvc.scheduler.registry import Param, string_map

_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


def _check_expressions(value: list) -> str | None:
    for index, item in enumerate(value):
        if not isinstance(item, Mapping) or not isinstance(item.get("key"), str):
            return f"entry {index} needs a string key"
        if item.get("operator") not in _OPERATORS:
            return f"entry {index}: operator must be one of {', '.join(_OPERATORS)}, got {item.get('operator')!r}"
        values = item.get("values", [])
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            return f"entry {index}: values must be a list of strings"
        if item["operator"] in ("In", "NotIn") and not values:
            return f"entry {index}: operator {item['operator']} needs values"
    return None


class LabelSelectorFilter(Plugin, LifecycleHooks):
    """Keeps endpoints matching `matchLabels` and `matchExpressions`."""

    type_name = "label-selector-filter"
    kind = "filter"
    PARAMETERS = (
        Param("matchLabels", (dict,), {}, string_map),
        Param("matchExpressions", (list,), [], _check_expressions),
    )

    def __init__(self, name: str, parameters: dict, context) -> None:
        super().__init__(name)
        self.match_labels = dict(parameters["matchLabels"])
        self.expressions = list(parameters["matchExpressions"])

    def filter(self, state: CycleState, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        return [e for e in endpoints if self._matches(e.labels)]

    def _matches(self, labels: Mapping[str, str]) -> bool:
        for key, value in self.match_labels.items():
            if labels.get(key) != value:
                return False
        for expression in self.expressions:
            key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
            present = key in labels
            if operator == "In" and not (present and labels[key] in values):
                return False
            if operator == "NotIn" and present and labels[key] in values:
                return False
            if operator == "Exists" and not present:
                return False
            if operator == "DoesNotExist" and present:
                return False
        return True
