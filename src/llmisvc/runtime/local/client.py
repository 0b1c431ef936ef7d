"""The CLI's side of the control socket: start the control process on demand and call it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from typing import Callable

from llmisvc.runtime.local.paths import Home
from llmisvc.runtime.local.process import LLMISVC_COMMAND

_START_TIMEOUT_S = 90.0

# Exit code of `llmisvc control` when another control process holds this home's lock.
EXIT_ALREADY_RUNNING = 3


class ControlError(RuntimeError):
    """The control process rejected a request; `kind` is "spec" for invalid input."""

    def __init__(self, message: str, kind: str = ""):
        super().__init__(message)
        self.kind = kind


class ControlNotRunning(ControlError):
    """No control process listens on the socket."""


class ControlClient:
    """Talk to the control process of `home`."""

    def __init__(self, home: Home):
        self.home = home

    def is_running(self) -> bool:
        try:
            self.call("ping")
            return True
        except ControlNotRunning:
            return False

    def ensure_started(self, gateway_port: int | None = None) -> dict:
        """Start the control process (detached, logging to control.log) unless it runs.

        `gateway_port` None lets the control process choose (LLMISVC_GATEWAY_PORT, else
        the port it used last, else 8000). Returns the ping result (pid, gateway_port).
        Raises ControlError when it does not come up within 90 seconds, quoting the end of
        control.log.
        """
        try:
            return self.call("ping")
        except ControlNotRunning:
            pass
        self.home.ensure()
        process = self._spawn(gateway_port)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                return self.call("ping")
            except ControlNotRunning:
                pass
            if process.poll() is not None:
                try:
                    return self.call("ping")
                except ControlNotRunning:
                    pass
                if process.returncode != EXIT_ALREADY_RUNNING:
                    raise ControlError(f"the control process exited with code {process.returncode}:\n{_tail(self.home.control_log)}")
                # Another control process holds the lock: one that a concurrent CLI started,
                # or one still stopping after its last service was deleted. Try again.
                time.sleep(0.5)
                process = self._spawn(gateway_port)
            time.sleep(0.2)
        raise ControlError(f"the control process did not start within {_START_TIMEOUT_S:.0f}s:\n{_tail(self.home.control_log)}")

    def _spawn(self, gateway_port: int | None) -> subprocess.Popen:
        with open(self.home.control_log, "ab") as log:
            return subprocess.Popen(
                LLMISVC_COMMAND + ["control"] + ([] if gateway_port is None else ["--gateway-port", str(gateway_port)]),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                env=dict(os.environ, LLMISVC_HOME=str(self.home.root)),
            )

    def call(self, op: str, progress: Callable[[str], None] | None = None, **payload) -> dict:
        """Send one request and return its result; progress lines go to `progress`.

        Raises ControlNotRunning when nothing listens, ControlError when the request failed.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.home.socket))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise ControlNotRunning(f"no control process on {self.home.socket}") from exc
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot connect to {self.home.socket}: {exc}") from exc
        with sock, sock.makefile("rb") as replies:
            try:
                sock.sendall(json.dumps({"op": op, **payload}).encode() + b"\n")
            except (BrokenPipeError, ConnectionResetError) as exc:
                # The control process accepted the connection while it was stopping.
                raise ControlNotRunning(f"the control process on {self.home.socket} is stopping") from exc
            received = False
            try:
                for line in replies:
                    received = True
                    message = json.loads(line)
                    if "progress" in message:
                        if progress is not None:
                            progress(message["progress"])
                        continue
                    if message.get("ok"):
                        return message["result"]
                    raise ControlError(message.get("error", "request failed"), message.get("kind", ""))
            except ConnectionResetError:
                pass
        if not received:
            # Closed before any reply: the control process was stopping when it accepted.
            raise ControlNotRunning(f"the control process on {self.home.socket} is stopping")
        raise ControlError("the control process closed the connection without a reply; see " + str(self.home.control_log))


def _tail(path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
