"""Prefill/decode orchestration: the two legs of a disaggregated request.

The gateway (local mode) and the decode-side sidecar (Kubernetes) both use this module:

1. `PDOrchestrator.run_prefill(...)` sends the prefill leg to the chosen prefill endpoint
   through a caller-supplied `PrefillSender` and returns a `PrefillOutcome`:
   - `outcome.response` set: a prefill 4xx, returned to the client as it came;
   - otherwise `outcome.decode_body` is the decode leg's body: the original request plus the
     prefill's `kv_transfer_params`.
   - When the prefill leg failed (5xx, timeout, refused connection), the decode body is the
     original request alone. This decode-only fallback is logged and counted. The same body
     is sent when the prefill leg returned no `kv_transfer_params`, and the decode engine
     then recomputes the prompt.
2. The caller sends `decode_body` to the decode endpoint and relays the response. When the
   prefill engine reported cache hits, `outcome.usage_rewriter()` returns a filter that sets
   `usage.prompt_tokens_details.cached_tokens` of the decode response to the prefill replica's
   count (SSE events without usage pass through byte for byte).
3. If the request ends between the legs (client disconnect, decode endpoint unreachable),
   the caller awaits `release_prefill(outcome)`, which tells the prefill engine to free the
   held blocks at once instead of when their lease expires.

Prefill leg body: `stream: false`, `max_tokens: 1` (and `max_completion_tokens: 1` when the
client sent it), no `stream_options`, `min_tokens`, `stop`, `stop_token_ids`, `n`,
`logprobs`/`top_logprobs`/`prompt_logprobs`, `echo`, `ignore_eos: true` and `kv_transfer_params: {do_remote_decode:
true}`, so the leg always ends on the length cap and returns transfer parameters. Both legs
carry the same `x-request-id`.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
from prometheus_client import CollectorRegistry, Counter, Histogram

from llmisvc.protocol import metrics as metric_names
from llmisvc.protocol.headers import REQUEST_ID
from llmisvc.protocol.kv_transfer import SIDE_CHANNEL_FRAME_HEADER, encode_side_channel_frame

from .jsonutil import JSONDecodeError, dumps, loads

logger = logging.getLogger(__name__)

# Request fields removed from the prefill leg: each could end the leg before the length cap
# (stop criteria), make it stream, or multiply its work (n, logprobs).
_PREFILL_DROPPED_FIELDS = (
    "stream_options",
    "min_tokens",
    "stop",
    "stop_token_ids",
    "n",
    "best_of",
    "logprobs",
    "top_logprobs",
    "prompt_logprobs",
    "echo",
)
_FREE_TIMEOUT_SECONDS = 2.0


def scores_prompt(request: dict[str, Any] | None) -> bool:
    """Return whether the request wants prompt logprobs (`prompt_logprobs`, or `echo` with `logprobs`).

    Such a request gains nothing from a prefill leg: imported KV carries no logits, so the
    decode engine computes the prompt again to score it.
    """
    if not request:
        return False
    echo_scores = request.get("echo") is True and request.get("logprobs") is not None
    return echo_scores or request.get("prompt_logprobs") is not None


class PrefillLegFailed(Exception):
    """The prefill leg got no HTTP response: refused connection, timeout or closed socket.

    `kind` is a short label (connect, timeout, closed) used in the fallback metric.
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


# send(address "host:port", path, body bytes, headers, timeout seconds) -> (status, body)
# Raises PrefillLegFailed (or OSError / asyncio.TimeoutError) when no response arrives.
PrefillSender = Callable[[str, str, bytes, list[tuple[str, str]], float], Awaitable[tuple[int, bytes]]]


