"""Prometheus metrics of one engine, under vLLM's names and label `model_name`.

All metrics live in a registry owned by the `EngineMetrics` object, so several engines in one
test process never share state. Histogram buckets are vLLM's (v0.10, `vllm/v1/metrics/loggers.py`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from llmisvc.protocol import metrics as names

TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class EngineMetrics:
    """The engine's gauges, counters and histograms, all labelled with `model_name`.

    The engine thread updates them; `/metrics` renders them with `render()`.
    """

    def __init__(self, model_name: str, block_size: int, num_blocks: int, enable_prefix_caching: bool):
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        label = ["model_name"]
        registry = self.registry

        running = Gauge(names.NUM_REQUESTS_RUNNING, "Requests in model execution batches.", label, registry=registry)
        waiting = Gauge(names.NUM_REQUESTS_WAITING, "Requests waiting to be processed.", label, registry=registry)
        usage = Gauge(names.KV_CACHE_USAGE_PERC, "KV-cache usage, 1 means 100 percent.", label, registry=registry)
        self.running = running.labels(model_name)
        self.waiting = waiting.labels(model_name)
        self.kv_usage = usage.labels(model_name)

        info = Gauge(
            names.CACHE_CONFIG_INFO,
            "Information of the KV-cache configuration.",
            ["model_name", "block_size", "num_gpu_blocks", "enable_prefix_caching"],
            registry=registry,
        )
        info.labels(model_name, str(block_size), str(num_blocks), str(enable_prefix_caching)).set(1)

        def counter(name: str, doc: str):
            return Counter(name, doc, label, registry=registry).labels(model_name)

        def histogram(name: str, doc: str, buckets):
            return Histogram(name, doc, label, buckets=buckets, registry=registry).labels(model_name)

        self.prefix_queries = counter(names.PREFIX_CACHE_QUERIES, "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter(names.PREFIX_CACHE_HITS, "Prompt tokens found in the prefix cache.")
        self.prompt_tokens = counter(names.PROMPT_TOKENS, "Prefill tokens processed.")
        self.generation_tokens = counter(names.GENERATION_TOKENS, "Generation tokens processed.")
        self.preemptions = counter(names.NUM_PREEMPTIONS, "Cumulative number of preemptions.")
        success = Counter(
            names.REQUEST_SUCCESS, "Finished requests by finish reason.", ["model_name", "finished_reason"], registry=registry
        )
        self.request_success = {reason: success.labels(model_name, reason) for reason in ("stop", "length", "abort")}

        self.ttft = histogram(names.TIME_TO_FIRST_TOKEN, "Time to first token in seconds.", TTFT_BUCKETS)
        self.itl = histogram(names.INTER_TOKEN_LATENCY, "Time between output tokens in seconds.", ITL_BUCKETS)
        self.e2e = histogram(names.E2E_REQUEST_LATENCY, "End-to-end request latency in seconds.", REQUEST_LATENCY_BUCKETS)
        self.queue_time = histogram(
            names.REQUEST_QUEUE_TIME, "Time requests spent waiting before first scheduled, in seconds.", REQUEST_LATENCY_BUCKETS
        )
        self.prompt_tokens_per_request = histogram(
            names.REQUEST_PROMPT_TOKENS, "Prompt tokens per request.", TOKEN_COUNT_BUCKETS
        )
        self.generation_tokens_per_request = histogram(
            names.REQUEST_GENERATION_TOKENS, "Generated tokens per request.", TOKEN_COUNT_BUCKETS
        )

    def render(self) -> bytes:
        """Return the metrics in the Prometheus text exposition format."""
        return generate_latest(self.registry)
