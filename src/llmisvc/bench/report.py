"""Result JSON of `llmisvc bench serve`, with vLLM's benchmark key names.

Keys as vLLM's `benchmark_serving` writes them: `duration`, `completed`,
`total_input_tokens`, `total_output_tokens`, `request_throughput`, `output_throughput`,
`total_token_throughput`, per-request arrays `input_lens`, `output_lens`, `ttfts`,
`itls`, `generated_texts`, `errors`, and for each of ttft, tpot, itl and e2el the
`mean_`, `median_`, `std_` and `p<N>_` values in milliseconds. Added by llmisvc:
`cache_hit_rate` (cached / prompt tokens from `usage.prompt_tokens_details`),
`cached_tokens` and `endpoints` per request, `requests_per_endpoint` (from the
gateway's `x-llmisvc-endpoint` header), `start_times` (seconds from the first request).
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence

import numpy as np

from llmisvc.bench.client import RequestOutcome


def summarize(outcomes: Sequence[RequestOutcome], duration: float, percentiles: Sequence[float] = (50, 90, 99)) -> dict:
    """Return the result dict for `outcomes` of a run that took `duration` seconds."""
    done = [o for o in outcomes if o.success]
    first_start = min((o.start for o in outcomes), default=0.0)
    ttfts = [o.ttft for o in done]
    tpots = [(o.latency - o.ttft) / (o.output_tokens - 1) for o in done if o.output_tokens > 1]
    itls = [gap for o in done for gap in o.itl]
    e2els = [o.latency for o in done]
    prompt_tokens = sum(o.prompt_tokens for o in done)
    output_tokens = sum(o.output_tokens for o in done)
    cached = sum(o.cached_tokens for o in done)

    result = {
        "duration": duration,
        "completed": len(done),
        "failed": len(outcomes) - len(done),
        "total_input_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration if duration else 0.0,
        "output_throughput": output_tokens / duration if duration else 0.0,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration if duration else 0.0,
        "cache_hit_rate": cached / prompt_tokens if prompt_tokens else 0.0,
        "requests_per_endpoint": dict(Counter(o.endpoint or "unknown" for o in done)),
    }
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        ms = [v * 1000 for v in values]
        result[f"mean_{name}_ms"] = statistics.fmean(ms) if ms else 0.0
        result[f"median_{name}_ms"] = statistics.median(ms) if ms else 0.0
        result[f"std_{name}_ms"] = statistics.pstdev(ms) if ms else 0.0
        for p in percentiles:
            key = f"p{int(p) if float(p).is_integer() else p}_{name}_ms"
            result[key] = float(np.percentile(ms, p)) if ms else 0.0
    result.update(
        input_lens=[o.prompt_tokens for o in outcomes],
        output_lens=[o.output_tokens for o in outcomes],
        ttfts=[o.ttft for o in outcomes],
        itls=[o.itl for o in outcomes],
        start_times=[o.start - first_start for o in outcomes],
        cached_tokens=[o.cached_tokens for o in outcomes],
        endpoints=[o.endpoint for o in outcomes],
        generated_texts=[o.text for o in outcomes],
        errors=[o.error for o in outcomes],
    )
    return result


def format_summary(result: dict) -> str:
    """Return the human-readable summary table printed after a run."""
    lines = [
        f"{'Successful requests:':<40}{result['completed']:>12}",
        f"{'Failed requests:':<40}{result['failed']:>12}",
        f"{'Benchmark duration (s):':<40}{result['duration']:>12.2f}",
        f"{'Request throughput (req/s):':<40}{result['request_throughput']:>12.2f}",
        f"{'Output token throughput (tok/s):':<40}{result['output_throughput']:>12.2f}",
        f"{'Prefix cache hit rate:':<40}{result['cache_hit_rate']:>12.3f}",
    ]
    for name, label in (("ttft", "Time to first token"), ("tpot", "Time per output token"), ("itl", "Inter-token latency"), ("e2el", "End-to-end latency")):
        lines.append(f"---{label} (ms)---")
        for key in (f"mean_{name}_ms", f"median_{name}_ms", *[k for k in result if k.startswith("p") and k.endswith(f"_{name}_ms")]):
            lines.append(f"{key + ':':<40}{result[key]:>12.2f}")
    lines.append("---Requests per endpoint---")
    for endpoint, count in sorted(result["requests_per_endpoint"].items()):
        lines.append(f"{endpoint + ':':<40}{count:>12}")
    return "\n".join(lines)


def plot(result: dict, directory) -> list[str]:
    """Write PNG charts (TTFT histogram, TTFT over time, requests per endpoint); return their paths.

    Needs matplotlib (`pip install llmisvc[bench]`); raises ImportError with that hint otherwise.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install 'llmisvc[bench]'") from exc

    directory.mkdir(parents=True, exist_ok=True)
    ok = [i for i, error in enumerate(result["errors"]) if not error]
    ttft_ms = [result["ttfts"][i] * 1000 for i in ok]
    paths = []

    figure, axes = plt.subplots(figsize=(7, 4))
    axes.hist(ttft_ms, bins=50)
    axes.set_xlabel("time to first token (ms)")
    axes.set_ylabel("requests")
    paths.append(_save(figure, directory / "ttft_histogram.png"))

    figure, axes = plt.subplots(figsize=(7, 4))
    axes.scatter([result["start_times"][i] for i in ok], ttft_ms, s=4)
    axes.set_xlabel("request start (s)")
    axes.set_ylabel("time to first token (ms)")
    paths.append(_save(figure, directory / "ttft_over_time.png"))

    figure, axes = plt.subplots(figsize=(7, 4))
    endpoints = sorted(result["requests_per_endpoint"])
    axes.bar(range(len(endpoints)), [result["requests_per_endpoint"][e] for e in endpoints])
    axes.set_xticks(range(len(endpoints)), endpoints, rotation=45, ha="right", fontsize=7)
    axes.set_ylabel("requests")
    paths.append(_save(figure, directory / "requests_per_endpoint.png"))
    plt.close("all")
    return paths


def _save(figure, path) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return str(path)
