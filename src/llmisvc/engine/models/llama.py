"""Forward pass of Llama-family decoders (Llama, and Qwen2 which adds q/k/v bias).

Written directly with torch tensor ops rather than `torch.nn` modules: the step runs every
token of a batch through each linear layer at once and keeps attention per sequence group,
reading K/V from the contiguous working slots of `KVCache`. Attention is plain
matmul-softmax-matmul, because PyTorch's fused SDPA measured 6x slower for one-token
bfloat16 steps on a 2-core CPU with SmolLM2-135M.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmisvc.engine.kv_cache import KVCache
from llmisvc.engine.model_config import ModelConfig, UnsupportedModelError


@dataclass
class PrefillSegment:
    """A run of `length` consecutive tokens of one sequence, starting at batch row `row`.

    `start_pos` is the position of its first token; `mask` is the additive causal mask
    `[length, start_pos + length]` in the run dtype.
    """

    row: int
    length: int
    slot: int
    start_pos: int
    mask: torch.Tensor


@dataclass
class AttentionBatch:
    """Where each token of a step lives in the KV working buffer.

    Rows [0, num_decode) are single tokens of distinct sequences, attended as one padded
    batch: `decode_slots` / `decode_positions` locate each token, `decode_slot_range` is
    `(first, end)` when the slots are consecutive (attention then reads a view instead of a
    gather), `decode_len` is the padded key length and `decode_mask` the additive padding
    mask `[num_decode, 1, 1, decode_len]`. Rows from `num_decode` on are `prefills`.
    """

    num_decode: int
    decode_slots: torch.Tensor | None
    decode_positions: torch.Tensor | None
    decode_slot_range: tuple[int, int] | None
    decode_len: int
    decode_mask: torch.Tensor | None
    prefills: list[PrefillSegment]


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

        self.embed = take("model.embed_tokens.weight")
        self.norm = take("model.norm.weight")
        self.lm_head = self.embed if config.tie_word_embeddings or "lm_head.weight" not in weights else take("lm_head.weight")
        self.layers = []
        for index in range(config.num_layers):
            prefix = f"model.layers.{index}."
            attention = prefix + "self_attn."
            qkv = torch.cat([take(attention + f"{name}_proj.weight") for name in "qkv"])
            qkv_bias = None
            if config.attention_bias:
                qkv_bias = torch.cat([take(attention + f"{name}_proj.bias") for name in "qkv"])
            self.layers.append(
                {
                    "input_norm": take(prefix + "input_layernorm.weight"),
                    "qkv": qkv,
                    "qkv_bias": qkv_bias,
                    "o": take(attention + "o_proj.weight"),
                    "post_norm": take(prefix + "post_attention_layernorm.weight"),
                    "gate_up": torch.cat([take(prefix + "mlp.gate_proj.weight"), take(prefix + "mlp.up_proj.weight")]),
                    "down": take(prefix + "mlp.down_proj.weight"),
                }
            )

        inv_freq = _rope_inverse_frequencies(config)
        positions = torch.arange(config.max_model_len, dtype=torch.float64)
        angles = torch.outer(positions, inv_freq)
        self._cos = angles.cos().to(device=device, dtype=torch.float32)
        self._sin = angles.sin().to(device=device, dtype=torch.float32)
        self._scale = 1.0 / math.sqrt(config.head_dim)

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return cos and sin `[tokens, 1, head_dim / 2]` in the run dtype for `positions`."""
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
    ) -> torch.Tensor:
        """Run one step and return float32 logits `[len(logit_rows), vocab]`.

        `token_ids` and `positions` are `[tokens]`, ordered as `batch` describes; K/V of
        every token is written to its slot. `logit_rows` selects the rows whose next-token
        logits are wanted (the last token of each sequence).
        """
        config = self.config
        hidden = self.embed.index_select(0, token_ids)
        cos, sin = self.rope_tables(positions)
        q_size = config.num_heads * config.head_dim
        kv_size = config.num_kv_heads * config.head_dim
        rope_heads = config.num_heads + config.num_kv_heads

        for index, layer in enumerate(self.layers):
            normed = self._rms_norm(hidden, layer["input_norm"])
            qkv = F.linear(normed, layer["qkv"], layer["qkv_bias"])
            query_key = _apply_rope(qkv[:, : q_size + kv_size].view(-1, rope_heads, config.head_dim), cos, sin)
            query = query_key[:, : config.num_heads]
            key = query_key[:, config.num_heads :]
            value = qkv[:, q_size + kv_size :].view(-1, config.num_kv_heads, config.head_dim)
            attended = self._attention(index, query, key, value, batch, kv)
            hidden = hidden + F.linear(attended, layer["o"])

            normed = self._rms_norm(hidden, layer["post_norm"])
            gate_up = F.linear(normed, layer["gate_up"])
            gate, up = gate_up.chunk(2, dim=-1)
            hidden = hidden + F.linear(F.silu(gate) * up, layer["down"])

        last = self._rms_norm(hidden.index_select(0, logit_rows), self.norm)
        return F.linear(last, self.lm_head).float()

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and scale in the run dtype, as the Hugging Face reference does.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.config.rms_norm_eps)
        return weight * normed.to(self.dtype)

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
        config = self.config
        kv_heads, head_dim = config.num_kv_heads, config.head_dim
        group = config.num_heads // kv_heads
        key_buffer, value_buffer = kv.layer(layer)
        query = query * self._scale
        outputs = []

        count = batch.num_decode
        if count:
            key_buffer[batch.decode_slots, :, batch.decode_positions] = key[:count]
            value_buffer[batch.decode_slots, :, batch.decode_positions] = value[:count]
            length = batch.decode_len
            if batch.decode_slot_range is not None:
                first, end = batch.decode_slot_range
                keys = key_buffer[first:end, :, :length]
                values = value_buffer[first:end, :, :length]
            else:
                keys = key_buffer[batch.decode_slots, :, :length]
                values = value_buffer[batch.decode_slots, :, :length]
            # [B, kv_heads, group, dim] @ [B, kv_heads, dim, L]: each KV head serves its group
            # of query heads without repeating K/V.
            grouped = query[:count].reshape(count, kv_heads, group, head_dim)
            scores = torch.matmul(grouped, keys.transpose(-1, -2)) + batch.decode_mask
            probabilities = torch.softmax(scores, dim=-1)
            outputs.append(torch.matmul(probabilities, values).reshape(count, -1))

        for segment in batch.prefills:
            rows = slice(segment.row, segment.row + segment.length)
            end_pos = segment.start_pos + segment.length
            key_buffer[segment.slot, :, segment.start_pos : end_pos] = key[rows].transpose(0, 1)
            value_buffer[segment.slot, :, segment.start_pos : end_pos] = value[rows].transpose(0, 1)
            keys = key_buffer[segment.slot, :, :end_pos]  # [kv_heads, L, dim]
            values = value_buffer[segment.slot, :, :end_pos]
            # [T, heads, dim] -> [kv_heads, group * T, dim] so one matmul per KV head covers its group.
            grouped = query[rows].reshape(segment.length, kv_heads, group, head_dim).permute(1, 2, 0, 3)
            grouped = grouped.reshape(kv_heads, group * segment.length, head_dim)
            scores = torch.matmul(grouped, keys.transpose(-1, -2))
            scores = scores.view(kv_heads, group, segment.length, end_pos) + segment.mask
            probabilities = torch.softmax(scores, dim=-1).view(kv_heads, group * segment.length, end_pos)
            attended = torch.matmul(probabilities, values).view(kv_heads, group, segment.length, head_dim)
            outputs.append(attended.permute(2, 0, 1, 3).reshape(segment.length, -1))

        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head's features (Hugging Face `rotate_half` convention)."""
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
