"""`llmisvc engine`: run the built-in model server.

Flags mirror `vllm serve` where vLLM has one. torch and the model code are imported only
inside `run()`, so building the parser (for `--help` or for the controller's flag check)
stays cheap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
from typing import Any

logger = logging.getLogger(__name__)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
                 "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """Parse a byte size such as `2GiB`, `512MiB`, `1.5G` or `1000000`; raise ArgumentTypeError."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; use bytes or a unit like 2GiB or 500MB")
    unit = (match.group(2) or "").lower().removesuffix("b")
    return int(float(match.group(1)) * _SIZE_FACTORS[unit])


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"invalid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _only_one(text: str) -> int:
    value = int(text)
    if value != 1:
        raise argparse.ArgumentTypeError(f"the built-in engine runs on one device; got {value}")
    return value


def add_parser(subparsers: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """Add the `engine` subcommand and its flags."""
    parser = subparsers.add_parser(name, help=help, description="Run the built-in model server (OpenAI API).")
    parser.add_argument("model_tag", nargs="?", help="model URI, as the positional argument of vllm serve")
    parser.add_argument("--model", help="model URI: GGUF file, safetensors directory, hf://org/name or smollm2 (the embedded model, default)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        action="extend",
        help="model names accepted in requests (repeatable; the first is reported in responses and metrics)",
    )

    parser.add_argument("--max-model-len", type=int, help="context length in tokens (default: the model's)")
    parser.add_argument("--max-num-seqs", type=int, default=128, help="maximum sequences per step (default 128)")
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=2048, help="token budget per step for prefill chunks and decodes (default 2048)"
    )

    parser.add_argument(
        "--long-prefill-token-threshold",
        type=int,
        default=0,
        help="maximum prompt tokens one sequence computes per step, so decodes keep a short step time (default 0: no cap)",
    )
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default 16)")
    parser.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse KV blocks of identical prompt prefixes (default on)",
    )
    parser.add_argument(
        "--prefix-caching-hash-seed",
        default=os.environ.get("LLMISVC_PREFIX_CACHING_HASH_SEED", ""),
        help="seed string of the chained block hashes; engines that share routing must agree (default empty)",
    )
    parser.add_argument("--num-gpu-blocks-override", type=int, help="number of KV-cache blocks, overriding sizing by memory")
    parser.add_argument(
        "--kv-cache-memory",
        type=parse_size,
        help="KV-cache pool size in bytes (units like 2GiB accepted); default: 10%% of RAM up to 4 GiB on CPU",
    )

    parser.add_argument("--kv-transfer-config", type=_json_object, help="KV-transfer connector settings as JSON (vLLM's KVTransferConfig fields)")
    parser.add_argument(
        "--kv-events-config",
        type=_json_object,
        help='KV-cache event publishing as JSON, e.g. {"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:5557"}',
    )

    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"], help="weight and activation dtype (auto: bfloat16)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler for requests without their own seed (default 0)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")

    parser.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY"), help="require this Bearer key on /v1 endpoints (default: $VLLM_API_KEY)")

    parser.add_argument("--tensor-parallel-size", "-tp", type=_only_one, default=1, help="must be 1 (one device)")
    parser.add_argument("--pipeline-parallel-size", "-pp", type=_only_one, default=1, help="must be 1 (one device)")
    parser.add_argument("--data-parallel-size", "-dp", type=_only_one, default=1, help="must be 1; run replicas instead")

    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Load the model and serve until SIGINT or SIGTERM; return the exit code."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(_serve(args))
    except _StartupError as exc:
        logger.error("%s", exc)
        return 1
    return 0


class _StartupError(Exception):
    """The engine could not start; the message gives the reason."""


async def _serve(args: argparse.Namespace) -> None:
    from llmisvc.engine.server import EngineServer, ServerConfig

    model_uri = args.model or args.model_tag or "smollm2"
    names = args.served_model_name or [model_uri]
    if args.max_num_batched_tokens < args.max_num_seqs:
        # Every running sequence must be able to decode one token in every step.
        raise _StartupError(
            f"--max-num-batched-tokens ({args.max_num_batched_tokens}) must be at least "
            f"--max-num-seqs ({args.max_num_seqs}); raise it or lower --max-num-seqs"
        )
    server = EngineServer(ServerConfig(args.host, args.port, names, model_uri, args.api_key))
    runner = await server.start()

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    engine = connector = None
    try:
        load = loop.run_in_executor(None, _build_engine, args, names, model_uri)
        waiter = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({load, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            logger.info("stopped while loading the model")
            return
        waiter.cancel()
        engine, metrics, connector = load.result()
        if connector is not None:
            connector.start()
        engine.start(loop)
        server.attach(engine, metrics.render)
        logger.info("engine ready: serving %s as %s", model_uri, ", ".join(names))
        await stop.wait()
        logger.info("shutting down")
    finally:
        await runner.cleanup()
        if engine is not None:
            engine.shutdown()
        if connector is not None:
            connector.close()


def _build_engine(args: argparse.Namespace, names: list[str], model_uri: str):
    """Load the runner and build the engine, metrics and connector (runs off the event loop)."""
    import torch

    from llmisvc.engine.kv_events import KVEventsConfig, ZmqEventPublisher, default_topic
    from llmisvc.engine.llm_engine import EngineConfig, LLMEngine
    from llmisvc.engine.metrics import EngineMetrics
    from llmisvc.engine.model_config import ModelLoadError
    from llmisvc.engine.model_runner import ModelRunner

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if args.dtype == "auto" else args.dtype
    try:
        runner = ModelRunner(
            model_uri,
            dtype=dtype,
            device=device,
            block_size=args.block_size,
            num_blocks=args.num_gpu_blocks_override,
            max_model_len=args.max_model_len,
            threads=args.threads,
            kv_cache_memory=args.kv_cache_memory,
        )
    except (ModelLoadError, ValueError) as exc:
        raise _StartupError(f"cannot load model {model_uri}: {exc}") from exc

    try:
        events_config = KVEventsConfig.from_json(args.kv_events_config or {})
    except (TypeError, ValueError) as exc:
        raise _StartupError(f"invalid --kv-events-config: {exc}") from exc
    publisher = None
    if events_config.enabled:
        topic = events_config.topic or default_topic(args.host, args.port, names[0])
        publisher = ZmqEventPublisher(events_config, topic)

    metrics = EngineMetrics(names[0], runner.block_size, runner.num_blocks, args.enable_prefix_caching)
    config = EngineConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        long_prefill_token_threshold=args.long_prefill_token_threshold,
        enable_prefix_caching=args.enable_prefix_caching,
        prefix_caching_hash_seed=args.prefix_caching_hash_seed,
        seed=args.seed,
    )
    engine = LLMEngine(runner, config, metrics, publisher)

    connector = None
    if args.kv_transfer_config:
        from llmisvc.engine.kv_transfer import NixlConnector, TransferConfig

        try:
            transfer_config = TransferConfig.from_json(args.kv_transfer_config)
        except (TypeError, ValueError) as exc:
            raise _StartupError(f"invalid --kv-transfer-config: {exc}") from exc
        connector = NixlConnector(transfer_config, runner, engine.release_held, registry=metrics.registry)
        engine.connector = connector
    return engine, metrics, connector
