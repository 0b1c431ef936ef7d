"""Prefill/decode disaggregation benchmark: output identity, transfer bandwidth, latency.

Three measurements, each side by side in one run:

1. identity: greedy outputs of N prompts (log-uniform 20 to 2,000 tokens, float32,
   `ignore_eos`, fixed output length) through the gateway's prefill/decode path (a prefill
   engine, a decode engine and KV transfer) against an aggregated engine. Every output
   must be token-identical (compared token by token, as the `logprobs.tokens` strings).
2. bandwidth: KV blocks of the embedded model's layout (30 layers, 3 KV heads, head dim
   64, float32, 16-token blocks: 737,280 bytes a block) pulled from a connector in another
   process, for each available transport, as a ratio to an in-process memcpy
   (`torch.Tensor.copy_`) of the same bytes. Both the read alone (for shared memory: the
   copy into the KV pool) and the whole pull (side-channel calls, read, import into the KV
   pool) are reported.
3. latency: TTFT and inter-token latency of a mixed load (long prompts with short outputs,
   short prompts with long outputs) through the gateway, for prefill/decode (1 prefill + 1
   decode engine) against the scheduler shape over 2 aggregated engines.

Prints a table and writes `benchmarks/results/pd.json`. Run:
`.venv/bin/python benchmarks/pd.py [--prompts 50] [--skip-identity] [--skip-latency]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support import free_port, start, stop, wait_http  # noqa: E402

MODEL = "smol"
URI = "hf://HuggingFaceTB/SmolLM2-135M-Instruct"
WORDS = (
    "river mountain quiet number silver garden engine violet harbor lantern copper meadow thunder "
    "pencil orchard window marble falcon winter canvas ribbon desert anchor velvet signal cedar "
    "puzzle comet basket meteor lemon saddle tunnel feather island maple rocket glacier"
).split()


# ------------------------------------------------------------------------------ processes


def engine_args(port: int, transfer: bool, blocks: int) -> list[str]:
    args = [
        "engine", "--model", URI, "--host", "127.0.0.1", "--port", str(port), "--served-model-name", MODEL,
        "--dtype", "float32", "--threads", "1", "--num-gpu-blocks-override", str(blocks), "--max-model-len", "4096",
    ]
    if transfer:
        args += ["--kv-transfer-config", json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both",
                                                     "kv_buffer_size": 400_000_000})]
    return args


class Cluster:
    """Engines and a gateway serving service `pd` (shape pd) and `agg` (shape scheduler)."""

    def __init__(self, logs: Path, aggregated_replicas: int, blocks: int):
        self.logs = logs
        self.ports = {"prefill": free_port(), "decode": free_port(), "gateway": free_port()}
        for index in range(aggregated_replicas):
            self.ports[f"agg{index}"] = free_port()
        self.processes: list[subprocess.Popen] = []
        for name, port in self.ports.items():
            if name == "gateway":
                continue
            args = engine_args(port, transfer=name in ("prefill", "decode"), blocks=blocks)
            self.processes.append(start(args, logs / f"{name}.log"))
        config = {
            "services": [
                {"namespace": "default", "name": "pd", "model": MODEL, "shape": "pd", "endpoints": [
                    {"address": f"127.0.0.1:{self.ports['prefill']}", "role": "prefill"},
                    {"address": f"127.0.0.1:{self.ports['decode']}", "role": "decode"},
                ]},
                {"namespace": "default", "name": "agg", "model": MODEL, "shape": "scheduler", "endpoints": [
                    {"address": f"127.0.0.1:{port}", "role": "both"}
                    for name, port in self.ports.items() if name.startswith("agg")
                ]},
            ]
        }
        (logs / "gateway.json").write_text(json.dumps(config))
        self.processes.append(start(
            ["gateway", "--host", "127.0.0.1", "--port", str(self.ports["gateway"]), "--config",
             str(logs / "gateway.json"), "--health-interval", "0.5"],
            logs / "gateway.log",
        ))
        for name, port in self.ports.items():
            wait_http(f"http://127.0.0.1:{port}/health", timeout=600)
        self.gateway = f"http://127.0.0.1:{self.ports['gateway']}"

    def url(self, service: str) -> str:
        return f"{self.gateway}/default/{service}/v1/completions"

    def stop(self) -> None:
        for process in self.processes:
            stop(process)


def prompt_of(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def wait_service(session: aiohttp.ClientSession, url: str) -> None:
    """Wait until the gateway's probes mark the service's endpoints ready."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        async with session.post(url, json={"model": MODEL, "prompt": "warm up", "max_tokens": 1}) as response:
            await response.read()
            if response.status == 200:
                return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"{url} not ready")


# ------------------------------------------------------------------------------ identity


