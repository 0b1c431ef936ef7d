"""Operating-system processes: start detached, identify after a restart, measure, stop.

Replicas and the gateway run in their own sessions so they outlive a restart of the
control process, which then adopts them. A process is identified by PID plus its start
time from `/proc`, because a PID alone may have been reused by an unrelated process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

LLMISVC_COMMAND = [sys.executable, "-m", "llmisvc.cli.main"]
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcessRef:
    """A running process: PID and start time in clock ticks since boot (`/proc/PID/stat`)."""

    pid: int
    start_ticks: int


def start_detached(argv: list[str], log_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen, ProcessRef]:
    """Start `argv` in a new session with stdout and stderr appended to `log_path`.

    Returns the Popen (so this process can reap it) and its ProcessRef. Raises OSError
    when the program cannot be started.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    return process, ProcessRef(process.pid, start_ticks(process.pid) or 0)


def start_ticks(pid: int) -> int | None:
    """Return the start time of `pid` in clock ticks since boot, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses, so split after it.
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def is_alive(ref: ProcessRef) -> bool:
    """Return True when the process `ref` names still runs (not a zombie, PID not reused)."""
    return start_ticks(ref.pid) == ref.start_ticks


def rss_bytes(pid: int) -> int | None:
    """Return the resident set size of `pid` in bytes, or None if it is gone."""
    try:
        resident_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * _PAGE_SIZE


def group_rss_bytes(pgid: int) -> int | None:
    """Return the summed resident set size of every process in group `pgid`, in bytes.

    Engines such as vLLM run helper processes, which count toward a replica's memory like
    the processes of one container. Returns None when no process of the group is left.
    """
    total, found = 0, False
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[2]) != pgid or fields[0] == "Z":
            continue
        rss = rss_bytes(int(entry.name))
        if rss is not None:
            total, found = total + rss, True
    return total if found else None


def signal_group(ref: ProcessRef, signum: int) -> None:
    """Send `signum` to the process group of `ref` if that process still runs.

    The group is signalled so that helper processes an engine started go down with it.
    """
    if not is_alive(ref):
        return
    try:
        os.killpg(ref.pid, signum)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(ref.pid, signum)


async def terminate(ref: ProcessRef, popen: subprocess.Popen | None, grace_s: float) -> None:
    """Send SIGTERM, wait up to `grace_s` seconds for exit, then SIGKILL the group."""
    signal_group(ref, signal.SIGTERM)
    deadline = asyncio.get_running_loop().time() + max(0.0, grace_s)
    while asyncio.get_running_loop().time() < deadline:
        if popen is not None:
            popen.poll()
        if not is_alive(ref):
            break
        await asyncio.sleep(0.1)
    else:
        logger.warning("process %d did not exit within %.0fs of SIGTERM; sending SIGKILL", ref.pid, grace_s)
    signal_group(ref, signal.SIGKILL)
    if popen is not None:
        for _ in range(50):
            if popen.poll() is not None:
                break
            await asyncio.sleep(0.1)
