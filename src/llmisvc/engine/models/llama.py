"""Forward pass of Llama-family decoders (Llama, and Qwen2 which adds q/k/v bias).

Written directly with torch tensor ops rather than `torch.nn` modules: the step runs every
token of a batch through each linear layer at once and keeps attention per sequence group,
reading K/V from the contiguous working slots of `KVCache`. Attention is plain
matmul-softmax-matmul, because PyTorch's fused SDPA measured 6x slower for one-token
bfloat16 steps on a 2-core CPU with SmolLM2-135M.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llmisvc.engine.kernels import NativeKernels
from llmisvc.engine.kernels import load as load_native_kernels
from llmisvc.engine.kv_cache import KVCache
from llmisvc.engine.model_config import ModelConfig, UnsupportedModelError

logger = logging.getLogger(__name__)


@dataclass
class PrefillSegment:
    """A run of `length` consecutive tokens of one sequence, starting at batch row `row`.

    `start_pos` is the position of its first token, and `slot` the sequence's KV slot.
    """

    row: int
    length: int
    slot: int
    start_pos: int


@dataclass
class AttentionBatch:
    """Locations of a step's tokens in the KV working buffer.

    Rows [0, num_decode) are single tokens of distinct sequences, in `decode_slots` at
    `decode_positions`. `decode_slot_range` is `(first, end)` when the slots are
    consecutive, so the PyTorch decode path reads a contiguous view instead of gathering
    `decode_slots`. Rows from `num_decode` on are `prefills`.
    """

    num_decode: int
    decode_slots: torch.Tensor | None
    decode_positions: torch.Tensor | None
    decode_slot_range: tuple[int, int] | None
    prefills: list[PrefillSegment]
    _padding: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False)

    def decode_padding(self, kv_heads: int, capacity: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the decode tokens' K/V rows and additive padding mask for the PyTorch decode path.

        The rows index a layer buffer viewed as `[slots * kv_heads * capacity, head_dim]`, one
        per (token, KV head). The mask `[num_decode, 1, 1, capacity]` is -inf past each
        token's position. Both are built on first use and reused by every layer of the step.
        """
        if self._padding is None:
            slots, positions = self.decode_slots, self.decode_positions
            heads = torch.arange(kv_heads, device=slots.device)
            rows = (slots.unsqueeze(1) * kv_heads + heads) * capacity + positions.unsqueeze(1)
            invalid = torch.arange(capacity, device=slots.device).unsqueeze(0) > positions.unsqueeze(1)
            mask = torch.zeros((self.num_decode, capacity), dtype=dtype, device=slots.device)
            mask.masked_fill_(invalid, float("-inf"))
            self._padding = (rows.reshape(-1), mask.view(self.num_decode, 1, 1, capacity))
        return self._padding


