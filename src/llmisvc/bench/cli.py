"""`llmisvc bench serve`: load-test an OpenAI-compatible endpoint and report vLLM-style JSON."""

from __future__ import annotations

import argparse
import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """Add the `bench` command with its `serve` subcommand."""
    parser = subparsers.add_parser(name, help=help, description=help)
    modes = parser.add_subparsers(dest="bench_command", metavar="MODE", required=True)
    serve = modes.add_parser("serve", help="send a workload to a running server", description="Send a workload to an OpenAI-compatible server and report latency and throughput.")

    target = serve.add_argument_group("target")
    target.add_argument("--base-url", default="http://127.0.0.1:8000", help="server URL without the /v1 path (default http://127.0.0.1:8000)")
    target.add_argument("--endpoint", default=None, help="API path (default /v1/completions, or /v1/chat/completions with --chat or multi-turn)")
    target.add_argument("--model", required=True, help="model name sent in each request")
    target.add_argument("--api-key", default=None, help="bearer token sent in Authorization")
    target.add_argument("--chat", action="store_true", help="send chat messages instead of prompts")
    target.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    target.add_argument("--extra-body", default=None, help="JSON object merged into every request body")

    workload = serve.add_argument_group("workload (lengths in tokens of about 4 characters)")
    workload.add_argument("--workload", choices=("random", "prefix-repetition", "shared-prefix", "multi-turn"), default="random")
    workload.add_argument("--num-prompts", type=int, default=100, help="requests (random, prefix-repetition) or conversations (multi-turn)")
    workload.add_argument("--input-len", type=int, default=256, help="random prompt, suffix, question or user-turn length")
    workload.add_argument("--output-len", type=int, default=128, help="max_tokens of each request")
    workload.add_argument("--prefix-len", type=int, default=1024, help="shared prefix or system prompt length")
    workload.add_argument("--num-prefixes", type=int, default=8, help="distinct prefixes (prefix-repetition)")
    workload.add_argument("--num-groups", type=int, default=8, help="groups sharing a system prompt (shared-prefix)")
    workload.add_argument("--prompts-per-group", type=int, default=16, help="prompts per group (shared-prefix)")
    workload.add_argument("--turns", type=int, default=4, help="user turns per conversation (multi-turn)")
    workload.add_argument("--seed", type=int, default=0, help="seed of prompts and arrival times")

    load = serve.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=math.inf, help="requests per second (default inf: all at once)")
    load.add_argument("--arrival", choices=("poisson", "fixed"), default="poisson", help="gaps between arrivals: exponential or constant")
    load.add_argument("--max-concurrency", type=int, default=None, help="maximum number of requests in flight at once (default: no limit)")

    output = serve.add_argument_group("output")
    output.add_argument("--result-file", type=Path, default=None, help="write the result JSON here")
    output.add_argument("--percentiles", default="50,90,99", help="comma-separated percentiles to report")
    output.add_argument("--plot", type=Path, default=None, metavar="DIR", help="write PNG charts into DIR (needs matplotlib)")
    output.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    serve.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run `bench serve`; return 0 when every request succeeded, 1 when some failed, 2 on bad arguments."""
    import asyncio

    from llmisvc.bench import report
    from llmisvc.bench.runner import RunSettings
    from llmisvc.bench.runner import run as run_load
    from llmisvc.bench.workloads import WorkloadSpec, build

    try:
        extra = json.loads(args.extra_body) if args.extra_body else {}
        if not isinstance(extra, dict):
            raise ValueError("--extra-body must be a JSON object")
        percentiles = [float(p) for p in args.percentiles.split(",") if p.strip()]
        chat = args.chat or args.workload == "multi-turn"
        spec = WorkloadSpec(
            name=args.workload, num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
            prefix_len=args.prefix_len, num_prefixes=args.num_prefixes, num_groups=args.num_groups,
            prompts_per_group=args.prompts_per_group, turns=args.turns, chat=chat, seed=args.seed,
        )
        requests = build(spec)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2

    endpoint = args.endpoint or ("/v1/chat/completions" if chat else "/v1/completions")
    settings = RunSettings(
        url=args.base_url.rstrip("/") + endpoint, model=args.model, request_rate=args.request_rate, arrival=args.arrival,
        max_concurrency=args.max_concurrency, timeout=args.timeout, api_key=args.api_key, seed=args.seed,
        progress=not args.no_progress, extra_body=extra,
    )
    outcomes, duration = asyncio.run(run_load(settings, requests))
    result = report.summarize(outcomes, duration, percentiles)
    result.update(
        date=datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"), backend="openai-chat" if chat else "openai",
        model_id=args.model, workload=args.workload, num_prompts=len(outcomes), request_rate=args.request_rate if math.isfinite(args.request_rate) else "inf",
        arrival=args.arrival, max_concurrency=args.max_concurrency,
    )
    print(report.format_summary(result))
    errors = [e for e in result["errors"] if e]
    if errors:
        print(f"first error: {errors[0]}")
    if args.result_file is not None:
        args.result_file.parent.mkdir(parents=True, exist_ok=True)
        args.result_file.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.result_file}")
    if args.plot is not None:
        try:
            for path in report.plot(result, args.plot):
                print(f"wrote {path}")
        except ImportError as exc:
            logger.error("%s", exc)
            return 2
    return 1 if result["failed"] else 0
