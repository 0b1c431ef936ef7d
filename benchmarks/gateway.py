"""Gateway overhead benchmark: llmisvc gateway against vllm-router and sglang-router, one run.

Every proxy sits in front of the same two backend replicas on 127.0.0.1 and is measured
against calling those replicas directly. Scenarios: backend latency 0 and 20 ms (time to
the first byte), concurrency 1 and 32, non-streaming and streaming chat requests of about
1 KB (a 900-character system message and a 64-character user message, echoed back as 16
four-character tokens). Reported per scenario and target: p50/p99 latency, the added p50/p99
versus direct, requests/s, and the proxy's CPU time per request (utime + stime of its
process tree from /proc). Then, for the llmisvc gateway only: 220 KB prompts at concurrency
150, and 1,000 concurrent SSE streams.

Backends:
- `llmisvc sim --echo` replicas (the project's simulator), used for direct and llmisvc runs.
- A minimal echo backend in this file, used for every target in the router comparison:
  both routers add an SGLang field (`no_stop_trim`) to each request, which the simulator
  rejects as unknown, so the ratios come from this backend. It also responds to
  `/get_model_info` with a local directory holding a `tokenizer.json`, so sglang-router
  loads that instead of downloading a tokenizer at start-up.

The routers are installed from PyPI (`vllm-router==0.1.17`, `sglang-router==0.3.2`) into
their own virtual environment outside the repository (`--routers-venv`, created when
missing) and bound to 127.0.0.1. `--no-routers` skips them.

Usage: .venv/bin/python benchmarks/gateway.py [--quick] [--no-routers] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

SYSTEM_TEXT = ("You are a careful assistant. " * 40)[:900]
USER_TEXT = ("Kubernetes schedules pods onto nodes by resources. " * 2)[:64]
MAX_TOKENS = 16


# ---------------------------------------------------------------- minimal echo backend


def serve_mini(ports: list[int], delay_ms: float, model_dir: str, gap_ms: float = 0.0) -> None:
    """Run the minimal echo backend on `ports` until SIGTERM (a subprocess entry point).

    `delay_ms` passes before the first byte; `gap_ms` between streamed events (0 sends a
    stream in one write).
    """
    import httptools
    import uvloop

    try:
        import orjson

        loads, dumps = orjson.loads, orjson.dumps
    except ImportError:  # pragma: no cover - orjson is a gateway dependency
        loads, dumps = json.loads, lambda obj: json.dumps(obj).encode()

    delay = delay_ms / 1000.0
    gap = gap_ms / 1000.0
    engine_metrics = b"vllm:num_requests_running 0.0\nvllm:num_requests_waiting 0.0\nvllm:kv_cache_usage_perc 0.0\n"
    model_info = dumps({"model_path": model_dir, "tokenizer_path": model_dir, "is_generation": True})
    models = dumps({"object": "list", "data": [{"id": model_dir, "object": "model", "owned_by": "bench"}]})

    class Backend(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)
            self.url = b""
            self.body = []

        def data_received(self, data):
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self.transport.close()

        def on_url(self, url):
            self.url += url

        def on_body(self, body):
            self.body.append(body)

        def on_message_complete(self):
            url, self.url = self.url, b""
            body, self.body = b"".join(self.body), []
            asyncio.get_running_loop().create_task(self.answer(url, body))

        def send(self, status, ctype, payload):
            self.transport.write(
                b"HTTP/1.1 %d OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (status, ctype, len(payload), payload)
            )

        async def answer(self, url, body):
            path = url.split(b"?")[0]
            if path in (b"/health", b"/get_server_info", b"/server_info"):
                self.send(200, b"application/json", b"{}")
                return
            if path in (b"/get_model_info", b"/model_info"):
                self.send(200, b"application/json", model_info)
                return
            if path == b"/v1/models":
                self.send(200, b"application/json", models)
                return
            if path == b"/metrics":
                self.send(200, b"text/plain", engine_metrics)
                return
            request = loads(body) if body else {}
            messages = request.get("messages") or [{"content": request.get("prompt", "")}]
            text = messages[-1].get("content") or ""
            limit = request.get("max_tokens") or MAX_TOKENS
            pieces = [text[i : i + 4] for i in range(0, min(len(text), 4 * limit), 4)]
            if delay:
                await asyncio.sleep(delay)
            if request.get("stream"):
                out = [b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"]
                for piece in pieces:
                    event = b"data: " + dumps({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": piece}}]}) + b"\n\n"
                    out.append(b"%x\r\n%s\r\n" % (len(event), event))
                usage = {"prompt_tokens": 300, "completion_tokens": len(pieces), "total_tokens": 300 + len(pieces)}
                tail = b"data: " + dumps({"choices": [], "usage": usage}) + b"\n\ndata: [DONE]\n\n"
                out.append(b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail))
                if not gap:
                    self.transport.write(b"".join(out))
                    return
                for part in out:
                    if self.transport.is_closing():
                        return
                    self.transport.write(part)
                    await asyncio.sleep(gap)
                return
            answer = {
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 300, "completion_tokens": len(pieces), "total_tokens": 300 + len(pieces)},
            }
            self.send(200, b"application/json", dumps(answer))

    async def main():
        loop = asyncio.get_running_loop()
        servers = [await loop.create_server(Backend, "127.0.0.1", port, backlog=4096) for port in ports]
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        for server in servers:
            server.close()

    uvloop.run(main())


# ---------------------------------------------------------------- load generator


class ClientConnection(asyncio.Protocol):
    """One keep-alive client connection; `request(data)` returns (status, TTFB, end) times."""

    def __init__(self):
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.future = None
        self.first_byte = 0.0
        self.closed = asyncio.get_event_loop().create_future()
        self.body_bytes = 0

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if self.first_byte == 0.0:
            self.first_byte = time.perf_counter()
        self.parser.feed_data(data)

    def on_body(self, body):
        self.body_bytes += len(body)

    def on_message_complete(self):
        future, self.future = self.future, None
        if future is not None and not future.done():
            future.set_result((self.parser.get_status_code(), self.first_byte, time.perf_counter(), self.body_bytes))

    def connection_lost(self, exc):
        if self.future is not None and not self.future.done():
            self.future.set_exception(ConnectionError(f"connection lost: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    async def request(self, data: bytes):
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.first_byte = 0.0
        self.body_bytes = 0
        self.future = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.future


def build_request(path: str, model: str, stream: bool, system_text: str = SYSTEM_TEXT) -> bytes:
    """Return a raw HTTP/1.1 chat request."""
    body = {
        "model": model,
        "messages": [{"role": "system", "content": system_text}, {"role": "user", "content": USER_TEXT}],
        "max_tokens": MAX_TOKENS,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
    return head.encode() + data


@dataclass
class RunResult:
    """Latencies (ms) and throughput of one load run."""

    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    ttfb_p50_ms: float
    rps: float
    cpu_us_per_request: float | None = None


async def load(
    ports: list[int], request: bytes, concurrency: int, count: int, warmup: int, cpu_pids: list[int] | None
) -> RunResult:
    """Send `count` requests over `concurrency` keep-alive connections (spread over `ports`)."""
    loop = asyncio.get_running_loop()
    connections = []
    for index in range(concurrency):
        _, connection = await loop.create_connection(ClientConnection, "127.0.0.1", ports[index % len(ports)])
        connections.append(connection)

    async def worker(connection, n, latencies, ttfbs, errors):
        for _ in range(n):
            start = time.perf_counter()
            try:
                status, first, end, _ = await connection.request(request)
            except ConnectionError:
                errors.append(1)
                return
            if status != 200:
                errors.append(status)
                continue
            latencies.append(end - start)
            ttfbs.append(first - start)

    per_warm = max(1, warmup // concurrency)
    await asyncio.gather(*(worker(c, per_warm, [], [], []) for c in connections))

    latencies: list[float] = []
    ttfbs: list[float] = []
    errors: list[int] = []
    per_conn = max(1, count // concurrency)
    cpu_before = process_tree_cpu(cpu_pids) if cpu_pids else None
    started = time.perf_counter()
    await asyncio.gather(*(worker(c, per_conn, latencies, ttfbs, errors) for c in connections))
    elapsed = time.perf_counter() - started
    cpu_after = process_tree_cpu(cpu_pids) if cpu_pids else None
    for connection in connections:
        connection.transport.close()

    done = len(latencies)
    latencies.sort()
    ttfbs.sort()
    result = RunResult(
        requests=done,
        errors=len(errors),
        seconds=elapsed,
        p50_ms=1000 * statistics.median(latencies) if latencies else float("nan"),
        p99_ms=1000 * latencies[min(done - 1, int(done * 0.99))] if latencies else float("nan"),
        ttfb_p50_ms=1000 * statistics.median(ttfbs) if ttfbs else float("nan"),
        rps=done / elapsed if elapsed else 0.0,
    )
    if cpu_before is not None and done:
        result.cpu_us_per_request = (cpu_after - cpu_before) / done * 1e6
    return result


async def concurrent_streams(port: int, request: bytes, count: int) -> tuple[int, int, float]:
    """Open `count` streams at once; return (completed, errors, seconds)."""
    loop = asyncio.get_running_loop()
    started = time.perf_counter()

    async def one():
        _, connection = await loop.create_connection(ClientConnection, "127.0.0.1", port)
        try:
            status, _, _, size = await connection.request(request)
            return status == 200 and size > 0
        finally:
            connection.transport.close()

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    completed = sum(1 for r in results if r is True)
    return completed, count - completed, time.perf_counter() - started


# ---------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int) -> list[int]:
    return [free_port() for _ in range(count)]


def wait_ready(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def process_tree_cpu(pids: list[int]) -> float:
    """Return utime + stime in seconds of `pids` and all their descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    total = 0.0
    stack = list(pids)
    seen = set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        except OSError:
            pass
        stack.extend(children.get(pid, []))
    return total


