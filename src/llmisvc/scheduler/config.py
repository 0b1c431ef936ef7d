"""EndpointPickerConfig loading with llm-d's defaulting, checked before anything starts.

Accepted: `apiVersion` `llm-d.ai/v1alpha1` or `inference.networking.x-k8s.io/v1alpha1`,
`kind: EndpointPickerConfig`, `plugins: [{type, name, parameters}]`,
`schedulingProfiles: [{name, plugins: [{pluginRef, weight}]}]`. Defaulting follows llm-d.
A plugin's name defaults to its type. One profile and no profile handler gets a
`single-profile-handler`. A profile without a picker gets `max-score-picker`, and a
scorer without a weight gets 1. Any unknown plugin type, unknown parameter or bad value raises
`ConfigError` naming the plugin and the parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmisvc.scheduler import registry

API_VERSIONS = ("llm-d.ai/v1alpha1", "inference.networking.x-k8s.io/v1alpha1")
KIND = "EndpointPickerConfig"
# Top-level sections of llm-d's config that this scheduler accepts without using:
# feature gates and data-layer tuning have no equivalent here.
_IGNORED_SECTIONS = ("featureGates", "data", "saturationDetector")

DEFAULT_CONFIG: dict[str, Any] = {
    "apiVersion": "llm-d.ai/v1alpha1",
    "kind": KIND,
    "plugins": [
        {"type": "utilization-detector"},
        {"type": "prefix-cache-scorer"},
        {"type": "load-aware-scorer"},
        {"type": "max-score-picker"},
    ],
    "schedulingProfiles": [
        {
            "name": "default",
            "plugins": [
                {"pluginRef": "utilization-detector"},
                {"pluginRef": "prefix-cache-scorer", "weight": 2},
                {"pluginRef": "load-aware-scorer", "weight": 1},
                {"pluginRef": "max-score-picker"},
            ],
        }
    ],
}

# Default for a service with `prefill:` and no `scheduler.config`: a prefill and a decode
# profile, each with its role filter and the saturation filter, prefix-cache scorer weight 2,
# load-aware scorer weight 1 and the max-score picker. Every request is split (threshold 0),
# because declaring a prefill pool requests disaggregation. A config with a threshold or a
# prefix-based-pd-decider keeps short prompts on the decode endpoint.
DEFAULT_PD_CONFIG: dict[str, Any] = {
    "apiVersion": "llm-d.ai/v1alpha1",
    "kind": KIND,
    "plugins": [
        {"type": "pd-profile-handler", "parameters": {"threshold": 0}},
        {"type": "prefill-filter"},
        {"type": "decode-filter"},
        {"type": "utilization-detector"},
        {"type": "prefix-cache-scorer"},
        {"type": "load-aware-scorer"},
        {"type": "max-score-picker"},
    ],
    "schedulingProfiles": [
        {
            "name": "prefill",
            "plugins": [
                {"pluginRef": "prefill-filter"},
                {"pluginRef": "utilization-detector"},
                {"pluginRef": "prefix-cache-scorer", "weight": 2},
                {"pluginRef": "load-aware-scorer", "weight": 1},
                {"pluginRef": "max-score-picker"},
            ],
        },
        {
            "name": "decode",
            "plugins": [
                {"pluginRef": "decode-filter"},
                {"pluginRef": "utilization-detector"},
                {"pluginRef": "prefix-cache-scorer", "weight": 2},
                {"pluginRef": "load-aware-scorer", "weight": 1},
                {"pluginRef": "max-score-picker"},
            ],
        },
    ],
}


class ConfigError(ValueError):
    """An EndpointPickerConfig is invalid; the message names the plugin and parameter."""

    def __init__(self, message: str, *, plugin: str | None = None, parameter: str | None = None):
        super().__init__(message)
        self.plugin = plugin
        self.parameter = parameter


@dataclass
class PluginSpec:
    """One configured plugin with checked, defaulted parameters."""

    type: str
    name: str
    kind: str
    parameters: dict[str, Any]


@dataclass
class ProfileSpec:
    """One scheduling profile: plugin names in order, with scorer weights."""

    name: str
    filters: list[str] = field(default_factory=list)
    scorers: list[tuple[str, float]] = field(default_factory=list)
    picker: str = ""


@dataclass
class EndpointPickerConfig:
    """A checked config: plugins by name, profiles, and the profile handler's name."""

    plugins: dict[str, PluginSpec]
    profiles: list[ProfileSpec]
    handler: str