async def completion_tokens(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> tuple[list[str], int]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    async with session.post(url, json=body) as response:
        data = await response.json()
        if response.status != 200:
            raise RuntimeError(f"{url}: {response.status} {data}")
    return data["choices"][0]["logprobs"]["tokens"], data["usage"]["prompt_tokens"]


async def run_identity(cluster: Cluster, prompts: int, max_tokens: int) -> dict:
    rng = random.Random(7)
    lengths = sorted(int(math.exp(rng.uniform(math.log(20), math.log(2000)))) for _ in range(prompts))
    results = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await wait_service(session, cluster.url("pd"))
        await wait_service(session, cluster.url("agg"))
        for index, words in enumerate(lengths):
            prompt = prompt_of(1000 + index, words)
            split, prompt_tokens = await completion_tokens(session, cluster.url("pd"), prompt, max_tokens)
            reference, _ = await completion_tokens(session, cluster.url("agg"), prompt, max_tokens)
            results.append({"prompt_tokens": prompt_tokens, "identical": split == reference})
            print(f"  identity {index + 1}/{prompts}: {prompt_tokens} prompt tokens, identical={split == reference}", flush=True)
    transferred = scrape(f"http://127.0.0.1:{cluster.ports['decode']}/metrics", "llmisvc_kv_transfer_blocks_total")
    return {
        "prompts": prompts,
        "identical": sum(r["identical"] for r in results),
        "prompt_tokens_min": min(r["prompt_tokens"] for r in results),
        "prompt_tokens_max": max(r["prompt_tokens"] for r in results),
        "blocks_transferred": transferred,
        "max_tokens": max_tokens,
    }


def scrape(url: str, name: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


# ------------------------------------------------------------------------------ bandwidth


def _layout(num_blocks: int):
    import torch

    from llmisvc.engine.kv_cache import KVCache, KVLayout

    layout = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64)
    return KVCache(layout, 16, num_blocks, torch.float32, torch.device("cpu"))


def _prefill_side(transport: str, num_blocks: int, commands, replies) -> None:
    """Child process: hold blocks on request and reply with kv_transfer_params."""
    import torch

    from llmisvc.engine.kv_transfer import NixlConnector, TransferConfig

    cache = _layout(num_blocks)
    cache.pool.copy_(torch.randn(cache.pool.shape))
    config = TransferConfig(transport=transport, kv_buffer_size=300_000_000)
    connector = NixlConnector(config, cache, lambda request_id: None)
    connector.start()
    replies.put(connector.transport)
    while True:
        command = commands.get()
        if command is None:
            break
        request_id, blocks = command
        replies.put(connector.hold(request_id, blocks, len(blocks) * 16))
    connector.close()


def run_bandwidth(transport: str, blocks: int, repeats: int) -> dict:
    import torch

    from llmisvc.engine.kv_transfer import NixlConnector, TransferConfig
    from llmisvc.protocol.kv_transfer import KVTransferParams

    context = multiprocessing.get_context("spawn")
    commands, replies = context.Queue(), context.Queue()
    child = context.Process(target=_prefill_side, args=(transport, 2 * blocks, commands, replies), daemon=True)
    child.start()
    replies.get(timeout=120)  # the child's transport, sent once it serves
    cache = _layout(2 * blocks)
    connector = NixlConnector(TransferConfig(transport=transport, kv_buffer_size=300_000_000), cache, lambda request_id: None)
    connector.start()
    # Each pull is paired with a memcpy of the same bytes right after it, so a load change
    # on a shared machine moves both sides of a ratio together.
    source = target = None
    wire, total, copies = [], [], []
    try:
        for attempt in range(repeats + 1):
            commands.put((f"bench-{attempt}", list(range(blocks))))
            params = KVTransferParams.from_json(replies.get(timeout=60))
            asyncio.run(connector.pull(params, list(range(blocks, 2 * blocks)), 0))
            timing = connector.last_pull
            if source is None:
                source = torch.randn(timing.nbytes // 4)
                target = torch.empty_like(source)
            started = time.perf_counter()
            target.copy_(source)
            copy_seconds = time.perf_counter() - started
            if attempt > 0:  # the first pull also pays connection and NIXL agent setup
                wire.append(timing.wire_seconds)
                total.append(timing.total_seconds)
                copies.append(copy_seconds)
        nbytes = timing.nbytes
    finally:
        commands.put(None)
        child.join(30)
        connector.close()

    memcpy = statistics.median(copies)
    return {
        "transport": timing.transport,
        "bytes": nbytes,
        "memcpy_gbps": nbytes / memcpy / 1e9,
        "wire_gbps": nbytes / statistics.median(wire) / 1e9,
        "pull_gbps": nbytes / statistics.median(total) / 1e9,
        "wire_ratio": statistics.median(c / w for c, w in zip(copies, wire)),
        "pull_ratio": statistics.median(c / t for c, t in zip(copies, total)),
    }


# ------------------------------------------------------------------------------ latency


async def stream_one(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> tuple[float, list[float]]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    started = time.perf_counter()
    first: float | None = None
    gaps: list[float] = []
    last = started
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{url}: {response.status} {await response.text()}")
        buffer = b""
        async for chunk in response.content.iter_any():
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if not event.startswith(b"data: {"):
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now - started
                else:
                    gaps.append(now - last)
                last = now
    return first or 0.0, gaps


async def run_latency(cluster: Cluster, service: str, requests_per_class: int, concurrency: int) -> dict:
    rng = random.Random(11)
    jobs = [("long", prompt_of(5000 + i, 1500), 8) for i in range(requests_per_class)]
    jobs += [("decode", prompt_of(6000 + i, 40), 96) for i in range(requests_per_class)]
    rng.shuffle(jobs)
    stats: dict[str, dict[str, list[float]]] = {"long": {"ttft": [], "itl": []}, "decode": {"ttft": [], "itl": []}}
    semaphore = asyncio.Semaphore(concurrency)
    url = cluster.url(service)

    async def one(kind: str, prompt: str, max_tokens: int) -> None:
        async with semaphore:
            ttft, gaps = await stream_one(session, url, prompt, max_tokens)
        stats[kind]["ttft"].append(ttft)
        stats[kind]["itl"].extend(gaps)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1200)) as session:
        await wait_service(session, url)
        started = time.perf_counter()
        await asyncio.gather(*(one(kind, prompt, tokens) for kind, prompt, tokens in jobs))
        elapsed = time.perf_counter() - started

    def summary(values: list[float]) -> dict:
        values = sorted(values)
        return {"median_ms": statistics.median(values) * 1000, "p90_ms": values[int(0.9 * (len(values) - 1))] * 1000}

    return {
        "service": service,
        "elapsed_s": elapsed,
        **{f"{kind}_{metric}": summary(values) for kind, data in stats.items() for metric, values in data.items()},
    }


# ------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=50, help="prompts in the identity check (default 50)")
    parser.add_argument("--max-tokens", type=int, default=16, help="output tokens per identity prompt (default 16)")
    parser.add_argument("--blocks", type=int, default=125, help="KV blocks per bandwidth pull (default 125, 2,000 tokens)")
    parser.add_argument("--repeats", type=int, default=10, help="pulls per transport (default 10)")
    parser.add_argument("--latency-requests", type=int, default=12, help="requests per class in the mixed load (default 12)")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent requests in the mixed load (default 4)")
    parser.add_argument("--skip-identity", action="store_true")
    parser.add_argument("--skip-bandwidth", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()

    from llmisvc.engine.kv_transfer import import_nixl

    results: dict = {"machine": {"cpus": os.cpu_count()}}
    if not args.skip_bandwidth:
        # `auto` between two processes on one host runs the shared-memory path.
        transports = ["auto", "tcp"] + (["nixl"] if import_nixl() is not None else [])
        results["bandwidth"] = [run_bandwidth(t, args.blocks, args.repeats) for t in transports]
        for row in results["bandwidth"]:
            print(
                f"bandwidth {row['transport']:>4}: {row['bytes'] / 1e6:.1f} MB, memcpy {row['memcpy_gbps']:.2f} GB/s, "
                f"wire {row['wire_gbps']:.2f} GB/s (ratio {row['wire_ratio']:.2f}), "
                f"whole pull {row['pull_gbps']:.2f} GB/s (ratio {row['pull_ratio']:.2f})",
                flush=True,
            )

    if not (args.skip_identity and args.skip_latency):
        with tempfile.TemporaryDirectory(prefix="llmisvc-pd-bench-") as logs:
            cluster = Cluster(Path(logs), aggregated_replicas=2, blocks=900)
            try:
                if not args.skip_identity:
                    results["identity"] = asyncio.run(run_identity(cluster, args.prompts, args.max_tokens))
                    identity = results["identity"]
                    print(
                        f"identity: {identity['identical']}/{identity['prompts']} token-identical "
                        f"({identity['prompt_tokens_min']}-{identity['prompt_tokens_max']} prompt tokens, "
                        f"{identity['blocks_transferred']:.0f} blocks transferred)",
                        flush=True,
                    )
                if not args.skip_latency:
                    results["latency"] = [
                        asyncio.run(run_latency(cluster, service, args.latency_requests, args.concurrency))
                        for service in ("pd", "agg")
                    ]
                    for row in results["latency"]:
                        print(
                            f"latency {row['service']:>3}: long TTFT median {row['long_ttft']['median_ms']:.0f} ms "
                            f"p90 {row['long_ttft']['p90_ms']:.0f} ms; decode TTFT median "
                            f"{row['decode_ttft']['median_ms']:.0f} ms; decode ITL median {row['decode_itl']['median_ms']:.1f} ms "
                            f"p90 {row['decode_itl']['p90_ms']:.1f} ms; elapsed {row['elapsed_s']:.1f} s",
                            flush=True,
                        )
            finally:
                cluster.stop()

    # Sections skipped in this run keep their earlier results, so the parts can be rerun alone.
    out = REPO / "benchmarks" / "results" / "pd.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {}
    out.write_text(json.dumps({**previous, **results}, indent=2))
    print(f"wrote {out}")
    identity = results.get("identity")
    return 0 if identity is None or identity["identical"] == identity["prompts"] else 1


if __name__ == "__main__":
    sys.exit(main())
