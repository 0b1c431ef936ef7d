"""The `--config FILE` format of a standalone gateway: service entries loaded at start.

    services:
      - namespace: default          # optional, default "default"
        name: smollm2
        model: smollm2
        shape: no-scheduler
        endpoints: [{address: "127.0.0.1:40123"}]

Each item is a service entry as the admin API's PUT takes it, plus its namespace and name.
"""

from __future__ import annotations

from pathlib import Path

import yaml


class ConfigError(ValueError):
    """The config file is unreadable or not in the expected shape."""


def load_config(path: Path) -> list[dict]:
    """Return the service entries of `path` (YAML or JSON), each with namespace and name set."""
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read gateway config {path}: {exc}") from None
    if document is None:
        return []
    services = document.get("services") if isinstance(document, dict) else None
    if not isinstance(services, list):
        raise ConfigError(f"{path}: expected a top-level 'services' list")
    entries = []
    for index, item in enumerate(services):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise ConfigError(f"{path}: services[{index}].name: must be a non-empty string")
        entries.append({"namespace": "default", **item})
    return entries
