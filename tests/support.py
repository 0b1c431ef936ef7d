"""Helpers for tests that start real llmisvc processes on 127.0.0.1."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
LLMISVC = [sys.executable, "-m", "llmisvc.cli.main"]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_run(count: int) -> int:
    """Return the first of `count` consecutive TCP ports that were free a moment ago.

    For processes that take one port per replica from a base port (`sim --replicas N`
    and its KV-event endpoints). The run lies below the kernel's ephemeral range, because
    since Linux 4.6 outgoing connections take the even ports there and bind(0) the odd
    ones, so the port after a free_port() result is often a client socket's local port. Each
    port is probed on the wildcard address, because a ZMQ publisher binds `tcp://*:PORT`.
    """
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        first = random.randrange(min(10000, ephemeral_low // 2), ephemeral_low - count)
        probes = []
        try:
            for offset in range(count):
                probe = socket.socket()
                probe.bind(("", first + offset))
                probes.append(probe)
            return first
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError(f"no run of {count} free consecutive ports found in 100 tries")


def wait_http(url: str, timeout: float = 120.0, process: subprocess.Popen | None = None) -> None:
    """Poll `url` until it answers 200; raise if `process` exits or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {url} was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError) as exc:
            last_error = exc
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s: {last_error}")


def start(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `llmisvc ARGS` in its own process group with output in `log_path`."""
    log = open(log_path, "wb")
    return subprocess.Popen(
        LLMISVC + args,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def stop(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """Terminate a process group started by `start`, killing it if it does not exit."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout)


def run_cli(args: list[str], env: dict[str, str], timeout: float = 300.0, input_text: str | None = None) -> subprocess.CompletedProcess:
    """Run `llmisvc ARGS` to completion with `env` added to the environment; output as text."""
    return subprocess.run(
        LLMISVC + args,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input_text,
    )


def pids_with_env(name: str, value: str) -> list[int]:
    """Return PIDs of this user's processes whose environment has `name=value`.

    Processes started by an llmisvc control process inherit its LLMISVC_HOME, so this
    finds every process one test's runtime left behind.
    """
    needle = f"{name}={value}".encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (environ.startswith(needle) or b"\0" + needle in environ):
            found.append(int(entry.name))
    return found
