"""The native bfloat16 kernels against PyTorch or float32 references, and their build and fallback rules.

The kernels need AVX512-BF16 and a C compiler. On machines without them the kernel tests
skip, and the engine runs on PyTorch's kernels, which the rest of the suite covers.
"""

from __future__ import annotations

import ctypes

import os
import subprocess
import sys

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
    # Block 0, column pair 1, row 3 is weight[3, 2:4], and the padded rows are zero.
    assert packed[0, 1, 3].tolist() == weight[3, 2:4].tolist()
    assert packed[1, 0, 4:].abs().sum() == 0


@pytest.mark.parametrize("value", ["0", "off", "FALSE", "no"])
def test_disabled_by_environment(monkeypatch, value):
    monkeypatch.setenv("LLMISVC_NATIVE_KERNELS", value)
    assert kernels.load.__wrapped__() is None


def test_missing_compiler_falls_back(monkeypatch):
    monkeypatch.setenv("CC", "llmisvc-no-such-compiler")
    monkeypatch.setattr(kernels, "cpu_supported", lambda: True)
    assert kernels.load.__wrapped__() is None


def test_empty_compiler_output_falls_back(monkeypatch, tmp_path):
    # `true` exits 0 without writing anything, as a broken compiler wrapper might.
    monkeypatch.setenv("CC", "true")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernels, "cpu_supported", lambda: True)
    assert kernels.load.__wrapped__() is None
    assert list((tmp_path / "llmisvc" / "kernels").iterdir()) == []


@needs_native
def test_build_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = kernels.load.__wrapped__()
    built = first.path.stat().st_mtime_ns
    second = kernels.load.__wrapped__()
    assert second.path == first.path
    assert second.path.stat().st_mtime_ns == built
    assert sorted(path.name for path in first.path.parent.iterdir()) == [first.path.name, first.path.name + ".sha256"]


@needs_native
def test_compiler_with_arguments(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "cc -g0")
    assert kernels.load.__wrapped__() is not None


@needs_native
@pytest.mark.parametrize("size", [0, 1000, 20000])
def test_truncated_cache_is_rebuilt(tmp_path, size):
    # Loading a truncated library would kill the process with SIGBUS, so each attempt runs
    # in a child process.
    script = "from llmisvc.engine import kernels; import sys; sys.exit(0 if kernels.load() else 3)"
    environment = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-c", script], env=environment, check=True, timeout=120)
    (library,) = (tmp_path / "llmisvc" / "kernels").glob("*.so")
    complete = library.read_bytes()
    library.write_bytes(complete[:size])

    rebuilt = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=120)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "do not match their checksum" in rebuilt.stderr
    assert library.read_bytes() == complete


@needs_native
@pytest.mark.parametrize(("rows", "width"), [(1, 576), (3, 40), (549, 576)])
@pytest.mark.parametrize("with_delta", [False, True], ids=["norm", "add-norm"])
def test_add_rms_norm_matches_pytorch(rows, width, with_delta):
    generator = torch.Generator().manual_seed(rows + width)
    hidden = torch.randn(rows, width, generator=generator).bfloat16()
    delta = torch.randn(rows, width, generator=generator).bfloat16() if with_delta else None
    weight = torch.rand(width, generator=generator).bfloat16()
    expected_hidden = hidden + delta if with_delta else hidden.clone()
    expected = torch.nn.functional.rms_norm(expected_hidden.float(), (width,), weight.float(), eps=1e-5)

    original = hidden.clone()
    normed = native.add_rms_norm(hidden, delta, weight, 1e-5)
    assert torch.equal(hidden, expected_hidden)
    if not with_delta:
        assert torch.equal(hidden, original)
    # One bfloat16 rounding of values of magnitude up to about 4.
    torch.testing.assert_close(normed.float(), expected, rtol=2 ** -8, atol=1e-6)


