"""Read a GGUF file into a `ModelConfig`, Hugging Face-named weights and a `Tokenizer`.

Quantised tensors (Q4_1, Q8_0, K-quants, ...) are dequantised with the `gguf` package into the
requested torch dtype, one tensor at a time so peak memory stays near the final model size.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmisvc.engine.model_config import ModelConfig, ModelLoadError, UnsupportedModelError
from llmisvc.engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# GGUF architecture name -> Hugging Face architecture name.
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")


def read_gguf_fields(path: Path) -> tuple[Any, dict[str, Any]]:
    """Open a GGUF file and return its reader and its metadata as plain Python values."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"failed to read GGUF file {path}: {exc}") from exc
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return reader, fields


def config_from_gguf(fields: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    """Build a `ModelConfig` from GGUF metadata; raise `UnsupportedModelError` naming the architecture."""
    arch = fields.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported GGUF architecture {arch!r}; the built-in engine runs {', '.join(_ARCHITECTURES)}"
        )

    def key(name: str, default: Any = None) -> Any:
        return fields.get(f"{arch}.{name}", default)

    hidden_size = int(key("embedding_length"))
    num_heads = int(key("attention.head_count"))
    rope_scaling = None
    scaling_type = key("rope.scaling.type")
    if scaling_type not in (None, "none"):
        if scaling_type != "linear":
            raise UnsupportedModelError(f"unsupported GGUF rope scaling type {scaling_type!r}; supported: linear")
        rope_scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    eos = fields.get("tokenizer.ggml.eos_token_id")
    vocab_size = key("vocab_size") or len(fields.get("tokenizer.ggml.tokens", []))
    return ModelConfig(
        architecture=_ARCHITECTURES[arch],
        vocab_size=int(vocab_size),
        hidden_size=hidden_size,
        num_layers=int(key("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(key("attention.head_count_kv", num_heads)),
        head_dim=int(key("attention.key_length", hidden_size // num_heads)),
        intermediate_size=int(key("feed_forward_length")),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        max_model_len=int(key("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        rope_scaling=rope_scaling,
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=[int(eos)] if eos is not None else [],
    )


def _unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo the row order llama.cpp's converter applies to Llama q/k projections.

    The converter interleaves the two rotary halves of each head (rows r and r + head_dim/2
    become neighbours) so llama.cpp can rotate adjacent pairs; Hugging Face's Llama rotates
    the halves, which is what the forward pass here implements.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _dequantize(tensor: Any) -> np.ndarray:
    import gguf

    type_name = tensor.tensor_type.name
    if tensor.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.asarray(tensor.data)
    if tensor.tensor_type == gguf.GGMLQuantizationType.BF16:
        raw = np.asarray(tensor.data).view(np.uint16).astype(np.uint32) << 16
        return raw.view(np.float32)
    try:
        return gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise UnsupportedModelError(
            f"unsupported GGUF tensor type {type_name} in tensor {tensor.name!r}: the gguf package "
            "cannot dequantize it"
        ) from exc


def load_gguf(path: Path, dtype: torch.dtype) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Load a GGUF model file.

    Returns the config, the weights under Hugging Face parameter names in `dtype` (q/k rows
    restored to Hugging Face order for Llama), and the tokenizer built from the file's
    vocabulary. Raises `UnsupportedModelError` naming an unknown architecture, tensor or
    tensor type, and `ModelLoadError` for unreadable files.
    """
    reader, fields = read_gguf_fields(path)
    tensor_names = {tensor.name for tensor in reader.tensors}
    config = config_from_gguf(fields, tensor_names)
    tokenizer = Tokenizer.from_gguf_fields(fields)
    if tokenizer.eos_token_id is not None:
        config.eos_token_ids = sorted(set(config.eos_token_ids) | set(tokenizer.eos_token_ids))
    permute_rope = fields["general.architecture"] == "llama"

    weights: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        array = _dequantize(tensor)
        if permute_rope and tensor.name.endswith(("attn_q.weight", "attn_q.bias")):
            array = _unpermute_rope_rows(array, config.num_heads)
        elif permute_rope and tensor.name.endswith(("attn_k.weight", "attn_k.bias")):
            array = _unpermute_rope_rows(array, config.num_kv_heads)
        # np.array copies, because arrays memory-mapped from the file are read-only.
        weights[name] = torch.from_numpy(np.array(array, dtype=np.float32)).to(dtype)
    logger.info(
        "loaded GGUF %s: %s, %d layers, %d tensors", path, config.architecture, config.num_layers, len(weights)
    )
    return config, weights, tokenizer


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_TENSORS:
        return f"model.layers.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}"
    raise UnsupportedModelError(f"unsupported GGUF tensor {gguf_name!r}; the Llama/Qwen2 forward pass has no use for it")