class PDMetrics:
    """Counters and histograms of prefill/decode orchestration."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.decisions = Counter(
            metric_names.PD_DECISIONS,
            "Requests by prefill/decode decision (prefill_decode or decode_only).",
            ["model", "decision"],
            registry=registry,
        )
        self.fallbacks = Counter(
            metric_names.PD_FALLBACKS,
            "Split requests whose prefill leg failed or returned no transfer parameters, by reason.",
            ["model", "reason"],
            registry=registry,
        )
        self.prefill_duration = Histogram(
            metric_names.PD_PREFILL_DURATION,
            "Wall time of the prefill leg as seen by the orchestrator.",
            ["model"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
            registry=registry,
        )


def build_prefill_body(request: dict[str, Any]) -> dict[str, Any]:
    """Return the prefill leg's body for an OpenAI completion or chat request (a new dict)."""
    body = {key: value for key, value in request.items() if key not in _PREFILL_DROPPED_FIELDS}
    body["stream"] = False
    body["max_tokens"] = 1
    if "max_completion_tokens" in request:
        body["max_completion_tokens"] = 1
    body["ignore_eos"] = True
    body["kv_transfer_params"] = {"do_remote_decode": True}
    return body


def build_decode_body(request: dict[str, Any], kv_transfer_params: dict[str, Any] | None) -> dict[str, Any]:
    """Return the decode leg's body: the original request, plus the prefill's params if any."""
    body = dict(request)
    body.pop("kv_transfer_params", None)
    if kv_transfer_params:
        body["kv_transfer_params"] = kv_transfer_params
    return body


@dataclass
class PrefillOutcome:
    """Result of the prefill leg; see the module docstring for how callers use it."""

    decode_body: bytes = b""
    kv_transfer_params: dict[str, Any] | None = None
    prefill_address: str | None = None
    prefill_cached_tokens: int | None = None
    fallback_reason: str | None = None
    # A prefill 4xx to return to the client as it came: (status, body).
    response: tuple[int, bytes] | None = None
    released: bool = field(default=False, repr=False)

    @property
    def split(self) -> bool:
        """True when the decode leg carries transfer parameters from the prefill leg."""
        return self.kv_transfer_params is not None

    def usage_rewriter(self) -> "UsageRewriter | None":
        """Return a filter for the decode response's usage, or None when nothing needs changing."""
        if not self.split or self.prefill_cached_tokens is None:
            return None
        return UsageRewriter(self.prefill_cached_tokens)


