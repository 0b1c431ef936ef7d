"""Chat templates: Jinja2 programs shipped with a model that turn messages into a prompt.

Templates come from model files that anyone can publish, so they run in Jinja2's immutable
sandbox (no attribute access to Python internals, no mutation of the passed messages). The
rendering environment matches what Hugging Face `transformers` offers templates:
`raise_exception`, `strftime_now`, a `tojson` filter that keeps non-ASCII text, and the
`bos_token`, `eos_token`, `add_generation_prompt`, `tools` variables.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmisvc.protocol.errors import BadRequestError


class TemplateRaisedError(jinja2.TemplateError):
    """A template called `raise_exception` (for example roles not alternating)."""


def _raise_exception(message: str) -> None:
    raise TemplateRaisedError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format_string: str) -> str:
    return datetime.now().strftime(format_string)


class ChatTemplate:
    """One compiled chat template.

    Raises `BadRequestError` at construction when the template does not parse, because the
    only caller-supplied templates arrive in requests.
    """

    def __init__(self, source: str):
        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = _strftime_now
        try:
            self._template = environment.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise BadRequestError(f"invalid chat template: {exc}", param="chat_template") from exc
        self.source = source

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool,
        bos_token: str = "",
        eos_token: str = "",
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Return the prompt text for `messages`.

        `kwargs` become extra template variables (vLLM's `chat_template_kwargs`). Raises
        `BadRequestError` with the template's own message when it rejects the conversation
        or fails while rendering.
        """
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=bos_token,
                eos_token=eos_token,
                tools=tools,
                **kwargs,
            )
        except TemplateRaisedError as exc:
            raise BadRequestError(f"chat template rejected the messages: {exc}", param="messages") from exc
        except jinja2.TemplateError as exc:
            raise BadRequestError(f"chat template failed to render: {exc}", param="messages") from exc
