"""Sends a workload at a target arrival rate or concurrency and collects the outcomes.

Arrivals are Poisson (exponential gaps) or fixed-rate at `request_rate` requests per
second, or all at once when the rate is infinite. `max_concurrency` caps requests in
flight in every mode. A multi-turn conversation's next turn is queued when its previous
response arrives, so it competes with new arrivals like a user's follow-up would.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from dataclasses import dataclass

import aiohttp

from llmisvc.bench.client import RequestOutcome, send
from llmisvc.bench.workloads import BenchRequest, next_turn


@dataclass
class RunSettings:
    """How to send: target URL, model, arrival process and limits."""

    url: str
    model: str
    request_rate: float = math.inf
    arrival: str = "poisson"
    max_concurrency: int | None = None
    timeout: float = 600.0
    api_key: str | None = None
    seed: int = 0
    progress: bool = True
    extra_body: dict | None = None


async def run(settings: RunSettings, requests: list[BenchRequest]) -> tuple[list[RequestOutcome], float]:
    """Send every request (and follow-up turns); return outcomes in completion order and the duration (s)."""
    rng = random.Random(settings.seed)
    limit = asyncio.Semaphore(settings.max_concurrency) if settings.max_concurrency else None
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    total = sum(1 + len(r.questions) for r in requests)
    progress = _progress(total, settings.progress)
    outcomes: list[RequestOutcome] = []
    tasks: set[asyncio.Task] = set()

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=settings.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(request: BenchRequest) -> None:
            if limit is not None:
                async with limit:
                    outcome = await send(session, settings.url, settings.model, request, headers, settings.extra_body or {})
            else:
                outcome = await send(session, settings.url, settings.model, request, headers, settings.extra_body or {})
            outcomes.append(outcome)
            if progress is not None:
                progress.update(1)
            follow = next_turn(request, outcome.text) if outcome.success else None
            if follow is not None:
                spawn(follow)
            elif request.questions and progress is not None:
                progress.update(len(request.questions))  # turns never sent after a failure

        def spawn(request: BenchRequest) -> None:
            task = asyncio.get_running_loop().create_task(one(request))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        started = time.perf_counter()
        for index, request in enumerate(requests):
            if index and math.isfinite(settings.request_rate):
                gap = rng.expovariate(settings.request_rate) if settings.arrival == "poisson" else 1.0 / settings.request_rate
                await asyncio.sleep(gap)
            spawn(request)
        while tasks:
            await asyncio.gather(*list(tasks))
        duration = time.perf_counter() - started
    if progress is not None:
        progress.close()
    return outcomes, duration


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return _LineProgress(total)
    return tqdm(total=total, unit="req", desc="requests")


class _LineProgress:
    """A progress line on stderr for when tqdm is not installed (it is not a dependency)."""

    def __init__(self, total: int):
        self.total = total
        self.done = 0

    def update(self, count: int) -> None:
        self.done += count
        sys.stderr.write(f"\rrequests: {self.done}/{self.total}")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")
