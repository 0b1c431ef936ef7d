"""`llmisvc operator`, `llmisvc discover` and `llmisvc install --print`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

import yaml


def add_parser(subparsers, name: str, help: str) -> None:
    """Add the `operator`, `discover` or `install` subcommand parser."""
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
    elif name == "discover":
        parser = subparsers.add_parser(name, help=help, description=help)
        parser.add_argument("--config", type=Path, required=True,
                            help="sync config file: namespace, name, entry and discovery (YAML)")
        parser.add_argument("--gateway-url", default="http://127.0.0.1:8000",
                            help="base URL of the gateway's admin API (default http://127.0.0.1:8000)")
        parser.add_argument("--admin-token-file", type=Path, required=True,
                            help="file holding the gateway's admin API token")
        parser.add_argument("--api-server", default=None,
                            help="Kubernetes API server URL without credentials (for tests); "
                                 "default: the pod's service account")
        parser.add_argument("--resend-seconds", type=float, default=30.0,
                            help="seconds between re-sends of an unchanged entry (default 30)")
        parser.add_argument("--watch-timeout", type=int, default=300,
                            help="seconds before each pod watch is closed and re-listed (default 300)")
        parser.add_argument("--ready-file", type=Path, default=None,
                            help="file to create once the gateway has the service (for a readiness probe)")
        parser.set_defaults(func=run_discover_command)
    else:
        parser = subparsers.add_parser(name, help=help, description=help)
        parser.add_argument("--print", action="store_true", dest="print_manifests", required=True,
                            help="print the manifests as YAML (the only mode: apply them with "
                                 "kubectl apply --server-side -f -)")
        parser.add_argument("--namespace", default="llmisvc-system",
                            help="namespace of the operator (default llmisvc-system)")
        parser.add_argument("--image", default=None, help="operator image (default: this version's)")
        parser.set_defaults(func=run_install_command)


logger = logging.getLogger(__name__)


def run_discover_command(args: argparse.Namespace) -> int:
    """Feed the gateway the ready pods of one service's pool until interrupted."""
    from llmisvc.runtime.kubernetes.client import KubeClient
    from llmisvc.runtime.kubernetes.pool_sync import GatewaySync, SyncConfigError, load_sync_config

    try:
        config = load_sync_config(args.config)
        token = args.admin_token_file.read_text().strip()
        client = KubeClient(args.api_server) if args.api_server else KubeClient.in_cluster()
    except (SyncConfigError, OSError, RuntimeError) as error:
        logger.error("cannot start pod discovery: %s", error)
        return 2

    async def main() -> None:
        sync = GatewaySync(client, config, args.gateway_url, token,
                           resend_seconds=args.resend_seconds, watch_timeout=args.watch_timeout,
                           ready_file=args.ready_file)
        try:
            await sync.run()
        finally:
            await client.close()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        return 130
    return 0


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