class Processes:
    """Child processes of the benchmark, stopped in reverse order."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.started: list[subprocess.Popen] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True)
        self.started.append(process)
        return process

    def stop(self, process: subprocess.Popen) -> None:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)

    def stop_all(self) -> None:
        for process in reversed(self.started):
            self.stop(process)


def ensure_router_venv(venv: Path) -> Path:
    """Create `venv` with the two routers from PyPI when missing; return its bin directory."""
    bin_dir = venv / "bin"
    if not (bin_dir / "vllm-router").exists() or not (bin_dir / "sglang-router").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(bin_dir / "pip"), "install", "-q", "vllm-router==0.1.17", "sglang-router==0.3.2"], check=True)
    return bin_dir


# ---------------------------------------------------------------- scenarios


@dataclass
class Target:
    """A proxy (or direct access) to measure: `ports` to send to, `path`, `model`, `pids` for CPU."""

    name: str
    ports: list[int]
    path: str
    model: str
    pids: list[int] = field(default_factory=list)


def print_row(label: str, result: RunResult, direct: RunResult | None) -> None:
    added50 = result.p50_ms - direct.p50_ms if direct else 0.0
    added99 = result.p99_ms - direct.p99_ms if direct else 0.0
    cpu = f"{result.cpu_us_per_request:8.0f}" if result.cpu_us_per_request is not None else "       -"
    print(
        f"{label:44s} p50 {result.p50_ms:7.2f} p99 {result.p99_ms:7.2f} "
        f"+p50 {added50:6.2f} +p99 {added99:6.2f} rps {result.rps:7.0f} cpu/req {cpu} us err {result.errors}",
        flush=True,
    )


def run_matrix(targets: list[Target], backend: str, latency: int, args, results: dict) -> None:
    for stream in (False, True):
        for concurrency in (1, 32):
            count = args.count_c1 if concurrency == 1 else args.count_c32
            if latency:
                # 20 ms per request bounds these runs by time, not CPU, so fewer suffice.
                count = max(100, count // 4)
            direct = None
            for target in targets:
                request = build_request(target.path, target.model, stream)
                result = asyncio.run(load(target.ports, request, concurrency, count, args.warmup, target.pids or None))
                label = f"{backend} lat={latency}ms c={concurrency} {'stream' if stream else 'json'} {target.name}"
                if target.name == "direct":
                    direct = result
                print_row(label, result, direct)
                entry = asdict(result)
                if direct is not None and target.name != "direct":
                    entry["added_p50_ms"] = result.p50_ms - direct.p50_ms
                    entry["added_p99_ms"] = result.p99_ms - direct.p99_ms
                results[label] = entry


def alternate_c1(targets: list[Target], count: int, runs: dict) -> None:
    """Measure concurrency 1 in three alternating rounds per proxy and keep each median.

    At concurrency 1 a proxy's CPU per request and added latency move with whatever else
    the shared machine runs at that moment; alternating the proxies round by round spreads
    that noise evenly over them.
    """
    for stream in (False, True):
        kind = "stream" if stream else "json"
        samples: dict[str, list[RunResult]] = {}
        for _ in range(3):
            for target in targets:
                request = build_request(target.path, target.model, stream)
                result = asyncio.run(load(target.ports, request, 1, count, 64, target.pids or None))
                samples.setdefault(target.name, []).append(result)
        direct_p50 = statistics.median(r.p50_ms for r in samples["direct"])
        for name, results in samples.items():
            p50 = statistics.median(r.p50_ms for r in results)
            cpu = [r.cpu_us_per_request for r in results if r.cpu_us_per_request is not None]
            entry = {"p50_ms": p50, "added_p50_ms": p50 - direct_p50, "cpu_us_per_request": statistics.median(cpu) if cpu else None}
            runs[f"mini lat=0ms c=1 {kind} alternating {name}"] = entry
            cpu_text = f"{entry['cpu_us_per_request']:.0f}" if cpu else "-"
            print(f"alternating c=1 {kind} {name:18s} median p50 {p50:.3f} ms, added {p50 - direct_p50:.3f} ms, cpu/req {cpu_text} us", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--routers-venv", type=Path, default=Path(tempfile.gettempdir()) / "llmisvc-bench-routers")
    parser.add_argument("--no-routers", action="store_true", help="measure only direct and llmisvc")
    parser.add_argument("--quick", action="store_true", help="fewer requests per run")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gateway.json")
    parser.add_argument("--serve-mini", nargs="*", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mini-delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--mini-model-dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--mini-gap-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_mini:
        serve_mini(args.serve_mini, args.mini_delay_ms, args.mini_model_dir, args.mini_gap_ms)
        return 0
    args.count_c1 = 300 if args.quick else 1000
    args.count_c32 = 1600 if args.quick else 6400
    args.warmup = 64

    import uvloop

    uvloop.install()
    work = Path(tempfile.mkdtemp(prefix="llmisvc-bench-gateway-"))
    model_dir = work / "model"
    model_dir.mkdir()
    write_tokenizer(model_dir)
    procs = Processes(work)
    results: dict = {"machine": machine_info(), "runs": {}}
    try:
        run_all(args, work, str(model_dir), procs, results)
    finally:
        procs.stop_all()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"results written to {args.out} (logs in {work})")
    return 0


def write_tokenizer(directory: Path) -> None:
    """Write a small word-level tokenizer.json, so sglang-router has a local tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{chr(ord("a") + i): i + 1 for i in range(26)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8192}))


