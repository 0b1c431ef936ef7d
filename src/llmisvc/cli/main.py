"""Entry point of the `llmisvc` console script.

Subcommands are registered by name in COMMANDS and imported only when used, so
`llmisvc get` never pays for importing torch. Each command module exposes
`add_parser(subparsers, name, help)`, which adds its parser and sets `func`; `func(args)`
returns the process exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "apply": ("llmisvc.cli.local_commands", "create or update services from a YAML file"),
    "get": ("llmisvc.cli.local_commands", "list services with URL, READY and REASON"),
    "describe": ("llmisvc.cli.local_commands", "show a service's replicas, conditions and events"),
    "logs": ("llmisvc.cli.local_commands", "print or follow a service's replica logs"),
    "delete": ("llmisvc.cli.local_commands", "stop and remove a service"),
    "control": ("llmisvc.cli.local_commands", "run the control process in the foreground"),
    "validate": ("llmisvc.cli.spec_commands", "check a YAML file and list every error with its path"),
    "render": ("llmisvc.cli.spec_commands", "print the merged, defaulted, rendered spec"),
    "explain": ("llmisvc.cli.spec_commands", "document a spec field, like kubectl explain"),
    "engine": ("llmisvc.engine.cli", "run the built-in model server"),
    "sim": ("llmisvc.sim.cli", "run the simulated model server"),
    "gateway": ("llmisvc.gateway.cli", "run the HTTP front door"),
    "sidecar": ("llmisvc.gateway.sidecar", "run the decode-side prefill/decode proxy (Kubernetes)"),
    "operator": ("llmisvc.runtime.kubernetes.cli", "run the Kubernetes operator"),
    "install": ("llmisvc.runtime.kubernetes.cli", "print CRDs, RBAC and the operator Deployment"),
    "discover": ("llmisvc.runtime.kubernetes.cli", "feed a gateway the ready pods of a service's pool (Kubernetes)"),
    "bench": ("llmisvc.bench.cli", "load-test an OpenAI-compatible endpoint"),
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """Build the top-level parser; only `command`'s module is imported."""
    parser = argparse.ArgumentParser(
        prog="llmisvc",
        description="LLM inference services from KServe LLMInferenceService YAML.",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("LLMISVC_LOG_LEVEL", "INFO"),
        help="logging level (DEBUG, INFO, WARNING, ERROR)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if command == name:
            module = importlib.import_module(module_name)
            module.add_parser(subparsers, name, help_text)
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def _find_command(argv: list[str]) -> str | None:
    """Return the subcommand name in argv, skipping global options and their values."""
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg == "--log-level":
            skip_next = True
        elif not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    """Run one llmisvc subcommand and return its exit code."""
    argv = sys.argv[1:] if argv is None else argv
    command = _find_command(argv)
    if command is None and not any(a in ("-h", "--help") for a in argv):
        build_parser(None).print_help()
        return 2

    parser = build_parser(command)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
