"""Small random-weight Hugging Face checkpoints that tests write to disk and load back.

Each checkpoint is a real model directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json) saved by `transformers`, so loaders and parity tests run on the same
files a user would download.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "Kubernetes schedules containers onto nodes and restarts them when they fail.",
    "The quick brown fox jumps over the lazy dog 0123456789 times.",
    "Large language models predict the next token from the tokens before it.",
    "Prefix caching reuses the key and value tensors of a shared prompt prefix.",
    "héllo wörld, 你好世界, emoji 😀 and symbols #$%&*()[]{}",
]


def build_tokenizer(vocab_size: int = 400) -> Tokenizer:
    """Train a byte-level BPE tokenizer on a fixed corpus (deterministic for a given size)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    return tokenizer


def write_checkpoint(
    directory: Path,
    architecture: str = "Qwen2ForCausalLM",
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Path:
    """Create a 2-layer random model of `architecture` with tokenizer files in `directory`."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save(str(directory / "tokenizer.json"))
    end_id = tokenizer.token_to_id("<|im_end|>")

    config_class, model_class = {
        "Qwen2ForCausalLM": (Qwen2Config, Qwen2ForCausalLM),
        "LlamaForCausalLM": (LlamaConfig, LlamaForCausalLM),
    }[architecture]
    config = config_class(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.token_to_id("<|im_start|>"),
        eos_token_id=end_id,
    )
    torch.manual_seed(seed)
    model = model_class(config).to(dtype)
    # Default initialisation leaves q/k/v biases at zero; random values make the bias path count.
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith("bias") or "norm" in parameter_name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(directory, safe_serialization=True)

    tokenizer_config = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory
