"""Routing benchmark: scheduling policies over 8 simulated replicas, in virtual time.

The scheduler runs in-process with its real plugins, datastore and metrics parser. The
replicas are the simulator's engine core (`llmisvc.sim.engine.SimEngine`, the code behind
`llmisvc sim`), driven on an event loop whose clock jumps to the next timer instead of
sleeping. Timing is therefore exact and repeatable on a shared machine, and the results
measure the policies, not the host. Metrics reach the datastore through its scrape loop
every 50 ms of virtual time, rendered and parsed as over HTTP; KV events go straight to
the precise scorer's index. HTTP is left out here; `llmisvc bench serve` against a
gateway measures the same workloads end to end.

Two real-time measurements complete the picture: the scheduling decision latency with
64 endpoints and 8 KB prompts, and the CPU cost of scraping 64 real `llmisvc sim`
replicas over HTTP every 50 ms.

    python benchmarks/routing.py            # full run, about two minutes
    python benchmarks/routing.py --quick    # smaller workload for a smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmisvc.protocol.block_hash import hash_blocks
from llmisvc.protocol.prompt_text import sim_token_ids
from llmisvc.scheduler import DEFAULT_CONFIG, Datastore, EndpointSpec, Scheduler, SchedulingRequest
from llmisvc.scheduler.framework import SchedulingResult
from llmisvc.sim.engine import SimConfig, SimEngine, SimRequest
from llmisvc.sim.latency import LatencyModel

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "sim"

# Replica model: prefill costs 0.1 ms per token, an estimate for an 8B model on one
# H100. Decoding costs 10 ms per output token at batch 1, rising to 30 ms at 32 sequences.
# The KV cache has 2,048 blocks of 16 tokens, room for about 14 of the 32 system prompts.
# A policy that scatters groups over every replica therefore thrashes the cache, while
# one that keeps groups together fits them all.
LATENCY = LatencyModel(ttft_overhead=0.02, prefill_per_token=0.0001, itl=0.01, itl_max_factor=3.0)
MAX_NUM_SEQS = 32
NUM_GPU_BLOCKS = 2048
REPLICAS = 8


# ---------------------------------------------------------------- virtual time


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps to the next scheduled timer when nothing is ready."""

    def __init__(self) -> None:
        super().__init__()
        self._now = 0.0

    def time(self) -> float:
        return self._now

    def _run_once(self) -> None:
        # asyncio keeps ready callbacks in `_ready` and timers in the heap `_scheduled`.
        # With nothing ready, moving the clock to the earliest timer makes the selector's
        # timeout zero, so the loop never sleeps.
        if not self._ready and self._scheduled:
            when = self._scheduled[0]._when
            if when > self._now:
                self._now = when
        super()._run_once()


# ---------------------------------------------------------------- workloads


@dataclass
class Job:
    """One request of a workload: arrival time (s), prompt text and output length."""

    arrival: float
    prompt: str
    max_tokens: int
    group: int


def _text(rng: random.Random, tokens: int) -> str:
    # Four characters per simulator token; distinct words keep texts from sharing prefixes.
    return "".join(f"{rng.randrange(16**3):03x} " for _ in range(tokens))


def shared_prefix_jobs(rate: float, groups: int, per_group: int, system_tokens: int, question_tokens: int, output_tokens: int, seed: int) -> list[Job]:
    """Return Poisson arrivals at `rate` req/s of `groups` x `per_group` prompts sharing per-group system prompts."""
    rng = random.Random(seed)
    systems = [_text(rng, system_tokens) for _ in range(groups)]
    order = [(g, i) for g in range(groups) for i in range(per_group)]
    rng.shuffle(order)
    jobs, now = [], 0.0
    for group, _ in order:
        now += rng.expovariate(rate)
        jobs.append(Job(now, systems[group] + _text(rng, question_tokens), output_tokens, group))
    return jobs


