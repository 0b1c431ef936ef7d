"""Recognition of a scheduler EndpointPickerConfig passed as container arguments.

KServe and llm-d samples often pass the EndpointPickerConfig to the scheduler as
`--config-text <yaml>` (also spelled `--configText`) or point at a file with
`--config-file`. llmisvc keeps the configuration in one place, `router.scheduler.config`.
"""

from __future__ import annotations

import yaml

from llmisvc.api.errors import SpecError

# Scheduler flags that carry an EndpointPickerConfig as inline YAML text or as a file path.
# The scheduler parses flags with Go's flag package, which accepts one or two leading dashes.
CONFIG_TEXT_FLAGS = ("--config-text", "--configText", "-config-text", "-configText")
CONFIG_FILE_FLAGS = ("--config-file", "--configFile", "-config-file", "-configFile")


def _scheduler_containers(spec: dict) -> list[tuple[str, dict]]:
    template = ((spec.get("router") or {}).get("scheduler") or {}).get("template") or {}
    prefix = "spec.router.scheduler.template.containers"
    return [(f"{prefix}[{i}]", c) for i, c in enumerate(template.get("containers") or []) if isinstance(c, dict)]


def _split_flag(arg: str, flags: tuple[str, ...]) -> tuple[str | None, str | None]:
    """Return (flag, inline value) when `arg` is one of `flags` (`--f v` or `--f=v`)."""
    for flag in flags:
        if arg == flag:
            return flag, None
        if arg.startswith(flag + "="):
            return flag, arg[len(flag) + 1:]
    return None, None


def move_config_text_to_inline(spec: dict) -> str | None:
    """Move `--config-text` from the scheduler's container args into `config.inline`.

    Moving the text keeps a single copy of the configuration, which the runtimes turn back
    into one flag. Returns a `--config-file` path if one is given. Raises SpecError for
    unparsable text, a flag without a value or a configuration given twice.
    """
    found: list[tuple[str, str]] = []
    config_file = None
    for path, container in _scheduler_containers(spec):
        args = [str(a) for a in container.get("args") or []]
        remaining_args: list[str] = []
        i = 0
        while i < len(args):
            flag, value = _split_flag(args[i], CONFIG_TEXT_FLAGS + CONFIG_FILE_FLAGS)
            if flag is None:
                remaining_args.append(args[i])
                i += 1
                continue
            if value is None:
                if i + 1 >= len(args):
                    raise SpecError.single(f"{path}.args[{i}]", f"{flag} needs a value")
                value = args[i + 1]
                step = 2
            else:
                step = 1
            if flag in CONFIG_FILE_FLAGS:
                config_file = value
                remaining_args.extend(args[i:i + step])
            else:
                found.append((f"{path}.args[{i}]", value))
            i += step
        if "args" in container:
            container["args"] = remaining_args

    config = spec.get("router", {}).get("scheduler", {}).get("config") or {}
    sources = [p for p, _ in found] + (["--config-file"] if config_file else []) + \
        [f"spec.router.scheduler.config.{key}" for key in ("inline", "ref") if key in config]
    if len(sources) > 1:
        raise SpecError.single("spec.router.scheduler.config",
                               f"EndpointPickerConfig given more than once ({', '.join(sources)}): keep one")
    if not found:
        return config_file
    config = spec["router"]["scheduler"].setdefault("config", {})
    path, text = found[0]
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError.single(path, f"--config-text is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(parsed, dict):
        raise SpecError.single(path, "--config-text must be an EndpointPickerConfig mapping")
    config["inline"] = parsed
    return config_file
