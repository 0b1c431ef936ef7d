"""Capacity of this machine for replicas: CPU cores, CUDA devices, installed engines."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

_NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


@dataclass(frozen=True)
class Machine:
    """Capacity the planning step checks a spec against.

    `gpu_ids` are the CUDA device indices replicas may claim, in order.
    """

    cpu_count: int
    gpu_ids: tuple[int, ...]
    vllm_installed: bool
    memory_bytes: int | None = None  # physical memory; None when unknown

    @property
    def gpu_count(self) -> int:
        return len(self.gpu_ids)

    @classmethod
    def detect(cls) -> "Machine":
        """Inspect this host without importing torch or initialising CUDA.

        CUDA devices come from the NVIDIA driver's `/proc` entries, narrowed by this
        process's `CUDA_VISIBLE_DEVICES` when it lists plain indices.
        """
        cpu_count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        gpu_total = len(list(_NVIDIA_GPUS.iterdir())) if _NVIDIA_GPUS.is_dir() else 0
        gpu_ids = tuple(range(gpu_total))
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            entries = [entry.strip() for entry in visible.split(",") if entry.strip()]
            if all(entry.isdigit() for entry in entries):
                gpu_ids = tuple(int(entry) for entry in entries if int(entry) < gpu_total)
            # NOTE: UUID-style CUDA_VISIBLE_DEVICES entries are passed through unchanged by
            # keeping every device; mapping UUIDs to indices needs NVML.
        vllm_installed = importlib.util.find_spec("vllm") is not None
        try:
            memory_bytes: int | None = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            memory_bytes = None
        return cls(
            cpu_count=max(1, cpu_count),
            gpu_ids=gpu_ids,
            vllm_installed=vllm_installed,
            memory_bytes=memory_bytes,
        )
