"""Exact prefix index built from engines' KV events (ZMQ SUB, vLLM's msgpack layout).

Engines publish batches `[timestamp, events, dp_rank]` on topic `kv@<host:port>@<model>`,
where each event is `["BlockStored", hashes, parent, token_ids, block_size, lora_id,
medium]`, `["BlockRemoved", hashes, medium]` or `["AllBlocksCleared"]`. The subscriber
thread applies them to a map from block hash to the endpoints that cache it.

The scheduler recomputes the same chained hashes from the prompt's token ids, so a hash
seed or block size that differs from the engine's would silently match nothing. Every
BlockStored is therefore checked: its block size field, and for a block without parent
the hash recomputed from its tokens. A mismatch is logged and counted.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import msgpack

from llmisvc.protocol.block_hash import hash_block, root_hash

logger = logging.getLogger(__name__)


class KVEventIndex:
    """Block hash -> endpoints, fed by KV events; safe to read while the subscriber writes."""

    def __init__(self, block_size: int, hash_seed: str, on_mismatch: Callable[[str, str, str], None] | None = None):
        self.block_size = block_size
        self.hash_seed = hash_seed
        self._root = root_hash(hash_seed)
        # Block hash -> bit mask of endpoints, as in PrefixIndex: ints add no objects for
        # the garbage collector to walk.
        self._holders: dict[int, int] = {}
        self._blocks: dict[str, set[int]] = {}
        self._bits: dict[str, int] = {}
        self._addresses: dict[int, str] = {}
        self._lock = threading.Lock()
        self._on_mismatch = on_mismatch
        self._reported: set[tuple[str, str]] = set()
        self.events_applied = {"BlockStored": 0, "BlockRemoved": 0, "AllBlocksCleared": 0}

    def blocks(self, address: str) -> int:
        """Number of blocks `address` reported as cached."""
        with self._lock:
            return len(self._blocks.get(address, ()))

    def match(self, hashes: list[int]) -> dict[str, int]:
        """Return address -> number of leading blocks of `hashes` the endpoint caches."""
        counts: dict[str, int] = {}
        with self._lock:
            alive = -1  # every bit: endpoints still matching all blocks so far
            matched = 0
            for block_hash in hashes:
                holders = self._holders.get(block_hash, 0) & alive
                if not holders:
                    break
                if alive != -1:
                    self._record(counts, alive & ~holders, matched)
                alive = holders
                matched += 1
            if matched:
                self._record(counts, alive, matched)
        return counts

    def _record(self, counts: dict[str, int], mask: int, matched: int) -> None:
        while mask:
            low = mask & -mask
            counts[self._addresses[low.bit_length() - 1]] = matched
            mask ^= low

    def remove_endpoint(self, address: str) -> None:
        """Forget every block of `address`."""
        with self._lock:
            for block_hash in self._blocks.pop(address, set()):
                self._drop(block_hash, address)
            bit = self._bits.pop(address, None)
            if bit is not None:
                del self._addresses[bit]

    def _bit(self, address: str) -> int:
        bit = self._bits.get(address)
        if bit is None:
            bit = 0
            while bit in self._addresses:
                bit += 1
            self._bits[address] = bit
            self._addresses[bit] = address
        return 1 << bit

    def apply_message(self, topic: bytes, payload: bytes) -> None:
        """Decode one ZMQ message and apply its events; malformed messages are logged and skipped."""
        address = _topic_address(topic)
        try:
            batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
            events = batch["events"] if isinstance(batch, dict) else batch[1]
        except (ValueError, TypeError, KeyError, IndexError, msgpack.UnpackException) as exc:
            logger.warning("malformed KV event batch from %s: %s", address, exc)
            return
        for event in events:
            self.apply_event(address, event)

    def apply_event(self, address: str, event: list | dict) -> None:
        """Apply one decoded event from `address` (array or map layout)."""
        if isinstance(event, dict):
            kind = event.get("type")
            fields = event
        else:
            kind = event[0] if event else None
            fields = None
        if kind == "BlockStored":
            hashes = fields["block_hashes"] if fields else event[1]
            parent = fields.get("parent_block_hash") if fields else event[2]
            tokens = fields.get("token_ids", []) if fields else event[3]
            block_size = fields.get("block_size") if fields else event[4]
            if not self._check(address, hashes, parent, tokens, block_size):
                return
            with self._lock:
                held = self._blocks.setdefault(address, set())
                bit = self._bit(address)
                for block_hash in hashes:
                    block_hash = _unsigned(block_hash)
                    held.add(block_hash)
                    self._holders[block_hash] = self._holders.get(block_hash, 0) | bit
        elif kind == "BlockRemoved":
            hashes = fields["block_hashes"] if fields else event[1]
            with self._lock:
                held = self._blocks.get(address, set())
                for block_hash in hashes:
                    block_hash = _unsigned(block_hash)
                    held.discard(block_hash)
                    self._drop(block_hash, address)
        elif kind == "AllBlocksCleared":
            self.remove_endpoint(address)
        else:
            logger.warning("unknown KV event type %r from %s", kind, address)
            return
        self.events_applied[kind] += 1

    def _check(self, address: str, hashes: list, parent, tokens: list, block_size) -> bool:
        if block_size is not None and block_size != self.block_size:
            self._mismatch(address, "block_size", f"engine block size {block_size}, scheduler {self.block_size}")
            return False
        if parent is None and hashes and len(tokens) >= self.block_size:
            expected = hash_block(self._root, tokens[: self.block_size])
            if _unsigned(hashes[0]) != expected:
                self._mismatch(address, "hash_seed", "first block hash differs: engine hash seed or hash function differs from the scheduler's")
                return False
        return True

    def _mismatch(self, address: str, reason: str, detail: str) -> None:
        if self._on_mismatch is not None:
            self._on_mismatch(address, reason, detail)
        if (address, reason) not in self._reported:
            self._reported.add((address, reason))
            logger.error("KV events from %s do not match the scheduler's hashing (%s): %s; precise prefix scores for it stay 0", address, reason, detail)

    def _drop(self, block_hash: int, address: str) -> None:
        holders = self._holders.get(block_hash)
        bit = self._bits.get(address)
        if holders is None or bit is None:
            return
        holders &= ~(1 << bit)
        if holders:
            self._holders[block_hash] = holders
        else:
            del self._holders[block_hash]


def _unsigned(value: int) -> int:
    # vLLM may send hashes as signed 64-bit integers; the scheduler's are unsigned.
    return value & 0xFFFFFFFFFFFFFFFF if isinstance(value, int) else value


def _topic_address(topic: bytes) -> str:
    parts = topic.decode("utf-8", "replace").split("@")
    return parts[1] if len(parts) >= 3 else topic.decode("utf-8", "replace")


class KVEventSubscriber:
    """A thread that receives KV events on a ZMQ SUB socket and applies them to an index.

    Endpoints containing `*` are bound (engines connect to the scheduler, as llm-d deploys
    it); others are connected to (the scheduler connects to engines that bind).
    """

    def __init__(self, index: KVEventIndex, endpoints: list[str], topic_filter: str = "kv@"):
        self.index = index
        self.endpoints = endpoints
        self.topic_filter = topic_filter
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def start(self) -> None:
        """Start the thread and wait until the socket is bound or connected."""
        self._thread = threading.Thread(target=self._run, name="kv-event-subscriber", daemon=True)
        self._thread.start()
        self._ready.wait(5)

    def close(self) -> None:
        """Stop the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    def _run(self) -> None:
        import zmq

        context = zmq.Context.instance()
        socket = context.socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVHWM, 100_000)
        socket.setsockopt_string(zmq.SUBSCRIBE, self.topic_filter)
        try:
            for endpoint in self.endpoints:
                if "*" in endpoint:
                    socket.bind(endpoint)
                else:
                    socket.connect(endpoint)
            logger.info("subscribed to KV events on %s", ", ".join(self.endpoints))
        except zmq.ZMQError as exc:
            logger.error("KV event subscription on %s failed: %s", ", ".join(self.endpoints), exc)
            self._ready.set()
            socket.close(0)
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(100):
                    continue
                frames = socket.recv_multipart()
                if len(frames) < 2:
                    continue
                self.index.apply_message(frames[0], frames[-1])
        finally:
            socket.close(0)
