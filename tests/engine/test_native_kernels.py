"""The native bfloat16 linear kernel against PyTorch, and its build and fallback rules.

The kernel needs AVX512-BF16 and a C compiler; on machines without them the kernel tests
skip and the engine runs on PyTorch's kernels, which the rest of the suite covers.
"""

from __future__ import annotations

import pytest
import torch

from llmisvc.engine import kernels

native = kernels.load()
needs_native = pytest.mark.skipif(native is None, reason="native kernels unavailable (CPU without AVX512-BF16 or no C compiler)")


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())


@needs_native
@pytest.mark.parametrize(
    ("rows", "cols", "batch"),
    [(16, 64, 1), (37, 576, 1), (960, 576, 3), (100, 70, 8), (48, 2, 9), (576, 1536, 20)],
)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_linear_matches_pytorch(rows, cols, batch, with_bias):
    generator = torch.Generator().manual_seed(rows * 1000 + cols + batch)
    weight = torch.randn(rows, cols, generator=generator).bfloat16()
    bias = torch.randn(rows, generator=generator).bfloat16() if with_bias else None
    x = torch.randn(batch, cols, generator=generator).bfloat16()
    packed = native.pack_linear_weight(weight)
    got = native.linear(packed, bias, x, rows)
    assert got.shape == (batch, rows)
    assert got.dtype == torch.bfloat16
    expected = _reference(x, weight, bias)
    # float32 accumulation, one bfloat16 rounding: relative 2^-8 of the largest values.
    tolerance = 2 ** -7 * float(expected.abs().max())
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=tolerance)


@needs_native
def test_linear_reads_strided_input():
    weight = torch.randn(32, 64).bfloat16()
    wide = torch.randn(3, 128).bfloat16()
    x = wide[:, :64]
    got = native.linear(native.pack_linear_weight(weight), None, x, 32)
    torch.testing.assert_close(got.float(), _reference(x, weight, None), rtol=0, atol=0.1)


@needs_native
def test_linear_uses_all_threads():
    weight = torch.randn(512, 64).bfloat16()
    x = torch.randn(2, 64).bfloat16()
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = native.linear(native.pack_linear_weight(weight), None, x, 512)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(got.float(), _reference(x, weight, None), rtol=0, atol=0.1)


def test_pack_rejects_unsupported_weights():
    assert kernels.NativeKernels.pack_linear_weight(torch.zeros(16, 5, dtype=torch.bfloat16)) is None
    assert kernels.NativeKernels.pack_linear_weight(torch.zeros(16, 4, dtype=torch.float32)) is None


def test_pack_pads_rows_to_blocks():
    weight = torch.arange(20 * 4, dtype=torch.float32).reshape(20, 4).bfloat16()
    packed = kernels.NativeKernels.pack_linear_weight(weight)
    assert packed.shape == (2, 2, 16, 2)
    # Block 0, column pair 1, row 3 holds weight[3, 2:4]; padded rows are zero.
    assert packed[0, 1, 3].tolist() == weight[3, 2:4].tolist()
    assert packed[1, 0, 4:].abs().sum() == 0


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("LLMISVC_NATIVE_KERNELS", "0")
    assert kernels.load.__wrapped__() is None


def test_missing_compiler_falls_back(monkeypatch):
    monkeypatch.setenv("CC", "llmisvc-no-such-compiler")
    monkeypatch.setattr(kernels, "cpu_supported", lambda: True)
    assert kernels.load.__wrapped__() is None


@needs_native
def test_build_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = kernels.load.__wrapped__()
    built = first.path.stat().st_mtime_ns
    second = kernels.load.__wrapped__()
    assert second.path == first.path
    assert second.path.stat().st_mtime_ns == built
    assert list(first.path.parent.iterdir()) == [first.path]
