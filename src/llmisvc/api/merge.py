"""Layered merge of LLMInferenceService specs: presets, then baseRefs, then the service.

Rules, applied recursively from the earlier layer (`base`) to the later one (`overlay`):

- objects merge field by field;
- lists of named things merge by their key, keeping the earlier order and appending new
  items. Containers, initContainers, ephemeralContainers, env, volumes, imagePullSecrets and
  resourceClaims merge by `name`, ports by `containerPort`, volumeMounts by `mountPath` and
  volumeDevices by `devicePath`. Every other list (`args`, `command`, tolerations, ...) is
  replaced whole;
- an absent, null, empty-string, empty-list or empty-object value in the later layer leaves
  the earlier value in place, so `scheduler: {}` in a service keeps a preset's scheduler.
  Explicit `0` and `false` do override, because KServe's numeric and boolean fields are
  optional pointers where zero is a real setting (`replicas: 0`).
"""

from __future__ import annotations

import copy
from typing import Any as AnyValue

# Field name -> merge key of its items (the Kubernetes strategic-merge patch keys).
LIST_MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "imagePullSecrets": "name",
    "resourceClaims": "name",
    "ports": "containerPort",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
}


def is_empty(value: AnyValue) -> bool:
    """Return True for values that do not override an earlier layer (None, "", [], {})."""
    return value is None or (isinstance(value, (str, list, dict)) and len(value) == 0)


def merge(base: AnyValue, overlay: AnyValue, field_name: str = "") -> AnyValue:
    """Return `overlay` merged over `base` (neither is modified).

    `field_name` is the name of the field holding these values; it selects the list merge key.
    """
    if is_empty(overlay):
        return copy.deepcopy(base)
    if isinstance(base, dict) and isinstance(overlay, dict):
        merged = copy.deepcopy(base)
        for key, value in overlay.items():
            merged[key] = merge(base.get(key), value, key) if key in base else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(overlay, list) and field_name in LIST_MERGE_KEYS:
        return _merge_keyed_lists(base, overlay, LIST_MERGE_KEYS[field_name], field_name)
    return copy.deepcopy(overlay)


def _merge_keyed_lists(base: list, overlay: list, key: str, field_name: str) -> list:
    merged = [copy.deepcopy(item) for item in base]
    positions = {item.get(key): i for i, item in enumerate(merged) if isinstance(item, dict) and key in item}
    for item in overlay:
        item_key = item.get(key) if isinstance(item, dict) else None
        if item_key is not None and item_key in positions:
            index = positions[item_key]
            merged[index] = merge(merged[index], item, field_name)
        else:
            if item_key is not None:
                positions[item_key] = len(merged)
            merged.append(copy.deepcopy(item))
    return merged


def merge_layers(layers: list[dict]) -> dict:
    """Merge spec dicts in order (earliest first) and return the result."""
    result: dict = {}
    for layer in layers:
        result = merge(result, layer)
    return result