class Linear:
    """A weight matrix `[out, in]` (and optional bias) applied as `x @ weight.T + bias`.

    On CPU in bfloat16 the weight is also stored in oneDNN's blocked layout and applied with
    `torch.ops.mkldnn._linear_pointwise` (the op TorchInductor emits for frozen CPU linears),
    which measured 1.3-1.7x faster than `F.linear` for 2 to 512 rows on a 2-core Xeon with AMX.
    A few rows are bound by reading the weight instead, and the fastest kernel depends on the
    CPU. `torch.mv` on the plain weight made a decode step 8% faster than oneDNN on that Xeon.
    On a 2-core AMD EPYC with AVX512-BF16, the one-row sweep that `choose_kernels` logs took
    48.8 ms with `torch.mv`, 22.1 ms with oneDNN and 12.2 ms with the native kernel
    (`llmisvc.engine.kernels`) for SmolLM2-135M.
    `LlamaModel.choose_kernels` times them and sets `native_max_rows` and `single_row_mv`,
    then each linear frees the weight copies that its chosen kernels never read.
    NOTE: with the native kernel, two packed copies of each weight stay in memory.
    Other devices and dtypes, or a torch build without oneDNN, use `F.linear`.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, native: NativeKernels | None = None):
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.weight: torch.Tensor | None = weight
        self.single_row_mv = False
        self.native_max_rows = 0
        self._packed = None
        self._native = native
        self._native_packed = None
        if weight.device.type == "cpu" and weight.dtype == torch.bfloat16:
            if torch.backends.mkldnn.is_available():
                self._packed = _pack_for_onednn(weight, bias)
            if native is not None:
                self._native_packed = native.pack_linear_weight(weight)

    @property
    def has_native(self) -> bool:
        return self._native_packed is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if rows <= self.native_max_rows:
            return self._native.linear(self._native_packed, self.bias, x, self.out_features)
        if self.single_row_mv and rows == 1:
            out = torch.mv(self.weight, x[0]).unsqueeze(0)
            return out if self.bias is None else out + self.bias
        if self._packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")

    def release_unused(self) -> None:
        """Release the weight copies that the chosen kernels never read."""
        if self._packed is not None and not self.single_row_mv:
            self.weight = None
        if self.native_max_rows == 0:
            self._native_packed = None


def _pack_for_onednn(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """Return the oneDNN-packed weight, or None when the op is missing or disagrees with F.linear."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 32)
        probe = torch.randn(3, weight.shape[1], dtype=weight.dtype)
        got = torch.ops.mkldnn._linear_pointwise(probe, packed, bias, "none", [], "")
    except (RuntimeError, AttributeError):
        return None
    expected = F.linear(probe, weight, bias)
    if not torch.allclose(got.float(), expected.float(), rtol=2e-2, atol=2e-2):
        return None
    return packed


def _rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        # Llama 3.1 frequency scaling: long wavelengths slowed by `factor`, short ones kept,
        # a smooth blend between `low_freq_factor` and `high_freq_factor`.
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        original = float(scaling.get("original_max_position_embeddings", 8192))
        wavelength = 2 * math.pi / inv_freq
        smooth = (original / wavelength - low) / (high - low)
        scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        medium = (wavelength <= original / low) & (wavelength >= original / high)
        inv_freq = torch.where(medium, blended, scaled)
    elif kind != "default":
        raise UnsupportedModelError(f"unsupported rope_scaling type {kind!r}")
    return inv_freq


