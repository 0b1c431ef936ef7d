"""`llmisvc operator` and `llmisvc install --print`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import yaml


def add_parser(subparsers, name: str, help: str) -> None:
    """Add the `operator` or `install` subcommand parser."""
    if name == "operator":
        parser = subparsers.add_parser(name, help=help, description=help)
        parser.add_argument("--namespace", action="append", default=[], dest="namespaces",
                            help="namespace to watch (repeatable); default: all namespaces")
        parser.add_argument("--system-namespace",
                            default=os.environ.get("POD_NAMESPACE", "llmisvc-system"),
                            help="namespace whose LLMInferenceServiceConfig objects every "
                                 "service may reference (default: $POD_NAMESPACE or llmisvc-system)")
        parser.add_argument("--resync-seconds", type=float, default=60.0,
                            help="seconds between periodic reconciles of each service (default 60)")
        parser.add_argument("--watch-timeout", type=int, default=300,
                            help="seconds before each watch request is closed and re-listed (default 300)")
        parser.add_argument("--liveness", default=None,
                            help="URL of the liveness endpoint to serve, e.g. http://0.0.0.0:8080/healthz")
        parser.add_argument("--llmisvc-image", default=None,
                            help="image for llmisvc engines, gateway and sidecar")
        parser.add_argument("--vllm-image", default=None, help="image for vLLM engines")
        parser.set_defaults(func=run_operator_command)
    else:
        parser = subparsers.add_parser(name, help=help, description=help)
        parser.add_argument("--print", action="store_true", dest="print_manifests", required=True,
                            help="print the manifests as YAML (the only mode: apply them with "
                                 "kubectl apply --server-side -f -)")
        parser.add_argument("--namespace", default="llmisvc-system",
                            help="namespace of the operator (default llmisvc-system)")
        parser.add_argument("--image", default=None, help="operator image (default: this version's)")
        parser.set_defaults(func=run_install_command)


def run_install_command(args: argparse.Namespace) -> int:
    """Print CRDs, RBAC and the operator Deployment as one YAML stream."""
    from llmisvc.runtime.kubernetes.install import install_manifests

    yaml.safe_dump_all(install_manifests(args.namespace, args.image), sys.stdout, sort_keys=False)
    return 0


def run_operator_command(args: argparse.Namespace) -> int:
    """Run the operator until interrupted."""
    from llmisvc.runtime.kubernetes.operator import OperatorConfig, run_operator
    from llmisvc.runtime.kubernetes.options import RenderOptions

    defaults = RenderOptions()
    options = RenderOptions(
        llmisvc_image=args.llmisvc_image or defaults.llmisvc_image,
        vllm_image=args.vllm_image or defaults.vllm_image,
    )
    config = OperatorConfig(
        namespaces=args.namespaces,
        system_namespace=args.system_namespace,
        resync_seconds=args.resync_seconds,
        watch_timeout=args.watch_timeout,
        liveness_endpoint=args.liveness,
        options=options,
    )
    try:
        asyncio.run(run_operator(config))
    except KeyboardInterrupt:
        return 130
    return 0
