"""Per-service admission control: a concurrency limit with a bounded priority queue.

A request takes a slot when one is free. Otherwise it waits in a queue ordered by
criticality (`Critical` before `Standard` before `Sheddable`, first come first served within
one level) until a finishing request hands its slot over. When the queue is full, an arriving
request displaces the newest waiter of a strictly lower level, which is rejected with 429
(`displaced`); with no such waiter the arriving request itself is rejected with 429
(`queue-full`). A waiter still queued after `queue_timeout` seconds gets 503.
"""

from __future__ import annotations

import asyncio
from collections import deque

from llmisvc.protocol.errors import BadRequestError, ServiceUnavailableError, TooManyRequestsError

CRITICAL = 0
STANDARD = 1
SHEDDABLE = 2

_LEVELS = {"critical": CRITICAL, "standard": STANDARD, "sheddable": SHEDDABLE}
LEVEL_NAMES = ("Critical", "Standard", "Sheddable")


def parse_criticality(value: str | bytes | None, default: int = STANDARD, param: str = "criticality") -> int:
    """Return the level for `Critical`, `Standard` or `Sheddable` (any case); None gives `default`.

    Raises BadRequestError naming `param` for any other value.
    """
    if value is None:
        return default
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    level = _LEVELS.get(text.strip().lower())
    if level is None:
        raise BadRequestError(
            f"invalid {param} {text!r}: expected Critical, Standard or Sheddable", param=param
        )
    return level


class Admission:
    """Concurrency slots and the priority queue of one service.

    `max_concurrency` 0 means no limit (every request is admitted at once). `max_queue` bounds
    the waiters across all levels; `queue_timeout` is in seconds.
    """

    def __init__(self, max_concurrency: int = 0, max_queue: int = 1024, queue_timeout: float = 30.0):
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.active = 0
        self._queues: tuple[deque[asyncio.Future], ...] = (deque(), deque(), deque())
        self.queued = 0

    def configure(self, max_concurrency: int, max_queue: int, queue_timeout: float) -> None:
        """Change the limits; waiters that now fit are admitted at once."""
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        while self.queued and (max_concurrency == 0 or self.active < max_concurrency):
            self.active += 1
            self._wake_next()

    def try_acquire(self) -> bool:
        """Take a slot if one is free without waiting; return whether it was taken."""
        if self.max_concurrency == 0 or (self.active < self.max_concurrency and not self.queued):
            self.active += 1
            return True
        return False

    async def acquire(self, level: int) -> None:
        """Wait for a slot at priority `level`.

        Raises TooManyRequestsError when the queue is full (or this waiter is displaced) and
        ServiceUnavailableError when the wait passes `queue_timeout`.
        """
        if self.try_acquire():
            return
        if self.max_queue <= 0:
            raise TooManyRequestsError("service is at its concurrency limit", drop_reason="over-capacity")
        if self.queued >= self.max_queue:
            self._displace_lower_than(level)
        waiter = asyncio.get_running_loop().create_future()
        self._queues[level].append(waiter)
        self.queued += 1
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.queue_timeout)
        except asyncio.TimeoutError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # The slot was handed over just as the timer fired: keep it.
                return
            self._remove(level, waiter)
            raise ServiceUnavailableError(
                f"request waited {self.queue_timeout:g} s in the admission queue without a free slot"
            ) from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()
            else:
                self._remove(level, waiter)
            raise

    def release(self) -> None:
        """Give back a slot, handing it to the highest-priority waiter if any."""
        if self.queued and (self.max_concurrency == 0 or self.active <= self.max_concurrency):
            self._wake_next()
            return
        self.active -= 1

    def _wake_next(self) -> None:
        for queue in self._queues:
            while queue:
                waiter = queue.popleft()
                self.queued -= 1
                if not waiter.done():
                    waiter.set_result(None)
                    return
        # Every queued waiter had already left, so the slot is free again.
        self.active -= 1

    def _displace_lower_than(self, level: int) -> None:
        for lower in range(SHEDDABLE, level, -1):
            queue = self._queues[lower]
            while queue:
                victim = queue.pop()
                self.queued -= 1
                if not victim.done():
                    victim.set_exception(
                        TooManyRequestsError(
                            "request was displaced from the admission queue by a more critical one",
                            drop_reason="displaced",
                        )
                    )
                    return
        raise TooManyRequestsError(
            f"service is at its concurrency limit and its admission queue is full ({self.max_queue} waiting)",
            drop_reason="queue-full",
        )

    def _remove(self, level: int, waiter: asyncio.Future) -> None:
        try:
            self._queues[level].remove(waiter)
        except ValueError:
            return
        self.queued -= 1