def no_reuse_jobs(rate: float, count: int, prompt_tokens: int, output_tokens: int, seed: int) -> list[Job]:
    """Return Poisson arrivals of unrelated prompts (the control without any prefix reuse)."""
    rng = random.Random(seed)
    jobs, now = [], 0.0
    for index in range(count):
        now += rng.expovariate(rate)
        jobs.append(Job(now, _text(rng, prompt_tokens), output_tokens, index))
    return jobs


def capacity(prompt_tokens: int) -> float:
    """Return the cluster's request rate without prefix reuse (req/s): prefill-bound replicas."""
    return REPLICAS / LATENCY.prefill_time(prompt_tokens)


# ---------------------------------------------------------------- policies


def _single(plugins: list[dict], refs: list[dict]) -> dict:
    return {"plugins": plugins, "schedulingProfiles": [{"name": "default", "plugins": refs}]}


POLICY_CONFIGS = {
    "random": _single([{"type": "random-picker"}], [{"pluginRef": "random-picker"}]),
    "load-only": _single([{"type": "load-aware-scorer"}], [{"pluginRef": "load-aware-scorer"}]),
    "prefix-only": _single([{"type": "prefix-cache-scorer"}], [{"pluginRef": "prefix-cache-scorer"}]),
    "default": DEFAULT_CONFIG,
    "precise": _single(
        [
            {"type": "utilization-detector"},
            {"type": "precise-prefix-cache-scorer", "parameters": {"kvEventsConfig": {"zmqEndpoint": "inproc://routing-bench"}}},
            {"type": "load-aware-scorer"},
        ],
        [
            {"pluginRef": "utilization-detector"},
            {"pluginRef": "precise-prefix-cache-scorer", "weight": 2},
            {"pluginRef": "load-aware-scorer", "weight": 1},
        ],
    ),
}
POLICIES = ["round-robin", "random", "load-only", "prefix-only", "default", "precise", "oracle"]