def machine_info() -> dict:
    return {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(), "python": sys.version.split()[0]}


def start_gateway(procs: Processes, name: str, services: list[dict], work: Path) -> tuple[int, subprocess.Popen]:
    port = free_port()
    config = work / f"{name}.json"
    config.write_text(json.dumps({"services": services}))
    process = procs.start(name, [PYTHON, "-m", "llmisvc.cli.main", "--log-level", "WARNING", "gateway", "--port", str(port), "--config", str(config)])
    wait_ready(f"http://127.0.0.1:{port}/health")
    return port, process


def run_all(args, work: Path, model_dir: str, procs: Processes, results: dict) -> None:
    runs = results["runs"]
    mini = {}
    sims = {}
    for latency in (0, 20):
        ports = free_ports(2)
        procs.start(
            f"mini-{latency}",
            [PYTHON, __file__, "--serve-mini", *map(str, ports), "--mini-delay-ms", str(latency), "--mini-model-dir", model_dir],
        )
        mini[latency] = ports
        sim_port = free_port()
        extra = ["--ttft-overhead-ms", "20"] if latency else []
        procs.start(
            f"sim-{latency}",
            [PYTHON, "-m", "llmisvc.cli.main", "--log-level", "WARNING", "sim", "--port", str(sim_port), "--replicas", "2",
             "--served-model-name", "simecho", "--echo", *extra],
        )
        sims[latency] = [sim_port, sim_port + 1]
    for ports in [*mini.values(), *sims.values()]:
        for port in ports:
            wait_ready(f"http://127.0.0.1:{port}/health")

    services = []
    for latency in (0, 20):
        services.append({"name": f"mini{latency}", "model": f"mini{latency}", "shape": "no-scheduler",
                         "endpoints": [{"address": f"127.0.0.1:{p}"} for p in mini[latency]]})
        services.append({"name": f"sim{latency}", "model": f"sim{latency}", "shape": "no-scheduler",
                         "endpoints": [{"address": f"127.0.0.1:{p}"} for p in sims[latency]]})
    slow_ports = free_ports(2)
    procs.start(
        "mini-streams",
        [PYTHON, __file__, "--serve-mini", *map(str, slow_ports), "--mini-gap-ms", "100", "--mini-model-dir", model_dir],
    )
    for port in slow_ports:
        wait_ready(f"http://127.0.0.1:{port}/health")
    services.append({"name": "streams", "model": "streams", "shape": "no-scheduler",
                     "endpoints": [{"address": f"127.0.0.1:{p}"} for p in slow_ports]})
    silent = SilentBackend()
    services.append({"name": "silent", "model": "silent", "shape": "no-scheduler",
                     "endpoints": [{"address": f"127.0.0.1:{silent.port}"}]})
    gateway_port, gateway = start_gateway(procs, "gateway", services, work)
    # The scheduler shape scrapes engine metrics every 50 ms; its own process keeps that
    # work out of the round-robin gateway's CPU figures.
    sched_services = [
        {"name": f"sched{latency}", "model": f"sched{latency}", "shape": "scheduler",
         "endpoints": [{"address": f"127.0.0.1:{p}"} for p in mini[latency]]}
        for latency in (0, 20)
    ]
    sched_port, sched_gateway = start_gateway(procs, "gateway-scheduler", sched_services, work)

    # The project's simulator behind llmisvc, against the simulator directly.
    for latency in (0, 20):
        targets = [
            Target("direct", sims[latency], "/v1/chat/completions", "simecho"),
            Target("llmisvc", [gateway_port], f"/default/sim{latency}/v1/chat/completions", "simecho", [gateway.pid]),
        ]
        run_matrix(targets, "sim", latency, args, runs)

    # Router comparison on the minimal backend.
    bin_dir = None if args.no_routers else ensure_router_venv(args.routers_venv)
    for latency in (0, 20):
        targets = [
            Target("direct", mini[latency], "/v1/chat/completions", model_dir),
            Target("llmisvc", [gateway_port], f"/default/mini{latency}/v1/chat/completions", model_dir, [gateway.pid]),
            Target("llmisvc-scheduler", [sched_port], f"/default/sched{latency}/v1/chat/completions", model_dir, [sched_gateway.pid]),
        ]
        routers = []
        if bin_dir is not None:
            urls = [f"http://127.0.0.1:{p}" for p in mini[latency]]
            port, metrics_port = free_port(), free_port()
            vllm = procs.start(f"vllm-router-{latency}", [str(bin_dir / "vllm-router"), "--host", "127.0.0.1", "--port", str(port),
                               "--worker-urls", *urls, "--policy", "round_robin", "--log-level", "warning",
                               "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)])
            wait_ready(f"http://127.0.0.1:{port}/health")
            targets.append(Target("vllm-router", [port], "/v1/chat/completions", model_dir, [vllm.pid]))
            port, metrics_port = free_port(), free_port()
            sglang = procs.start(f"sglang-router-{latency}", [str(bin_dir / "sglang-router"), "launch", "--host", "127.0.0.1",
                                 "--port", str(port), "--worker-urls", *urls, "--policy", "round_robin", "--log-level", "warn",
                                 "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)])
            wait_ready(f"http://127.0.0.1:{port}/health")
            targets.append(Target("sglang-router", [port], "/v1/chat/completions", model_dir, [sglang.pid]))
            routers = [vllm, sglang]
        run_matrix(targets, "mini", latency, args, runs)
        if latency == 0 and routers:
            alternate_c1(targets, args.count_c1, runs)
        for router in routers:
            procs.stop(router)

    # 220 KB prompts at concurrency 150, zero-delay backend.
    big = ("x" * 63 + " ") * (220 * 1024 // 64)
    for name, ports, path in (
        ("direct", mini[0], "/v1/chat/completions"),
        ("llmisvc", [gateway_port], "/default/mini0/v1/chat/completions"),
    ):
        request = build_request(path, model_dir, False, system_text=big)
        result = asyncio.run(load(ports, request, 150, 600 if args.quick else 1500, 150, [gateway.pid] if name == "llmisvc" else None))
        label = f"mini lat=0ms c=150 220KB json {name}"
        print_row(label, result, runs.get("mini lat=0ms c=150 220KB json direct") and RunResult(**runs["mini lat=0ms c=150 220KB json direct"]))
        runs[label] = asdict(result)
    runs["mini lat=0ms c=150 220KB json llmisvc"]["added_p50_ms"] = (
        runs["mini lat=0ms c=150 220KB json llmisvc"]["p50_ms"] - runs["mini lat=0ms c=150 220KB json direct"]["p50_ms"]
    )

    # Client gone before the first token: time from the client's close to the upstream close.
    delays = asyncio.run(cancel_delays(gateway_port, silent, 20))
    print(f"upstream closed after client disconnect: p50 {statistics.median(delays):.2f} ms, "
          f"max {max(delays):.2f} ms (20 streaming requests with 100,000-character prompts)", flush=True)
    runs["cancel-before-first-token"] = {"p50_ms": statistics.median(delays), "max_ms": max(delays), "samples": len(delays)}
    silent.stop()

    # 1,000 concurrent SSE streams through one gateway: 18 events 100 ms apart, so the
    # streams overlap; the in-flight gauge is sampled while they run.
    request = build_request("/default/streams/v1/chat/completions", model_dir, True)
    completed, errors, seconds, peak = asyncio.run(streams_with_peak(gateway_port, request, 1000))
    print(f"1000 concurrent SSE streams through llmisvc: completed {completed}, errors {errors}, "
          f"peak in flight {peak:.0f}, {seconds:.2f} s", flush=True)
    runs["sse-1000"] = {"completed": completed, "errors": errors, "seconds": seconds, "peak_in_flight": peak}


class SilentBackend:
    """A backend in a thread that reads requests, never responds, and records when peers close."""

    def __init__(self):
        import threading

        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self.received: list[float] = []
        self.closed: list[float] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import threading

        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock):
        data = b""
        while True:
            try:
                chunk = sock.recv(1 << 20)
            except OSError:
                chunk = b""
            if not chunk:
                self.closed.append(time.perf_counter())
                sock.close()
                return
            data += chunk
            if b"GET /health" in data:
                sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                data = b""
            elif b"\r\n\r\n" in data and len(data) > 100_000:
                self.received.append(time.perf_counter())
                data = b""

    def stop(self):
        self._listener.close()


async def cancel_delays(port: int, backend: SilentBackend, count: int) -> list[float]:
    """Return, per request, ms from the client's close to the gateway closing the upstream."""
    body = json.dumps({"model": "silent", "prompt": "a" * 100_000, "stream": True}).encode()
    request = b"POST /v1/completions HTTP/1.1\r\nhost: bench\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    delays = []
    for _ in range(count):
        received, closed = len(backend.received), len(backend.closed)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        while len(backend.received) == received:
            await asyncio.sleep(0.001)
        client_closed = time.perf_counter()
        writer.transport.abort()
        while len(backend.closed) == closed:
            await asyncio.sleep(0.001)
        delays.append(1000 * (backend.closed[-1] - client_closed))
    return delays


async def streams_with_peak(port: int, request: bytes, count: int) -> tuple[int, int, float, float]:
    """Run `concurrent_streams` while sampling the gateway's in-flight gauge; return its peak too."""
    loop = asyncio.get_running_loop()
    peak = 0.0
    done = asyncio.Event()

    def sample() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("llmisvc_gateway_requests_in_flight{")
        )

    async def sampler():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, await loop.run_in_executor(None, sample))
            await asyncio.sleep(0.2)

    task = loop.create_task(sampler())
    completed, errors, seconds = await concurrent_streams(port, request, count)
    done.set()
    await task
    return completed, errors, seconds, peak


if __name__ == "__main__":
    sys.exit(main())
