"""NixlConnector between two KV caches in one process, over each available transport.

The engines' own `KVCache` (a small layout) plays the runner: it has the same
`export_blocks` / `import_blocks` the model runner forwards to.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from llmisvc.engine.kv_cache import KVCache, KVLayout
from llmisvc.engine.kv_transfer import KVTransferError, NixlConnector, TransferConfig, import_nixl
from llmisvc.protocol.kv_transfer import KVTransferParams
from support import free_port

# `auto` between two connectors on one host picks shared memory.
TRANSPORTS = [
    "tcp",
    "auto",
    pytest.param("nixl", marks=pytest.mark.skipif(import_nixl() is None, reason="NIXL is not installed")),
]
EXPECTED = {"tcp": "tcp", "auto": "shm", "nixl": "nixl"}


class Released:
    """Records the core's release_held calls."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.event = threading.Event()

    def __call__(self, request_id: str) -> None:
        self.ids.append(request_id)
        self.event.set()


def _cache(seed: int) -> KVCache:
    cache = KVCache(KVLayout(num_layers=3, num_kv_heads=2, head_dim=8), 4, 64, torch.float32, torch.device("cpu"))
    cache.pool.copy_(torch.randn(cache.pool.shape, generator=torch.Generator().manual_seed(seed)))
    return cache


@pytest.fixture(params=TRANSPORTS)
def pair(request):
    config = TransferConfig(transport=request.param, kv_buffer_size=4_000_000, lease_seconds=1.5, transfer_timeout_seconds=5)
    prefill_cache, decode_cache = _cache(1), _cache(2)
    released = Released()
    prefill = NixlConnector(config, prefill_cache, released)
    decode = NixlConnector(config, decode_cache, Released())
    prefill.start()
    decode.start()
    decode.expected_transport = EXPECTED[request.param]
    yield prefill, decode, prefill_cache, decode_cache, released
    prefill.close()
    decode.close()


def _params(prefill: NixlConnector, request_id: str, blocks: list[int]) -> KVTransferParams:
    params = prefill.hold(request_id, blocks, len(blocks) * 4)
    assert params is not None
    return KVTransferParams.from_json(params)


def test_pull_copies_blocks_and_frees(pair):
    prefill, decode, prefill_cache, decode_cache, released = pair
    params = _params(prefill, "req-1", [3, 4, 5, 9])
    assert params.do_remote_prefill is True
    assert params.remote_port == prefill.port

    asyncio.run(decode.pull(params, [10, 11, 12, 13], 0))

    assert torch.equal(decode_cache.pool[[10, 11, 12, 13]], prefill_cache.pool[[3, 4, 5, 9]])
    assert decode.last_pull.transport == decode.expected_transport
    assert released.event.wait(5)
    assert released.ids == ["req-1"]
    assert prefill.held_requests() == []


def test_pull_skips_locally_cached_blocks(pair):
    prefill, decode, prefill_cache, decode_cache, released = pair
    before = decode_cache.pool[20].clone()
    params = _params(prefill, "req-2", [1, 2, 3])
    asyncio.run(decode.pull(params, [20, 21, 22], 1))
    assert torch.equal(decode_cache.pool[20], before)
    assert torch.equal(decode_cache.pool[[21, 22]], prefill_cache.pool[[2, 3]])


def test_lease_expiry_frees(pair):
    prefill, decode, _, _, released = pair
    _params(prefill, "req-3", [7])
    assert released.event.wait(10)
    assert released.ids == ["req-3"]
    assert prefill.metrics.lease_expired._value.get() == 1


def test_pull_after_expiry_fails_not_held(pair):
    prefill, decode, _, _, released = pair
    params = _params(prefill, "req-4", [7, 8])
    assert released.event.wait(10)
    with pytest.raises(KVTransferError) as error:
        asyncio.run(decode.pull(params, [30, 31], 0))
    assert error.value.reason == "not_held"


def test_release_is_idempotent(pair):
    prefill, _, _, _, released = pair
    _params(prefill, "req-5", [1])
    assert prefill.release("req-5") is True
    assert prefill.release("req-5") is False
    assert released.ids == ["req-5"]


def test_unreachable_prefill_fails_fast(pair):
    _, decode, _, decode_cache, _ = pair
    params = KVTransferParams(
        do_remote_prefill=True, remote_engine_id="gone", remote_block_ids=[1], remote_host="127.0.0.1",
        remote_port=free_port(), extra={"remote_request_id": "req-6"},
    )
    started = time.monotonic()
    with pytest.raises(KVTransferError) as error:
        asyncio.run(decode.pull(params, [5], 0))
    assert error.value.reason == "connection"
    assert time.monotonic() - started < 5
    assert decode.slab.free_slots == decode.slab.num_slots


def test_block_count_mismatch(pair):
    prefill, decode, _, _, _ = pair
    params = _params(prefill, "req-7", [1, 2])
    with pytest.raises(KVTransferError) as error:
        asyncio.run(decode.pull(params, [5, 6, 7], 0))
    assert error.value.reason == "block_mismatch"


def test_cancelled_pull_writes_nothing_after_return(pair):
    prefill, decode, _, decode_cache, released = pair
    params = _params(prefill, "req-8", list(range(40)))
    snapshot = decode_cache.pool.clone()

    async def cancel_soon() -> None:
        task = asyncio.ensure_future(decode.pull(params, list(range(20, 60)), 0))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_soon())
    after_return = decode_cache.pool.clone()
    time.sleep(0.3)
    # Whatever the pull did, it did before returning: nothing changes afterwards.
    assert torch.equal(decode_cache.pool, after_return)
    assert torch.equal(decode_cache.pool[:20], snapshot[:20])
    # The prefill side hears about the abort (or frees at the lease).
    assert released.event.wait(10)
    assert decode.slab.free_slots == decode.slab.num_slots


def test_hold_without_room_returns_none():
    cache = _cache(3)
    config = TransferConfig(transport="tcp", kv_buffer_size=cache.pool[0].numel() * 4 * 2, lease_seconds=5)
    connector = NixlConnector(config, cache, Released())
    connector.start()
    try:
        assert connector.hold("big", [1, 2, 3], 12) is None
        assert connector.metrics.failures.labels(reason="staging_full")._value.get() == 1
        assert connector.hold("small", [1, 2], 8) is not None
    finally:
        connector.close()


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="kv_load_failure_policy"):
        TransferConfig.from_json({"kv_load_failure_policy": "retry"})
    with pytest.raises(ValueError, match="transport"):
        TransferConfig.from_json({"kv_connector_extra_config": {"transport": "rdma"}})
    config = TransferConfig.from_json({}, environ={"VLLM_NIXL_SIDE_CHANNEL_PORT": "5601"})
    assert config.side_channel_port == 5601
    assert config.lease_seconds == 30.0
