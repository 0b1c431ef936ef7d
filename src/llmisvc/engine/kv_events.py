"""KV-cache events and their ZMQ publisher, in vLLM's wire layout.

The block pool records `BlockStored`, `BlockRemoved` and `AllBlocksCleared` events; once per
engine step the engine publishes them as one batch. Each ZMQ message has three frames:
`[topic, sequence number (8 bytes, big-endian), msgpack payload]`. The payload is an
array-encoded `KVEventBatch` as vLLM 0.10 sends it with msgspec `array_like=True`
(`vllm/distributed/kv_events.py`):

    [ts, [event, ...], data_parallel_rank]
    event = ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium]
          | ["BlockRemoved", block_hashes, medium]
          | ["AllBlocksCleared"]

Block hashes are the unsigned 64-bit chained hashes of `llmisvc.protocol.block_hash`. The
default topic is `kv@<host:port>@<model>`, so a subscriber can tell replicas apart.

NOTE: newer vLLM releases encode batches as msgpack maps and add fields (lora_name,
extra_keys, group_idx); subscribers that read vLLM itself must accept both layouts.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import msgpack

logger = logging.getLogger(__name__)

MEDIUM = "CPU"


@dataclass(frozen=True)
class BlockStored:
    """Consecutive full blocks entered the prefix cache; `token_ids` covers all of them."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = MEDIUM

    def to_wire(self) -> list[Any]:
        """Return the array form used on the wire."""
        return [
            "BlockStored",
            self.block_hashes,
            self.parent_block_hash,
            self.token_ids,
            self.block_size,
            self.lora_id,
            self.medium,
        ]


@dataclass(frozen=True)
class BlockRemoved:
    """Blocks left the prefix cache (evicted for reuse)."""

    block_hashes: list[int]
    medium: str | None = MEDIUM

    def to_wire(self) -> list[Any]:
        """Return the array form used on the wire."""
        return ["BlockRemoved", self.block_hashes, self.medium]


@dataclass(frozen=True)
class AllBlocksCleared:
    """The whole prefix cache was reset."""

    def to_wire(self) -> list[Any]:
        """Return the array form used on the wire."""
        return ["AllBlocksCleared"]


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


def encode_batch(events: list[KVEvent], ts: float | None = None, data_parallel_rank: int = 0) -> bytes:
    """Return the msgpack payload of one `KVEventBatch`."""
    stamp = time.time() if ts is None else ts
    return msgpack.packb([stamp, [event.to_wire() for event in events], data_parallel_rank], use_bin_type=True)


def decode_batch(payload: bytes) -> tuple[float, list[list[Any]], int | None]:
    """Decode a payload from `encode_batch` into (ts, events in wire form, data_parallel_rank)."""
    batch = msgpack.unpackb(payload, raw=False)
    ts, events = batch[0], batch[1]
    rank = batch[2] if len(batch) > 2 else None
    return ts, events, rank


@dataclass
class KVEventsConfig:
    """The engine's `--kv-events-config` JSON, with vLLM's field names and defaults.

    `endpoint` binds when it contains `*` (or is ipc/inproc) and connects otherwise, as vLLM
    does. `replay_endpoint` (a ROUTER socket) serves missed batches: a client sends the first
    sequence number it wants as 8 big-endian bytes and receives `[seq, payload]` frames, then
    `[-1, b""]`.
    """

    enable_kv_cache_events: bool = False
    publisher: str = "null"
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "KVEventsConfig":
        """Build from the decoded JSON; raise ValueError naming an unknown field or publisher."""
        known = set(cls.__dataclass_fields__)
        for key in data:
            if key not in known:
                raise ValueError(f"unknown kv-events-config field {key!r}; known: {sorted(known)}")
        config = cls(**data)
        if config.publisher not in ("null", "zmq"):
            raise ValueError(f"kv-events-config publisher must be 'zmq' or 'null', got {config.publisher!r}")
        return config

    @property
    def enabled(self) -> bool:
        """True when events are both enabled and sent somewhere."""
        return self.enable_kv_cache_events and self.publisher == "zmq"


class ZmqEventPublisher:
    """Publish event batches on a ZMQ PUB socket from a dedicated thread.

    `publish()` only enqueues, so the engine step never waits on the network. Batches beyond
    `max_queue_size` are dropped with a warning rather than blocking the engine; the last
    `buffer_steps` batches are kept for replay.
    """

    _END_SEQ = (-1).to_bytes(8, "big", signed=True)

    def __init__(self, config: KVEventsConfig, topic: str):
        import zmq

        self._zmq = zmq
        self._config = config
        self._topic = topic.encode("utf-8")
        self._queue: queue.Queue[list[KVEvent] | None] = queue.Queue(maxsize=config.max_queue_size)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._next_seq = 0
        self._dropped = 0

        self._context = zmq.Context()
        self._pub = self._context.socket(zmq.PUB)
        self._pub.set_hwm(config.hwm)
        if _binds(config.endpoint):
            self._pub.bind(config.endpoint)
        else:
            self._pub.connect(config.endpoint)
        self._replay = None
        if config.replay_endpoint:
            self._replay = self._context.socket(zmq.ROUTER)
            self._replay.bind(config.replay_endpoint)

        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()
        logger.info("publishing KV events on %s with topic %r", config.endpoint, topic)

    def publish(self, events: list[KVEvent]) -> None:
        """Queue one batch for sending; empty batches are skipped."""
        if not events:
            return
        try:
            self._queue.put_nowait(events)
        except queue.Full:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                logger.warning("KV event queue full; dropped %d batches so far", self._dropped)

    def close(self) -> None:
        """Send what is queued (up to one second), then close the sockets."""
        self._queue.put(None)
        self._thread.join(timeout=1.0)
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
        self._context.term()

    def _run(self) -> None:
        while True:
            if self._replay is not None and self._replay.poll(0):
                self._serve_replay()
            try:
                events = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if events is None:
                return
            payload = encode_batch(events)
            seq = self._next_seq
            self._next_seq += 1
            try:
                self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))
            except self._zmq.ZMQError:
                logger.exception("sending KV event batch %d failed", seq)
            self._buffer.append((seq, payload))

    def _serve_replay(self) -> None:
        frames = self._replay.recv_multipart()
        if len(frames) != 3:
            logger.warning("ignoring malformed KV event replay request with %d frames", len(frames))
            return
        client, _, start_bytes = frames
        start = int.from_bytes(start_bytes, "big")
        for seq, payload in self._buffer:
            if seq >= start:
                self._replay.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
        self._replay.send_multipart((client, b"", self._END_SEQ, b""))


def _binds(endpoint: str) -> bool:
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def default_topic(host: str, port: int, model: str) -> str:
    """Return the topic `kv@<host:port>@<model>`."""
    return f"kv@{host}:{port}@{model}"
