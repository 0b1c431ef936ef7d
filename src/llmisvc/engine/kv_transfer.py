"""KV-block transfer between a prefill engine and a decode engine.

`NixlConnector` implements the engine's `KVConnector` hooks with the `kv_transfer_params`
fields of vLLM's NixlConnector:

- Prefill side: when a request with `do_remote_decode` ends on the length cap, the core calls
  `hold(request_id, block_ids, num_tokens)`. The connector copies those blocks into a
  staging slab (one contiguous host buffer, registered with NIXL when NIXL runs) and returns
  `{do_remote_prefill, remote_engine_id, remote_block_ids, remote_host, remote_port, tp_size}`.
  The core keeps the blocks until the connector calls `release_held(request_id)`: after the
  decode engine sends a free notification, or when the lease (default 30 s) expires.
- Decode side: `await pull(params, block_ids, first_uncached_block)` reads the remote blocks
  `remote_block_ids[first_uncached_block:]` into the local blocks at the same positions, sends
  the free notification, and imports them into the runner. Failures raise `KVTransferError`
  with a reason; the core then applies its `kv_load_failure_policy`.

Three transports move the bytes, with the same side channel (TCP on `remote_port`, frames
of a 4-byte big-endian length and a msgpack map) for metadata, lookups and free
notifications:

- `shm`: a decode engine on the same host (same boot id) maps the prefill engine's slab,
  which lives in a /dev/shm file readable by the same user only, and copies the blocks
  straight into its KV pool. Used with `transport: auto` (the default).
- `nixl`: the decode engine posts a NIXL READ (UCX backend, host memory) from the prefill
  engine's registered slab into its own. Used for peers on other hosts when `nixl_cu12`
  (or `nixl`) imports and its UCX backend starts, and always with `transport: nixl`.
- `tcp`: the prefill engine streams the slab slots over the side-channel connection. Every
  engine serves it, so a decode engine falls back to it when the others do not apply.

Both ends log which transport they run.

Side-channel operations (request map → reply map):

- `{"op": "metadata"}` → `{engine_id, transports, block_shape, dtype, block_bytes,
  nixl_agent_metadata?, slab_address?, shm_path?, shm_bytes?, host_id?}`
- `{"op": "lookup", "request_id", "block_ids"}` → `{"slots": [...]}` (NIXL and shm reads)
- `{"op": "read", "request_id", "block_ids"}` → `{"nbytes": N}` followed by N raw bytes (TCP)
- `{"op": "free", "request_id"}` → `{"freed": bool}` (idempotent)

Errors come back as `{"error": reason, "message": text}`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import socketserver
import struct
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llmisvc.protocol import metrics as metric_names
from llmisvc.protocol.kv_transfer import SIDE_CHANNEL_FRAME_HEADER, KVTransferParams, encode_side_channel_frame

logger = logging.getLogger(__name__)

_FRAME_HEADER = struct.Struct(SIDE_CHANNEL_FRAME_HEADER)
# Side-channel messages are small maps. A larger frame means a peer that does not speak
# this protocol, so the connection is dropped instead of allocating the claimed size.
_MAX_FRAME_BYTES = 16 * 1024 * 1024
_DEFAULT_LEASE_SECONDS = 30.0
_DEFAULT_TRANSFER_TIMEOUT_SECONDS = 30.0
# vLLM's KVTransferConfig.kv_buffer_size default (1e9 bytes). Pages of the slab are only
# touched when slots are used, so an idle slab costs address space, not memory.
_DEFAULT_BUFFER_BYTES = 1_000_000_000
_TCP_CHUNK_SLOTS = 64
_SHM_DIR = "/dev/shm"
# Slab files are named PREFIX<pid>-<engine id>, so a later engine can remove files whose
# process is gone.
_SHM_PREFIX = "llmisvc-kv-"
# Larger kernel socket buffers let a block stream run with fewer wake-ups; Linux caps the
# value at net.core.rmem_max / wmem_max.
_SOCKET_BUFFER_BYTES = 4 * 1024 * 1024

_TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class KVTransferError(Exception):
    """A KV pull that failed; `reason` is a short label used in metrics and logs."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


# ---------------------------------------------------------------------------------------
# configuration


