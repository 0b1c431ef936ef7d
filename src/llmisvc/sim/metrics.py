"""Prometheus text for the simulated engine's metrics, under vLLM's names.

Rendered by hand instead of with prometheus_client, because one process may host dozens
of simulated replicas scraped every 50 ms. Formatting a few lines is far cheaper than a
registry walk, and the output is the same exposition format.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from llmisvc.protocol import metrics as names

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)


class Histogram:
    """A cumulative histogram with fixed upper bounds (seconds)."""

    def __init__(self, name: str, buckets: Sequence[float]):
        self.name = name
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Add one observation."""
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def render(self, labels: str) -> list[str]:
        """Return the exposition lines, `labels` being `key="value",...` without braces."""
        lines = [f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip(self.buckets, self.counts):
            cumulative += count
            lines.append(f'{self.name}_bucket{{{labels},le="{bound}"}} {cumulative}')
        lines.append(f'{self.name}_bucket{{{labels},le="+Inf"}} {self.count}')
        lines.append(f"{self.name}_sum{{{labels}}} {self.total}")
        lines.append(f"{self.name}_count{{{labels}}} {self.count}")
        return lines


class EngineMetrics:
    """Counters and histograms of one simulated replica."""

    def __init__(self, model_name: str):
        self.labels = f'model_name="{model_name}",engine="0"'
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.transferred_tokens = 0
        self.requests_success = 0
        self.failures_injected = 0
        self.ttft = Histogram(names.TIME_TO_FIRST_TOKEN, TTFT_BUCKETS)
        self.itl = Histogram(names.INTER_TOKEN_LATENCY, ITL_BUCKETS)
        self.e2e = Histogram(names.E2E_REQUEST_LATENCY, E2E_BUCKETS)
        self.queue = Histogram(names.REQUEST_QUEUE_TIME, E2E_BUCKETS)

    def render(self, running: int, waiting: int, usage: float, block_size: int, num_blocks: int) -> str:
        """Return the whole /metrics body."""
        labels = self.labels
        lines = [
            f"# TYPE {names.NUM_REQUESTS_RUNNING} gauge",
            f"{names.NUM_REQUESTS_RUNNING}{{{labels}}} {running}",
            f"# TYPE {names.NUM_REQUESTS_WAITING} gauge",
            f"{names.NUM_REQUESTS_WAITING}{{{labels}}} {waiting}",
            f"# TYPE {names.KV_CACHE_USAGE_PERC} gauge",
            f"{names.KV_CACHE_USAGE_PERC}{{{labels}}} {usage}",
            f"# TYPE {names.CACHE_CONFIG_INFO} gauge",
            f'{names.CACHE_CONFIG_INFO}{{block_size="{block_size}",enable_prefix_caching="True",'
            f'engine="0",num_gpu_blocks="{num_blocks}"}} 1.0',
            f"# TYPE {names.PREFIX_CACHE_QUERIES}_total counter",
            f"{names.PREFIX_CACHE_QUERIES}_total{{{labels}}} {self.prefix_queries}",
            f"# TYPE {names.PREFIX_CACHE_HITS}_total counter",
            f"{names.PREFIX_CACHE_HITS}_total{{{labels}}} {self.prefix_hits}",
            f"# TYPE {names.PROMPT_TOKENS}_total counter",
            f"{names.PROMPT_TOKENS}_total{{{labels}}} {self.prompt_tokens}",
            f"# TYPE {names.GENERATION_TOKENS}_total counter",
            f"{names.GENERATION_TOKENS}_total{{{labels}}} {self.generation_tokens}",
            "# TYPE sim:kv_transfer_tokens_total counter",
            f"sim:kv_transfer_tokens_total{{{labels}}} {self.transferred_tokens}",
            "# TYPE sim:failures_injected_total counter",
            f"sim:failures_injected_total{{{labels}}} {self.failures_injected}",
        ]
        for histogram in (self.ttft, self.itl, self.e2e, self.queue):
            lines.extend(histogram.render(labels))
        return "\n".join(lines) + "\n"
