"""Metric names the engines export, in vLLM's spelling so existing dashboards work."""

NUM_REQUESTS_RUNNING = "vllm:num_requests_running"
NUM_REQUESTS_WAITING = "vllm:num_requests_waiting"
KV_CACHE_USAGE_PERC = "vllm:kv_cache_usage_perc"
CACHE_CONFIG_INFO = "vllm:cache_config_info"
PREFIX_CACHE_QUERIES = "vllm:prefix_cache_queries"
PREFIX_CACHE_HITS = "vllm:prefix_cache_hits"
PROMPT_TOKENS = "vllm:prompt_tokens"
GENERATION_TOKENS = "vllm:generation_tokens"
TIME_TO_FIRST_TOKEN = "vllm:time_to_first_token_seconds"
INTER_TOKEN_LATENCY = "vllm:inter_token_latency_seconds"
E2E_REQUEST_LATENCY = "vllm:e2e_request_latency_seconds"
REQUEST_QUEUE_TIME = "vllm:request_queue_time_seconds"
NUM_PREEMPTIONS = "vllm:num_preemptions"
REQUEST_SUCCESS = "vllm:request_success"
REQUEST_PROMPT_TOKENS = "vllm:request_prompt_tokens"
REQUEST_GENERATION_TOKENS = "vllm:request_generation_tokens"

# Counters above are exposed with the Prometheus `_total` suffix
# (prometheus_client appends it), e.g. `vllm:prefix_cache_hits_total`.

# KV-block transfer between prefill and decode engines (engine side). These are llmisvc's
# own names with the gateway's `llmisvc_` prefix, because vLLM's NixlConnector statistics
# have no stable Prometheus spelling to follow.
KV_TRANSFER_BYTES = "llmisvc_kv_transfer_bytes"
KV_TRANSFER_BLOCKS = "llmisvc_kv_transfer_blocks"
KV_TRANSFER_DURATION = "llmisvc_kv_transfer_duration_seconds"
KV_TRANSFER_FAILURES = "llmisvc_kv_transfer_failures"
KV_TRANSFER_HELD_BLOCKS = "llmisvc_kv_transfer_held_blocks"
KV_TRANSFER_LEASE_EXPIRED = "llmisvc_kv_transfer_lease_expired"

# Prefill/decode orchestration (gateway and sidecar side).
PD_DECISIONS = "llmisvc_pd_decisions"
PD_FALLBACKS = "llmisvc_pd_fallbacks"
PD_PREFILL_DURATION = "llmisvc_pd_prefill_duration_seconds"