class OraclePolicy:
    """Reads every replica's true cache and load at pick time and minimises estimated TTFT.

    Estimated TTFT = wait for the replica's prefill lane + wait for a batch slot (one
    average request time per sequence beyond max_num_seqs) + prefill of the prompt
    tokens that replica really has uncached.
    """

    def __init__(self, engines: dict[str, SimEngine], datastore: Datastore):
        self.engines = engines
        self.datastore = datastore

    def schedule(self, request: SchedulingRequest) -> SchedulingResult:
        loop = asyncio.get_running_loop()
        tokens = sim_token_ids(request.prompt_text or "")
        best, best_cost = None, float("inf")
        for address, engine in self.engines.items():
            hashes = engine.prompt_hashes(tokens)
            cached = min(engine.cache.match_prefix(hashes), (len(tokens) - 1) // engine.config.block_size) * engine.config.block_size
            lane = max(engine._prefill_free_at - loop.time(), 0.0)
            overflow = max(engine.running + engine.waiting + 1 - engine.config.max_num_seqs, 0)
            slot_wait = overflow * 128 * LATENCY.itl * LATENCY.itl_max_factor / engine.config.max_num_seqs
            cost = lane + slot_wait + LATENCY.prefill_time(len(tokens) - cached)
            if cost < best_cost:
                best, best_cost = address, cost
        return SchedulingResult(target=self.datastore.get(best), primary_profile="oracle")

    def request_finished(self, address: str, request_id: str = "") -> None:
        pass

    def close(self) -> None:
        pass


class _IndexPublisher:
    """Feeds a replica's KV events straight into the precise scorer's index."""

    def __init__(self, address: str, index) -> None:
        self.address = address
        self.index = index

    def block_stored(self, hashes, parent, token_ids) -> None:
        self.index.apply_event(self.address, ["BlockStored", hashes, parent, token_ids, 16, None, "GPU"])

    def block_removed(self, hashes) -> None:
        self.index.apply_event(self.address, ["BlockRemoved", hashes, "GPU"])

    def flush(self) -> None:
        pass


# ---------------------------------------------------------------- one run


@dataclass
class RequestRecord:
    """Timing of one finished request, in seconds of virtual time."""

    arrival: float
    ttft: float
    e2e: float
    output_tokens: int
    itls: list[float] = field(default_factory=list)
    endpoint: str = ""
    cached_tokens: int = 0
    prompt_tokens: int = 0


async def run_policy(policy: str, jobs: list[Job], seed: int) -> dict:
    """Serve `jobs` with `policy` on fresh replicas and return the measurements."""
    loop = asyncio.get_running_loop()
    addresses = [f"10.0.0.{i}:8000" for i in range(REPLICAS)]
    engines: dict[str, SimEngine] = {}

    async def fetch(address: str) -> str:
        return engines[address].render_metrics()

    datastore = Datastore(scrape_interval=0.05, clock=loop.time, fetcher=fetch)
    datastore.set_endpoints([EndpointSpec(address) for address in addresses])
    if policy == "round-robin":
        scheduler = Scheduler.from_config(None, shape="no-scheduler", datastore=datastore, model_name=MODEL)
    elif policy == "oracle":
        scheduler = None
    else:
        scheduler = Scheduler.from_config(POLICY_CONFIGS[policy], datastore=datastore, model_name=MODEL, seed=seed)
    index = scheduler.plugins["precise-prefix-cache-scorer"].index if policy == "precise" else None

    for i, address in enumerate(addresses):
        config = SimConfig(
            served_model_names=(MODEL,), max_num_seqs=MAX_NUM_SEQS, num_gpu_blocks=NUM_GPU_BLOCKS,
            latency=LATENCY, seed=seed + i, max_model_len=16384,
        )
        engines[address] = SimEngine(config, _IndexPublisher(address, index) if index is not None else None)
    if scheduler is None:
        scheduler = OraclePolicy(engines, datastore)

    scrape_task = loop.create_task(datastore.run())
    records: list[RequestRecord] = []
    decision_times: list[float] = []

    async def serve(job: Job, number: int) -> None:
        await asyncio.sleep(max(job.arrival - loop.time(), 0))
        started = time.perf_counter()
        result = scheduler.schedule(SchedulingRequest(str(number), MODEL, prompt_text=job.prompt))
        decision_times.append(time.perf_counter() - started)
        address = result.target.address
        datastore.request_started(address)
        engine = engines[address]
        request = SimRequest(str(number), sim_token_ids(job.prompt), job.max_tokens)
        arrival = loop.time()
        times = []
        async for _ in engine.generate(request):
            times.append(loop.time())
        datastore.request_finished(address)
        scheduler.request_finished(address, str(number))
        records.append(
            RequestRecord(
                arrival=arrival, ttft=times[0] - arrival, e2e=times[-1] - arrival, output_tokens=len(times),
                itls=[b - a for a, b in zip(times, times[1:])], endpoint=address,
                cached_tokens=request.cached_tokens, prompt_tokens=len(request.token_ids),
            )
        )

    await asyncio.gather(*(serve(job, n) for n, job in enumerate(jobs)))
    scrape_task.cancel()
    await asyncio.gather(scrape_task, return_exceptions=True)
    scheduler.close()

    hits = sum(engine.metrics.prefix_hits for engine in engines.values())
    queries = sum(engine.metrics.prefix_queries for engine in engines.values())
    return summarize(policy, records, hits / queries if queries else 0.0, decision_times)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(int(q / 100 * len(ordered)), len(ordered) - 1)]