def parse_config(source: str | Mapping[str, Any] | None) -> EndpointPickerConfig:
    """Check and default an EndpointPickerConfig given as YAML text or a dict.

    None or an empty document gives the default profile (utilization-detector filter,
    prefix-cache-scorer weight 2, load-aware-scorer weight 1, max-score-picker).
    Raises ConfigError.
    """
    document = _load(source)
    if not document:
        document = DEFAULT_CONFIG
    _check_header(document)
    plugins = _parse_plugins(document.get("plugins"))
    profiles = _parse_profiles(document.get("schedulingProfiles"), plugins)
    handler = _handler(plugins, profiles)
    return EndpointPickerConfig(plugins=plugins, profiles=profiles, handler=handler)


def config_from_args(args: list[str], base_dir: Path | None = None) -> str | None:
    """Return the config text named by a scheduler container's `--config-text` or `--config-file`.

    Both `--flag value` and `--flag=value` forms are accepted, as llm-d's endpoint picker
    takes them. A relative `--config-file` path is resolved against `base_dir` (the
    directory of the ConfigMap mount in local mode). Returns None when neither flag is
    present. Raises ConfigError when the file cannot be read or both flags are given.
    """
    values: dict[str, str] = {}
    iterator = iter(range(len(args)))
    for index in iterator:
        arg = args[index]
        for flag in ("--config-text", "--config-file"):
            if arg == flag and index + 1 < len(args):
                values[flag] = args[index + 1]
                next(iterator, None)
            elif arg.startswith(flag + "="):
                values[flag] = arg[len(flag) + 1 :]
    if len(values) > 1:
        raise ConfigError("scheduler args: give either --config-text or --config-file, not both")
    if "--config-text" in values:
        return values["--config-text"]
    if "--config-file" in values:
        path = Path(values["--config-file"])
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        try:
            return path.read_text()
        except OSError as exc:
            raise ConfigError(f"scheduler args: cannot read --config-file {path}: {exc}") from exc
    return None


def _load(source: str | Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    if source is None:
        return None
    if isinstance(source, str):
        try:
            source = yaml.safe_load(source)
        except yaml.YAMLError as exc:
            raise ConfigError(f"scheduler config is not valid YAML: {exc}") from exc
        if source is None:
            return None
    if not isinstance(source, Mapping):
        raise ConfigError(f"scheduler config must be a mapping, got {type(source).__name__}")
    return source


def _check_header(document: Mapping[str, Any]) -> None:
    known = {"apiVersion", "kind", "plugins", "schedulingProfiles", *_IGNORED_SECTIONS}
    for key in document:
        if key not in known:
            raise ConfigError(f"scheduler config: unknown field {key!r}; known fields: {', '.join(sorted(known))}")
    api_version = document.get("apiVersion")
    if api_version is not None and api_version not in API_VERSIONS:
        raise ConfigError(f"scheduler config: apiVersion must be one of {', '.join(API_VERSIONS)}, got {api_version!r}")
    kind = document.get("kind")
    if kind is not None and kind != KIND:
        raise ConfigError(f"scheduler config: kind must be {KIND}, got {kind!r}")


def _parse_plugins(items: Any) -> dict[str, PluginSpec]:
    if not isinstance(items, list) or not items:
        raise ConfigError("scheduler config: plugins must be a non-empty list")
    plugins: dict[str, PluginSpec] = {}
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ConfigError(f"scheduler config: plugins[{index}] must be a mapping")
        for key in item:
            if key not in ("type", "name", "parameters"):
                raise ConfigError(f"scheduler config: plugins[{index}]: unknown field {key!r}")
        type_name = item.get("type")
        if not isinstance(type_name, str) or not type_name:
            raise ConfigError(f"scheduler config: plugins[{index}].type is required")
        name = item.get("name") or type_name
        if type_name not in registry.PLUGINS:
            raise ConfigError(
                f"plugin {name!r}: unknown plugin type {type_name!r}; known types: {', '.join(sorted(registry.PLUGINS))}",
                plugin=name,
            )
        if name in plugins:
            raise ConfigError(f"plugin {name!r}: duplicate plugin name", plugin=name)
        cls = registry.plugin_class(type_name)
        parameters = check_parameters(name, type_name, cls.PARAMETERS, item.get("parameters"))
        plugins[name] = PluginSpec(type_name, name, cls.kind, parameters)
    return plugins


def check_parameters(name: str, type_name: str, schema: tuple, raw_parameters: Any) -> dict[str, Any]:
    """Return `raw_parameters` checked against `schema` with defaults filled; raise ConfigError."""
    if raw_parameters is None:
        raw_parameters = {}
    if not isinstance(raw_parameters, Mapping):
        raise ConfigError(f"plugin {name!r} (type {type_name}): parameters must be a mapping", plugin=name)
    known = {param.name: param for param in schema}
    result = {}
    for key, value in raw_parameters.items():
        param = known.get(key)
        if param is None:
            names = ", ".join(sorted(known)) or "none"
            raise ConfigError(
                f"plugin {name!r} (type {type_name}): unknown parameter {key!r}; known parameters: {names}",
                plugin=name,
                parameter=key,
            )
        result[key] = _check_value(name, type_name, param, value)
    for param in schema:
        result.setdefault(param.name, param.default)
    return result


def _check_value(name: str, type_name: str, param: registry.Param, value: Any) -> Any:
    def fail(reason: str) -> ConfigError:
        return ConfigError(f"plugin {name!r} (type {type_name}): parameter {param.name!r} {reason}", plugin=name, parameter=param.name)

    ok = isinstance(value, param.types) and not (isinstance(value, bool) and bool not in param.types)
    if not ok and float in param.types and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        expected = " or ".join(t.__name__ for t in param.types)
        raise fail(f"must be {expected}, got {value!r}")
    if param.check is not None:
        reason = param.check(value)
        if reason:
            raise fail(reason)
    return value


def _parse_profiles(items: Any, plugins: dict[str, PluginSpec]) -> list[ProfileSpec]:
    if not isinstance(items, list) or not items:
        raise ConfigError("scheduler config: schedulingProfiles must be a non-empty list")
    profiles = []
    seen = set()
    for index, item in enumerate(items):
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str) or not item.get("name"):
            raise ConfigError(f"scheduler config: schedulingProfiles[{index}] needs a name")
        profile = ProfileSpec(name=item["name"])
        if profile.name in seen:
            raise ConfigError(f"scheduler config: duplicate profile name {profile.name!r}")
        seen.add(profile.name)
        refs = item.get("plugins") or []
        if not isinstance(refs, list):
            raise ConfigError(f"profile {profile.name!r}: plugins must be a list")
        for ref in refs:
            _add_ref(profile, ref, plugins)
        if not profile.picker:
            _ensure_default_picker(plugins)
            profile.picker = "max-score-picker"
        profiles.append(profile)
    return profiles