class PDOrchestrator:
    """Runs the prefill leg and prepares the decode leg (module docstring)."""

    def __init__(self, metrics: PDMetrics, *, prefill_timeout: float = 60.0):
        self.metrics = metrics
        self.prefill_timeout = prefill_timeout

    def count_decode_only(self, model: str) -> None:
        """Count a request the scheduler kept on the decode endpoint alone."""
        self.metrics.decisions.labels(model=model, decision="decode_only").inc()

    def count_delegated_split(self, model: str) -> None:
        """Count a split request whose legs the decode endpoint's sidecar runs.

        The gateway calls this in sidecar mode, where it only names the prefill endpoint
        (`x-prefiller-host-port`); `run_prefill` counts the decision where the legs run.
        """
        self.metrics.decisions.labels(model=model, decision="prefill_decode").inc()

    async def run_prefill(
        self,
        *,
        request: dict[str, Any],
        path: str,
        request_id: str,
        model: str,
        prefill_address: str,
        send: PrefillSender,
        headers: list[tuple[str, str]] | None = None,
    ) -> PrefillOutcome:
        """Send the prefill leg to `prefill_address` and return what the decode leg needs.

        `request` is the client's parsed body, `path` the OpenAI path (`/v1/completions` or
        `/v1/chat/completions`), `headers` extra headers for the leg (for example an engine
        API key). A failed leg becomes a decode-only outcome when `send` raises
        PrefillLegFailed, OSError or asyncio.TimeoutError, or the endpoint returns a non-2xx,
        non-4xx status or a body that is not a JSON object. Other exceptions from `send`
        propagate. Cancellation of the calling task cancels the leg.
        """
        self.metrics.decisions.labels(model=model, decision="prefill_decode").inc()
        leg_headers = [(REQUEST_ID, request_id), ("content-type", "application/json")]
        leg_headers += [(k, v) for k, v in headers or [] if k.lower() not in (REQUEST_ID, "content-type")]
        started = time.perf_counter()
        try:
            status, body = await send(prefill_address, path, dumps(build_prefill_body(request)), leg_headers, self.prefill_timeout)
        except PrefillLegFailed as exc:
            return self._fallback(request, model, request_id, prefill_address, f"prefill_{exc.kind}", str(exc))
        except asyncio.TimeoutError:
            return self._fallback(request, model, request_id, prefill_address, "prefill_timeout", "timed out")
        except OSError as exc:
            return self._fallback(request, model, request_id, prefill_address, "prefill_connect", str(exc))
        finally:
            self.metrics.prefill_duration.labels(model=model).observe(time.perf_counter() - started)

        if 400 <= status < 500:
            logger.info("request %s: prefill endpoint %s returned %d; passing it to the client", request_id, prefill_address, status)
            return PrefillOutcome(response=(status, body), prefill_address=prefill_address)
        if not 200 <= status < 300:
            reason = "prefill_5xx" if status >= 500 else "prefill_status"
            return self._fallback(request, model, request_id, prefill_address, reason, f"status {status}")

        try:
            response = loads(body)
        except JSONDecodeError:
            return self._fallback(request, model, request_id, prefill_address, "prefill_bad_body", "body is not JSON")
        if not isinstance(response, dict):
            return self._fallback(request, model, request_id, prefill_address, "prefill_bad_body", "body is not an object")

        params = response.get("kv_transfer_params")
        cached = _cached_tokens(response.get("usage"))
        if not isinstance(params, dict) or not params.get("do_remote_prefill"):
            # The prefill engine did not keep blocks (no connector, or it could not stage
            # them): the decode engine computes the whole prompt itself.
            self.metrics.fallbacks.labels(model=model, reason="no_transfer_params").inc()
            logger.info("request %s: prefill endpoint %s returned no kv_transfer_params; decode recomputes", request_id, prefill_address)
            return PrefillOutcome(
                decode_body=dumps(build_decode_body(request, None)),
                prefill_address=prefill_address,
                fallback_reason="no_transfer_params",
            )
        return PrefillOutcome(
            decode_body=dumps(build_decode_body(request, params)),
            kv_transfer_params=params,
            prefill_address=prefill_address,
            prefill_cached_tokens=cached,
        )

    def _fallback(
        self, request: dict[str, Any], model: str, request_id: str, prefill_address: str, reason: str, detail: str
    ) -> PrefillOutcome:
        self.metrics.fallbacks.labels(model=model, reason=reason).inc()
        logger.warning(
            "request %s: prefill leg to %s failed (%s: %s); falling back to decode-only",
            request_id,
            prefill_address,
            reason,
            detail,
        )
        return PrefillOutcome(
            decode_body=dumps(build_decode_body(request, None)),
            prefill_address=prefill_address,
            fallback_reason=reason,
        )

    async def release_prefill(self, outcome: PrefillOutcome) -> bool:
        """Tell the prefill engine to free the blocks held for `outcome`; return True if freed.

        Only the host of the prefill endpoint that served the leg is contacted, on the
        side-channel port its own response named, so a response cannot direct the gateway elsewhere.
        Idempotent; failures are logged and leave the blocks to the prefill engine's lease.
        """
        params = outcome.kv_transfer_params
        if outcome.released or not params or not outcome.prefill_address:
            return False
        outcome.released = True
        host = str(params.get("remote_host") or "")
        port = params.get("remote_port")
        request_id = params.get("remote_request_id")
        prefill_host = outcome.prefill_address.rsplit(":", 1)[0]
        if not request_id or not isinstance(port, int) or host != prefill_host:
            logger.info("not releasing prefill blocks early: params name %s:%s, prefill endpoint is %s", host, port, prefill_host)
            return False
        try:
            return await asyncio.wait_for(_send_free(host, port, str(request_id)), _FREE_TIMEOUT_SECONDS)
        except (OSError, asyncio.TimeoutError, ValueError) as exc:
            logger.warning("request %s: early release of prefill blocks on %s:%d failed: %s", request_id, host, port, exc)
            return False