def summarize(policy: str, records: list[RequestRecord], hit_rate: float, decisions: list[float]) -> dict:
    """Return the result row of one run: latency percentiles (ms), throughput, hit rate, spread."""
    records.sort(key=lambda r: r.arrival)
    ttfts = [r.ttft * 1000 for r in records]
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) * 1000 for r in records if r.output_tokens > 1]
    e2els = [r.e2e * 1000 for r in records]
    start = records[0].arrival
    end = max(r.arrival + r.e2e for r in records)
    third = len(records) // 3
    first_p99 = _pct([r.ttft for r in records[:third]], 99)
    last_p99 = _pct([r.ttft for r in records[-third:]], 99)
    per_endpoint: dict[str, int] = {}
    for record in records:
        per_endpoint[record.endpoint] = per_endpoint.get(record.endpoint, 0) + 1
    row = {"policy": policy, "completed": len(records)}
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("e2el", e2els)):
        for q in (50, 90, 99):
            row[f"p{q}_{name}_ms"] = round(_pct(values, q), 1)
    row.update(
        request_throughput=round(len(records) / (end - start), 3),
        output_throughput=round(sum(r.output_tokens for r in records) / (end - start), 1),
        engine_cache_hit_rate=round(hit_rate, 4),
        ttft_p99_last_over_first_third=round(last_p99 / first_p99, 2) if first_p99 else None,
        requests_per_replica=[per_endpoint.get(f"10.0.0.{i}:8000", 0) for i in range(REPLICAS)],
        decision_p99_us=round(_pct(decisions, 99) * 1e6, 1),
    )
    return row


def run_workload(policies: list[str], make_jobs, seed: int) -> list[dict]:
    """Run every policy on the same jobs, each on a fresh virtual-time loop."""
    rows = []
    for policy in policies:
        loop = VirtualTimeLoop()
        try:
            rows.append(loop.run_until_complete(run_policy(policy, make_jobs(), seed)))
        finally:
            loop.close()
    return rows


# ---------------------------------------------------------------- real-time measurements


