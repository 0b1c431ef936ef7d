"""The interface between the engine core and a KV-transfer implementation.

The core uses only this interface, and `engine.kv_transfer.NixlConnector` implements it (NIXL
or TCP transport). The flow, with vLLM NixlConnector's `kv_transfer_params` field names:

- Prefill side: a request with `kv_transfer_params.do_remote_decode` that stops on the
  length cap keeps its KV blocks allocated. On the engine thread the core calls
  `hold(request_id, block_ids, num_tokens)` and returns the dict it gets back as the
  response's `kv_transfer_params` (`do_remote_prefill`, `remote_engine_id`,
  `remote_block_ids`, `remote_host`, `remote_port`, `tp_size`). `hold` returning None means
  the connector cannot stage the blocks: the core frees them at once and the response has
  no `kv_transfer_params`, so the decode side recomputes. Otherwise the connector later calls
  the `release_held(request_id)` callback it was built with (from any thread) when the
  decode side has read the blocks or the lease expired. The core makes that callback
  idempotent.
- Decode side: a request with `do_remote_prefill` gets blocks for its whole prompt (local
  prefix-cache hits reused), waits while `await pull(params, block_ids, first_uncached_block)`
  fills `block_ids[first_uncached_block:]`, then computes only the last prompt token. When
  `pull` raises, the core follows `kv_load_failure_policy`: `recompute` (default) computes the
  prompt locally, `fail` ends the request with an error. When the request is aborted the core
  cancels the `pull` task and frees the blocks only after the task has finished, so a
  cancelled pull must not write into the blocks after it returns.

Without a connector, requests carrying `do_remote_*` are served as plain requests.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

from llmisvc.protocol.kv_transfer import KVTransferParams


class KVConnector(Protocol):
    """One engine's side of KV-cache transfer between prefill and decode engines.

    Lifecycle: built with the model runner and the core's `release_held` callback,
    `start()` before serving, `close()` at shutdown (which releases every held request).
    """

    config: Any  # has `kv_load_failure_policy`: "recompute" or "fail"

    def start(self) -> None:
        """Open the side channel (and transfer agents) and start lease expiry."""

    def close(self) -> None:
        """Stop serving and release every held request."""

    def hold(self, request_id: str, block_ids: Sequence[int], num_tokens: int) -> dict[str, Any] | None:
        """Register blocks kept for a remote decode; return the response's `kv_transfer_params`.

        `num_tokens` is the number of tokens whose KV the blocks contain. Runs on the engine
        thread between steps, so reading the blocks cannot race the forward pass.
        """

    def release(self, request_id: str) -> bool:
        """Stop holding a request's blocks and call `release_held`; False if it held none."""

    async def pull(self, params: KVTransferParams, block_ids: Sequence[int], first_uncached_block: int) -> None:
        """Fill `block_ids[first_uncached_block:]` from the prefill engine named in `params`.

        Raises on any failure (peer unreachable, timeout, size mismatch).
        """
