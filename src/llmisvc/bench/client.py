"""One benchmark request over HTTP: streams the response and records its timing.

Time to first token is measured to the first chunk carrying text. Inter-token latencies
are the gaps between later text chunks, so a chunk carrying several tokens counts once,
as in vLLM's benchmark. Output and cached token counts come from the final usage chunk
(`stream_options.include_usage`), falling back to the number of text chunks.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import aiohttp

from llmisvc.bench.workloads import BenchRequest
from llmisvc.protocol.headers import ENDPOINT


@dataclass
class RequestOutcome:
    """Measurements of one request; times in seconds, `start` on the monotonic clock."""

    success: bool = False
    error: str = ""
    start: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    endpoint: str = ""
    text: str = ""


async def send(session: aiohttp.ClientSession, url: str, model: str, request: BenchRequest, headers: dict[str, str], extra_body: dict) -> RequestOutcome:
    """Send `request` as a streamed completion or chat completion and return its outcome."""
    body = {"model": model, "max_tokens": request.max_tokens, "stream": True, "stream_options": {"include_usage": True}, **extra_body}
    chat = request.messages is not None
    if chat:
        body["messages"] = request.messages
    else:
        body["prompt"] = request.prompt

    outcome = RequestOutcome(start=time.perf_counter())
    pieces: list[str] = []
    last = outcome.start
    try:
        async with session.post(url, json=body, headers=headers) as response:
            outcome.endpoint = response.headers.get(ENDPOINT, "")
            if response.status != 200:
                outcome.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return outcome
            buffer = b""
            async for data in response.content.iter_any():
                buffer += data
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    if not event.startswith(b"data: "):
                        continue
                    payload = event[6:].strip()
                    if payload == b"[DONE]":
                        continue
                    chunk = json.loads(payload)
                    now = time.perf_counter()
                    text = _chunk_text(chunk, chat)
                    if text:
                        if not pieces:
                            outcome.ttft = now - outcome.start
                        else:
                            outcome.itl.append(now - last)
                        pieces.append(text)
                        last = now
                    usage = chunk.get("usage")
                    if usage:
                        outcome.prompt_tokens = usage.get("prompt_tokens", 0)
                        outcome.output_tokens = usage.get("completion_tokens", 0)
                        outcome.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
        return outcome

    outcome.latency = time.perf_counter() - outcome.start
    outcome.text = "".join(pieces)
    outcome.output_tokens = outcome.output_tokens or len(pieces)
    outcome.success = bool(pieces) or outcome.output_tokens == 0
    if not outcome.success:
        outcome.error = "stream ended without output"
    return outcome


def _chunk_text(chunk: dict, chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if chat:
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""
