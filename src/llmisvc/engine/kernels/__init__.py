"""Native CPU kernels, compiled from the C sources in this package on first use.

The sources are built with the system C compiler (`$CC`, else `cc`) into a shared library
cached under `$XDG_CACHE_HOME/llmisvc/kernels` (default `~/.cache/llmisvc/kernels`), keyed
by a hash of the sources, the flags and the compiler's version, and called through ctypes.
They need x86-64 with AVX512-BF16. On other CPUs, without a compiler, when the build fails,
or with `LLMISVC_NATIVE_KERNELS=0` (or `false`, `off`, `no`), `load()` returns None and the engine uses PyTorch's
kernels only. OpenMP pragmas bind to the `libgomp.so.1` that PyTorch has already loaded, so
the kernels share PyTorch's thread pool instead of starting a second one.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
# Status codes of llmisvc_attention_bf16 other than success (0).
ATTENTION_OUT_OF_MEMORY = -3
COMPILE_FLAGS = ["-O3", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"]
# LLMISVC_NATIVE_KERNELS values (case-insensitive) that turn the kernels off.
DISABLING_VALUES = frozenset({"0", "false", "off", "no"})
COMPILE_TIMEOUT_SECONDS = 300
TEMPORARY_PREFIX = "partial-"
STALE_TEMPORARY_SECONDS = 3600


class NativeKernels:
    """Typed wrappers around the compiled library's functions."""

    def __init__(self, library: ctypes.CDLL, path: Path):
        self.path = path
        self._linear = library.llmisvc_linear_bf16
        self._linear.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
        self._linear.restype = None
        self._attention = library.llmisvc_attention_bf16
        self._attention.argtypes = [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 6 + [ctypes.c_int]
        self._attention.restype = ctypes.c_int
        self._add_rms_norm = library.llmisvc_add_rms_norm_bf16
        self._add_rms_norm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int]
        self._add_rms_norm.restype = None
        self._silu_mul = library.llmisvc_silu_mul_bf16
        self._silu_mul.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_int]
        self._silu_mul.restype = None
        self._decode_attention = library.llmisvc_decode_attention_bf16
        self._decode_attention.argtypes = (
            [ctypes.c_void_p, ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2 + [ctypes.c_int64] + [ctypes.c_void_p] * 3
            + [ctypes.c_int64] * 4 + [ctypes.c_int]
        )
        self._decode_attention.restype = ctypes.c_int

    @staticmethod
    def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor | None:
        """Return `weight` `[out, in]` in the kernel's `[blocks, in / 2, 16, 2]` layout.

        Returns None when the weight is not a CPU bfloat16 matrix with an even number of
        input features. Rows are zero padded to a multiple of 16.
        """
        if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or weight.dim() != 2:
            return None
        rows, cols = weight.shape
        if cols % 2:
            return None
        padding = (-rows) % 16
        if padding:
            weight = torch.cat([weight, weight.new_zeros(padding, cols)])
        return weight.reshape(-1, 16, cols // 2, 2).permute(0, 2, 1, 3).contiguous()

    def linear(self, packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, out_features: int) -> torch.Tensor:
        """Return `x @ weight.T + bias` for bfloat16 `x` `[m, in]`, using `pack_linear_weight`'s output."""
        x = x.contiguous()
        out = torch.empty((x.shape[0], out_features), dtype=torch.bfloat16)
        self._linear(
            packed.data_ptr(),
            None if bias is None else bias.data_ptr(),
            x.data_ptr(),
            out.data_ptr(),
            x.shape[0],
            out_features,
            x.shape[1],
            torch.get_num_threads(),
        )
        return out

    @staticmethod
    def supports_attention(query: torch.Tensor, keys: torch.Tensor) -> bool:
        """Return whether `attention` accepts these shapes, dtypes and devices.

        The kernel needs CPU bfloat16 tensors, a head_dim that is a multiple of 32 up to 256,
        and a number of query heads that is a multiple of the number of KV heads.
        """
        head_dim = query.shape[-1]
        return (
            query.device.type == "cpu"
            and query.dtype == torch.bfloat16
            and keys.dtype == torch.bfloat16
            and head_dim % 32 == 0
            and head_dim <= 256
            and query.shape[1] % keys.shape[0] == 0
        )

    def attention(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Return causal attention `[tokens, heads * head_dim]` of one prefill segment, in bfloat16.

        `query` is `[tokens, heads, head_dim]`, already scaled by 1/sqrt(head_dim), for
        positions `start_pos ..`; its heads must be contiguous, its token stride may be any.
        `keys` and `values` are one slot's `[kv_heads, capacity, head_dim]` buffers holding
        the segment's K/V from `start_pos` on and the cached prefix before it. Query head h
        reads KV head h // (heads / kv_heads); token t attends keys 0 .. start_pos + t.
        Raises ValueError for inputs `supports_attention` rejects or shapes that disagree,
        MemoryError when the kernel's scratch buffers cannot be allocated.
        """
        tokens, heads, head_dim = query.shape
        kv_heads, capacity, _ = keys.shape
        if not self.supports_attention(query, keys) or values.dtype != torch.bfloat16:
            raise ValueError(f"attention kernel does not support head_dim {head_dim}, {heads} heads over {kv_heads} KV heads, dtype {query.dtype}")
        if query.stride(2) != 1 or query.stride(1) != head_dim or query.stride(0) % 2:
            query = query.contiguous()
        if not (keys.is_contiguous() and values.is_contiguous()) or values.shape != keys.shape or keys.shape[2] != head_dim:
            raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must be contiguous [kv_heads, capacity, {head_dim}]")
        out = torch.empty((tokens, heads * head_dim), dtype=torch.bfloat16)
        status = self._attention(
            query.data_ptr(),
            query.stride(0),
            keys.data_ptr(),
            values.data_ptr(),
            out.data_ptr(),
            tokens,
            start_pos,
            heads,
            kv_heads,
            capacity,
            head_dim,
            torch.get_num_threads(),
        )
        if status == ATTENTION_OUT_OF_MEMORY:
            raise MemoryError("attention kernel could not allocate its scratch buffers")
        if status != 0:
            raise ValueError(f"attention kernel rejected {tokens} tokens at start_pos {start_pos} with capacity {capacity} (status {status})")
        return out

    def add_rms_norm(self, hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """Add `delta` into `hidden` in place (when given) and return RMS-normalised `hidden` times `weight`.

        `hidden` `[m, n]` must be contiguous bfloat16, as `delta` is made.
        """
        normed = torch.empty_like(hidden)
        delta = None if delta is None else delta.contiguous()
        self._add_rms_norm(
            hidden.data_ptr(),
            None if delta is None else delta.data_ptr(),
            weight.data_ptr(),
            normed.data_ptr(),
            hidden.shape[0],
            hidden.shape[1],
            eps,
            torch.get_num_threads(),
        )
        return normed

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """Return `silu(gate) * up` for `gate_up` `[m, 2n]` (gate columns, then up columns), as `[m, n]`."""
        gate_up = gate_up.contiguous()
        rows, width = gate_up.shape
        out = torch.empty((rows, width // 2), dtype=torch.bfloat16)
        self._silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, width // 2, torch.get_num_threads())
        return out

    def decode_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_buffer: torch.Tensor,
        value_buffer: torch.Tensor,
        slots: torch.Tensor,
        positions: torch.Tensor,
    ) -> torch.Tensor | None:
        """Write one token's K/V per sequence into its slot and return attention `[count, heads * head_dim]`.

        `query` is `[count, heads, head_dim]`, `key`/`value` `[count, kv_heads, head_dim]`, each
        with contiguous heads; the buffers are `[slots, kv_heads, capacity, head_dim]`
        contiguous; `slots` and `positions` are int64 `[count]`. Returns None when the kernel
        cannot run (head_dim not a multiple of 32 up to 256, more than 16 query heads per KV
        head, or out of memory). A fallback may then write the same K/V rows again.
        """
        count, heads, head_dim = query.shape
        kv_heads, capacity = key_buffer.shape[1], key_buffer.shape[2]
        for tensor in (query, key, value):
            if tensor.stride(2) != 1 or tensor.stride(1) != head_dim:
                raise ValueError("decode_attention needs contiguous heads in query, key and value")
        out = torch.empty((count, heads * head_dim), dtype=torch.bfloat16)
        status = self._decode_attention(
            query.data_ptr(),
            query.stride(0),
            key.data_ptr(),
            key.stride(0),
            value.data_ptr(),
            value.stride(0),
            key_buffer.data_ptr(),
            value_buffer.data_ptr(),
            capacity,
            slots.data_ptr(),
            positions.data_ptr(),
            out.data_ptr(),
            count,
            heads,
            kv_heads,
            head_dim,
            torch.get_num_threads(),
        )
        return out if status == 0 else None


def cpu_supported() -> bool:
    """Return whether this is an x86-64 Linux CPU with the instructions the kernels use."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return all(flag in flags for flag in CPU_FLAGS)
    return False


@functools.cache
def load() -> NativeKernels | None:
    """Build (once per source version) and load the kernels, or return None when unavailable."""
    setting = os.environ.get("LLMISVC_NATIVE_KERNELS", "1").strip().lower()
    if setting in DISABLING_VALUES:
        logger.info("native kernels disabled by LLMISVC_NATIVE_KERNELS=%s", setting)
        return None
    if not cpu_supported():
        logger.info("native kernels not used: the CPU lacks one of %s", ", ".join(CPU_FLAGS))
        return None
    compiler = shlex.split(os.environ.get("CC") or "cc")
    if not compiler or shutil.which(compiler[0]) is None:
        logger.warning("native kernels not used: C compiler %r not found (set CC or install gcc)", " ".join(compiler))
        return None
    try:
        path = _build(compiler)
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("native kernels not used: building them failed: %s", error)
        return None
    try:
        return NativeKernels(ctypes.CDLL(str(path)), path)
    except OSError as error:
        # Remove the library so that the next start builds it again.
        logger.warning("native kernels not used: loading %s failed: %s", path, error)
        for stale in (path, _checksum_path(path)):
            stale.unlink(missing_ok=True)
        return None


def _build(compiler: list[str]) -> Path:
    """Compile the sources unless a library for the same inputs is cached; return its path.

    A cached library is used only when its bytes match the SHA-256 stored beside it, because
    loading a truncated library crashes the process with SIGBUS instead of raising.
    """
    sources = sorted(SOURCE_DIR.glob("*.c"))
    headers = sorted(SOURCE_DIR.glob("*.h"))
    version = subprocess.run(
        [*compiler, "--version"], capture_output=True, text=True, check=True, timeout=COMPILE_TIMEOUT_SECONDS
    ).stdout
    digest = hashlib.sha256()
    for part in [version, " ".join(COMPILE_FLAGS)] + [path.read_text() for path in sources + headers]:
        digest.update(part.encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmisvc" / "kernels"
    target = cache / f"llmisvc-kernels-{digest.hexdigest()[:16]}.so"
    checksum = _checksum_path(target)
    if target.exists():
        if checksum.exists() and checksum.read_text().strip() == _file_sha256(target):
            return target
        logger.warning("cached native kernels %s do not match their checksum; building them again", target)

    cache.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(cache)
    # Replicas starting together may build at once, so each writes private files and
    # renames them into place atomically: the library first, then its checksum.
    handle, temporary = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, suffix=".so", dir=cache)
    os.close(handle)
    try:
        command = [*compiler, *COMPILE_FLAGS, *map(str, sources), "-o", temporary, "-lm"]
        result = subprocess.run(command + ["-fopenmp"], capture_output=True, text=True, timeout=COMPILE_TIMEOUT_SECONDS)
        if result.returncode != 0:
            # Without OpenMP the kernels still work, on one thread.
            logger.warning("building native kernels with -fopenmp failed, retrying without: %s", result.stderr.strip())
            result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_SECONDS)
        if result.returncode != 0:
            raise subprocess.SubprocessError(f"{' '.join(command)} exited with {result.returncode}: {result.stderr.strip()}")
        if os.path.getsize(temporary) == 0:
            raise subprocess.SubprocessError(f"{' '.join(command)} wrote an empty library")
        with open(temporary, "rb") as library:
            os.fsync(library.fileno())
        os.replace(temporary, target)
        _write_atomically(checksum, _file_sha256(target))
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    logger.info("built native kernels into %s", target)
    return target


def _checksum_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, dir=path.parent)
    with os.fdopen(handle, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _remove_stale_temporaries(cache: Path) -> None:
    """Delete partial outputs of builds that were killed (older than an hour)."""
    cutoff = time.time() - STALE_TEMPORARY_SECONDS
    for leftover in cache.glob(TEMPORARY_PREFIX + "*"):
        try:
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink()
        except OSError:
            pass
