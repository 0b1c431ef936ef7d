"""Supervision of one replica process: start, probe, restart with backoff, stop.

A Replica runs one asyncio task that keeps its engine process alive the way the kubelet
keeps a container alive. Readiness gates routing. Liveness and a start-up deadline restart
a hung process. A process over its memory limit is killed and reported as OOMKilled, and
restarts back off exponentially. Everything the task observes goes to the `on_change` and
`on_event` callbacks of the owning service.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import aiohttp

from llmisvc.controller.plan import Workload
from llmisvc.runtime.local.probe_runner import run_probe
from llmisvc.runtime.local.process import (
    LLMISVC_COMMAND,
    ProcessRef,
    is_alive,
    group_rss_bytes,
    signal_group,
    start_detached,
    terminate,
)

logger = logging.getLogger(__name__)

# Seconds between checks for process exit and memory use.
_TICK_S = 0.2
# Restart delays after consecutive crashes (the kubelet uses 10s doubling to 5 minutes;
# a local replica restarts faster so a one-off crash costs little).
_BACKOFF_S = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0)
# A replica that stays ready this long counts as recovered and its backoff resets.
_BACKOFF_RESET_S = 60.0
# Consecutive crashes without recovering after which the replica reports CrashLoopBackOff.
CRASH_LOOP_THRESHOLD = 3
# Log lines kept from a crashed run for `describe`.
CRASH_TAIL_LINES = 20


@dataclass
class ReplicaRecord:
    """Replica state kept in the store, enough to adopt the process after a control restart."""

    id: str
    component: str
    slot: int
    revision: str
    log_path: str
    created: float
    devices: list[int] = field(default_factory=list)
    port: int | None = None
    pid: int | None = None
    start_ticks: int | None = None
    restarts: int = 0
    last_termination: dict | None = None  # reason, exit_code, finished, log_tail


def new_replica_id(workload: Workload) -> str:
    """Name a replica like a Deployment's pod: workload name, revision, random suffix."""
    return f"{workload.name}-{workload.revision[:5]}-{secrets.token_hex(3)[:5]}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Replica:
    """One supervised replica of `workload`; `start()` launches its supervision task.

    `on_change(replica)` runs after readiness, state or process changes;
    `on_event(type, reason, message)` records Kubernetes-style events.
    """

    def __init__(
        self,
        record: ReplicaRecord,
        workload: Workload,
        session: aiohttp.ClientSession,
        gpu_visible: bool,
        on_change: Callable[["Replica"], None],
        on_event: Callable[[str, str, str], None],
    ):
        self.record = record
        self.workload = workload
        self._session = session
        self._gpu_visible = gpu_visible
        self._on_change = on_change
        self._on_event = on_event
        self._popen: subprocess.Popen | None = None
        self._task: asyncio.Task | None = None
        self._consecutive_crashes = 0
        self._process_started = 0.0
        self._log_offset = 0
        self.state = "Pending"
        self.ready = False
        self.draining = False
        self.last_probe_detail = ""

    # public view

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def address(self) -> str | None:
        return f"127.0.0.1:{self.record.port}" if self.record.port else None

    @property
    def crash_looping(self) -> bool:
        return self._consecutive_crashes >= CRASH_LOOP_THRESHOLD

    def describe(self) -> dict:
        """Return the replica's observed state as plain data for `describe` and `get`."""
        return {
            "id": self.id,
            "component": self.record.component,
            "role": self.workload.role,
            "engine": self.workload.engine,
            "revision": self.record.revision,
            "port": self.record.port,
            "pid": self.record.pid,
            "state": "CrashLoopBackOff" if self.crash_looping and not self.ready else self.state,
            "ready": self.ready,
            "restarts": self.record.restarts,
            "devices": self.record.devices,
            "age_s": time.time() - self.record.created,
            "log_path": self.record.log_path,
            "last_termination": self.record.last_termination,
            "last_probe": self.last_probe_detail,
            "draining": self.draining,
        }

    # lifecycle

    def start(self) -> None:
        """Start supervising; adopts the recorded process when it still runs."""
        self._task = asyncio.create_task(self._supervise(), name=f"replica {self.id}")

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop supervising and terminate the process (SIGTERM, then SIGKILL after grace)."""
        self.state = "Terminating"
        self.ready = False
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        ref = self._ref()
        if ref is not None:
            await terminate(ref, self._popen, self.workload.grace_period_s if grace_s is None else grace_s)
            logger.info("replica %s stopped (pid %d)", self.id, ref.pid)
        self.state = "Stopped"

    def detach(self) -> None:
        """Stop supervising but leave the process running, for adoption by the next control process."""
        if self._task is not None:
            self._task.cancel()

    async def wait_ready_or_failed(self, timeout_s: float) -> bool:
        """Wait until ready (True) or crash-looping / timed out (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ready:
                return True
            if self.crash_looping:
                return False
            await asyncio.sleep(0.2)
        return False

    # supervision

    def _ref(self) -> ProcessRef | None:
        if self.record.pid is None or self.record.start_ticks is None:
            return None
        return ProcessRef(self.record.pid, self.record.start_ticks)

    async def _supervise(self) -> None:
        try:
            termination: dict | None = None
            ref = self._ref()
            if ref is not None and is_alive(ref):
                logger.info("replica %s: adopted running process %d on port %s", self.id, ref.pid, self.record.port)
                self._process_started = time.monotonic()
                self._log_offset = _file_size(Path(self.record.log_path))
                self.state = "Running"
            else:
                termination = self._launch()
            while True:
                if termination is None:
                    termination = await self._watch()
                self._record_termination(termination)
                self._consecutive_crashes += 1
                delay = _BACKOFF_S[min(self._consecutive_crashes - 1, len(_BACKOFF_S) - 1)]
                self.state = "CrashLoopBackOff" if self.crash_looping else "Restarting"
                self._on_change(self)
                await asyncio.sleep(delay)
                self.record.restarts += 1
                reason = termination["reason"]
                termination = self._launch()
                if termination is None:
                    self._on_event("Normal", "Restarted", f"replica {self.id} restarted (restart {self.record.restarts}) after {reason}")
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("replica %s: supervision failed", self.id)
            raise

    def _launch(self) -> dict | None:
        """Start the engine process on a fresh free port.

        Returns None when it started, else a termination record (the program is missing
        or cannot be executed), which the caller treats like a crash.
        """
        self.record.port = _free_port()
        log_path = Path(self.record.log_path)
        self._log_offset = _file_size(log_path)
        argv = self._command(self.record.port)
        env = dict(os.environ)
        env.update(self.workload.env)
        if self._gpu_visible:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(device) for device in self.record.devices)
        try:
            self._popen, ref = start_detached(argv, log_path, env)
        except OSError as exc:
            logger.error("replica %s: cannot start %s: %s", self.id, argv[0], exc)
            self._on_event("Warning", "Failed", f"cannot start {argv[0]} for replica {self.id}: {exc}")
            return {"reason": "StartError", "exit_code": None, "message": f"cannot start {argv[0]}: {exc.strerror or exc}"}
        self.record.pid, self.record.start_ticks = ref.pid, ref.start_ticks
        self._process_started = time.monotonic()
        self.state = "Starting"
        self.ready = False
        logger.info("replica %s: started pid %d on port %d: %s", self.id, ref.pid, self.record.port, " ".join(argv))
        self._on_event("Normal", "Started", f"started replica {self.id} (pid {ref.pid}, port {self.record.port})")
        self._on_change(self)
        return None

    def _command(self, port: int) -> list[str]:
        workload = self.workload
        placement = ["--host", "127.0.0.1", "--port", str(port)]
        if workload.engine == "vllm":
            args = list(workload.engine_args)
            model_index = args.index("--model")
            model = args[model_index + 1]
            del args[model_index : model_index + 2]
            model = model.removeprefix("hf://").removeprefix("file://")
            return ["vllm", "serve", model] + placement + args
        command = "engine" if workload.engine == "builtin" else "sim"
        threads = ["--threads", str(workload.threads)] if workload.threads is not None else []
        return LLMISVC_COMMAND + [command] + placement + threads + list(workload.engine_args)

    async def _watch(self) -> dict:
        """Watch the running process until it exits or must be restarted.

        Returns the termination record: reason (Error, Completed, OOMKilled, Unhealthy),
        exit code (None when unknown) and a message.
        """
        workload = self.workload
        started = self._process_started
        readiness = _ProbeState(workload.readiness)
        if self.ready:
            # An adopted replica that passed its readiness probe counts as ready.
            readiness.successes = workload.readiness.success_threshold
        liveness = _ProbeState(workload.liveness)
        startup = _ProbeState(workload.startup) if workload.startup is not None else None
        started_up = self.ready
        ready_since: float | None = time.monotonic() if self.ready else None
        next_memory_check = 0.0
        try:
            return await self._watch_loop(workload, started, readiness, liveness, startup, started_up, ready_since, next_memory_check)
        finally:
            for state in (readiness, liveness, startup):
                if state is not None and state.task is not None:
                    state.task.cancel()

    async def _watch_loop(self, workload, started, readiness, liveness, startup, started_up, ready_since, next_memory_check) -> dict:
        while True:
            await asyncio.sleep(_TICK_S)
            now = time.monotonic()
            exited = self._exit_status()
            if exited is not None:
                return exited

            if workload.memory_limit_bytes is not None and now >= next_memory_check:
                next_memory_check = now + 1.0
                rss = group_rss_bytes(self.record.pid)
                if rss is not None and rss > workload.memory_limit_bytes:
                    signal_group(self._ref(), signal.SIGKILL)
                    self._on_event("Warning", "OOMKilled", f"replica {self.id} used {rss >> 20} MiB, over its memory limit of {workload.memory_limit_bytes >> 20} MiB")
                    return {"reason": "OOMKilled", "exit_code": 137, "message": f"resident memory {rss >> 20} MiB over the limit {workload.memory_limit_bytes >> 20} MiB"}

            if startup is not None and not started_up:
                outcome = await startup.step(self, now - started)
                if outcome is True:
                    started_up = True
                elif outcome is False:
                    return await self._kill_unhealthy("startup probe failed: " + self.last_probe_detail)
                continue

            ready_outcome = await readiness.step(self, now - started)
            if ready_outcome is not None and ready_outcome != self.ready:
                self.ready = ready_outcome
                self.state = "Running"
                if ready_outcome:
                    ready_since = now
                    self._on_event("Normal", "Ready", f"replica {self.id} is ready on port {self.record.port}")
                else:
                    ready_since = None
                    self._on_event("Warning", "Unhealthy", f"readiness probe of replica {self.id} failed: {self.last_probe_detail}")
                self._on_change(self)
            if self.ready:
                started_up = True
            if ready_since is not None and now - ready_since > _BACKOFF_RESET_S:
                self._consecutive_crashes = 0

            if startup is None and not started_up and now - started > workload.startup_timeout_s:
                return await self._kill_unhealthy(f"not ready within {workload.startup_timeout_s:.0f}s of start")

            # An explicit liveness probe follows Kubernetes and counts from its initial delay.
            # The default one only counts once the replica has been ready, so a slow model
            # load is never taken for a hang.
            if started_up or (workload.liveness_explicit and startup is None):
                if await liveness.step(self, now - started) is False:
                    return await self._kill_unhealthy("liveness probe failed: " + self.last_probe_detail)

    def _exit_status(self) -> dict | None:
        if self._popen is not None:
            code = self._popen.poll()
            if code is None:
                return None
            if code < 0:
                return {"reason": "Error", "exit_code": 128 - code, "message": f"killed by {signal.Signals(-code).name}"}
            return {"reason": "Completed" if code == 0 else "Error", "exit_code": code, "message": f"exited with code {code}"}
        ref = self._ref()
        if ref is not None and is_alive(ref):
            return None
        # An adopted process is not this process's child, so its exit code is unknown.
        return {"reason": "Error", "exit_code": None, "message": "process exited (adopted, exit code unknown)"}

    async def _kill_unhealthy(self, message: str) -> dict:
        self._on_event("Warning", "Unhealthy", f"replica {self.id}: {message}; restarting")
        self.ready = False
        self._on_change(self)
        await terminate(self._ref(), self._popen, self.workload.grace_period_s)
        return {"reason": "Unhealthy", "exit_code": None, "message": message}

    def _record_termination(self, termination: dict) -> None:
        self.ready = False
        termination = dict(termination, finished=time.time(), log_tail=_tail(Path(self.record.log_path), self._log_offset, CRASH_TAIL_LINES))
        self.record.last_termination = termination
        self._popen = None
        self.record.pid = None
        self.record.start_ticks = None
        logger.warning("replica %s terminated: %s (%s)", self.id, termination["reason"], termination["message"])
        if termination["reason"] != "OOMKilled":
            self._on_event("Warning", "BackOff" if self.crash_looping else "Terminated", f"replica {self.id} terminated: {termination['message']}")