def _add_ref(profile: ProfileSpec, ref: Any, plugins: dict[str, PluginSpec]) -> None:
    if not isinstance(ref, Mapping) or not isinstance(ref.get("pluginRef"), str):
        raise ConfigError(f"profile {profile.name!r}: each plugin entry needs a pluginRef")
    for key in ref:
        if key not in ("pluginRef", "weight"):
            raise ConfigError(f"profile {profile.name!r}: unknown field {key!r} in plugin entry {ref.get('pluginRef')!r}")
    name = ref["pluginRef"]
    spec = plugins.get(name)
    if spec is None:
        raise ConfigError(f"profile {profile.name!r}: pluginRef {name!r} names no plugin in plugins", plugin=name)
    weight = ref.get("weight")
    if spec.kind == "scorer":
        if weight is None:
            weight = 1
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ConfigError(f"profile {profile.name!r}: weight of {name!r} must be a number >= 0, got {weight!r}", plugin=name, parameter="weight")
        profile.scorers.append((name, float(weight)))
    elif weight is not None:
        raise ConfigError(f"profile {profile.name!r}: {name!r} is a {spec.kind}, only scorers take a weight", plugin=name, parameter="weight")
    elif spec.kind == "filter":
        profile.filters.append(name)
    elif spec.kind == "picker":
        if profile.picker:
            raise ConfigError(f"profile {profile.name!r}: more than one picker ({profile.picker!r}, {name!r})", plugin=name)
        profile.picker = name
    else:
        raise ConfigError(f"profile {profile.name!r}: {name!r} is a profile handler; list it under plugins only", plugin=name)


def _ensure_default_picker(plugins: dict[str, PluginSpec]) -> None:
    existing = plugins.get("max-score-picker")
    if existing is None:
        cls = registry.plugin_class("max-score-picker")
        plugins["max-score-picker"] = PluginSpec("max-score-picker", "max-score-picker", "picker", check_parameters("max-score-picker", "max-score-picker", cls.PARAMETERS, None))
    elif existing.kind != "picker":
        raise ConfigError("plugin 'max-score-picker' is needed as the default picker but names another plugin type", plugin="max-score-picker")


def _handler(plugins: dict[str, PluginSpec], profiles: list[ProfileSpec]) -> str:
    handlers = [spec.name for spec in plugins.values() if spec.kind == "profile-handler"]
    if len(handlers) > 1:
        raise ConfigError(f"scheduler config: more than one profile handler ({', '.join(handlers)})", plugin=handlers[1])
    if handlers:
        return handlers[0]
    if len(profiles) > 1:
        raise ConfigError("scheduler config: several profiles need a profile handler plugin (for example pd-profile-handler)")
    cls = registry.plugin_class("single-profile-handler")
    plugins["single-profile-handler"] = PluginSpec("single-profile-handler", "single-profile-handler", "profile-handler", check_parameters("single-profile-handler", "single-profile-handler", cls.PARAMETERS, None))
    return "single-profile-handler"
