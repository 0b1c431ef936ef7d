"""Prompt text as an engine receives it, and the simulator's tokenizer.

The scheduler hashes the text an engine will really process, so a chat request and the
equivalent completions request must render to the same string on both sides. With the
model's chat template the text is the template's output, rendered in a jinja2 sandbox.
Without one, both sides use `render_chat_fallback`, a fixed role-tagged layout.

`sim_token_ids` is the simulated engine's tokenizer: one token per 4 characters, the id
derived from the characters, so equal text prefixes give equal token prefixes and equal
KV block hashes. The precise prefix scorer uses it to hash exactly as the simulator does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SIM_CHARS_PER_TOKEN = 4
SIM_VOCAB_SIZE = 1 << 31

# Odd multipliers mix the 4 code points of a piece into one id. Any fixed values work,
# provided every component uses the same ones.
_ASCII_LIMIT = np.uint64(1 << 28)
_PIECE_MIX = np.array([0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F], dtype=np.uint64)


class ChatTemplateError(ValueError):
    """A chat template failed to render the given messages."""


def message_text(content: Any) -> str:
    """Return the text of a chat message's `content` (a string or a list of content parts).

    Text parts are joined by newlines, as `llmisvc.protocol.openai` joins them. Non-text
    parts (images, audio) contribute nothing: neither the simulator nor the approximate
    prefix index models them.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                texts.append(part)
        return "\n".join(texts)
    return str(content)


def _role_and_text(message: Any) -> tuple[str, str]:
    """Return (role, text) of a message given as a JSON object or as a parsed ChatMessage."""
    if isinstance(message, Mapping):
        return str(message.get("role", "user")), message_text(message.get("content"))
    return str(getattr(message, "role", "user")), message_text(getattr(message, "content", ""))


def render_chat_fallback(messages: Sequence[Any], add_generation_prompt: bool = True) -> str:
    """Render chat messages without a template: `<|role|>\\ncontent\\n` per message.

    Deterministic and append-only, so the rendering of a conversation is a prefix of the
    rendering of its continuation (multi-turn chats share cached blocks).
    """
    parts = []
    for message in messages:
        role, text = _role_and_text(message)
        parts.append(f"<|{role}|>\n{text}\n")
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


class ChatRenderer:
    """Renders chat messages with a model's jinja2 chat template, or the fallback layout.

    The template runs in jinja2's immutable sandbox because it comes from model files or
    configuration, not from this program.
    """

    def __init__(self, template: str | None = None, bos_token: str = "", eos_token: str = ""):
        self.template_source = template
        self._template = None
        self._bos_token = bos_token
        self._eos_token = eos_token
        if template:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            try:
                self._template = env.from_string(template)
            except Exception as exc:  # jinja2 raises several syntax error types
                raise ChatTemplateError(f"invalid chat template: {exc}") from exc

    def render(self, messages: Sequence[Any], add_generation_prompt: bool = True) -> str:
        """Return the prompt text for `messages`; raise ChatTemplateError if the template fails."""
        if self._template is None:
            return render_chat_fallback(messages, add_generation_prompt)
        plain = []
        for message in messages:
            role, text = _role_and_text(message)
            plain.append({"role": role, "content": text})
        try:
            return self._template.render(
                messages=plain,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos_token,
                eos_token=self._eos_token,
            )
        except Exception as exc:
            raise ChatTemplateError(f"chat template failed to render: {exc}") from exc


def _raise_template_error(message: str) -> None:
    raise ChatTemplateError(message)


def sim_token_ids(text: str) -> np.ndarray:
    """Return the simulator's token ids for `text`: one id per 4 characters (last piece padded).

    A piece of 4 ASCII characters packs into an id below 2**28 (7 bits per character),
    so `sim_detokenize` can invert it. Other pieces get a mixed id in [2**28, 2**31).
    Vectorised with numpy, so long prompts cost no Python work per token.
    """
    if not text:
        return np.zeros(0, dtype=np.int64)
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    pad = (-len(codes)) % SIM_CHARS_PER_TOKEN
    if pad:
        codes = np.concatenate([codes, np.zeros(pad, dtype=np.uint64)])
    pieces = codes.reshape(-1, SIM_CHARS_PER_TOKEN)
    packed = pieces[:, 0] | (pieces[:, 1] << np.uint64(7)) | (pieces[:, 2] << np.uint64(14)) | (pieces[:, 3] << np.uint64(21))
    mixed = (pieces * _PIECE_MIX).sum(axis=1) ^ (pieces[:, 0] << np.uint64(17))
    mixed = _ASCII_LIMIT + mixed % np.uint64(SIM_VOCAB_SIZE - int(_ASCII_LIMIT))
    ascii_piece = (pieces < 128).all(axis=1)
    return np.where(ascii_piece, packed, mixed).astype(np.int64)


def sim_detokenize(token_ids: Sequence[int]) -> str:
    """Return the text of simulator token ids; ids of non-ASCII pieces become U+FFFD."""
    characters = []
    for token_id in token_ids:
        if 0 <= token_id < int(_ASCII_LIMIT):
            for shift in (0, 7, 14, 21):
                code = (token_id >> shift) & 0x7F
                if code:
                    characters.append(chr(code))
        else:
            characters.append("\ufffd")
    return "".join(characters)


def sim_token_count(text: str) -> int:
    """Return the number of simulator tokens in `text` (ceil of characters / 4)."""
    return -(-len(text) // SIM_CHARS_PER_TOKEN)
