"""Model hyperparameters in one shape, whatever file format they came from.

`ModelConfig` is filled from a Hugging Face `config.json` dict or from GGUF metadata, and is
what the forward pass, the KV cache and the engine core read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Architectures the forward pass in `engine.models.llama` implements, by the name that
# `config.json` uses in `architectures`. Qwen2 differs from Llama only by bias on q/k/v.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


class ModelLoadError(Exception):
    """A model could not be loaded; the message names the source and what to do."""


class ModelNotFoundError(ModelLoadError):
    """The model URI names nothing that exists locally (downloads are never attempted)."""


class UnsupportedModelError(ModelLoadError):
    """The model exists but uses an architecture, tensor type or dtype this engine cannot run."""


@dataclass
class ModelConfig:
    """Hyperparameters of a decoder-only transformer of the Llama family.

    `max_model_len` is the context length in tokens the model was trained for (the engine may
    lower it). `eos_token_ids` lists every token id that ends generation.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_model_len: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope_scaling: dict[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict.

        Raises `UnsupportedModelError` naming the architecture when it is not Llama or Qwen2,
        and for rope scaling types the forward pass does not implement.
        """
        architectures = config.get("architectures") or [config.get("model_type", "<missing>")]
        architecture = architectures[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {architecture!r}; the built-in engine runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        # transformers 5 writes rope settings as `rope_parameters`; older releases use
        # `rope_theta` plus `rope_scaling`.
        rope_parameters = config.get("rope_parameters") or {}
        rope_scaling = config.get("rope_scaling")
        if rope_scaling is None and rope_parameters.get("rope_type", "default") != "default":
            rope_scaling = rope_parameters
        _check_rope_scaling(rope_scaling)
        rope_theta = config.get("rope_theta", rope_parameters.get("rope_theta", 10000.0))
        if config.get("use_sliding_window") and config.get("sliding_window"):
            raise UnsupportedModelError(
                f"unsupported sliding-window attention (sliding_window={config['sliding_window']}) in "
                f"{architecture}; the built-in engine implements full attention only"
            )

        num_heads = int(config["num_attention_heads"])
        hidden_size = int(config["hidden_size"])
        eos = config.get("eos_token_id")
        if eos is None:
            eos_ids = []
        elif isinstance(eos, int):
            eos_ids = [eos]
        else:
            eos_ids = [int(token) for token in eos]
        is_qwen2 = architecture == "Qwen2ForCausalLM"
        return cls(
            architecture=architecture,
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden_size,
            num_layers=int(config["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
            head_dim=int(config.get("head_dim") or hidden_size // num_heads),
            intermediate_size=int(config["intermediate_size"]),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            max_model_len=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias, Llama only when `attention_bias` is true.
            attention_bias=is_qwen2 or bool(config.get("attention_bias", False)),
            rope_scaling=rope_scaling,
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def to_hf(self) -> dict[str, Any]:
        """Return the equivalent Hugging Face `config.json` dict (used to build references)."""
        model_type = "qwen2" if self.architecture == "Qwen2ForCausalLM" else "llama"
        config: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_model_len,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "rope_scaling": self.rope_scaling,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else self.eos_token_ids,
        }
        if model_type == "llama":
            config["attention_bias"] = self.attention_bias
            config["mlp_bias"] = False
        return config


def _check_rope_scaling(rope_scaling: dict[str, Any] | None) -> None:
    if not rope_scaling:
        return
    kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if kind not in ("default", "linear", "llama3"):
        raise UnsupportedModelError(
            f"unsupported rope_scaling type {kind!r}; the built-in engine implements "
            "default, linear and llama3"
        )
