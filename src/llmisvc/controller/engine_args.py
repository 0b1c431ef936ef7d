"""Engine command lines: flags generated from the spec plus the container's `args`.

The runtime owns the flags that place a replica on this machine (`--host`, `--port`) and
the flags the spec states in structured fields (`--model`, `--served-model-name`,
`--threads`, parallelism). User `args` extend them; an unknown flag is rejected at apply
time, before anything starts, because the engine would otherwise exit at start-up and
crash-loop.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

ENGINE_KINDS = ("builtin", "sim", "vllm")

# CLI module of each engine run through `llmisvc`; its parser is the source of truth for
# the flags it accepts.
_ENGINE_MODULES = {"builtin": ("llmisvc.engine.cli", "engine"), "sim": ("llmisvc.sim.cli", "sim")}

# Flags set by the runtime for every replica. The same flags in `args` are dropped with a
# warning, because a Kubernetes container's host and port do not apply on one machine.
RUNTIME_FLAGS = frozenset({"--host", "--port"})

# Flags generated from structured spec fields; repeating them in `args` is rejected
# because the two values could disagree.
SPEC_FLAGS = frozenset(
    {
        "--model",
        "--served-model-name",
        "--tensor-parallel-size",
        "-tp",
        "--pipeline-parallel-size",
        "-pp",
        "--data-parallel-size",
        "-dp",
    }
)

# Flags of `llmisvc engine` named by the engine contract (they mirror `vllm serve`); used
# only when the engine's own parser cannot be imported.
_FALLBACK_ENGINE_FLAGS = {
    "--host": True,
    "--port": True,
    "--model": True,
    "--served-model-name": True,
    "--max-model-len": True,
    "--max-num-seqs": True,
    "--block-size": True,
    "--enable-prefix-caching": False,
    "--no-enable-prefix-caching": False,
    "--kv-transfer-config": True,
    "--kv-events-config": True,
    "--dtype": True,
    "--seed": True,
    "--threads": True,
}


class EngineArgsError(ValueError):
    """Container `args` that the chosen engine does not accept."""


@dataclass(frozen=True)
class EngineFlags:
    """Option strings an engine accepts, each mapped to whether it takes a value."""

    kind: str
    options: dict[str, bool]

    def accepts(self, flag: str) -> bool:
        return flag in self.options

    def takes_value(self, flag: str) -> bool:
        return self.options.get(flag, True)


def engine_flags(kind: str) -> EngineFlags | None:
    """Return the flags of engine `kind`, or None when they are not known here (vLLM).

    The built-in engine and the simulator are asked through their own argparse parsers,
    so this list cannot drift from what the engine really accepts.
    """
    if kind not in _ENGINE_MODULES:
        return None
    module_name, command = _ENGINE_MODULES[kind]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        logger.warning("cannot import %s to read its flags (%s); using the documented flag list", module_name, exc)
        return EngineFlags(kind, dict(_FALLBACK_ENGINE_FLAGS))
    parser = argparse.ArgumentParser(prog="llmisvc")
    subparsers = parser.add_subparsers()
    module.add_parser(subparsers, command, "")
    engine_parser = subparsers.choices[command]
    options: dict[str, bool] = {}
    for action in engine_parser._actions:  # argparse offers no public listing of actions
        for option in action.option_strings:
            options[option] = action.nargs != 0
    return EngineFlags(kind, options)


def split_user_args(args: list[str], flags: EngineFlags | None) -> tuple[list[str], list[str]]:
    """Check container `args` against `flags` and drop the runtime-owned ones.

    Returns (args to pass, warnings). Raises EngineArgsError naming the first flag that
    the engine does not accept, a spec-owned flag, or a stray positional argument. With
    `flags` None (vLLM) only the runtime and spec flags are checked.
    """
    kept: list[str] = []
    warnings: list[str] = []
    index = 0
    while index < len(args):
        arg = str(args[index])
        flag, has_inline_value = (arg.split("=", 1)[0], True) if "=" in arg else (arg, False)
        if not flag.startswith("-"):
            raise EngineArgsError(f"unexpected positional argument {arg!r}; the model comes from spec.model.uri")
        if flags is not None and not flags.accepts(flag):
            raise EngineArgsError(f"unknown flag {flag!r} for the {flags.kind} engine")
        if flag in SPEC_FLAGS:
            raise EngineArgsError(f"flag {flag!r} is set from the spec (model and parallelism fields), remove it from args")
        takes_value = flags.takes_value(flag) if flags is not None else _looks_like_value_follows(args, index)
        width = 2 if takes_value and not has_inline_value else 1
        if takes_value and not has_inline_value and index + 1 >= len(args):
            raise EngineArgsError(f"flag {flag!r} expects a value")
        if flag in RUNTIME_FLAGS:
            warnings.append(f"ignored {' '.join(args[index:index + width])}: the local runtime assigns host and port")
        else:
            kept.extend(str(value) for value in args[index:index + width])
        index += width
    return kept, warnings


def _looks_like_value_follows(args: list[str], index: int) -> bool:
    """Guess whether an unknown engine's flag takes the next argument as its value."""
    return index + 1 < len(args) and not str(args[index + 1]).startswith("-")
