"""Processes and backends for the gateway tests.

`GatewayProcess` runs a real `llmisvc gateway` with its admin API enabled; `SimProcess` runs
real `llmisvc sim` replicas; `ScriptedBackend` is a small real HTTP/1.1 server in a thread
whose responses are scripted byte by byte, for behaviour the simulator does not have
(SSE split at every byte offset, a 400 to a streaming request, a stall, header capture).
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import requests

from support import free_port, free_port_run, start, stop, wait_http

ADMIN_TOKEN = "gateway-test-admin-token"


class GatewayProcess:
    """A `llmisvc gateway` on 127.0.0.1 with an admin token; `url` is its base URL."""

    def __init__(self, tmp_path: Path, *extra_args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        token_file = tmp_path / f"admin-token-{self.port}"
        token_file.write_text(ADMIN_TOKEN + "\n")
        self.log_path = tmp_path / f"gateway-{self.port}.log"
        self.process = start(
            ["gateway", "--port", str(self.port), "--admin-token-file", str(token_file), *extra_args],
            self.log_path,
            env,
        )
        try:
            wait_http(self.url + "/health", timeout=30, process=self.process)
        except Exception:
            stop(self.process)
            raise

    def put_service(self, name: str, entry: dict, namespace: str = "default") -> dict:
        """Create or replace a service through the admin API and return its view."""
        response = requests.put(
            f"{self.url}/admin/services/{namespace}/{name}",
            json=entry,
            headers={"x-llmisvc-admin-token": ADMIN_TOKEN},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        return response.json()

    def delete_service(self, name: str, namespace: str = "default") -> None:
        """Remove a service through the admin API."""
        response = requests.delete(
            f"{self.url}/admin/services/{namespace}/{name}", headers={"x-llmisvc-admin-token": ADMIN_TOKEN}, timeout=10
        )
        assert response.status_code == 200, response.text

    def service(self, name: str, namespace: str = "default") -> dict:
        """Return the admin API view of one service."""
        response = requests.get(
            f"{self.url}/admin/services/{namespace}/{name}", headers={"x-llmisvc-admin-token": ADMIN_TOKEN}, timeout=10
        )
        assert response.status_code == 200, response.text
        return response.json()

    def metric(self, name: str, **labels: str) -> float:
        """Return the value of one sample on /metrics (0.0 when absent)."""
        return scrape(self.url + "/metrics", name, **labels)

    def log(self) -> str:
        """Return the gateway's log so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop(self.process)


class SimProcess:
    """`llmisvc sim` replicas on consecutive ports from `port`."""

    def __init__(self, tmp_path: Path, model: str, *extra_args: str, replicas: int = 1):
        self.port = free_port_run(replicas)
        self.addresses = [f"127.0.0.1:{self.port + i}" for i in range(replicas)]
        self.log_path = tmp_path / f"sim-{self.port}.log"
        self.process = start(
            ["sim", "--port", str(self.port), "--served-model-name", model, "--replicas", str(replicas), *extra_args],
            self.log_path,
        )
        try:
            for address in self.addresses:
                wait_http(f"http://{address}/health", timeout=60, process=self.process)
        except Exception:
            stop(self.process)
            raise

    def metric(self, index: int, name: str, **labels: str) -> float:
        """Return one sample of replica `index`'s /metrics."""
        return scrape(f"http://{self.addresses[index]}/metrics", name, **labels)

    def stop(self) -> None:
        stop(self.process)


def scrape(url: str, name: str, **labels: str) -> float:
    """Return the sum of samples named `name` whose labels include `labels` (0.0 when none)."""
    text = requests.get(url, timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.match(r"([^{ ]+)(\{[^}]*\})? (\S+)", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll `condition` until it is true or `timeout` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def no_scheduler_entry(model: str, addresses: list[str], **extra) -> dict:
    """Return a service entry with round-robin routing over `addresses`."""
    return {"model": model, "shape": "no-scheduler", "endpoints": [{"address": a} for a in addresses], **extra}


@dataclass
class RecordedRequest:
    """A request as a ScriptedBackend received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float


@dataclass
class BackendConnection:
    """The socket of one request the script responds to, with helpers to write raw bytes."""

    sock: socket.socket
    request: RecordedRequest
    closed_at: list[float] = field(default_factory=list)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_head(self, status: int, headers: dict[str, str]) -> None:
        lines = [f"HTTP/1.1 {status} X"] + [f"{k}: {v}" for k, v in headers.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())

    def send_chunk(self, data: bytes) -> None:
        self.sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))

    def end_chunks(self) -> None:
        self.sock.sendall(b"0\r\n\r\n")

    def send_json(self, status: int, obj: object) -> None:
        body = json.dumps(obj).encode()
        self.send_head(status, {"content-type": "application/json", "content-length": str(len(body))})
        self.sock.sendall(body)

    def wait_closed(self, timeout: float) -> float | None:
        """Block until the peer closes the connection; return the loop time or None on timeout."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return time.monotonic()
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic()
        except socket.timeout:
            return None


Script = Callable[[BackendConnection], bool]


class ScriptedBackend:
    """A threaded HTTP/1.1 server whose every response is produced by `script(connection)`.

    The script returns True to keep the connection open for the next request. Every request
    is recorded in `requests`.
    """

    def __init__(self, script: Script):
        self.script = script
        self.requests: list[RecordedRequest] = []
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(256)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._stopped = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stopped:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0"))
                while len(buffer) < length:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buffer += data
                body, buffer = buffer[:length], buffer[length:]
                request = RecordedRequest(method, path, headers, body, time.monotonic())
                self.requests.append(request)
                if not self.script(BackendConnection(sock, request)):
                    return
        except OSError:
            return
        finally:
            sock.close()

    def stop(self) -> None:
        self._stopped = True
        self._listener.close()
