"""Keep a gateway's routing state equal to the ready pods of one service's pool.

Runs beside the gateway in the scheduler pod (`llmisvc discover`): pod discovery
(`discovery.py`) reports the ready endpoints, and every change is sent to the gateway's
admin API as `PUT /admin/services/{namespace}/{name}` with the service entry. The entry is
also re-sent every `resend_seconds`, so a gateway container that restarted with an empty
table gets its service back without waiting for a pod change.

The config file (rendered into the scheduler's ConfigMap) is:

    namespace: llm
    name: qwen-chat
    entry: {model: ..., shape: scheduler, scheduler_config: null, criticality: Standard}
    discovery: {namespace: llm, selector: {...}, targetPort: 8000}
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
import yaml

from llmisvc.runtime.kubernetes.client import KubeClient
from llmisvc.runtime.kubernetes.discovery import PodDiscovery

logger = logging.getLogger(__name__)

ADMIN_TOKEN_HEADER = "x-llmisvc-admin-token"


class SyncConfigError(ValueError):
    """The sync config file is unreadable or incomplete."""


def load_sync_config(path: Path) -> dict:
    """Return the sync config of `path`; raises SyncConfigError naming the missing field."""
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise SyncConfigError(f"cannot read {path}: {error}") from None
    if not isinstance(config, dict):
        raise SyncConfigError(f"{path}: expected a mapping")
    for field in ("namespace", "name", "entry", "discovery"):
        if not config.get(field):
            raise SyncConfigError(f"{path}: {field}: required field is missing")
    for field in ("namespace", "selector", "targetPort"):
        if not config["discovery"].get(field):
            raise SyncConfigError(f"{path}: discovery.{field}: required field is missing")
    return config


class GatewaySync:
    """Send the service entry with the current endpoints to the gateway's admin API."""

    def __init__(self, client: KubeClient, config: dict, gateway_url: str, admin_token: str,
                 *, resend_seconds: float = 30.0, watch_timeout: int = 300,
                 ready_file: Path | None = None):
        self.config = config
        self.gateway_url = gateway_url.rstrip("/")
        self.admin_token = admin_token
        self.resend_seconds = resend_seconds
        # Created after the first successful send, for the container's readiness probe: the
        # pod takes no traffic before the gateway knows the service.
        self.ready_file = ready_file
        self.endpoints: list[dict] = []
        self.sent = 0
        self._changed = asyncio.Event()
        discovery = config["discovery"]
        self.discovery = PodDiscovery(
            client, discovery["namespace"], discovery["selector"], int(discovery["targetPort"]),
            self._on_endpoints, watch_timeout=watch_timeout,
        )

    async def _on_endpoints(self, endpoints: list[dict]) -> None:
        self.endpoints = endpoints
        self._changed.set()

    def entry(self) -> dict:
        """Return the service entry with the current endpoints.

        With `schedulerConfigFile`, the file is read each time, so an edited ConfigMap reaches
        the gateway on the next send. Raises SyncConfigError when it is unreadable.
        """
        entry = {**self.config["entry"], "endpoints": self.endpoints}
        path = self.config.get("schedulerConfigFile")
        if path:
            try:
                entry["scheduler_config"] = yaml.safe_load(Path(path).read_text())
            except (OSError, yaml.YAMLError) as error:
                raise SyncConfigError(f"cannot read scheduler config {path}: {error}") from None
        return entry

    async def _put(self, session: aiohttp.ClientSession) -> None:
        url = f"{self.gateway_url}/admin/services/{self.config['namespace']}/{self.config['name']}"
        body = self.entry()
        async with session.put(url, json=body, headers={ADMIN_TOKEN_HEADER: self.admin_token},
                               timeout=aiohttp.ClientTimeout(total=10)) as response:
            if response.status >= 400:
                raise RuntimeError(f"PUT {url} failed with {response.status}: {await response.text()}")
        self.sent += 1
        if self.ready_file is not None and self.sent == 1:
            self.ready_file.touch()
        logger.info("sent %d endpoints of %s/%s to the gateway", len(self.endpoints),
                    self.config["namespace"], self.config["name"])

    async def run(self) -> None:
        """Discover and send until cancelled; failed sends are retried after one second."""
        discovery_task = asyncio.create_task(self.discovery.run())
        try:
            async with aiohttp.ClientSession() as session:
                await self.discovery.reflector.synced.wait()
                self._changed.set()
                while True:
                    try:
                        await asyncio.wait_for(self._changed.wait(), self.resend_seconds)
                    except asyncio.TimeoutError:
                        pass
                    self._changed.clear()
                    try:
                        await self._put(session)
                    except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError,
                            SyncConfigError) as error:
                        logger.warning("sending endpoints to the gateway failed: %s; retrying", error)
                        await asyncio.sleep(1.0)
                        self._changed.set()
        finally:
            discovery_task.cancel()
            await asyncio.gather(discovery_task, return_exceptions=True)
