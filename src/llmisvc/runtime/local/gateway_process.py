"""The one gateway process of this machine and the client of its admin API.

The control process starts `llmisvc gateway` on the configured port, or adopts the one a
previous control process left running, and keeps it alive. It pushes every service's routing
state through the admin API (`PUT/DELETE/GET /admin/services...`), authenticated with the
token in `$LLMISVC_HOME/admin-token`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import subprocess
import time
from typing import Any, Awaitable, Callable

import aiohttp

from llmisvc.runtime.local.paths import Home
from llmisvc.runtime.local.process import LLMISVC_COMMAND, ProcessRef, is_alive, start_detached, terminate
from llmisvc.runtime.local.store import Store

logger = logging.getLogger(__name__)

ADMIN_TOKEN_HEADER = "x-llmisvc-admin-token"
_START_TIMEOUT_S = 60.0
_WATCH_INTERVAL_S = 0.5


class GatewayError(RuntimeError):
    """The gateway could not be started or rejected an admin request."""


def ensure_admin_token(home: Home) -> str:
    """Return the admin token, creating the file (mode 0600) on first use."""
    if not home.admin_token.exists():
        fd = os.open(home.admin_token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as token_file:
            token_file.write(secrets.token_urlsafe(32))
    return home.admin_token.read_text().strip()


class GatewayProcess:
    """Start, adopt and supervise the gateway on 127.0.0.1:`port`.

    `on_restart` is awaited after the gateway was (re)started, so the caller can push
    every service again. Raises GatewayError from `ensure_running` when the port is taken
    by another program or the gateway does not come up.
    """

    def __init__(self, home: Home, port: int, store: Store, session: aiohttp.ClientSession,
                 on_restart: Callable[[], Awaitable[None]]):
        self.home = home
        self.port = port
        self._store = store
        self._session = session
        self._on_restart = on_restart
        self._token = ensure_admin_token(home)
        self._popen: subprocess.Popen | None = None
        self._ref: ProcessRef | None = None
        self._task: asyncio.Task | None = None
        self.restarts = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._ref.pid if self._ref else None

    async def ensure_running(self) -> None:
        """Adopt the recorded gateway when it is alive and responds, else start one."""
        stored = self._store.get_setting("gateway")
        if stored and stored.get("pid") is None:
            stored = None
        if stored and stored.get("port") == self.port:
            ref = ProcessRef(stored["pid"], stored["start_ticks"])
            if is_alive(ref) and await self._answers():
                self._ref = ref
                logger.info("adopted gateway pid %d on port %d", ref.pid, self.port)
                return
            if is_alive(ref):
                await terminate(ref, None, 5.0)
        elif stored and is_alive(ProcessRef(stored["pid"], stored["start_ticks"])):
            logger.info("stopping gateway pid %d on old port %s", stored["pid"], stored.get("port"))
            await terminate(ProcessRef(stored["pid"], stored["start_ticks"]), None, 5.0)
        await self._start()

    def watch(self) -> None:
        """Start the task that restarts the gateway when it exits."""
        self._task = asyncio.create_task(self._watch(), name="gateway watch")

    async def stop(self) -> None:
        """Stop watching and terminate the gateway."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._ref is not None:
            await terminate(self._ref, self._popen, 10.0)
            logger.info("gateway pid %d stopped", self._ref.pid)
            self._ref = None
        # The port is kept so the next control process serves on the same one.
        self._store.set_setting("gateway", {"port": self.port, "pid": None, "start_ticks": None})

    def detach(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _start(self) -> None:
        if _port_in_use(self.port):
            raise GatewayError(
                f"gateway port {self.port} on 127.0.0.1 is in use by another program; "
                "choose another with --gateway-port or LLMISVC_GATEWAY_PORT"
            )
        argv = LLMISVC_COMMAND + [
            "gateway", "--host", "127.0.0.1", "--port", str(self.port),
            "--admin-token-file", str(self.home.admin_token),
        ]
        self._popen, self._ref = start_detached(argv, self.home.gateway_log, dict(os.environ))
        logger.info("started gateway pid %d on port %d", self._ref.pid, self.port)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._popen.poll() is not None:
                raise GatewayError(f"gateway exited with code {self._popen.returncode}; see {self.home.gateway_log}")
            if await self._answers():
                self._store.set_setting("gateway", {"pid": self._ref.pid, "start_ticks": self._ref.start_ticks, "port": self.port})
                return
            await asyncio.sleep(0.2)
        await terminate(self._ref, self._popen, 5.0)
        raise GatewayError(f"gateway did not respond on port {self.port} within {_START_TIMEOUT_S:.0f}s; see {self.home.gateway_log}")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(_WATCH_INTERVAL_S)
            if self._popen is not None:
                self._popen.poll()
            if self._ref is not None and is_alive(self._ref):
                continue
            self.restarts += 1
            logger.warning("gateway pid %s exited; restarting (restart %d)", self.pid, self.restarts)
            try:
                await self._start()
                await self._on_restart()
            except GatewayError as exc:
                logger.error("gateway restart failed: %s; retrying in 5s", exc)
                await asyncio.sleep(5.0)

    async def _answers(self) -> bool:
        try:
            await self.list_services(timeout_s=2.0)
            return True
        except (GatewayError, aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    # admin API

    async def put_service(self, namespace: str, name: str, entry: dict) -> None:
        await self._admin("PUT", f"/admin/services/{namespace}/{name}", entry)

    async def delete_service(self, namespace: str, name: str) -> None:
        await self._admin("DELETE", f"/admin/services/{namespace}/{name}", None, missing_ok=True)

    async def list_services(self, timeout_s: float = 10.0) -> Any:
        return await self._admin("GET", "/admin/services", None, timeout_s=timeout_s)

    async def in_flight(self, namespace: str, name: str, address: str) -> int:
        """Return the gateway's in-flight request count for `address` of a service (0 if unknown)."""
        services = await self.list_services()
        for service in _service_list(services):
            if service.get("namespace") != namespace or service.get("name") != name:
                continue
            for endpoint in service.get("endpoints") or []:
                if endpoint.get("address") == address:
                    return int(endpoint.get("in_flight", endpoint.get("inflight", 0)) or 0)
        return 0

    async def _admin(self, method: str, path: str, body: dict | None, timeout_s: float = 10.0, missing_ok: bool = False) -> Any:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        headers = {ADMIN_TOKEN_HEADER: self._token}
        async with self._session.request(method, self.base_url + path, json=body, headers=headers, timeout=timeout) as response:
            text = await response.text()
            if missing_ok and response.status == 404:
                return None
            if response.status >= 300:
                raise GatewayError(f"gateway admin {method} {path} failed with {response.status}: {text[:500]}")
            return await response.json(content_type=None) if text else None


def _service_list(data: Any) -> list[dict]:
    """Normalise the admin listing: `{"services": [...]}`, a list, or a dict keyed by `ns/name`."""
    if isinstance(data, dict) and "services" in data:
        data = data["services"]
    if isinstance(data, dict):
        services = []
        for key, value in data.items():
            namespace, _, name = key.partition("/")
            services.append({"namespace": namespace, "name": name, **value})
        return services
    return list(data or [])


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False
