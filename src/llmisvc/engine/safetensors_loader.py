"""Read a Hugging Face model directory: `config.json`, `*.safetensors`, tokenizer files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from llmisvc.engine.model_config import ModelConfig, ModelNotFoundError, UnsupportedModelError
from llmisvc.engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Checkpoint dtypes that convert to the run dtype without a quantisation scheme.
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def load_safetensors_dir(directory: Path, dtype: torch.dtype) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Load a model directory into a config, weights in `dtype` and a tokenizer.

    Raises `ModelNotFoundError` when `config.json` or the weights are missing, and
    `UnsupportedModelError` naming the architecture, the quantisation method
    (`quantization_config.quant_method`) or a tensor's dtype when the engine cannot run it.
    """
    from safetensors import safe_open

    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"missing config.json in model directory {directory}")
    raw_config = json.loads(config_file.read_text())
    quantization = raw_config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "<unnamed>")
        raise UnsupportedModelError(
            f"unsupported quantization {method!r} in {config_file}; the built-in engine loads "
            "float32, float16 and bfloat16 safetensors checkpoints"
        )
    config = ModelConfig.from_hf(raw_config)

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"no *.safetensors weights in model directory {directory}")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                if tensor.dtype not in _FLOAT_DTYPES:
                    raise UnsupportedModelError(
                        f"unsupported dtype {str(tensor.dtype).removeprefix('torch.')} of tensor {name!r} "
                        f"in {file}; supported: float32, float16, bfloat16"
                    )
                weights[name] = tensor.to(dtype)

    tokenizer = Tokenizer.from_directory(directory, extra_eos_token_ids=config.eos_token_ids)
    generation_config = directory / "generation_config.json"
    if generation_config.is_file():
        eos = json.loads(generation_config.read_text()).get("eos_token_id")
        extra = [eos] if isinstance(eos, int) else list(eos or [])
        tokenizer.eos_token_ids = sorted(set(tokenizer.eos_token_ids) | set(extra))
    config.eos_token_ids = tokenizer.eos_token_ids
    logger.info("loaded safetensors model %s: %s, %d layers", directory, config.architecture, config.num_layers)
    return config, weights, tokenizer
