"""Reading replica log files for `llmisvc logs`: the last N lines and following growth."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, TextIO

# Bytes read from the end of a file per step while looking for the last N lines.
_CHUNK = 64 * 1024


def tail_lines(path: Path, count: int | None) -> tuple[list[str], int]:
    """Return the last `count` lines of `path` (all when None) and the file size read up to."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return [], 0
    with open(path, "rb") as log:
        if count is None:
            data = log.read(size)
        else:
            start = size
            data = b""
            while start > 0 and data.count(b"\n") <= count:
                start = max(0, start - _CHUNK)
                log.seek(start)
                data = log.read(size - start)
    lines = data.decode("utf-8", "replace").splitlines()
    if count is not None:
        lines = lines[-count:] if count > 0 else []
    return lines, size


def follow(paths: list[Path], offsets: list[int], emit: Callable[[int, str], None],
           stop: Callable[[], bool] = lambda: False, interval_s: float = 0.2) -> None:
    """Call `emit(index, line)` for each complete line appended to `paths[index]` after `offsets[index]`.

    Runs until `stop()` returns True (or forever); a file that shrinks was rotated or
    recreated and is read again from its start.
    """
    partial = [b""] * len(paths)
    offsets = list(offsets)
    while not stop():
        for index, path in enumerate(paths):
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            if size < offsets[index]:
                offsets[index], partial[index] = 0, b""
            if size == offsets[index]:
                continue
            with open(path, "rb") as log:
                log.seek(offsets[index])
                data = partial[index] + log.read(size - offsets[index])
            offsets[index] = size
            *complete, partial[index] = data.split(b"\n")
            for line in complete:
                emit(index, line.decode("utf-8", "replace"))
        time.sleep(interval_s)


def print_lines(out: TextIO, prefix: str, lines: list[str]) -> None:
    for line in lines:
        out.write(f"{prefix}{line}\n")
    out.flush()