@needs_native
@pytest.mark.parametrize(("rows", "width"), [(1, 1536), (5, 24), (64, 1536)])
def test_silu_mul_matches_pytorch(rows, width):
    generator = torch.Generator().manual_seed(rows * width)
    gate_up = (torch.randn(rows, 2 * width, generator=generator) * 4).bfloat16()
    gate, up = gate_up.float().chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    got = native.silu_mul(gate_up)
    assert got.shape == (rows, width)
    torch.testing.assert_close(got.float(), expected, rtol=2 ** -8, atol=1e-6)


@needs_native
def test_silu_mul_saturates_without_nan():
    gate_up = torch.tensor([[-200.0, 200.0, -1e30, 3.0, 3.0, 3.0]]).bfloat16()
    got = native.silu_mul(gate_up).float()
    assert torch.isfinite(got).all()
    assert abs(got[0, 0]) < 1e-30
    assert got[0, 1] == pytest.approx(600, rel=1e-2)


def _reference_decode(query, key_buffer, value_buffer, slots, positions):
    """float32 attention of each query row over its slot's keys 0..position."""
    count, heads, head_dim = query.shape
    kv_heads = key_buffer.shape[1]
    group = heads // kv_heads
    out = torch.empty(count, heads * head_dim)
    for b in range(count):
        end = int(positions[b]) + 1
        keys = key_buffer[slots[b], :, :end].float().repeat_interleave(group, dim=0)
        values = value_buffer[slots[b], :, :end].float().repeat_interleave(group, dim=0)
        scores = torch.einsum("hd,htd->ht", query[b].float(), keys)
        out[b] = torch.einsum("ht,htd->hd", scores.softmax(-1), values).reshape(-1)
    return out


@needs_native
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 128), (8, 2, 32)])
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_attention_matches_reference(heads, kv_heads, head_dim, threads):
    generator = torch.Generator().manual_seed(heads * head_dim)
    capacity, num_slots = 80, 5
    key_buffer = torch.randn(num_slots, kv_heads, capacity, head_dim, generator=generator).bfloat16()
    value_buffer = torch.randn(num_slots, kv_heads, capacity, head_dim, generator=generator).bfloat16()
    slots = torch.tensor([3, 0, 4])
    positions = torch.tensor([0, 17, 79])
    # Queries and new K/V as strided views of one projection output, as the model passes them.
    width = (heads + 2 * kv_heads) * head_dim
    projection = (torch.randn(3, width, generator=generator) / head_dim**0.5).bfloat16()
    query = projection[:, : heads * head_dim].view(3, heads, head_dim)
    key = projection[:, heads * head_dim : (heads + kv_heads) * head_dim].view(3, kv_heads, head_dim)
    value = projection[:, (heads + kv_heads) * head_dim :].view(3, kv_heads, head_dim)

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = native.decode_attention(query, key, value, key_buffer, value_buffer, slots, positions)
    finally:
        torch.set_num_threads(previous)
    for b in range(3):
        assert torch.equal(key_buffer[slots[b], :, positions[b]], key[b])
        assert torch.equal(value_buffer[slots[b], :, positions[b]], value[b])
    expected = _reference_decode(query, key_buffer, value_buffer, slots, positions)
    # Scores and weights in float32, then one bfloat16 rounding of outputs below about 4.
    torch.testing.assert_close(got.float(), expected, rtol=2 ** -8, atol=2e-3)


@needs_native
def test_decode_attention_rejects_unsupported_head_dim():
    buffer = torch.zeros(1, 1, 8, 48, dtype=torch.bfloat16)
    row = torch.zeros(1, 1, 48, dtype=torch.bfloat16)
    got = native.decode_attention(row, row, row, buffer, buffer.clone(), torch.tensor([0]), torch.tensor([2]))
    assert got is None
    assert buffer.abs().sum() == 0


def _reference_prefill(query, keys, values, start_pos):
    """float32 causal attention `[tokens, heads * head_dim]`: token t attends keys 0..start_pos + t."""
    tokens, heads, head_dim = query.shape
    end = start_pos + tokens
    group = heads // keys.shape[0]
    keys = keys[:, :end].float().repeat_interleave(group, dim=0)
    values = values[:, :end].float().repeat_interleave(group, dim=0)
    scores = torch.einsum("thd,hkd->htk", query.float(), keys)
    future = torch.arange(end)[None, :] > start_pos + torch.arange(tokens)[:, None]
    probabilities = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    return torch.einsum("htk,hkd->thd", probabilities, values).reshape(tokens, heads * head_dim)


