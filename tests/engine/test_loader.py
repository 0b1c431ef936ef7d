"""Model sources: embedded GGUF, safetensors directories, the offline Hugging Face cache, errors."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from llmisvc.engine.loader import EMBEDDED_REPO_ID, embedded_gguf_path, load_model, resolve_model_path
from llmisvc.engine.model_config import ModelNotFoundError, UnsupportedModelError
from tiny_checkpoints import write_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("models") / "tiny-qwen2", "Qwen2ForCausalLM")


def _fake_hub_cache(root, repo_id, source, commit="0123abcd"):
    """Lay out `source` as the Hub cache does: models--org--name/{refs/main, snapshots/<commit>}."""
    repo_dir = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        (snapshot / file.name).symlink_to(file)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def test_embedded_aliases_resolve_to_package_gguf():
    path = embedded_gguf_path()
    assert path.suffix == ".gguf"
    assert resolve_model_path("smollm2") == path
    assert resolve_model_path("SmolLM2-135M-Instruct") == path


def test_embedded_repo_id_falls_back_when_not_cached(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="llmisvc.engine.loader"):
        path = resolve_model_path(f"hf://{EMBEDDED_REPO_ID}")
    assert path == embedded_gguf_path()
    assert "not in the Hugging Face cache" in caplog.text


def test_hf_uri_reads_hub_cache(tmp_path, monkeypatch, checkpoint):
    snapshot = _fake_hub_cache(tmp_path / "hub", "acme/tiny-qwen2", checkpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model_path("hf://acme/tiny-qwen2") == snapshot
    assert resolve_model_path("hf://acme/tiny-qwen2@0123abcd") == snapshot

    model = load_model("hf://acme/tiny-qwen2")
    assert model.config.architecture == "Qwen2ForCausalLM"
    assert model.weights["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_hf_uri_reads_hf_home(tmp_path, monkeypatch, checkpoint):
    snapshot = _fake_hub_cache(tmp_path / "home" / "hub", "acme/tiny-qwen2", checkpoint)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert resolve_model_path("hf://acme/tiny-qwen2") == snapshot


def test_hf_uri_prefers_cache_over_embedded(tmp_path, monkeypatch, checkpoint):
    snapshot = _fake_hub_cache(tmp_path, EMBEDDED_REPO_ID, checkpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert resolve_model_path(f"hf://{EMBEDDED_REPO_ID}") == snapshot


def test_hf_uri_not_cached_says_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as raised:
        resolve_model_path("hf://acme/missing-model")
    message = str(raised.value)
    assert "acme/missing-model" in message
    assert "offline" in message
    assert str(tmp_path) in message


def test_safetensors_directory_loads(checkpoint):
    model = load_model(str(checkpoint), dtype="float32")
    assert model.config.attention_bias
    assert model.config.num_layers == 2
    assert model.weights["lm_head.weight"].dtype == torch.float32
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert model.tokenizer.eos_token_ids == [model.tokenizer.encode("<|im_end|>")[0]]


def test_file_uri_and_plain_path(checkpoint):
    assert resolve_model_path(f"file://{checkpoint}") == checkpoint
    assert resolve_model_path(str(checkpoint)) == checkpoint
    gguf = embedded_gguf_path()
    assert resolve_model_path(f"file://{gguf}") == gguf
    assert load_model(f"file://{checkpoint}").config.architecture == "Qwen2ForCausalLM"


def test_missing_path_is_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="model path not found"):
        resolve_model_path(str(tmp_path / "absent"))


def test_unknown_scheme_is_rejected():
    with pytest.raises(ModelNotFoundError, match="s3://"):
        resolve_model_path("s3://bucket/model")


def _copy_checkpoint(source, target, config_changes=None, extra_tensors=None):
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    config = json.loads((target / "config.json").read_text())
    config.update(config_changes or {})
    (target / "config.json").write_text(json.dumps(config))
    if extra_tensors:
        save_file(extra_tensors, str(target / "extra.safetensors"))
    return target


def test_unsupported_architecture_is_named(tmp_path, checkpoint):
    directory = _copy_checkpoint(checkpoint, tmp_path / "gpt2", {"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        load_model(str(directory))


def test_unsupported_quantization_is_named(tmp_path, checkpoint):
    directory = _copy_checkpoint(checkpoint, tmp_path / "awq", {"quantization_config": {"quant_method": "awq"}})
    with pytest.raises(UnsupportedModelError, match="awq"):
        load_model(str(directory))


def test_unsupported_dtype_is_named(tmp_path, checkpoint):
    directory = _copy_checkpoint(
        checkpoint, tmp_path / "int8", extra_tensors={"model.extra.qweight": torch.zeros(4, 4, dtype=torch.int8)}
    )
    with pytest.raises(UnsupportedModelError, match="int8"):
        load_model(str(directory))


def _write_gguf(path, architecture, tensor_type):
    """Write a minimal GGUF with a byte-level BPE vocabulary and one token_embd tensor."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "ab"])
    writer.add_token_types([1, 1, 1])
    writer.add_token_merges(["a b"])
    block_elements, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
    raw = np.zeros((3, 32 // block_elements * block_bytes), dtype=np.uint8)
    writer.add_tensor("token_embd.weight", raw, raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_unsupported_architecture_is_named(tmp_path):
    import gguf

    path = _write_gguf(tmp_path / "model.gguf", "gpt2", gguf.GGMLQuantizationType.Q8_0)
    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        load_model(str(path))


def test_gguf_unsupported_tensor_type_is_named(tmp_path):
    import gguf

    path = _write_gguf(tmp_path / "model.gguf", "llama", gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(UnsupportedModelError, match="Q8_1"):
        load_model(str(path))
