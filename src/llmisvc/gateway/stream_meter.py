"""Measurements taken on a response as it is relayed, without changing a byte of it.

`StreamMeter` watches an SSE body: event boundaries give TTFT and inter-token latency, and
the event that carries a non-null `usage` is parsed even when it, or the `[DONE]` after it,
arrives split across chunks. `BodyMeter` finds `usage` in the tail of a JSON body.
"""

from __future__ import annotations

import json
import logging

from .jsonutil import JSONDecodeError, loads
from .metrics import ModelMetrics

logger = logging.getLogger(__name__)

# Bytes of an unfinished SSE event kept to look for usage; a longer event is not inspected.
_MAX_PENDING_EVENT = 1 << 20
# Bytes at the end of a JSON body kept to find its `usage` object.
_BODY_TAIL = 8192

_decoder = json.JSONDecoder()


class StreamMeter:
    """Observe TTFT, inter-token latency and usage of one relayed SSE stream.

    `feed(data, now)` is called with each relayed chunk and the loop time; `usage` is the
    last non-null usage object seen.
    """

    __slots__ = ("_metrics", "_start", "_last_event", "_pending", "usage", "events")

    def __init__(self, metrics: ModelMetrics, start: float):
        self._metrics = metrics
        self._start = start
        self._last_event: float | None = None
        self._pending = b""
        self.usage: dict | None = None
        self.events = 0

    def feed(self, data: bytes, now: float) -> None:
        """Account for one chunk of the stream, as relayed at loop time `now` (seconds)."""
        count = data.count(b"\n\n") + data.count(b"\r\n\r\n")
        if count and b"[DONE]" in data:
            count -= 1
        if count > 0:
            self._observe_events(count, now)
        self._scan_usage(data)

    def _observe_events(self, count: int, now: float) -> None:
        self.events += count
        if self._last_event is None:
            self._metrics.ttft.observe(now - self._start)
            self._last_event = now
            count -= 1
            if count == 0:
                return
        gap = (now - self._last_event) / count
        itl = self._metrics.itl
        for _ in range(count):
            itl.observe(gap)
        self._last_event = now

    def _scan_usage(self, data: bytes) -> None:
        # Only complete events are inspected: bytes after the last event boundary wait in
        # _pending for the rest of their event.
        if self._pending:
            data = self._pending + data
            self._pending = b""
        if data.endswith(b"\n\n"):
            # The usual case: the read ended on an event boundary, so nothing waits.
            if b'"usage"' in data:
                self._parse_usage_events(data)
            return
        end = data.rfind(b"\n\n")
        if end < 0:
            end = data.rfind(b"\r\n\r\n")
        if end < 0:
            self._keep_pending(data)
            return
        if data[end : end + 4] == b"\r\n\r\n":
            cut = end + 4
        else:
            cut = end + 2
        if cut < len(data):
            self._keep_pending(data[cut:])
        if b'"usage"' in data[:cut]:
            self._parse_usage_events(data[:cut])

    def _keep_pending(self, data: bytes) -> None:
        if len(data) <= _MAX_PENDING_EVENT:
            self._pending = data

    def _parse_usage_events(self, events: bytes) -> None:
        for line in events.splitlines():
            if not line.startswith(b"data:") or b'"usage"' not in line:
                continue
            try:
                event = loads(line[5:])
            except JSONDecodeError:
                continue
            if isinstance(event, dict) and isinstance(event.get("usage"), dict):
                self.usage = event["usage"]


class BodyMeter:
    """Keep the tail of a non-streamed JSON body and return its `usage` object at the end."""

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, data: bytes) -> None:
        """Account for one chunk of the body."""
        if len(data) >= _BODY_TAIL:
            self._tail = data[-_BODY_TAIL:]
        else:
            self._tail = (self._tail + data)[-_BODY_TAIL:]

    def usage(self) -> dict | None:
        """Return the body's top-level `usage` object, or None when it has none."""
        tail = self._tail
        index = tail.rfind(b'"usage"')
        if index < 0:
            return None
        colon = tail.find(b":", index + 7)
        if colon < 0:
            return None
        try:
            value, _ = _decoder.raw_decode(tail[colon + 1 :].decode("utf-8", "replace").lstrip())
        except ValueError:
            return None
        return value if isinstance(value, dict) else None
