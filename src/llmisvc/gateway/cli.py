"""`llmisvc gateway`: run the HTTP front door in the foreground until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
from pathlib import Path

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction, name: str, help: str) -> None:
    """Add the `gateway` subcommand."""
    parser = subparsers.add_parser(name, help=help, description="Run the llmisvc gateway (OpenAI-compatible front door).")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("LLMISVC_GATEWAY_PORT", "8000")),
        help="port to listen on (default $LLMISVC_GATEWAY_PORT, else 8000)",
    )
    parser.add_argument("--config", type=Path, help="YAML or JSON file with 'services: [{namespace, name, ...entry}]' loaded at start")
    parser.add_argument(
        "--admin-token-file", type=Path, help="file holding the admin API token; without it the admin API is disabled"
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("LLMISVC_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 and service routes (default $LLMISVC_API_KEY)",
    )
    parser.add_argument("--max-body-bytes", type=int, default=32 * 1024 * 1024, help="largest request body accepted, in bytes (default 32 MiB)")
    parser.add_argument(
        "--attempts", type=int, default=2, help="endpoints tried per request on a connect failure or a 5xx before the first byte (default 2)"
    )
    parser.add_argument(
        "--upstream-timeout", type=float, default=600.0, help="seconds an endpoint may send nothing before the request fails with 504 (default 600)"
    )
    parser.add_argument("--connect-timeout", type=float, default=5.0, help="seconds to connect to an endpoint (default 5)")
    parser.add_argument(
        "--max-concurrency", type=int, default=0, help="requests in flight per service before queueing; 0 means no limit (default 0)"
    )
    parser.add_argument("--max-queue", type=int, default=1024, help="requests queued per service before 429 (default 1024)")
    parser.add_argument("--queue-timeout", type=float, default=30.0, help="seconds a request may wait in the queue before 503 (default 30)")
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=75.0,
        help="seconds a client connection may send nothing between or within requests before it is closed (default 75)",
    )
    parser.add_argument(
        "--metrics-scrape-interval",
        "--scrape-interval",
        dest="metrics_scrape_interval",
        type=_positive_seconds,
        default=0.05,
        help="seconds between engine /metrics scrapes for services with a scheduler (default 0.05)",
    )
    parser.add_argument(
        "--metrics-staleness",
        type=_positive_seconds,
        default=None,
        help=(
            "seconds after which an endpoint's scraped metrics count as stale, so the scheduler treats the "
            "endpoint as saturated (default 10 scrape intervals, at least 0.5)"
        ),
    )
    parser.add_argument(
        "--prefill-timeout",
        type=float,
        default=60.0,
        help="seconds a prefill leg may take before the request falls back to decode-only (default 60)",
    )
    parser.add_argument(
        "--pd-legs",
        choices=("gateway", "sidecar"),
        default="gateway",
        help=(
            "who runs the prefill and decode legs of a split request of a 'pd' service: the gateway itself, or "
            "the decode endpoint's 'llmisvc sidecar', told the chosen prefill endpoint in x-prefiller-host-port "
            "(Kubernetes; default gateway)"
        ),
    )
    parser.add_argument("--health-interval", type=float, default=2.0, help="seconds between health probes of each endpoint (default 2)")
    parser.set_defaults(func=run)


def _positive_seconds(text: str) -> float:
    """Parse a duration in seconds that must be greater than 0 (an argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0 seconds, got {text}")
    return value


def raise_open_file_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit and return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft


def run(args: argparse.Namespace) -> int:
    """Run the gateway until a termination signal arrives; return the exit code."""
    import uvloop

    from .app import Gateway, GatewaySettings
    from .config import load_config
    from .services import Limits

    limit = raise_open_file_limit()
    logger.info("open-file limit is %d", limit)

    admin_token = None
    if args.admin_token_file is not None:
        admin_token = args.admin_token_file.read_text().strip()
        if not admin_token:
            logger.error("admin token file %s is empty", args.admin_token_file)
            return 2
    settings = GatewaySettings(
        max_body_bytes=args.max_body_bytes,
        attempts=max(1, args.attempts),
        upstream_timeout=args.upstream_timeout,
        connect_timeout=args.connect_timeout,
        api_key=args.api_key or None,
        admin_token=admin_token,
        health_interval=args.health_interval,
        idle_timeout=args.idle_timeout,
        scrape_interval=args.metrics_scrape_interval,
        metrics_staleness=args.metrics_staleness,
        prefill_timeout=args.prefill_timeout,
        pd_legs=args.pd_legs,
        limits=Limits(args.max_concurrency, args.max_queue, args.queue_timeout),
    )
    entries = load_config(args.config) if args.config is not None else []
    return uvloop.run(_serve(Gateway, settings, entries, args.host, args.port))


async def _serve(gateway_class, settings, entries: list[dict], host: str, port: int) -> int:
    loop = asyncio.get_running_loop()
    gateway = gateway_class(settings, loop)
    for entry in entries:
        gateway.table.put(entry["namespace"], entry["name"], {k: v for k, v in entry.items() if k not in ("namespace", "name")})

    server = await loop.create_server(gateway.protocol, host, port, backlog=4096)
    gateway.start_background()
    logger.info(
        "gateway listening on http://%s:%d (%d services, admin API %s, API key %s)",
        host, port, len(entries), "enabled" if settings.admin_token else "disabled",
        "required" if settings.api_key else "not required",
    )

    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()

    logger.info("gateway stopping")
    server.close()
    await gateway.close()
    return 0
