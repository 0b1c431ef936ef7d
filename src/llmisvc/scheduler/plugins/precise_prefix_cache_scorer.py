"""`precise-prefix-cache-scorer`: score by blocks engines report as cached (KV events).

Parameters:
- `kvEventsConfig` (map, default {zmqEndpoint: "tcp://*:5557", topicFilter: "kv@"}):
  `zmqEndpoint` is one ZMQ address or a list; addresses with `*` are bound (engines
  connect to the scheduler), others connected to (engines that bind).
- `indexerConfig` (map, default {}): `tokenProcessorConfig.blockSize` and
  `tokenProcessorConfig.hashSeed` override the two parameters below, as llm-d nests them.
- `blockSize` (int, default 16): the engines' KV block size in tokens.
- `hashSeed` (string, default ""): the engines' `--prefix-caching-hash-seed`.
- `tokenizer` (string, default "sim"): "sim" for the simulator's 4-characters-per-token
  tokenizer, or a path to a Hugging Face `tokenizer.json` for real engines.
Formula: matched leading blocks / total full blocks of the tokenized prompt, with block
hashes computed by `llmisvc.protocol.block_hash` exactly as engines compute them.
A block-size or hash-seed mismatch with an engine is logged and counted in
`scheduler_kv_events_mismatch_total`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from llmisvc.protocol.block_hash import hash_blocks
from llmisvc.protocol.prompt_text import sim_token_ids
from llmisvc.scheduler.datastore import Endpoint
from llmisvc.scheduler.framework import CycleState, LifecycleHooks, Plugin
from llmisvc.scheduler.kv_event_index import KVEventIndex, KVEventSubscriber
from llmisvc.scheduler.registry import Param, positive

STATE_KEY = "precise-prefix-cache"


def _check_events_config(value: Mapping) -> str | None:
    for key in value:
        if key not in ("zmqEndpoint", "topicFilter", "concurrency"):
            return f"has unknown field {key!r} (known: zmqEndpoint, topicFilter, concurrency)"
    endpoint = value.get("zmqEndpoint", "tcp://*:5557")
    endpoints = endpoint if isinstance(endpoint, list) else [endpoint]
    if not endpoints or not all(isinstance(e, str) and e.startswith(("tcp://", "ipc://", "inproc://")) for e in endpoints):
        return f"zmqEndpoint must be a ZMQ address or a list of them, got {endpoint!r}"
    return None


def _check_indexer_config(value: Mapping) -> str | None:
    for key in value:
        if key not in ("tokenProcessorConfig", "kvBlockIndexConfig", "tokenizersPoolConfig"):
            return f"has unknown field {key!r}"
    processor = value.get("tokenProcessorConfig", {})
    if not isinstance(processor, Mapping):
        return "tokenProcessorConfig must be a mapping"
    if "blockSize" in processor and (not isinstance(processor["blockSize"], int) or processor["blockSize"] <= 0):
        return f"tokenProcessorConfig.blockSize must be a positive integer, got {processor['blockSize']!r}"
    if "hashSeed" in processor and not isinstance(processor["hashSeed"], str):
        return "tokenProcessorConfig.hashSeed must be a string"
    return None


def _check_tokenizer(value: str) -> str | None:
    if value == "sim" or os.path.isfile(value):
        return None
    return f"must be 'sim' or the path of a tokenizer.json file; {value!r} is not a file"


class PrecisePrefixCacheScorer(Plugin, LifecycleHooks):
    """Scores by the fraction of the prompt's blocks an engine reported as cached."""

    type_name = "precise-prefix-cache-scorer"
    kind = "scorer"
    PARAMETERS = (
        Param("kvEventsConfig", (dict,), {"zmqEndpoint": "tcp://*:5557", "topicFilter": "kv@"}, _check_events_config),
        Param("indexerConfig", (dict,), {}, _check_indexer_config),
        Param("blockSize", (int,), 16, positive),
        Param("hashSeed", (str,), ""),
        Param("tokenizer", (str,), "sim", _check_tokenizer),
    )

    def __init__(self, name: str, parameters: dict, context) -> None:
        super().__init__(name)
        processor = parameters["indexerConfig"].get("tokenProcessorConfig", {})
        self.block_size = processor.get("blockSize", parameters["blockSize"])
        self.hash_seed = processor.get("hashSeed", parameters["hashSeed"])
        self._tokenize = _tokenizer(parameters["tokenizer"])
        mismatch = context.metrics.kv_event_mismatch
        service = context.service
        self.index = KVEventIndex(self.block_size, self.hash_seed, lambda address, reason, detail: mismatch.labels(service, name, reason).inc())
        events = parameters["kvEventsConfig"]
        endpoint = events.get("zmqEndpoint", "tcp://*:5557")
        self._subscriber = KVEventSubscriber(self.index, endpoint if isinstance(endpoint, list) else [endpoint], events.get("topicFilter", "kv@"))
        context.datastore.add_removal_listener(self.on_endpoint_removed)

    def start(self) -> None:
        self._subscriber.start()

    def close(self) -> None:
        self._subscriber.close()

    def score(self, state: CycleState, endpoints: Sequence[Endpoint]) -> dict[str, float]:
        tokens = self._tokenize(state.prompt_text)
        hashes = hash_blocks(tokens, self.block_size, self.hash_seed)
        counts = self.index.match(hashes) if hashes else {}
        state.values[STATE_KEY] = (len(tokens), counts, self.block_size)
        if not hashes:
            return {e.address: 0.0 for e in endpoints}
        return {e.address: counts.get(e.address, 0) / len(hashes) for e in endpoints}

    def on_endpoint_removed(self, address: str) -> None:
        self.index.remove_endpoint(address)


def _tokenizer(spec: str):
    if spec == "sim":
        return sim_token_ids
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(spec)
    return lambda text: tokenizer.encode(text, add_special_tokens=False).ids
