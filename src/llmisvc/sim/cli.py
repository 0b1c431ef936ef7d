"""`llmisvc sim`: run one or many simulated replicas in one process.

Accepts the engine's flags (`--model`, `--host`, `--port`, `--served-model-name`,
`--max-model-len`, `--max-num-seqs`, `--block-size`, `--enable-prefix-caching`,
`--kv-events-config`, `--kv-transfer-config`, `--seed`, `--threads`, `--dtype`) plus the
latency-model, cache, echo and failure-injection flags. `--replicas N` hosts N replicas
on consecutive ports from `--port` (KV event endpoints likewise), which is how 64 replicas
run on two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

logger = logging.getLogger(__name__)

# Latency defaults, in milliseconds; echo mode uses 0 for every flag left unset.
_LATENCY_DEFAULTS = {
    "ttft_overhead_ms": 20.0,
    "prefill_ms_per_token": 0.2,
    "itl_ms": 10.0,
    "kv_transfer_ms_per_token": 0.02,
}


def add_parser(subparsers: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """Add the `sim` subcommand."""
    parser = subparsers.add_parser(name, help=help, description=help)
    engine = parser.add_argument_group("engine flags")
    engine.add_argument("--model", default="sim", help="model URI or name; only used as the default served name")
    engine.add_argument("--host", default="127.0.0.1", help="address to listen on")
    engine.add_argument("--port", type=int, default=8000, help="port of the first replica")
    engine.add_argument("--served-model-name", nargs="+", default=None, help="model names accepted in requests")
    engine.add_argument("--max-model-len", type=int, default=8192, help="context length in tokens")
    engine.add_argument("--max-num-seqs", type=int, default=256, help="sequences decoded at once; more wait in a queue")
    engine.add_argument("--block-size", type=int, default=16, help="KV block size in tokens")
    engine.add_argument("--num-gpu-blocks", type=int, default=8192, help="KV cache capacity in blocks")
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True, help="reuse cached prompt blocks")
    engine.add_argument("--prefix-caching-hash-seed", default="", help="seed string of the chained block hashes")
    engine.add_argument("--kv-events-config", default=None, help="vLLM-style JSON: enable_kv_cache_events, publisher, endpoint, topic")
    engine.add_argument("--kv-transfer-config", default=None, help="vLLM-style JSON; accepted, the simulator always supports kv_transfer_params")
    engine.add_argument("--seed", type=int, default=0, help="seed of generated text and failure injection")
    engine.add_argument("--threads", type=int, default=None, help="accepted for compatibility; the simulator uses one thread")
    engine.add_argument("--dtype", default=None, help="accepted for compatibility")
    engine.add_argument("--chat-template", default=None, help="file with a jinja2 chat template (default: the fallback layout)")

    model = parser.add_argument_group("latency model (milliseconds)")
    model.add_argument("--ttft-overhead-ms", type=float, default=None, help="fixed time before the first token (default 20)")
    model.add_argument("--prefill-ms-per-token", type=float, default=None, help="prefill time per uncached prompt token (default 0.2)")
    model.add_argument("--itl-ms", type=float, default=None, help="inter-token latency with one running sequence (default 10)")
    model.add_argument("--itl-max-factor", type=float, default=3.0, help="inter-token latency multiplier at max-num-seqs running")
    model.add_argument("--kv-transfer-ms-per-token", type=float, default=None, help="time to pull one token of KV from a prefill replica (default 0.02)")

    behaviour = parser.add_argument_group("behaviour")
    behaviour.add_argument("--echo", action="store_true", help="answer with the prompt text (chat: the last message), no delay unless latency flags are set")
    behaviour.add_argument("--default-max-tokens", type=int, default=128, help="output length when a chat request sets no limit")
    behaviour.add_argument("--failure-rate", type=float, default=0.0, help="fraction of requests that fail (0 to 1)")
    behaviour.add_argument("--failure-types", default="500", help="comma-separated failure kinds: 500, drop, hang, cut")
    behaviour.add_argument("--kv-hold-seconds", type=float, default=30.0, help="seconds a prefill replica keeps KV blocks for a decode replica to pull (default 30)")
    behaviour.add_argument("--replicas", type=int, default=1, help="replicas hosted by this process on ports PORT..PORT+N-1")
    parser.set_defaults(func=run)
    return parser


def build_configs(args: argparse.Namespace) -> list:
    """Return one SimConfig per replica from parsed arguments; raise ValueError on bad values."""
    from llmisvc.sim.engine import FAILURE_TYPES, SimConfig
    from llmisvc.sim.latency import LatencyModel

    latency_ms = {}
    for key, default in _LATENCY_DEFAULTS.items():
        value = getattr(args, key)
        if value is None:
            value = 0.0 if args.echo else default
        latency_ms[key] = value
    latency = LatencyModel(
        ttft_overhead=latency_ms["ttft_overhead_ms"] / 1000,
        prefill_per_token=latency_ms["prefill_ms_per_token"] / 1000,
        itl=latency_ms["itl_ms"] / 1000,
        itl_max_factor=args.itl_max_factor,
        transfer_per_token=latency_ms["kv_transfer_ms_per_token"] / 1000,
    )
    failure_types = tuple(kind.strip() for kind in args.failure_types.split(",") if kind.strip())
    for kind in failure_types:
        if kind not in FAILURE_TYPES:
            raise ValueError(f"--failure-types: unknown kind {kind!r}; expected some of {', '.join(FAILURE_TYPES)}")
    if not 0.0 <= args.failure_rate <= 1.0:
        raise ValueError(f"--failure-rate must be between 0 and 1, got {args.failure_rate}")
    if args.replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {args.replicas}")

    names = tuple(args.served_model_name or [args.model])
    return [
        SimConfig(
            served_model_names=names,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            block_size=args.block_size,
            num_gpu_blocks=args.num_gpu_blocks,
            enable_prefix_caching=args.enable_prefix_caching,
            hash_seed=args.prefix_caching_hash_seed,
            latency=latency,
            echo=args.echo,
            seed=args.seed + index,
            failure_rate=args.failure_rate,
            failure_types=failure_types or ("500",),
            default_max_tokens=args.default_max_tokens,
            kv_hold_seconds=args.kv_hold_seconds,
            host=args.host,
            port=args.port + index,
        )
        for index in range(args.replicas)
    ]


def run(args: argparse.Namespace) -> int:
    """Serve the configured replicas until SIGINT or SIGTERM."""
    from llmisvc.sim.kv_events import KVEventsConfig

    try:
        configs = build_configs(args)
        events = KVEventsConfig.parse(args.kv_events_config)
        template = open(args.chat_template, encoding="utf-8").read() if args.chat_template else None
    except (ValueError, OSError) as exc:
        logger.error("%s", exc)
        return 2

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve(configs, events, template))
    return 0


async def _serve(configs: list, events, template: str | None) -> None:
    from aiohttp import web

    from llmisvc.protocol.prompt_text import ChatRenderer
    from llmisvc.sim.engine import SimEngine
    from llmisvc.sim.kv_events import KVEventPublisher
    from llmisvc.sim.server import SimServer

    renderer = ChatRenderer(template)
    runners = []
    publishers = []
    for index, config in enumerate(configs):
        publisher = None
        replica_events = events.with_port_offset(index)
        if replica_events.enabled:
            topic = f"kv@{config.host}:{config.port}@{config.served_model_names[0]}"
            publisher = KVEventPublisher(replica_events, topic, config.block_size)
            publishers.append(publisher)
        server = SimServer(SimEngine(config, publisher), renderer)
        runner = web.AppRunner(server.app, access_log=None, handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, config.host, config.port, backlog=1024).start()
        runners.append(runner)
        logger.info("sim replica serving %s on http://%s:%d", ",".join(config.served_model_names), config.host, config.port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    logger.info("stopping %d sim replicas", len(runners))
    for runner in runners:
        await runner.cleanup()
    for publisher in publishers:
        publisher.close()