@dataclass
class TransferConfig:
    """Settings of the connector, read from the engine's `--kv-transfer-config` JSON.

    Top-level keys follow vLLM's KVTransferConfig (`kv_connector`, `kv_role`,
    `kv_buffer_size`, `kv_load_failure_policy`); llmisvc's own settings live in
    `kv_connector_extra_config`:

    - `transport`: `auto` (shared memory for peers on this host, else NIXL when importable,
      else TCP), `nixl` or `tcp`.
    - `side_channel_host` / `side_channel_port`: where the side channel listens. Defaults
      come from `VLLM_NIXL_SIDE_CHANNEL_HOST` / `VLLM_NIXL_SIDE_CHANNEL_PORT`, else 127.0.0.1
      and an ephemeral port (0), so engines on one machine that leave the port unset do not
      collide.
    - `lease_seconds`: how long the prefill side holds blocks nobody read (default 30).
    - `transfer_timeout_seconds`: how long a pull waits for the prefill side (default 30).
    """

    kv_role: str = "kv_both"
    kv_buffer_size: int = _DEFAULT_BUFFER_BYTES
    kv_load_failure_policy: str = "recompute"
    transport: str = "auto"
    side_channel_host: str = "127.0.0.1"
    side_channel_port: int = 0
    lease_seconds: float = _DEFAULT_LEASE_SECONDS
    transfer_timeout_seconds: float = _DEFAULT_TRANSFER_TIMEOUT_SECONDS

    @classmethod
    def from_json(cls, data: dict[str, Any], environ: dict[str, str] | None = None) -> "TransferConfig":
        """Build a config from the decoded `--kv-transfer-config` object.

        Raises ValueError naming the key for a wrong value.
        """
        environ = os.environ if environ is None else environ
        extra = data.get("kv_connector_extra_config") or {}
        if not isinstance(extra, dict):
            raise ValueError("kv_connector_extra_config must be an object")

        config = cls(
            kv_role=str(data.get("kv_role", "kv_both")),
            kv_buffer_size=int(float(data.get("kv_buffer_size", _DEFAULT_BUFFER_BYTES))),
            kv_load_failure_policy=str(data.get("kv_load_failure_policy", "recompute")),
            transport=str(extra.get("transport", "auto")),
            side_channel_host=str(
                extra.get("side_channel_host", environ.get("VLLM_NIXL_SIDE_CHANNEL_HOST", "127.0.0.1"))
            ),
            side_channel_port=int(extra.get("side_channel_port", environ.get("VLLM_NIXL_SIDE_CHANNEL_PORT", 0))),
            lease_seconds=float(extra.get("lease_seconds", _DEFAULT_LEASE_SECONDS)),
            transfer_timeout_seconds=float(
                extra.get("transfer_timeout_seconds", _DEFAULT_TRANSFER_TIMEOUT_SECONDS)
            ),
        )
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        if self.kv_role not in ("kv_both", "kv_producer", "kv_consumer"):
            raise ValueError(f"kv_role must be kv_both, kv_producer or kv_consumer, got {self.kv_role!r}")
        if self.kv_load_failure_policy not in ("recompute", "fail"):
            raise ValueError(
                f"kv_load_failure_policy must be recompute or fail, got {self.kv_load_failure_policy!r}"
            )
        if self.transport not in ("auto", "nixl", "tcp"):
            raise ValueError(f"kv_connector_extra_config.transport must be auto, nixl or tcp, got {self.transport!r}")
        if self.kv_buffer_size <= 0:
            raise ValueError(f"kv_buffer_size must be positive, got {self.kv_buffer_size}")
        if not 0 <= self.side_channel_port <= 65535:
            raise ValueError(f"side_channel_port must be in 0..65535, got {self.side_channel_port}")
        if self.lease_seconds <= 0:
            raise ValueError(f"kv_connector_extra_config.lease_seconds must be positive, got {self.lease_seconds}")
        if self.transfer_timeout_seconds <= 0:
            raise ValueError(
                "kv_connector_extra_config.transfer_timeout_seconds must be positive, "
                f"got {self.transfer_timeout_seconds}"
            )


# ---------------------------------------------------------------------------------------
# side-channel framing


def send_frame(sock: socket.socket, message: dict[str, Any]) -> None:
    """Send one length-prefixed msgpack frame."""
    sock.sendall(encode_side_channel_frame(message))


def recv_exact(sock: socket.socket, buffer: memoryview) -> None:
    """Fill `buffer` from `sock`; raise ConnectionError if the peer closes first."""
    received = 0
    while received < len(buffer):
        count = sock.recv_into(buffer[received:])
        if count == 0:
            raise ConnectionError("side channel closed by peer")
        received += count


def recv_frame(sock: socket.socket) -> dict[str, Any]:
    """Receive one length-prefixed msgpack frame; raise ConnectionError on a bad frame."""
    header = bytearray(_FRAME_HEADER.size)
    recv_exact(sock, memoryview(header))
    (length,) = _FRAME_HEADER.unpack(header)
    if length > _MAX_FRAME_BYTES:
        raise ConnectionError(f"side-channel frame of {length} bytes is over the {_MAX_FRAME_BYTES} byte limit")
    payload = bytearray(length)
    recv_exact(sock, memoryview(payload))
    message = msgpack.unpackb(bytes(payload), raw=False)
    if not isinstance(message, dict):
        raise ConnectionError("side-channel frame is not a map")
    return message


# ---------------------------------------------------------------------------------------
# staging slab


