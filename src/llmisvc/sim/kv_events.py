"""KV cache events of the simulated engine, published on ZMQ in vLLM's msgpack layout.

Each message is three frames: topic (`kv@<host:port>@<model>` unless configured), an
8-byte big-endian sequence number, and a msgpack payload `[timestamp, events, dp_rank]`.
Events are arrays whose first element is the type name, as vLLM's tagged encoding writes
them: `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id,
medium]`, `["BlockRemoved", block_hashes, medium]`, `["AllBlocksCleared"]`.
Configured with vLLM's `--kv-events-config` JSON (`enable_kv_cache_events`, `publisher`,
`endpoint`, `topic`).
"""

from __future__ import annotations

import json
import logging
import struct
import time
from dataclasses import dataclass
from typing import Any

import msgpack

logger = logging.getLogger(__name__)

_SEQ = struct.Struct(">Q")


@dataclass(frozen=True)
class KVEventsConfig:
    """Parsed `--kv-events-config`: whether to publish, and where."""

    enabled: bool = False
    endpoint: str = "tcp://*:5557"
    topic: str = ""

    @classmethod
    def parse(cls, text: str | None) -> "KVEventsConfig":
        """Parse vLLM's JSON form; raise ValueError naming the bad key."""
        if not text:
            return cls()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--kv-events-config is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError("--kv-events-config must be a JSON object")
        publisher = data.get("publisher", "zmq")
        if publisher not in ("zmq", "null"):
            raise ValueError(f"--kv-events-config: publisher must be 'zmq' or 'null', got {publisher!r}")
        enabled = bool(data.get("enable_kv_cache_events", False)) and publisher == "zmq"
        return cls(enabled=enabled, endpoint=str(data.get("endpoint", cls.endpoint)), topic=str(data.get("topic", "")))

    def with_port_offset(self, offset: int) -> "KVEventsConfig":
        """Return this config with the endpoint's port raised by `offset` (one port per replica)."""
        if offset == 0 or not self.enabled:
            return self
        head, _, port = self.endpoint.rpartition(":")
        return KVEventsConfig(self.enabled, f"{head}:{int(port) + offset}", self.topic)


class KVEventPublisher:
    """Publishes block events on a ZMQ PUB socket; events are batched until `flush()`."""

    def __init__(self, config: KVEventsConfig, topic: str, block_size: int):
        import zmq

        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.SNDHWM, 100_000)
        self._socket.setsockopt(zmq.LINGER, 0)
        # As vLLM does: wildcard addresses are bound, others connected to (a scheduler that binds).
        if "*" in config.endpoint or "::" in config.endpoint:
            self._socket.bind(config.endpoint)
        else:
            self._socket.connect(config.endpoint)
        self.endpoint = config.endpoint
        self.topic = (config.topic or topic).encode()
        self._block_size = block_size
        self._pending: list[list[Any]] = []
        self._seq = 0
        logger.info("publishing KV events on %s topic %s", config.endpoint, self.topic.decode())

    def block_stored(self, hashes: list[int], parent: int | None, token_ids: list[int]) -> None:
        """Queue a BlockStored event for `hashes` (token ids of those blocks, in order)."""
        self._pending.append(["BlockStored", hashes, parent, token_ids, self._block_size, None, "GPU"])

    def block_removed(self, hashes: list[int]) -> None:
        """Queue a BlockRemoved event."""
        self._pending.append(["BlockRemoved", hashes, "GPU"])

    def all_cleared(self) -> None:
        """Queue an AllBlocksCleared event."""
        self._pending.append(["AllBlocksCleared"])

    def flush(self) -> None:
        """Send queued events as one batch (no-op when none are queued)."""
        if not self._pending:
            return
        payload = msgpack.packb([time.time(), self._pending, None], use_bin_type=True)
        self._pending = []
        self._socket.send_multipart([self.topic, _SEQ.pack(self._seq), payload], copy=False)
        self._seq += 1

    def close(self) -> None:
        """Flush and close the socket."""
        self.flush()
        self._socket.close(0)