@needs_native
@pytest.mark.parametrize("tokens", [1, 5, 16, 100, 549])
@pytest.mark.parametrize("start_pos", [0, 37])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("threads", [1, 2])
def test_attention_matches_reference(tokens, start_pos, head_dim, group, threads):
    generator = torch.Generator().manual_seed(tokens * 1000 + start_pos + head_dim + group)
    kv_heads = 2
    heads = kv_heads * group
    capacity = start_pos + tokens + 9
    # Queries as a strided view of a wider projection output, as the model passes them.
    projection = (torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=generator) * 2 / head_dim**0.5).bfloat16()
    query = projection[:, :heads]
    keys = torch.randn(kv_heads, capacity, head_dim, generator=generator).bfloat16()
    values = torch.randn(kv_heads, capacity, head_dim, generator=generator).bfloat16()
    # The engine never writes positions past the segment, so NaN there fails the test if one is read.
    keys[:, start_pos + tokens :] = float("nan")
    values[:, start_pos + tokens :] = float("nan")

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = native.attention(query, keys, values, start_pos)
    finally:
        torch.set_num_threads(previous)
    assert got.shape == (tokens, heads * head_dim)
    assert got.dtype == torch.bfloat16
    expected = _reference_prefill(query, keys, values, start_pos)
    # Two bfloat16 roundings: the output's (relative 2^-9) and each softmax weight's before
    # P.V (2^-9 of each weight, so at most 2^-9 of the largest |value| overall). The
    # tolerance doubles both, because scores, exp and sums in float32 add far less.
    max_value = float(values[:, : start_pos + tokens].abs().max())
    torch.testing.assert_close(got.float(), expected, rtol=2**-8, atol=2**-8 * max_value)


@needs_native
def test_attention_rejects_unsupported_shapes():
    query = torch.zeros(4, 2, 48, dtype=torch.bfloat16)
    keys = torch.zeros(1, 8, 48, dtype=torch.bfloat16)
    assert not native.supports_attention(query, keys)
    with pytest.raises(ValueError, match="head_dim 48"):
        native.attention(query, keys, keys, 0)

    query = torch.zeros(4, 2, 64, dtype=torch.bfloat16)
    keys = torch.zeros(1, 8, 64, dtype=torch.bfloat16)
    assert native.supports_attention(query, keys)
    with pytest.raises(ValueError, match="capacity 8"):
        native.attention(query, keys, keys, 5)


@needs_native
def test_attention_exp_accuracy():
    # The kernel's softmax exp is exported for this check. float64 exp is the reference.
    library = ctypes.CDLL(str(native.path))
    library.llmisvc_exp_f32.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    x = torch.cat([torch.linspace(-87, 0, 200003), torch.linspace(-1e-3, 1e-3, 1001), torch.tensor([-1e-30, 0.0])])
    out = torch.empty_like(x)
    library.llmisvc_exp_f32(x.data_ptr(), out.data_ptr(), x.numel())
    relative = (out.double() - x.double().exp()).abs() / x.double().exp()
    assert float(relative.max()) < 1e-6

    # On the first key block the old max is -inf, and exp(-inf) must give about 0, not NaN.
    tail = torch.tensor([-200.0, -110.0, float("-inf")])
    out = torch.empty_like(tail)
    library.llmisvc_exp_f32(tail.data_ptr(), out.data_ptr(), tail.numel())
    assert float(out.max()) < 1e-37
    assert float(out.min()) >= 0