class StagingSlab:
    """A host buffer of equal slots, one KV block each, shared by both transfer directions.

    Slots are handed out by `allocate` and returned by `free`; both are thread-safe. The
    buffer's address never changes, which is what lets NIXL register it once.
    """

    def __init__(self, slot_bytes: int, num_slots: int, shm_path: str | None = None):
        if num_slots <= 0:
            raise ValueError(f"kv_buffer_size is smaller than one block of {slot_bytes} bytes")
        self.slot_bytes = slot_bytes
        self.num_slots = num_slots
        self.shm_path = shm_path
        if shm_path is not None:
            # A file under /dev/shm, readable by this user only, lets a decode engine on the
            # same host map the slab and copy blocks out directly.
            fd = os.open(shm_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, num_slots * slot_bytes)
            finally:
                os.close(fd)
            flat = torch.from_file(shm_path, shared=True, size=num_slots * slot_bytes, dtype=torch.uint8)
            self.buffer = flat.view(num_slots, slot_bytes)
        else:
            self.buffer = torch.empty((num_slots, slot_bytes), dtype=torch.uint8)
        self.address = self.buffer.data_ptr()
        self._free = list(range(num_slots - 1, -1, -1))
        self._lock = threading.Lock()

    def unlink(self) -> None:
        """Remove the shared-memory file; mappings stay valid until unmapped."""
        if self.shm_path is not None:
            try:
                os.unlink(self.shm_path)
            except FileNotFoundError:
                pass

    @property
    def free_slots(self) -> int:
        """Number of slots not in use."""
        with self._lock:
            return len(self._free)

    def allocate(self, count: int) -> list[int] | None:
        """Return `count` slot indices, or None when fewer are free."""
        with self._lock:
            if count > len(self._free):
                return None
            slots = [self._free.pop() for _ in range(count)]
        return slots

    def free(self, slots: Sequence[int]) -> None:
        """Return slots to the free list."""
        with self._lock:
            self._free.extend(reversed(slots))

    def rows(self, slots: Sequence[int]) -> torch.Tensor:
        """Return the given slots as a [len(slots), slot_bytes] tensor.

        Consecutive slots come back as a view of the slab (no copy), others as a copy.
        """
        return self.select(self.buffer, slots)

    @staticmethod
    def select(buffer: torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
        """Return rows `slots` of a [num_slots, slot_bytes] buffer, as a view when consecutive."""
        first = slots[0]
        if list(slots) == list(range(first, first + len(slots))):
            return buffer[first : first + len(slots)]
        return buffer[torch.as_tensor(slots, dtype=torch.long)]

    def write(self, slots: Sequence[int], data: torch.Tensor) -> None:
        """Copy `data` ([len(slots), slot_bytes] uint8) into the slots."""
        first = slots[0]
        if list(slots) == list(range(first, first + len(slots))):
            self.buffer[first : first + len(slots)].copy_(data)
        else:
            self.buffer.index_copy_(0, torch.as_tensor(slots, dtype=torch.long), data)

    def views(self, slots: Sequence[int]) -> list[memoryview]:
        """Return one memoryview per run of consecutive slots, in slot order."""
        flat = memoryview(self.buffer.numpy()).cast("B")
        views: list[memoryview] = []
        for start, length in _runs(slots):
            views.append(flat[start * self.slot_bytes : (start + length) * self.slot_bytes])
        return views


def _runs(slots: Sequence[int]) -> list[tuple[int, int]]:
    """Split slot indices into (start, length) runs of consecutive values, order kept."""
    runs: list[tuple[int, int]] = []
    for slot in slots:
        if runs and runs[-1][0] + runs[-1][1] == slot:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((slot, 1))
    return runs


# ---------------------------------------------------------------------------------------
# NIXL


def import_nixl() -> Any | None:
    """Return the NIXL Python module (`nixl_cu12` or `nixl`), or None when neither imports."""
    for name in ("nixl_cu12", "nixl"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        except Exception as exc:  # a broken native library raises OSError and others
            logger.warning("NIXL package %s failed to import: %s", name, exc)
            continue
        if hasattr(module, "nixl_agent"):
            return module
    return None


class NixlAgent:
    """One NIXL agent with the staging slab registered, serialised by a lock.

    nixl-cu12 1.5.1 creates an agent without a listener thread in NIXL_THREAD_SYNC_NONE
    mode, which is not safe for concurrent calls. Pulls run in executor threads, so every
    call takes `_lock`.
    """

    def __init__(self, module: Any, name: str, slab: StagingSlab):
        config = module.nixl_agent_config(backends=["UCX"])
        self._agent = module.nixl_agent(name, config)
        if "UCX" not in getattr(self._agent, "backends", {"UCX": None}):
            raise RuntimeError("the NIXL UCX backend did not start")
        self._lock = threading.Lock()
        self.name = name
        self._slab = slab
        self._agent.register_memory([slab.buffer])
        self._remote_agents: dict[str, str] = {}

    def metadata(self) -> bytes:
        """Return this agent's metadata blob for a peer's `add_remote_agent`."""
        with self._lock:
            return self._agent.get_agent_metadata()

    def add_remote(self, engine_id: str, metadata: bytes) -> str:
        """Register a peer agent once per engine id and return its agent name."""
        with self._lock:
            if engine_id not in self._remote_agents:
                self._remote_agents[engine_id] = self._agent.add_remote_agent(metadata)
            return self._remote_agents[engine_id]

    def forget_remote(self, engine_id: str) -> None:
        """Drop a peer whose metadata may be stale (for example after a restart)."""
        with self._lock:
            name = self._remote_agents.pop(engine_id, None)
            if name is not None:
                try:
                    self._agent.remove_remote_agent(name)
                except Exception as exc:  # NIXL raises its own error types
                    logger.debug("removing NIXL agent %s failed: %s", name, exc)

    def read(
        self,
        remote_agent: str,
        remote_address: int,
        remote_slots: Sequence[int],
        local_slots: Sequence[int],
        deadline: float,
        cancelled: threading.Event,
    ) -> None:
        """Read remote slab slots into local slab slots; raise KVTransferError on failure."""
        slot_bytes = self._slab.slot_bytes
        local = np.array(
            [(self._slab.address + slot * slot_bytes, slot_bytes, 0) for slot in local_slots], dtype=np.uint64
        )
        remote = np.array([(remote_address + slot * slot_bytes, slot_bytes, 0) for slot in remote_slots], dtype=np.uint64)
        with self._lock:
            local_descs = self._agent.get_xfer_descs(local, "DRAM")
            remote_descs = self._agent.get_xfer_descs(remote, "DRAM")
            handle = self._agent.initialize_xfer("READ", local_descs, remote_descs, remote_agent)
            state = self._agent.transfer(handle)
        try:
            while state == "PROC":
                if cancelled.is_set():
                    raise KVTransferError("aborted", "request aborted during the NIXL read")
                if time.monotonic() > deadline:
                    raise KVTransferError("timeout", "NIXL read did not complete before the transfer timeout")
                time.sleep(0.0002)
                with self._lock:
                    state = self._agent.check_xfer_state(handle)
            if state != "DONE":
                raise KVTransferError("transfer_error", f"NIXL read ended in state {state}")
        finally:
            with self._lock:
                try:
                    self._agent.release_xfer_handle(handle)
                except Exception as exc:  # releasing an in-flight handle fails in NIXL
                    logger.warning("releasing NIXL transfer handle failed: %s", exc)


# ---------------------------------------------------------------------------------------
# metrics


class TransferMetrics:
    """Prometheus metrics of one connector, registered in the engine's registry."""

    def __init__(self, registry: CollectorRegistry | None):
        kwargs: dict[str, Any] = {"registry": registry}
        self.bytes = Counter(
            metric_names.KV_TRANSFER_BYTES,
            "Bytes of KV blocks received from prefill engines.",
            ["transport"],
            **kwargs,
        )
        self.blocks = Counter(
            metric_names.KV_TRANSFER_BLOCKS,
            "KV blocks received from prefill engines.",
            ["transport"],
            **kwargs,
        )
        self.duration = Histogram(
            metric_names.KV_TRANSFER_DURATION,
            "Wall time of one KV pull, from the first side-channel message to the import.",
            ["transport"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            **kwargs,
        )
        self.failures = Counter(
            metric_names.KV_TRANSFER_FAILURES,
            "KV transfers that failed, by reason.",
            ["reason"],
            **kwargs,
        )
        self.held_blocks = Gauge(
            metric_names.KV_TRANSFER_HELD_BLOCKS,
            "KV blocks held on the prefill side for a decode engine to read.",
            **kwargs,
        )
        self.lease_expired = Counter(
            metric_names.KV_TRANSFER_LEASE_EXPIRED,
            "Held requests whose blocks were freed because no decode engine read them in time.",
            **kwargs,
        )


# ---------------------------------------------------------------------------------------
# connector


@dataclass
class _Held:
    """Blocks of one request held for a decode engine."""

    block_ids: list[int]
    slots: list[int]
    deadline: float
    slot_of_block: dict[int, int] = field(default_factory=dict)


@dataclass
class PullTiming:
    """Timing of the last successful pull (benchmarks and debugging).

    `wire_seconds` covers the block read alone (the NIXL READ, the TCP stream, or the
    shared-memory copy into the pool), and
    `total_seconds` the whole pull: side-channel calls, the read and the import.
    """

    transport: str
    nbytes: int
    wire_seconds: float
    total_seconds: float


@dataclass
class _PeerInfo:
    """Metadata a prefill engine returned on the side channel."""

    engine_id: str
    transports: list[str]
    block_shape: list[int]
    dtype: str
    block_bytes: int
    nixl_agent_metadata: bytes | None
    slab_address: int | None
    shm_path: str | None = None
    shm_bytes: int = 0
    host_id: str | None = None


class NixlConnector:
    """KV connector with shared-memory, NIXL or TCP transport (the module docstring has the protocol).

    `runner` provides `export_blocks(block_ids) -> Tensor` and `import_blocks(block_ids,
    tensor)`; `release_held(request_id)` is the core's callback that frees held blocks and
    may be called from the connector's threads. Call `start()` once before serving and
    `close()` at shutdown.
    """

    def __init__(
        self,
        config: TransferConfig,
        runner: Any,
        release_held: Callable[[str], None],
        *,
        registry: CollectorRegistry | None = None,
        engine_id: str | None = None,
    ):
        self.config = config
        self.engine_id = engine_id or str(uuid.uuid4())
        self._runner = runner
        self._release_held = release_held
        self.metrics = TransferMetrics(registry)

        probe = runner.export_blocks([0])
        self.block_shape = list(probe.shape[1:])
        self.dtype = str(probe.dtype).removeprefix("torch.")
        self.block_bytes = probe[0].numel() * probe.element_size()
        num_slots = config.kv_buffer_size // self.block_bytes
        self.host_id = _host_id()
        self.slab = StagingSlab(self.block_bytes, num_slots, self._shm_path())

        self.transport = "tcp"
        self._nixl: NixlAgent | None = None
        if config.transport in ("auto", "nixl"):
            self._nixl = self._start_nixl()
            if self._nixl is not None:
                self.transport = "nixl"
            elif config.transport == "nixl":
                raise RuntimeError("kv transport nixl requested but NIXL could not be started; see the log above")

        self._held: dict[str, _Held] = {}
        self._held_lock = threading.Lock()
        self._peers: dict[tuple[str, int], _PeerInfo] = {}
        self._peer_slabs: dict[str, torch.Tensor] = {}
        self._peers_lock = threading.Lock()
        self._server: _SideChannelServer | None = None
        self._reaper: threading.Thread | None = None
        self._stopping = threading.Event()
        self.host = config.side_channel_host
        self.port = config.side_channel_port
        self.last_pull: PullTiming | None = None

    def _shm_path(self) -> str | None:
        """Return where the slab goes in shared memory, or None to keep it private."""
        if self.config.transport != "auto" or not os.path.isdir(_SHM_DIR):
            return None
        _remove_stale_slabs()
        return os.path.join(_SHM_DIR, f"{_SHM_PREFIX}{os.getpid()}-{self.engine_id}")

    def _start_nixl(self) -> NixlAgent | None:
        module = import_nixl()
        if module is None:
            logger.info("NIXL is not importable; KV transfer uses TCP")
            return None
        try:
            return NixlAgent(module, f"llmisvc-{self.engine_id}", self.slab)
        except Exception as exc:  # NIXL raises RuntimeError and native errors alike
            logger.warning("NIXL agent failed to start (%s); KV transfer uses TCP", exc)
            return None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the side-channel server and the lease reaper; log the transport."""
        self._server = _SideChannelServer((self.config.side_channel_host, self.config.side_channel_port), self)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="kv-side-channel", daemon=True).start()
        self._reaper = threading.Thread(target=self._reap_expired, name="kv-lease-reaper", daemon=True)
        self._reaper.start()
        logger.info(
            "KV transfer ready: transport=%s%s engine_id=%s side_channel=%s:%d slab=%d blocks of %d bytes lease=%.1fs",
            self.transport,
            " (shared memory for peers on this host)" if self.slab.shm_path else "",
            self.engine_id,
            self.host,
            self.port,
            self.slab.num_slots,
            self.block_bytes,
            self.config.lease_seconds,
        )

    def close(self) -> None:
        """Stop the side channel and free every held request."""
        self._stopping.set()
        self.slab.unlink()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        with self._held_lock:
            request_ids = list(self._held)
        for request_id in request_ids:
            self.release(request_id)

    # -- prefill side ----------------------------------------------------------------

    def hold(self, request_id: str, block_ids: Sequence[int], num_tokens: int) -> dict[str, Any] | None:
        """Stage a finished prefill's blocks for a decode engine and return kv_transfer_params.

        Returns None (the decode engine then recomputes) when the slab has no room; the
        caller frees the blocks at once in that case. Holding a request id twice replaces
        the first hold.
        """
        block_ids = list(block_ids)
        if not block_ids:
            return None
        slots = self.slab.allocate(len(block_ids))
        if slots is None:
            self.metrics.failures.labels(reason="staging_full").inc()
            logger.warning(
                "request %s: KV staging slab full (%d of %d slots free, %d needed); decode will recompute",
                request_id,
                self.slab.free_slots,
                self.slab.num_slots,
                len(block_ids),
            )
            return None

        try:
            exported = self._runner.export_blocks(block_ids)
            self.slab.write(slots, exported.reshape(len(block_ids), -1).view(torch.uint8))
        except (RuntimeError, ValueError, IndexError) as exc:
            self.slab.free(slots)
            self.metrics.failures.labels(reason="export_failed").inc()
            logger.error("request %s: staging %d KV blocks failed (%s); decode will recompute", request_id, len(block_ids), exc)
            return None

        held = _Held(block_ids, slots, time.monotonic() + self.config.lease_seconds)
        held.slot_of_block = dict(zip(block_ids, slots))
        with self._held_lock:
            previous = self._held.pop(request_id, None)
            self._held[request_id] = held
        if previous is not None:
            self.slab.free(previous.slots)
        self.metrics.held_blocks.inc(len(block_ids))
        logger.debug("request %s: holding %d blocks (%d tokens) for remote decode", request_id, len(block_ids), num_tokens)

        params = KVTransferParams(
            do_remote_prefill=True,
            do_remote_decode=False,
            remote_engine_id=self.engine_id,
            remote_block_ids=block_ids,
            remote_host=self.host,
            remote_port=self.port,
            tp_size=1,
        )
        # The decode engine names the held request by this id in its side-channel calls,
        # because engines derive internal ids from x-request-id and the two legs' ids may differ.
        params.extra["remote_request_id"] = request_id
        return params.to_json()

    def release(self, request_id: str) -> bool:
        """Free a held request's slots and its blocks in the core; return False if not held.

        Idempotent: the free notification, the lease reaper and an engine abort may race.
        """
        with self._held_lock:
            held = self._held.pop(request_id, None)
        if held is None:
            return False
        self.slab.free(held.slots)
        self.metrics.held_blocks.dec(len(held.block_ids))
        try:
            self._release_held(request_id)
        except Exception:
            logger.exception("request %s: freeing held blocks in the engine core failed", request_id)
        return True

    def held_requests(self) -> list[str]:
        """Return the ids of requests whose blocks are held now."""
        with self._held_lock:
            return list(self._held)

    def _reap_expired(self) -> None:
        interval = min(1.0, self.config.lease_seconds / 4)
        while not self._stopping.wait(interval):
            now = time.monotonic()
            with self._held_lock:
                expired = [rid for rid, held in self._held.items() if held.deadline <= now]
            for request_id in expired:
                if self.release(request_id):
                    self.metrics.lease_expired.inc()
                    logger.warning(
                        "request %s: no decode engine read its KV blocks within %.1fs; freed them",
                        request_id,
                        self.config.lease_seconds,
                    )

    def _slots_for(self, request_id: str, block_ids: Sequence[int]) -> list[int]:
        """Return the slots staging `block_ids` of a held request; raise KVTransferError."""
        with self._held_lock:
            held = self._held.get(request_id)
            if held is None:
                raise KVTransferError("not_held", f"request {request_id} has no held blocks (lease expired or already freed)")
            # A reader is about to copy these slots, so the lease must not free them mid-copy
            # (a new hold could reuse them). The reader's free notification ends the hold.
            held.deadline = max(held.deadline, time.monotonic() + self.config.transfer_timeout_seconds)
            try:
                return [held.slot_of_block[block_id] for block_id in block_ids]
            except KeyError as exc:
                raise KVTransferError("unknown_block", f"block {exc.args[0]} is not held for request {request_id}")

    def handle_side_channel(self, sock: socket.socket, message: dict[str, Any]) -> None:
        """Serve one side-channel request on `sock` (called from the server's threads)."""
        op = message.get("op")
        try:
            if op == "metadata":
                send_frame(sock, self._metadata())
            elif op == "lookup":
                slots = self._slots_for(str(message["request_id"]), message["block_ids"])
                send_frame(sock, {"slots": slots})
            elif op == "read":
                slots = self._slots_for(str(message["request_id"]), message["block_ids"])
                send_frame(sock, {"nbytes": len(slots) * self.block_bytes})
                for start in range(0, len(slots), _TCP_CHUNK_SLOTS):
                    sock.sendmsg(self.slab.views(slots[start : start + _TCP_CHUNK_SLOTS]))
            elif op == "free":
                freed = self.release(str(message["request_id"]))
                send_frame(sock, {"freed": freed})
            else:
                send_frame(sock, {"error": "bad_request", "message": f"unknown side-channel op {op!r}"})
        except KVTransferError as exc:
            send_frame(sock, {"error": exc.reason, "message": exc.message})
        except (KeyError, TypeError) as exc:
            send_frame(sock, {"error": "bad_request", "message": f"invalid {op} message: {exc}"})

    def _metadata(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "engine_id": self.engine_id,
            "transports": ["nixl", "tcp"] if self._nixl is not None else ["tcp"],
            "block_shape": self.block_shape,
            "dtype": self.dtype,
            "block_bytes": self.block_bytes,
        }
        if self._nixl is not None:
            data["nixl_agent_metadata"] = self._nixl.metadata()
            data["slab_address"] = self.slab.address
        if self.slab.shm_path is not None:
            data["transports"].insert(0, "shm")
            data["shm_path"] = self.slab.shm_path
            data["shm_bytes"] = self.slab.num_slots * self.slab.slot_bytes
            data["host_id"] = self.host_id
        return data

    # -- decode side -----------------------------------------------------------------

    async def pull(self, params: KVTransferParams, block_ids: Sequence[int], first_uncached_block: int) -> None:
        """Read the remote blocks this engine lacks into `block_ids` and import them.

        `block_ids` are this engine's blocks for the whole prompt; the first
        `first_uncached_block` of them already hold the right KV from the local prefix cache.
        The prefill side gets a free notification whether the pull succeeds or not.
        Raises KVTransferError (with `reason`) on any failure. If the calling task is
        cancelled, waits for the worker thread to stop before re-raising, so no write into
        `block_ids` happens after this returns.
        """
        cancelled = threading.Event()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, self._pull_blocking, params, list(block_ids), first_uncached_block, cancelled)
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            cancelled.set()
            try:
                await future
            except Exception:
                pass
            raise

    def _pull_blocking(
        self,
        params: KVTransferParams,
        block_ids: list[int],
        first_uncached_block: int,
        cancelled: threading.Event,
    ) -> None:
        started = time.perf_counter()
        deadline = time.monotonic() + self.config.transfer_timeout_seconds
        request_id = str(params.extra.get("remote_request_id") or params.extra.get("request_id") or "")
        transport = "tcp"
        try:
            request_id, remote_blocks, local_blocks = self._plan_pull(params, block_ids, first_uncached_block)
            if not local_blocks:
                self._notify_free(params, request_id, deadline)
                return
            peer = self._peer(params, deadline)
            transport = self._choose_transport(peer)
            if transport == "shm":
                wire_seconds = self._pull_shm(params, peer, request_id, remote_blocks, local_blocks, deadline)
                self._finish_pull(transport, len(local_blocks), wire_seconds, started, request_id)
                return
            slots = self.slab.allocate(len(local_blocks))
            if slots is None:
                raise KVTransferError("staging_full", f"no staging room for {len(local_blocks)} blocks")
            try:
                wire_started = time.perf_counter()
                if transport == "nixl":
                    self._read_nixl(params, peer, request_id, remote_blocks, slots, deadline, cancelled)
                else:
                    self._read_tcp(params, request_id, remote_blocks, slots, deadline, cancelled)
                wire_seconds = time.perf_counter() - wire_started
                self._notify_free(params, request_id, deadline)
                if cancelled.is_set():
                    raise KVTransferError("aborted", "request aborted during the KV pull")
                data = self.slab.rows(slots)
                tensor = data.view(_TORCH_DTYPES.get(peer.dtype, torch.uint8)).view(len(slots), *peer.block_shape)
                # NOTE: this runs on an executor thread while the engine thread steps. It
                # writes only pool rows of this request, which the core leaves alone while the
                # request waits for remote KV, and the pool tensor is never reallocated.
                try:
                    self._runner.import_blocks(local_blocks, tensor)
                except (ValueError, IndexError, RuntimeError) as exc:
                    raise KVTransferError("import_failed", f"writing {len(local_blocks)} blocks into the KV pool failed: {exc}") from exc
            finally:
                self.slab.free(slots)
        except KVTransferError as exc:
            self.metrics.failures.labels(reason=exc.reason).inc()
            if exc.reason not in ("not_held",):
                self._notify_free(params, request_id, deadline)
            raise
        except (OSError, ConnectionError) as exc:
            self.metrics.failures.labels(reason="connection").inc()
            self._notify_free(params, request_id, deadline)
            raise KVTransferError("connection", f"side channel {params.remote_host}:{params.remote_port}: {exc}") from exc

        self._finish_pull(transport, len(local_blocks), wire_seconds, started, request_id)

    def _finish_pull(self, transport: str, num_blocks: int, wire_seconds: float, started: float, request_id: str) -> None:
        nbytes = num_blocks * self.block_bytes
        total = time.perf_counter() - started
        self.last_pull = PullTiming(transport, nbytes, wire_seconds, total)
        self.metrics.bytes.labels(transport=transport).inc(nbytes)
        self.metrics.blocks.labels(transport=transport).inc(num_blocks)
        self.metrics.duration.labels(transport=transport).observe(total)
        logger.debug(
            "request %s: pulled %d blocks (%d bytes) over %s in %.2f ms", request_id, num_blocks, nbytes, transport, total * 1000
        )

    def _choose_transport(self, peer: "_PeerInfo") -> str:
        if "shm" in peer.transports and self.config.transport == "auto" and peer.host_id == self.host_id:
            if self._map_peer_slab(peer) is not None:
                return "shm"
        if self._nixl is not None and "nixl" in peer.transports:
            return "nixl"
        return "tcp"

    def _map_peer_slab(self, peer: "_PeerInfo") -> torch.Tensor | None:
        """Map a same-host peer's slab read-write (torch has no read-only file mapping)."""
        with self._peers_lock:
            mapped = self._peer_slabs.get(peer.engine_id)
        if mapped is not None:
            return mapped
        try:
            flat = torch.from_file(peer.shm_path, shared=True, size=peer.shm_bytes, dtype=torch.uint8)
        except (RuntimeError, OSError) as exc:
            logger.info("cannot map KV slab %s of engine %s (%s); using the network", peer.shm_path, peer.engine_id, exc)
            return None
        mapped = flat.view(-1, peer.block_bytes)
        with self._peers_lock:
            self._peer_slabs[peer.engine_id] = mapped
        return mapped

    def _pull_shm(
        self,
        params: KVTransferParams,
        peer: "_PeerInfo",
        request_id: str,
        remote_blocks: list[int],
        local_blocks: list[int],
        deadline: float,
    ) -> float:
        """Copy blocks straight from a same-host peer's mapped slab into the KV pool.

        The free call doubles as the check that the blocks were still held during the copy:
        a hold that expired meanwhile may have had its slots reused, so the copy is discarded.
        """
        address = (str(params.remote_host), int(params.remote_port))
        reply = self._call(address, {"op": "lookup", "request_id": request_id, "block_ids": remote_blocks}, deadline)
        remote = self._peer_slabs[peer.engine_id]
        wire_started = time.perf_counter()
        rows = StagingSlab.select(remote, reply["slots"])
        tensor = rows.view(_TORCH_DTYPES.get(peer.dtype, torch.uint8)).view(len(local_blocks), *peer.block_shape)
        try:
            self._runner.import_blocks(local_blocks, tensor)
        except (ValueError, IndexError, RuntimeError) as exc:
            raise KVTransferError("import_failed", f"writing {len(local_blocks)} blocks into the KV pool failed: {exc}") from exc
        wire_seconds = time.perf_counter() - wire_started
        freed = self._call(address, {"op": "free", "request_id": request_id}, max(deadline, time.monotonic() + 2.0))
        if not freed.get("freed"):
            raise KVTransferError("not_held", f"request {request_id} was released while its blocks were copied")
        return wire_seconds

    def _plan_pull(
        self, params: KVTransferParams, block_ids: list[int], first_uncached_block: int
    ) -> tuple[str, list[int], list[int]]:
        request_id = _remote_request_id(params)
        if not params.remote_host or not params.remote_port:
            raise KVTransferError("bad_params", "kv_transfer_params lack remote_host or remote_port")
        remote = list(params.remote_block_ids)
        if len(remote) != len(block_ids):
            raise KVTransferError(
                "block_mismatch",
                f"prefill engine sent {len(remote)} blocks but this prompt needs {len(block_ids)}",
            )
        start = max(0, min(first_uncached_block, len(block_ids)))
        return request_id, remote[start:], block_ids[start:]

    def _peer(self, params: KVTransferParams, deadline: float) -> _PeerInfo:
        address = (str(params.remote_host), int(params.remote_port))
        with self._peers_lock:
            peer = self._peers.get(address)
        if peer is not None and peer.engine_id == params.remote_engine_id:
            return peer

        reply = self._call(address, {"op": "metadata"}, deadline)
        peer = _PeerInfo(
            engine_id=str(reply["engine_id"]),
            transports=list(reply.get("transports", ["tcp"])),
            block_shape=list(reply["block_shape"]),
            dtype=str(reply["dtype"]),
            block_bytes=int(reply["block_bytes"]),
            nixl_agent_metadata=reply.get("nixl_agent_metadata"),
            slab_address=reply.get("slab_address"),
            shm_path=reply.get("shm_path"),
            shm_bytes=int(reply.get("shm_bytes", 0)),
            host_id=reply.get("host_id"),
        )
        if params.remote_engine_id and peer.engine_id != params.remote_engine_id:
            raise KVTransferError(
                "engine_mismatch",
                f"{address[0]}:{address[1]} is engine {peer.engine_id}, not {params.remote_engine_id} (restarted?)",
            )
        if peer.block_shape != self.block_shape or peer.dtype != self.dtype:
            raise KVTransferError(
                "incompatible_layout",
                f"prefill blocks are {peer.dtype}{peer.block_shape}, this engine uses {self.dtype}{self.block_shape}",
            )
        if self._nixl is not None and "nixl" in peer.transports and peer.nixl_agent_metadata:
            self._nixl.forget_remote(peer.engine_id)
            self._nixl.add_remote(peer.engine_id, peer.nixl_agent_metadata)
        with self._peers_lock:
            self._peers[address] = peer
        return peer

    def _read_nixl(
        self,
        params: KVTransferParams,
        peer: _PeerInfo,
        request_id: str,
        remote_blocks: list[int],
        slots: list[int],
        deadline: float,
        cancelled: threading.Event,
    ) -> None:
        address = (str(params.remote_host), int(params.remote_port))
        reply = self._call(address, {"op": "lookup", "request_id": request_id, "block_ids": remote_blocks}, deadline)
        assert self._nixl is not None and peer.slab_address is not None
        remote_agent = self._nixl.add_remote(peer.engine_id, peer.nixl_agent_metadata or b"")
        self._nixl.read(remote_agent, int(peer.slab_address), reply["slots"], slots, deadline, cancelled)

    def _read_tcp(
        self,
        params: KVTransferParams,
        request_id: str,
        remote_blocks: list[int],
        slots: list[int],
        deadline: float,
        cancelled: threading.Event,
    ) -> None:
        address = (str(params.remote_host), int(params.remote_port))
        with _connect(address, deadline) as sock:
            send_frame(sock, {"op": "read", "request_id": request_id, "block_ids": remote_blocks})
            reply = recv_frame(sock)
            _raise_for_error(reply)
            expected = len(slots) * self.block_bytes
            if int(reply["nbytes"]) != expected:
                raise KVTransferError("block_mismatch", f"prefill engine sends {reply['nbytes']} bytes, expected {expected}")
            for view in self.slab.views(slots):
                if cancelled.is_set():
                    raise KVTransferError("aborted", "request aborted during the TCP read")
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                try:
                    recv_exact(sock, view)
                except socket.timeout as exc:
                    raise KVTransferError("timeout", "TCP read did not complete before the transfer timeout") from exc

    def _notify_free(self, params: KVTransferParams, request_id: str, deadline: float) -> None:
        """Tell the prefill engine to free a request's blocks; failures are logged only."""
        if not request_id or not params.remote_host or not params.remote_port:
            return
        address = (str(params.remote_host), int(params.remote_port))
        # A short grace past the transfer deadline, so a timed-out pull still frees remotely.
        try:
            self._call(address, {"op": "free", "request_id": request_id}, max(deadline, time.monotonic() + 2.0))
        except (OSError, ConnectionError, KVTransferError) as exc:
            logger.warning(
                "request %s: free notification to %s:%d failed (%s); the prefill lease frees the blocks",
                request_id,
                address[0],
                address[1],
                exc,
            )

    def _call(self, address: tuple[str, int], message: dict[str, Any], deadline: float) -> dict[str, Any]:
        with _connect(address, deadline) as sock:
            send_frame(sock, message)
            try:
                reply = recv_frame(sock)
            except socket.timeout as exc:
                raise KVTransferError("timeout", f"{address[0]}:{address[1]} did not respond to {message['op']}") from exc
        _raise_for_error(reply)
        return reply


def _remove_stale_slabs() -> None:
    """Delete slab files left by engines that died without closing (for example SIGKILL)."""
    for name in os.listdir(_SHM_DIR):
        if not name.startswith(_SHM_PREFIX):
            continue
        pid_text = name[len(_SHM_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or os.path.exists(f"/proc/{pid_text}"):
            continue
        try:
            os.unlink(os.path.join(_SHM_DIR, name))
            logger.info("removed stale KV slab %s of exited process %s", name, pid_text)
        except OSError as exc:
            logger.debug("could not remove stale KV slab %s: %s", name, exc)


def _host_id() -> str:
    """Return an id that two processes share exactly when they run on one booted host."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot_id:
            return f"{socket.gethostname()}:{boot_id.read().strip()}"
    except OSError:
        return f"{socket.gethostname()}:{uuid.getnode()}"


def _remote_request_id(params: KVTransferParams) -> str:
    """Return the prefill-side request id carried in the params."""
    request_id = params.extra.get("remote_request_id") or params.extra.get("request_id")
    if not request_id:
        raise KVTransferError("bad_params", "kv_transfer_params lack remote_request_id")
    return str(request_id)


def _connect(address: tuple[str, int], deadline: float) -> socket.socket:
    timeout = deadline - time.monotonic()
    if timeout <= 0:
        raise KVTransferError("timeout", f"transfer timeout passed before connecting to {address[0]}:{address[1]}")
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except socket.timeout as exc:
        raise KVTransferError("timeout", f"connecting to {address[0]}:{address[1]} timed out") from exc
    except OSError as exc:
        raise KVTransferError("connection", f"connecting to {address[0]}:{address[1]} failed: {exc}") from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER_BYTES)
    return sock


def _raise_for_error(reply: dict[str, Any]) -> None:
    if "error" in reply:
        raise KVTransferError(str(reply["error"]), str(reply.get("message", "")))


class _SideChannelServer(socketserver.ThreadingTCPServer):
    """Threaded TCP server that hands each frame to the connector."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], connector: NixlConnector):
        self.connector = connector
        super().__init__(address, _SideChannelHandler)


class _SideChannelHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER_BYTES)
        connector: NixlConnector = self.server.connector  # type: ignore[attr-defined]
        while True:
            try:
                message = recv_frame(sock)
            except (ConnectionError, OSError, ValueError, msgpack.ExtraData):
                return
            try:
                connector.handle_side_channel(sock, message)
            except (ConnectionError, OSError) as exc:
                logger.debug("side-channel peer %s went away: %s", self.client_address, exc)
                return