class LlamaModel:
    """Weights and forward pass of a Llama or Qwen2 decoder on one device.

    `weights` uses Hugging Face parameter names and is consumed (fused q/k/v and gate/up
    copies are made, the originals released). Raises `UnsupportedModelError` when a
    required tensor is missing.
    """

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device):
        self.config = config
        self.dtype = dtype
        self.device = device

        def take(name: str) -> torch.Tensor:
            if name not in weights:
                raise UnsupportedModelError(f"missing tensor {name!r} for {config.architecture}")
            return weights.pop(name).to(device=device, dtype=dtype).contiguous()

        native = load_native_kernels() if device.type == "cpu" and dtype == torch.bfloat16 else None
        # Fused norm, activation, decode and prefill attention kernels. None runs PyTorch ops instead.
        self.native = native
        self.embed = take("model.embed_tokens.weight")
        self.norm = take("model.norm.weight")
        tied = config.tie_word_embeddings or "lm_head.weight" not in weights
        self.lm_head = Linear(self.embed if tied else take("lm_head.weight"), native=native)
        # The attention scale 1/sqrt(head_dim) is folded into the q projection, because RoPE
        # is linear and the product is then computed once at load instead of every step.
        # For head_dim 64 the scale is a power of two, so the bfloat16 weights stay exact.
        query_scale = 1.0 / math.sqrt(config.head_dim)

        def take_qkv(suffix: str) -> torch.Tensor:
            query = (take(attention + "q_proj." + suffix).float() * query_scale).to(dtype)
            return torch.cat([query, take(attention + "k_proj." + suffix), take(attention + "v_proj." + suffix)])

        self.layers = []
        for index in range(config.num_layers):
            prefix = f"model.layers.{index}."
            attention = prefix + "self_attn."
            qkv = take_qkv("weight")
            qkv_bias = take_qkv("bias") if config.attention_bias else None
            gate_up = torch.cat([take(prefix + "mlp.gate_proj.weight"), take(prefix + "mlp.up_proj.weight")])
            self.layers.append(
                {
                    "input_norm": take(prefix + "input_layernorm.weight"),
                    "qkv": Linear(qkv, qkv_bias, native),
                    "o": Linear(take(attention + "o_proj.weight"), native=native),
                    "post_norm": take(prefix + "post_attention_layernorm.weight"),
                    "gate_up": Linear(gate_up, native=native),
                    "down": Linear(take(prefix + "mlp.down_proj.weight"), native=native),
                }
            )

        inv_freq = _rope_inverse_frequencies(config)
        positions = torch.arange(config.max_model_len, dtype=torch.float64)
        angles = torch.outer(positions, inv_freq)
        # Full-width tables for `_apply_rope`: cos repeated for both halves, and sin negated
        # for the first half, so a rotation is x * cos + swap_halves(x) * sin.
        cos, sin = angles.cos(), angles.sin()
        self._cos = torch.cat([cos, cos], dim=-1).to(device=device, dtype=torch.float32)
        self._sin = torch.cat([-sin, sin], dim=-1).to(device=device, dtype=torch.float32)
        self.kernel_choice = self.choose_kernels()

    def choose_kernels(self, sweeps: int = 3) -> dict[str, object]:
        """Time the few-row kernels, configure every linear with the fastest and return the choice.

        One sweep calls every linear once in forward order, so the weights stream from memory
        as in a decode step instead of staying in cache, and the fastest of `sweeps` sweeps
        counts. For one row the candidates are oneDNN (or `F.linear`), `torch.mv` and the
        native kernel. When the native kernel wins, it is then compared with oneDNN at 2, 4,
        8, 16 and 32 rows, and used up to the last row count where it stays faster. Returns
        `{"single_row": kernel name, "native_max_rows": rows}`, or an empty dict (and
        changes nothing) for dtypes and devices with a single kernel.
        """
        linears = [layer[kind] for layer in self.layers for kind in ("qkv", "o", "gate_up", "down")]
        linears.append(self.lm_head)
        if self.device.type != "cpu" or self.dtype != torch.bfloat16 or any(linear.weight is None for linear in linears):
            return {}
        inputs = {
            rows: {size: torch.randn(rows, size, dtype=self.dtype) for size in {linear.in_features for linear in linears}}
            for rows in (1, 2, 4, 8, 16, 32)
        }

        def sweep_time(rows: int, native_max_rows: int, single_row_mv: bool) -> float:
            for linear in linears:
                linear.native_max_rows = native_max_rows
                linear.single_row_mv = single_row_mv
            best = math.inf
            with torch.inference_mode():
                for _sweep in range(sweeps):
                    start = time.perf_counter()
                    for linear in linears:
                        linear(inputs[rows][linear.in_features])
                    best = min(best, time.perf_counter() - start)
            return best

        timings = {"onednn": sweep_time(1, 0, False), "mv": sweep_time(1, 0, True)}
        native = all(linear.has_native for linear in linears)
        if native:
            timings["native"] = sweep_time(1, 1, False)
        single_row = min(timings, key=timings.get)
        native_max_rows = 1 if single_row == "native" else 0
        if native_max_rows:
            for rows in (2, 4, 8, 16, 32):
                if sweep_time(rows, rows, False) >= sweep_time(rows, 0, False):
                    break
                native_max_rows = rows

        for linear in linears:
            linear.native_max_rows = native_max_rows
            linear.single_row_mv = single_row == "mv"
            linear.release_unused()
        logger.info(
            "linear kernels: one row uses %s (one-row sweep: %s), native kernel up to %d rows",
            single_row,
            ", ".join(f"{name} {seconds * 1e3:.2f} ms" for name, seconds in timings.items()),
            native_max_rows,
        )
        return {"single_row": single_row, "native_max_rows": native_max_rows}

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the cos and signed sin tables `[tokens, 1, head_dim]` in the run dtype."""
        cos = self._cos.index_select(0, positions).to(self.dtype).unsqueeze(1)
        sin = self._sin.index_select(0, positions).to(self.dtype).unsqueeze(1)
        return cos, sin

    def forward(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        batch: AttentionBatch,
        kv: KVCache,
        logit_rows: torch.Tensor,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """Run one step, write float32 logits `[len(logit_rows), vocab]` into `out`.

        `token_ids` and `positions` are `[tokens]`, ordered as `batch` describes; K/V of
        every token is written to its slot. `logit_rows` selects the rows whose next-token
        logits are wanted (the last token of each sequence). Returns the final hidden states
        `[tokens, hidden]`, before the final norm, from which `logits()` computes other rows.
        """
        config = self.config
        hidden = self.embed.index_select(0, token_ids)
        cos, sin = self.rope_tables(positions)
        q_size = config.num_heads * config.head_dim
        kv_size = config.num_kv_heads * config.head_dim
        rope_heads = config.num_heads + config.num_kv_heads

        # Each residual branch's output is added into `hidden` by the next norm, which the
        # native kernel does in the same pass over the row.
        delta = None
        for index, layer in enumerate(self.layers):
            hidden, normed = self._add_rms_norm(hidden, delta, layer["input_norm"])
            qkv = layer["qkv"](normed)
            query_key = _apply_rope(qkv[:, : q_size + kv_size].view(-1, rope_heads, config.head_dim), cos, sin)
            query = query_key[:, : config.num_heads]
            key = query_key[:, config.num_heads :]
            value = qkv[:, q_size + kv_size :].view(-1, config.num_kv_heads, config.head_dim)
            attended = self._attention(index, query, key, value, batch, kv)
            delta = layer["o"](attended)

            hidden, normed = self._add_rms_norm(hidden, delta, layer["post_norm"])
            delta = layer["down"](self._silu_mul(layer["gate_up"](normed)))

        hidden = hidden + delta
        last = self._rms_norm(hidden.index_select(0, logit_rows), self.norm)
        out.copy_(self.lm_head(last))
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Return the logits `[rows, vocab]`, in the run dtype, of final hidden states from `forward`."""
        return self.lm_head(self._rms_norm(hidden, self.norm))

    def _add_rms_norm(
        self, hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `hidden + delta` (or `hidden` when delta is None) and its RMS norm times `weight`.

        The native kernel adds in place, so `hidden` must be a tensor the caller owns.
        """
        if self.native is not None:
            return hidden, self.native.add_rms_norm(hidden, delta, weight, self.config.rms_norm_eps)
        if delta is not None:
            hidden = hidden + delta
        return hidden, self._rms_norm(hidden, weight)

    def _silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            return self.native.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # One fused op instead of Hugging Face's upcast-normalise-downcast-scale sequence.
        # In bfloat16 it rounds once at the end (error measured within half a bfloat16 ulp,
        # below the reference's), and in float32 it computes the same values.
        return F.rms_norm(x, (x.shape[-1],), weight, eps=self.config.rms_norm_eps)

    def _attention(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        batch: AttentionBatch,
        kv: KVCache,
    ) -> torch.Tensor:
        """Write this step's K/V into the slots and return attention output `[tokens, heads * head_dim]`."""
        group = self.config.num_heads // self.config.num_kv_heads
        key_buffer, value_buffer = kv.layer(layer)
        outputs = []

        count = batch.num_decode
        if count:
            # The native kernel reads each sequence's valid positions only, in one call per
            # layer. A one-sequence SmolLM2-135M decode step took 13.1 ms with it and 17.6 ms
            # with the padded path (`benchmarks/kernels.py`, 2-core AMD EPYC).
            if self.native is not None:
                attended = self.native.decode_attention(
                    query[:count], key[:count], value[:count], key_buffer, value_buffer, batch.decode_slots, batch.decode_positions
                )
                if attended is not None:
                    outputs.append(attended)
            if not outputs:
                outputs.append(self._padded_decode_attention(query, key, value, key_buffer, value_buffer, batch))

        for segment in batch.prefills:
            rows = slice(segment.row, segment.row + segment.length)
            end_pos = segment.start_pos + segment.length
            key_buffer[segment.slot, :, segment.start_pos : end_pos] = key[rows].transpose(0, 1)
            value_buffer[segment.slot, :, segment.start_pos : end_pos] = value[rows].transpose(0, 1)
            slot_keys, slot_values = key_buffer[segment.slot], value_buffer[segment.slot]
            if self.native is not None and self.native.supports_attention(query, slot_keys):
                # It serves every length: a 549-token SmolLM2-135M prefill ran at 775 tokens/s
                # with it and 602 with SDPA (`benchmarks/kernels.py`, 2-core AMD EPYC), and a
                # one-off comparison found it faster than SDPA from 1 to 2048 tokens.
                outputs.append(self.native.attention(query[rows], slot_keys, slot_values, segment.start_pos))
                continue
            keys = key_buffer[segment.slot : segment.slot + 1, :, :end_pos]  # [1, kv_heads, L, dim]
            values = value_buffer[segment.slot : segment.slot + 1, :, :end_pos]
            queries = query[rows].transpose(0, 1).unsqueeze(0)  # [1, heads, T, dim], already scaled
            # SDPA's fused CPU kernel measured about 2x faster than matmul-softmax-matmul for
            # a 549-token bfloat16 prompt; one-token steps use the decode path above instead.
            mask = self._prefill_mask(segment) if segment.start_pos else None
            attended = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=mask, is_causal=mask is None, scale=1.0, enable_gqa=group > 1
            )
            outputs.append(attended[0].transpose(0, 1).reshape(segment.length, -1))

        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _prefill_mask(self, segment: PrefillSegment) -> torch.Tensor:
        """Return the additive mask `[length, start_pos + length]`: 0 where a query may attend a key, else -inf."""
        end = segment.start_pos + segment.length
        query_positions = torch.arange(segment.start_pos, end, device=self.device).unsqueeze(1)
        allowed = torch.arange(end, device=self.device).unsqueeze(0) <= query_positions
        # An additive mask measured slightly faster in SDPA's CPU kernel than a boolean one.
        mask = torch.zeros((segment.length, end), dtype=self.dtype, device=self.device)
        return mask.masked_fill_(~allowed, float("-inf"))

    def _padded_decode_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_buffer: torch.Tensor,
        value_buffer: torch.Tensor,
        batch: AttentionBatch,
    ) -> torch.Tensor:
        """Write the decode tokens' K/V and attend over every slot position with the padding mask.

        CPU bmm clones inputs whose batch stride is not rows * columns, so slicing to the
        longest length would copy K/V each layer. A contiguous
        `[slots * kv_heads, capacity, head_dim]` view with a padding mask costs less.
        """
        config = self.config
        kv_heads, head_dim = config.num_kv_heads, config.head_dim
        group = config.num_heads // kv_heads
        count = batch.num_decode
        capacity = key_buffer.shape[2]
        rows, mask = batch.decode_padding(kv_heads, capacity, key_buffer.dtype)
        key_buffer.view(-1, head_dim).index_copy_(0, rows, key[:count].reshape(-1, head_dim))
        value_buffer.view(-1, head_dim).index_copy_(0, rows, value[:count].reshape(-1, head_dim))
        if batch.decode_slot_range is not None:
            first, end = batch.decode_slot_range
            keys, values = key_buffer[first:end], value_buffer[first:end]
        else:
            keys = key_buffer.index_select(0, batch.decode_slots)
            values = value_buffer.index_select(0, batch.decode_slots)
        keys = keys.view(count * kv_heads, capacity, head_dim)
        values = values.view(count * kv_heads, capacity, head_dim)
        # Each KV head serves its group of query heads without repeating K/V.
        grouped = query[:count].reshape(count * kv_heads, group, head_dim)
        scores = torch.bmm(grouped, keys.transpose(1, 2)).view(count, kv_heads, group, capacity)
        probabilities = torch.softmax(scores + mask, dim=-1)
        attended = torch.bmm(probabilities.view(count * kv_heads, group, capacity), values)
        return attended.view(count, -1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head's features (Hugging Face `rotate_half` convention).

    `x` is `[tokens, heads, head_dim]`; `cos` and `sin` come from `LlamaModel.rope_tables`.
    """
    tokens, heads, head_dim = x.shape
    swapped = x.view(tokens, heads, 2, head_dim // 2).flip(2).view(tokens, heads, head_dim)
    return torch.addcmul(x * cos, swapped, sin)