@needs_native
def test_model_prefill_attention_tracks_float32(monkeypatch):
    # A chunked bfloat16 prefill of the embedded model (the second chunk starts at position
    # 20, after a cached prefix) through the kernel, against float32 and against SDPA.
    from llmisvc.engine.model_runner import ModelRunner, StepInput

    runners = {dtype: ModelRunner("smollm2", dtype=dtype, num_blocks=64, threads=1) for dtype in ("bfloat16", "float32")}
    tokenizer = runners["float32"].tokenizer
    prompt = tokenizer.encode(
        tokenizer.apply_chat_template([{"role": "user", "content": "How does Kubernetes schedule pods onto nodes?"}]),
        add_special_tokens=False,
    )
    table = list(range(8))
    model = runners["bfloat16"].model
    starts = []
    kernel_attention = model.native.attention
    monkeypatch.setattr(model.native, "attention", lambda *args: starts.append(args[3]) or kernel_attention(*args))

    def chunked_logits(runner: ModelRunner) -> torch.Tensor:
        runner.execute([StepInput("chunked", prompt[:20], 0, table)])
        logits = runner.execute([StepInput("chunked", prompt[20:], 20, table)])[0].clone()
        runner.free_sequence("chunked")
        return logits

    native_logits = chunked_logits(runners["bfloat16"])
    assert sorted(set(starts)) == [0, 20]
    reference = chunked_logits(runners["float32"])
    monkeypatch.setattr(type(model.native), "supports_attention", staticmethod(lambda query, keys: False))
    sdpa_logits = chunked_logits(runners["bfloat16"])

    # bfloat16 logits differ from float32 by tenths while their direction and top token
    # agree (cosine similarity measured at 0.99999 for both the kernel and SDPA).
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(native_logits, reference, dim=0) > 0.9999
    assert native_logits.argmax() == reference.argmax()
    assert cosine(native_logits, sdpa_logits, dim=0) > 0.9999


@needs_native
def test_model_decode_tracks_float32_like_pytorch_ops():
    # The embedded model in bfloat16 with every native kernel (linears, fused norm and
    # SiLU, prefill and decode attention), and again on PyTorch ops only, both fed the
    # float32 model's greedy tokens. Kernels round differently, so the two bfloat16 runs
    # differ from each other by about as much as each differs from float32. Cosine
    # similarity measured 0.998-0.99999 per step. The native run must stay as close.
    from llmisvc.engine.model_runner import ModelRunner, StepInput

    runners = {dtype: ModelRunner("smollm2", dtype=dtype, num_blocks=64, threads=1) for dtype in ("bfloat16", "float32")}
    model = runners["bfloat16"].model
    assert model.native is not None
    prompt = runners["float32"].tokenizer.encode("The three primary colours are", add_special_tokens=False)
    table = list(range(4))

    def step_logits(runner: ModelRunner, tokens: list[int]) -> list[torch.Tensor]:
        logits = [runner.execute([StepInput("decode", prompt, 0, table)])[0].clone()]
        for step, token in enumerate(tokens):
            logits.append(runner.execute([StepInput("decode", [token], len(prompt) + step, table)])[0].clone())
        runner.free_sequence("decode")
        return logits

    tokens = []
    reference = [runners["float32"].execute([StepInput("greedy", prompt, 0, table)])[0].clone()]
    for step in range(8):
        tokens.append(int(reference[-1].argmax()))
        reference.append(runners["float32"].execute([StepInput("greedy", [tokens[-1]], len(prompt) + step, table)])[0].clone())

    native = step_logits(runners["bfloat16"], tokens)
    for linear in [layer[kind] for layer in model.layers for kind in ("qkv", "o", "gate_up", "down")] + [model.lm_head]:
        linear.native_max_rows = 0
    model.native = None
    pytorch = step_logits(runners["bfloat16"], tokens)

    cosine = torch.nn.functional.cosine_similarity
    native_deviation = torch.stack([1 - cosine(got, expected, dim=0) for got, expected in zip(native, reference)])
    pytorch_deviation = torch.stack([1 - cosine(got, expected, dim=0) for got, expected in zip(pytorch, reference)])
    assert native_deviation.max() < 0.005
    assert native_deviation.mean() < 2 * pytorch_deviation.mean()
