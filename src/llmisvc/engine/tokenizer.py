"""Tokenizer: text to token ids and back, built on the `tokenizers` library.

A `Tokenizer` comes from a Hugging Face `tokenizer.json` (safetensors models) or is built
from a GGUF file's vocabulary and merges as a byte-level BPE. `IncrementalDetokenizer` turns a
growing list of generated ids into text pieces for streaming without ever emitting half of a
multi-byte character.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from llmisvc.engine.chat_template import ChatTemplate
from llmisvc.engine.model_config import UnsupportedModelError

logger = logging.getLogger(__name__)

# GGUF token types (gguf.TokenType): CONTROL tokens are special (skipped when decoding with
# skip_special_tokens), USER_DEFINED tokens are matched whole in the input like added tokens.
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# Split patterns for the pre-tokenizer names that GGUF files carry in `tokenizer.ggml.pre`.
# They are the regular expressions of the original Hugging Face tokenizers (GPT-2 for
# "gpt-2" and "smollm", Llama 3 for "llama-bpe", Qwen2 for "qwen2").
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """Return the pre-tokenizer for a GGUF `tokenizer.ggml.pre` name, or raise naming it."""
    if pre in ("gpt-2", "gpt2", "default"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # SmolLM's tokenizer splits every digit on its own before the GPT-2 regex runs.
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    patterns = {"llama-bpe": _LLAMA3_PATTERN, "llama3": _LLAMA3_PATTERN, "qwen2": _QWEN2_PATTERN}
    if pre in patterns:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(patterns[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise UnsupportedModelError(
        f"unsupported GGUF pre-tokenizer {pre!r}; supported: gpt-2, smollm, llama-bpe, qwen2"
    )


class Tokenizer:
    """Encode and decode text, and render chat prompts, for one model.

    Fields: `bos_token_id` / `eos_token_id` (may be None), `eos_token_ids` (every id that ends
    generation), `vocab_size` (including added tokens), `chat_template` (None when the model
    ships none).
    """

    def __init__(
        self,
        tokenizer: HFTokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        chat_template: str | None,
        extra_eos_token_ids: Sequence[int] = (),
    ):
        self._tokenizer = tokenizer
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = tokenizer.token_to_id(eos_token) if eos_token else None
        eos_ids = [self.eos_token_id] if self.eos_token_id is not None else []
        self.eos_token_ids = sorted(set(eos_ids) | set(extra_eos_token_ids))
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.chat_template = ChatTemplate(chat_template) if chat_template else None
        self.special_token_ids = frozenset(
            token_id for token_id, added in tokenizer.get_added_tokens_decoder().items() if added.special
        )

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_gguf_fields(cls, fields: dict[str, Any]) -> "Tokenizer":
        """Build a byte-level BPE tokenizer from GGUF `tokenizer.*` metadata values.

        `fields` maps GGUF keys to decoded Python values. Raises `UnsupportedModelError` for
        tokenizer models other than "gpt2" (byte-level BPE) and unknown pre-tokenizers.
        """
        kind = fields.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise UnsupportedModelError(
                f"unsupported GGUF tokenizer model {kind!r}; the built-in engine reads byte-level "
                "BPE tokenizers (tokenizer.ggml.model = gpt2)"
            )
        tokens: list[str] = fields["tokenizer.ggml.tokens"]
        token_types: list[int] = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(merge.split(" ", 1)) for merge in fields["tokenizer.ggml.merges"]]
        vocab = {token: index for index, token in enumerate(tokens)}

        tokenizer = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
        tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(fields.get("tokenizer.ggml.pre", "gpt-2"))
        tokenizer.decoder = decoders.ByteLevel()
        added = [
            AddedToken(token, special=token_type == _TOKEN_TYPE_CONTROL, normalized=False)
            for token, token_type in zip(tokens, token_types)
            if token_type in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)
        ]
        tokenizer.add_tokens(added)

        def token_at(key: str) -> str | None:
            index = fields.get(key)
            return tokens[index] if index is not None and 0 <= index < len(tokens) else None

        bos_token = token_at("tokenizer.ggml.bos_token_id")
        eos_token = token_at("tokenizer.ggml.eos_token_id")
        if fields.get("tokenizer.ggml.add_bos_token") and bos_token:
            tokenizer.post_processor = processors.TemplateProcessing(
                single=f"{bos_token} $A", pair=f"{bos_token} $A $B", special_tokens=[(bos_token, vocab[bos_token])]
            )
        else:
            tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        extra_eos = [fields["tokenizer.ggml.eot_token_id"]] if "tokenizer.ggml.eot_token_id" in fields else []
        return cls(
            tokenizer,
            bos_token=bos_token,
            eos_token=eos_token,
            chat_template=fields.get("tokenizer.chat_template"),
            extra_eos_token_ids=extra_eos,
        )

    @classmethod
    def from_directory(cls, directory: Path, extra_eos_token_ids: Sequence[int] = ()) -> "Tokenizer":
        """Load `tokenizer.json` and `tokenizer_config.json` from a model directory.

        The chat template comes from `tokenizer_config.json` (`chat_template`, a string or a
        list of named templates, of which "default" is used) or from `chat_template.jinja`.
        Raises `ModelLoadError` subclasses when `tokenizer.json` is missing.
        """
        from llmisvc.engine.model_config import ModelNotFoundError

        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelNotFoundError(f"missing tokenizer.json in {directory}")
        tokenizer = HFTokenizer.from_file(str(tokenizer_file))
        config_file = directory / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}

        chat_template = config.get("chat_template")
        if isinstance(chat_template, list):
            named = {entry["name"]: entry["template"] for entry in chat_template}
            chat_template = named.get("default")
        template_file = directory / "chat_template.jinja"
        if chat_template is None and template_file.is_file():
            chat_template = template_file.read_text()

        return cls(
            tokenizer,
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
            chat_template=chat_template,
            extra_eos_token_ids=extra_eos_token_ids,
        )

    # -- use ------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Return the token ids of `text`; `add_special_tokens` adds BOS where the model does."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Return the token ids of each text (runs in parallel inside `tokenizers`)."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [encoding.ids for encoding in encodings]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Return the text of `token_ids`; invalid UTF-8 byte sequences decode as U+FFFD."""
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """Return the vocabulary string of one id (byte-level form, e.g. "Ġthe"), or None."""
        return self._tokenizer.id_to_token(token_id)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` with the model's chat template (or `chat_template` if given).

        Raises `BadRequestError` when the model has no template or the template rejects the
        conversation (its `raise_exception` message is passed on).
        """
        from llmisvc.protocol.errors import BadRequestError

        template = ChatTemplate(chat_template) if chat_template else self.chat_template
        if template is None:
            raise BadRequestError(
                "this model has no chat template; use /v1/completions or pass chat_template",
                param="messages",
            )
        return template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )

    def to_json(self) -> str:
        """Return the tokenizer serialised as Hugging Face `tokenizer.json` text."""
        return self._tokenizer.to_str()


def _token_content(token: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as a string or as an AddedToken dict.
    if isinstance(token, dict):
        return token.get("content")
    return token


class IncrementalDetokenizer:
    """Turn generated token ids into text pieces for streaming.

    `add(ids)` returns only text whose characters are complete: when the bytes of a character
    span several tokens, nothing is returned until its last byte arrives, so a stream never
    carries U+FFFD for a character that is later completed. `finish()` returns whatever is
    still held back (a sequence that truly ends mid-character then yields U+FFFD once).
    Each call decodes only the ids since the last emitted boundary, not the whole output.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        # Text of ids[_prefix:_read] was already emitted; ids[_read:] are pending. Decoding
        # from _prefix keeps one emitted window as context for decoders that depend on it.
        self._prefix = 0
        self._read = 0
        self.text = ""

    @property
    def token_ids(self) -> list[int]:
        """Every id passed to `add` so far."""
        return self._ids

    def add(self, token_ids: Sequence[int]) -> str:
        """Append ids and return the newly completed text ("" while a character is partial)."""
        self._ids.extend(token_ids)
        return self._emit(final=False)

    def finish(self) -> str:
        """Return any text still held back, complete or not."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        decode = self._tokenizer.decode
        emitted = decode(self._ids[self._prefix : self._read], self._skip_special)
        current = decode(self._ids[self._prefix :], self._skip_special)
        if not final and current.endswith("\ufffd"):
            return ""
        piece = current[len(emitted) :]
        self._prefix = self._read
        self._read = len(self._ids)
        self.text += piece
        return piece