async def _send_free(host: str, port: int, request_id: str) -> bool:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(encode_side_channel_frame({"op": "free", "request_id": request_id}))
        await writer.drain()
        header = await reader.readexactly(struct.calcsize(SIDE_CHANNEL_FRAME_HEADER))
        (length,) = struct.unpack(SIDE_CHANNEL_FRAME_HEADER, header)
        reply = msgpack.unpackb(await reader.readexactly(length), raw=False)
    except asyncio.IncompleteReadError as exc:
        raise ValueError("side channel closed before replying") from exc
    finally:
        writer.close()
    return bool(isinstance(reply, dict) and reply.get("freed"))


def _cached_tokens(usage: Any) -> int | None:
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    if not isinstance(details, dict):
        return None
    value = details.get("cached_tokens")
    return value if isinstance(value, int) else None


class UsageRewriter:
    """Set `usage.prompt_tokens_details.cached_tokens` in a decode response to the prefill's count.

    For SSE, `feed(chunk)` returns the bytes to relay now and `flush()` the rest at the end.
    Complete events without a `"usage"` key are returned byte for byte. An unfinished event
    at the end of a chunk is held back until its boundary arrives, so a usage event split
    across chunks is still found. `rewrite_json(body)` does the same for a whole JSON body.
    """

    __slots__ = ("cached_tokens", "_pending", "rewritten")

    def __init__(self, cached_tokens: int):
        self.cached_tokens = cached_tokens
        self._pending = b""
        self.rewritten = False

    def feed(self, data: bytes) -> bytes:
        """Return the part of the stream that is ready to relay after `data`."""
        if self._pending:
            data = self._pending + data
            self._pending = b""
        cut = _event_end(data)
        if cut < len(data):
            self._pending = data[cut:]
            data = data[:cut]
        if data and b'"usage"' in data:
            data = self._rewrite_events(data)
        return data

    def flush(self) -> bytes:
        """Return bytes still held back (an unterminated last event)."""
        data, self._pending = self._pending, b""
        if data and b'"usage"' in data:
            data = self._rewrite_events(data)
        return data

    def rewrite_json(self, body: bytes) -> bytes:
        """Return a JSON response with its usage rewritten, or `body` unchanged if it has none."""
        try:
            response = loads(body)
        except JSONDecodeError:
            return body
        if not isinstance(response, dict) or not self._apply(response):
            return body
        return dumps(response)

    def _rewrite_events(self, data: bytes) -> bytes:
        lines = data.split(b"\n")
        for index, line in enumerate(lines):
            if not line.startswith(b"data:") or b'"usage"' not in line:
                continue
            stripped = line[5:].strip()
            try:
                event = loads(stripped)
            except JSONDecodeError:
                continue
            if isinstance(event, dict) and self._apply(event):
                ending = b"\r" if line.endswith(b"\r") else b""
                lines[index] = b"data: " + dumps(event) + ending
        return b"\n".join(lines)

    def _apply(self, response: dict[str, Any]) -> bool:
        usage = response.get("usage")
        if not isinstance(usage, dict):
            return False
        details = usage.get("prompt_tokens_details")
        details = dict(details) if isinstance(details, dict) else {}
        details["cached_tokens"] = self.cached_tokens
        usage["prompt_tokens_details"] = details
        self.rewritten = True
        return True


def _event_end(data: bytes) -> int:
    """Return the index just past the last SSE event boundary in `data` (0 if none)."""
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\r\n\r\n")
    if lf < 0 and crlf < 0:
        return 0
    if crlf >= 0 and crlf + 4 > lf + 2:
        return crlf + 4
    return lf + 2
