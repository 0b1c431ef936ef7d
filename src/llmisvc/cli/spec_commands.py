"""`llmisvc validate|render|explain`: check, resolve and document specs without running them.

None of these commands contacts the control process or starts anything.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import yaml

from llmisvc.api import Resource, SpecError, load_file, resolve
from llmisvc.api.types import API_VERSIONS, CONFIG_KIND, SERVICE_KIND

KUBERNETES_RENDER_MODULE = "llmisvc.runtime.kubernetes.render"


def add_parser(subparsers, name: str, help: str) -> None:
    """Register command `name` (validate, render or explain)."""
    parser = subparsers.add_parser(name, help=help, description=help)
    if name in ("validate", "render"):
        parser.add_argument(
            "-f", "--filename", required=True, action="append", type=Path,
            help="YAML file with LLMInferenceService and LLMInferenceServiceConfig documents; "
                 "repeat to add files whose configs baseRefs may name",
        )
    if name == "validate":
        parser.set_defaults(func=run_validate)
    elif name == "render":
        parser.add_argument(
            "--target", choices=("local", "kubernetes"), default="local",
            help="local: the merged spec as YAML (default); kubernetes: the objects a cluster gets",
        )
        parser.set_defaults(func=run_render)
    elif name == "explain":
        parser.add_argument("path", help="field path such as llmisvc.spec.router.scheduler")
        parser.add_argument("--api-version", default=API_VERSIONS[-1],
                            help=f"API version to document (default: {API_VERSIONS[-1]})")
        parser.add_argument("--recursive", action="store_true", help="list every field below PATH")
        parser.set_defaults(func=run_explain)


def _load(paths: list[Path]) -> tuple[list[Resource], dict[tuple[str, str], dict[str, Resource]]]:
    """Load every file; return the resources and the configs grouped by namespace."""
    resources: list[Resource] = []
    errors: list[str] = []
    for path in paths:
        try:
            resources += load_file(path)
        except SpecError as exc:
            errors += [f"{path}: {error}" for error in exc.errors]
        except OSError as exc:
            errors.append(f"{path}: cannot read file: {exc.strerror or exc}")
    if errors:
        raise _CommandError(errors)
    configs: dict[str, dict[str, Resource]] = {}
    for resource in resources:
        if resource.kind == CONFIG_KIND:
            configs.setdefault(resource.namespace, {})[resource.name] = resource
    return resources, configs


class _CommandError(Exception):
    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def _resolve_all(resources, configs):
    resolved, errors = [], []
    for resource in resources:
        if resource.kind != SERVICE_KIND:
            continue
        try:
            resolved.append(resolve(resource, configs.get(resource.namespace, {})))
        except SpecError as exc:
            errors += [f"{SERVICE_KIND} {resource.namespace}/{resource.name}: {e}" for e in exc.errors]
    if errors:
        raise _CommandError(errors)
    return resolved


def run_validate(args: argparse.Namespace) -> int:
    """Validate the files, resolve every service and list each error with its path."""
    try:
        resources, configs = _load(args.filename)
        _resolve_all(resources, configs)
    except _CommandError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        print(f"invalid: {len(exc.lines)} error(s)", file=sys.stderr)
        return 1
    for resource in resources:
        print(f"{resource.kind} {resource.namespace}/{resource.name}: valid")
    return 0


def _dump(document) -> str:
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False, width=100)


def run_render(args: argparse.Namespace) -> int:
    """Print every service merged and rendered (local) or as Kubernetes objects."""
    try:
        resources, configs = _load(args.filename)
        resolved = _resolve_all(resources, configs)
    except _CommandError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        return 1
    if not resolved:
        print("no LLMInferenceService in the given files", file=sys.stderr)
        return 1

    if args.target == "kubernetes":
        if importlib.util.find_spec(KUBERNETES_RENDER_MODULE) is None:
            print("kubernetes rendering not available", file=sys.stderr)
            return 1
        from llmisvc.runtime.kubernetes.render import render_manifests

        documents = []
        for service in resolved:
            try:
                documents += render_manifests(service)
            except ValueError as exc:
                print(f"{SERVICE_KIND} {service.namespace}/{service.name}: {exc}", file=sys.stderr)
                return 1
        sys.stdout.write("---\n".join(_dump(d) for d in documents))
        return 0

    parts = []
    for service in resolved:
        header = (
            f"# {SERVICE_KIND} {service.namespace}/{service.name} (shape: {service.shape})\n"
            f"# presets: {', '.join(service.applied_presets) or 'none'}\n"
            f"# baseRefs: {', '.join(service.applied_base_refs) or 'none'}\n"
        )
        parts.append(header + _dump(service.obj))
    sys.stdout.write("---\n".join(parts))
    return 0


def run_explain(args: argparse.Namespace) -> int:
    """Print the documentation of one spec field."""
    from llmisvc.api.explain import ExplainError, explain

    try:
        sys.stdout.write(explain(args.path, args.api_version, args.recursive))
    except ExplainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