class _ProbeState:
    """Thresholds and timing of one probe; `step` runs it when its period is due."""

    def __init__(self, probe):
        self.probe = probe
        self.successes = 0
        self.failures = 0
        self.next_at = probe.initial_delay_s
        self.task: asyncio.Task | None = None

    async def step(self, replica: Replica, elapsed_s: float) -> bool | None:
        """Return True/False when a threshold is crossed, None otherwise.

        The probe runs in its own task so a slow probe never delays exit detection.
        """
        if self.task is None:
            if elapsed_s < self.next_at:
                return None
            self.next_at = elapsed_s + self.probe.period_s
            self.task = asyncio.create_task(run_probe(replica._session, self.probe, replica.record.port, replica.workload.serving_scheme))
            return None
        if not self.task.done():
            return None
        healthy, detail = self.task.result()
        self.task = None
        replica.last_probe_detail = detail
        if healthy:
            self.successes += 1
            self.failures = 0
            return True if self.successes >= self.probe.success_threshold else None
        self.failures += 1
        self.successes = 0
        return False if self.failures >= self.probe.failure_threshold else None


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _tail(path: Path, offset: int, lines: int) -> str:
    """Return the last `lines` lines written to `path` after byte `offset`."""
    try:
        with open(path, "rb") as log:
            log.seek(max(offset, _file_size(path) - 64 * 1024))
            data = log.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def record_from_dict(data: dict) -> ReplicaRecord:
    return ReplicaRecord(**data)


def record_to_dict(record: ReplicaRecord) -> dict:
    return asdict(record)