def decision_latency(endpoints: int = 64, prompt_chars: int = 8192, requests: int = 3000, seed: int = 0, passes: int = 3) -> dict:
    """Return p50/p99 scheduling decision times (µs) of the default profile, in real time.

    The same request sequence runs `passes` times on fresh schedulers. On a shared,
    oversubscribed host the OS deschedules the process for milliseconds at a time, which
    sets the single-pass tail. Taking each request's fastest pass removes those stalls,
    because a stall rarely hits the same request in every pass. The `min_of_passes`
    figures are therefore the decision's own cost.
    """
    rng = random.Random(seed)
    prefixes = [_text(rng, prompt_chars // 8) for _ in range(128)]
    prompts = [(rng.choice(prefixes) + _text(rng, prompt_chars // 4))[:prompt_chars] for _ in range(requests)]
    runs = []
    for _ in range(passes):
        datastore = Datastore()
        datastore.set_endpoints([EndpointSpec(f"10.1.{i // 250}.{i % 250}:8000") for i in range(endpoints)])
        for endpoint in datastore.all_endpoints():
            datastore.update_metrics(
                endpoint.address,
                f'vllm:num_requests_waiting{{}} 1\nvllm:kv_cache_usage_perc{{}} 0.3\nvllm:cache_config_info{{block_size="16",num_gpu_blocks="{NUM_GPU_BLOCKS * 8}"}} 1\n',
            )
        scheduler = Scheduler.from_config(None, datastore=datastore, model_name=MODEL, seed=seed)
        times = []
        for number, prompt in enumerate(prompts):
            started = time.perf_counter()
            scheduler.schedule(SchedulingRequest(str(number), MODEL, prompt_text=prompt))
            times.append(time.perf_counter() - started)
        runs.append(times[requests // 10 :])  # skip warm-up while the index fills
    fastest = [min(values) for values in zip(*runs)]
    return {
        "endpoints": endpoints,
        "prompt_bytes": prompt_chars,
        "passes": passes,
        "p50_us": round(_pct(runs[0], 50) * 1e6, 1),
        "p99_us": round(_pct(runs[0], 99) * 1e6, 1),
        "min_of_passes_p50_us": round(_pct(fastest, 50) * 1e6, 1),
        "min_of_passes_p99_us": round(_pct(fastest, 99) * 1e6, 1),
    }


def scrape_cost(replicas: int = 64, interval: float = 0.05, seconds: float = 10.0) -> dict:
    """Return the CPU share of one core spent scraping `replicas` real sims every `interval` s."""
    import urllib.request

    base = _free_port_block(replicas)
    process = subprocess.Popen(
        [sys.executable, "-m", "llmisvc.cli.main", "--log-level", "WARNING", "sim", "--port", str(base), "--replicas", str(replicas), "--echo"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        for port in range(base, base + replicas):
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"simulated replicas exited with {process.returncode}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("simulated replicas did not start") from None
                    time.sleep(0.2)

        async def measure() -> dict:
            datastore = Datastore(scrape_interval=interval)
            datastore.set_endpoints([EndpointSpec(f"127.0.0.1:{base + i}") for i in range(replicas)])
            task = asyncio.get_running_loop().create_task(datastore.run())
            await asyncio.sleep(1.0)  # connect and warm up
            cpu0, wall0, sim0 = time.process_time(), time.perf_counter(), _process_cpu(process.pid)
            await asyncio.sleep(seconds)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            sim_cpu = _process_cpu(process.pid) - sim0
            ages = [datastore.metrics_age(e) for e in datastore.all_endpoints()]
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return {"replicas": replicas, "interval_ms": interval * 1000, "cpu_percent_of_one_core": round(100 * cpu / wall, 1), "max_metrics_age_ms": round(max(ages) * 1000, 1),
                    "sim_process_cpu_percent_of_one_core": round(100 * sim_cpu / wall, 1)}

        try:
            import uvloop

            return uvloop.run(measure())
        except ImportError:
            return asyncio.run(measure())
    finally:
        process.terminate()
        process.wait(10)


def _process_cpu(pid: int) -> float:
    """Return the CPU seconds (user + system) process `pid` has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape_cost_in_subprocess(timeout: float = 300.0) -> dict:
    """Run `scrape_cost` in a fresh interpreter and return its result.

    A fresh process keeps the CPU measurement free of the memory and threads left by the
    virtual-time runs.
    """
    completed = subprocess.run(
        [sys.executable, __file__, "--scrape-only"], capture_output=True, text=True, timeout=timeout
    )
    if completed.returncode != 0:
        raise RuntimeError(f"scrape measurement failed: {completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _free_port_block(count: int) -> int:
    import socket

    rng = random.Random(os.getpid())
    for _ in range(100):
        base = rng.randrange(20000, 60000 - count)
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sock.bind(("127.0.0.1", port))
                sockets.append(sock)
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no block of {count} free ports found")


# ---------------------------------------------------------------- main


def _table(title: str, rows: list[dict]) -> str:
    columns = ["policy", "p50_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p99_tpot_ms", "p50_e2el_ms", "p99_e2el_ms",
               "request_throughput", "engine_cache_hit_rate", "ttft_p99_last_over_first_third", "requests_per_replica"]
    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 groups x 8 prompts and no real-time scrape measurement")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset of " + ", ".join(POLICIES))
    parser.add_argument("--skip-scrape", action="store_true", help="skip the 64-replica scrape cost measurement")
    parser.add_argument("--scrape-only", action="store_true", help="only measure the scrape cost and print it as JSON")
    args = parser.parse_args()
    if args.scrape_only:
        print(json.dumps(scrape_cost()))
        return 0

    policies = args.policies.split(",")
    groups, per_group = (8, 8) if args.quick else (32, 16)
    system_tokens, question_tokens, output_tokens = 2000, 128, 128
    cap = capacity(system_tokens + question_tokens)
    report: dict = {"replicas": REPLICAS, "capacity_req_per_s": round(cap, 2), "latency_model": LATENCY.__dict__,
                    "max_num_seqs": MAX_NUM_SEQS, "num_gpu_blocks": NUM_GPU_BLOCKS, "workloads": {}}
    print(f"capacity without prefix reuse: {cap:.1f} req/s over {REPLICAS} replicas")

    for label, load in (("shared-prefix 50%", 0.5), ("shared-prefix 120%", 1.2)):
        rows = run_workload(policies, lambda: shared_prefix_jobs(cap * load, groups, per_group, system_tokens, question_tokens, output_tokens, args.seed), args.seed)
        report["workloads"][label] = rows
        print(_table(label, rows), end="\n\n", flush=True)

    control_policies = [p for p in ("round-robin", "default") if p in policies]
    rows = run_workload(control_policies, lambda: no_reuse_jobs(cap * 0.5, groups * per_group, system_tokens + question_tokens, output_tokens, args.seed), args.seed)
    report["workloads"]["no-reuse 50%"] = rows
    print(_table("no-reuse 50%", rows), end="\n\n")

    report["decision_latency"] = decision_latency()
    print("scheduling decision, 64 endpoints, 8 KB prompts:", report["decision_latency"])
    if not args.quick and not args.skip_scrape:
        report["scrape_cost"] = scrape_cost_in_subprocess()
        print("metrics scraping, 64 real sim replicas:", report["scrape_cost"])

    report["targets"] = check_targets(report)
    for name, verdict in report["targets"].items():
        print(f"{name}: {verdict}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("routing-quick.json" if args.quick else "routing.json")
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


def check_targets(report: dict) -> dict:
    """Return each target's measured value and whether it is met."""
    def row(workload: str, policy: str) -> dict | None:
        return next((r for r in report["workloads"].get(workload, []) if r["policy"] == policy), None)

    verdicts = {}
    rr, default = row("shared-prefix 50%", "round-robin"), row("shared-prefix 50%", "default")
    if rr and default:
        ratio = default["p50_ttft_ms"] / rr["p50_ttft_ms"]
        verdicts["default TTFT p50 / round robin at 50%"] = f"{ratio:.2f} (target <= 0.5): {'met' if ratio <= 0.5 else 'MISSED'}"
    overload = row("shared-prefix 120%", "default")
    if overload:
        ratio = overload["ttft_p99_last_over_first_third"]
        verdicts["default TTFT p99 last/first third at 120%"] = f"{ratio} (collapse above 3): {'met' if ratio is not None and ratio <= 3 else 'MISSED'}"
    oracle = row("shared-prefix 50%", "oracle")
    if default and oracle:
        ratio = default["engine_cache_hit_rate"] / oracle["engine_cache_hit_rate"]
        verdicts["default hit rate / oracle at 50%"] = f"{ratio:.3f} (target >= 0.95): {'met' if ratio >= 0.95 else 'MISSED'}"
    rr_c, default_c = row("no-reuse 50%", "round-robin"), row("no-reuse 50%", "default")
    if rr_c and default_c:
        thr = default_c["request_throughput"] / rr_c["request_throughput"] - 1
        ttft = default_c["p50_ttft_ms"] / rr_c["p50_ttft_ms"] - 1
        met = abs(thr) <= 0.05 and abs(ttft) <= 0.05
        verdicts["no-reuse default vs round robin"] = f"throughput {thr:+.1%}, TTFT p50 {ttft:+.1%} (target within 5%): {'met' if met else 'MISSED'}"
    decision = report.get("decision_latency")
    if decision:
        met = decision["min_of_passes_p99_us"] <= 1000
        verdicts["decision p99, 64 endpoints, 8 KB"] = (
            f"{decision['min_of_passes_p99_us']} us fastest of {decision['passes']} passes, {decision['p99_us']} us single pass "
            f"(target <= 1000 us): {'met' if met else 'MISSED'}"
        )
    scrape = report.get("scrape_cost")
    if scrape:
        verdicts["scrape CPU, 64 endpoints every 50 ms"] = f"{scrape['cpu_percent_of_one_core']}% (target <= 10%): {'met' if scrape['cpu_percent_of_one_core'] <= 10 else 'MISSED'}"
    return verdicts


if __name__ == "__main__":
    sys.exit(main())
