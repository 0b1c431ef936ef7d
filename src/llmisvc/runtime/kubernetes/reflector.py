"""A list-then-watch cache of one kind that re-lists on every watch (re)connect.

Watching only from the last resourceVersion after a disconnect is not enough: an object deleted
while the stream was down (or whose DELETE event the server never sent) would stay in the cache
for as long as the process lives. So each connect starts with a full list, and every cached
object missing from that list is reported as deleted.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

import aiohttp

from llmisvc.runtime.kubernetes.client import ApiError, KubeClient, WatchExpired

logger = logging.getLogger(__name__)

# (event type "ADDED" / "MODIFIED" / "DELETED", object) -> None
EventHandler = Callable[[str, dict], Awaitable[None]]


def object_key(obj: dict) -> tuple[str, str]:
    """Return (namespace, name) of `obj`."""
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "", meta.get("name") or ""


class Reflector:
    """Keep `items` equal to the API server's objects of one kind, calling `on_event` for
    every change, including deletions found by a re-list.

    `run()` loops until cancelled; `relists` counts completed lists (tests wait on it).
    """

    def __init__(self, client: KubeClient, api_version: str, kind: str, on_event: EventHandler,
                 *, namespace: str | None = None, label_selector: str | None = None,
                 watch_timeout: int = 300, retry_delay: float = 1.0):
        self.client = client
        self.api_version = api_version
        self.kind = kind
        self.namespace = namespace
        self.label_selector = label_selector
        self.on_event = on_event
        self.watch_timeout = watch_timeout
        self.retry_delay = retry_delay
        self.items: dict[tuple[str, str], dict] = {}
        self.relists = 0
        self.synced = asyncio.Event()

    async def _emit(self, event_type: str, obj: dict) -> None:
        try:
            await self.on_event(event_type, obj)
        except Exception:  # one bad handler call must not stop the cache
            logger.exception("%s handler failed for %s %s/%s", self.kind, event_type, *object_key(obj))

    async def relist(self) -> str:
        """List the kind, report additions, changes and vanished objects; return the
        list's resourceVersion."""
        items, resource_version = await self.client.list(
            self.api_version, self.kind, self.namespace, self.label_selector
        )
        fresh = {object_key(obj): obj for obj in items}
        vanished = [key for key in self.items if key not in fresh]
        for key in vanished:
            obj = self.items.pop(key)
            logger.info("%s %s/%s vanished while the watch was down", self.kind, *key)
            await self._emit("DELETED", obj)
        for key, obj in fresh.items():
            old = self.items.get(key)
            self.items[key] = obj
            if old is None:
                await self._emit("ADDED", obj)
            elif (old.get("metadata") or {}).get("resourceVersion") != (obj.get("metadata") or {}).get("resourceVersion"):
                await self._emit("MODIFIED", obj)
        self.relists += 1
        self.synced.set()
        return resource_version

    async def _watch(self, resource_version: str) -> None:
        async for event in self.client.watch(self.api_version, self.kind, self.namespace,
                                             resource_version, self.label_selector,
                                             timeout_seconds=self.watch_timeout):
            event_type = event.get("type")
            obj = event.get("object") or {}
            if event_type == "BOOKMARK":
                continue
            key = object_key(obj)
            if event_type == "DELETED":
                self.items.pop(key, None)
            elif event_type in ("ADDED", "MODIFIED"):
                self.items[key] = obj
            else:
                continue
            await self._emit(event_type, obj)

    async def run(self) -> None:
        """List and watch forever, re-listing after every disconnect; cancel to stop."""
        failures = 0
        while True:
            try:
                resource_version = await self.relist()
                await self._watch(resource_version)
                logger.debug("%s watch closed by the server; re-listing", self.kind)
            except WatchExpired:
                logger.info("%s watch expired; re-listing", self.kind)
            except (aiohttp.ClientError, asyncio.TimeoutError, ApiError, ValueError) as error:
                # Doubling up to a minute, so a kind whose CRD is not installed costs one
                # request and one log line a minute, not one a second.
                delay = min(self.retry_delay * 2 ** failures, 60.0)
                failures += 1
                logger.warning("%s watch failed: %s; retrying in %.1fs", self.kind, error, delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
