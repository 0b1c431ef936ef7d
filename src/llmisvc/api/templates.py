"""Go-template forms used in KServe presets and samples, rendered over a merged spec.

Supported actions (whitespace-trimming `{{-` and `-}}` included):

- `{{ .ObjectMeta.Name }}`, `{{ .ObjectMeta.Namespace }}`, `{{ .Spec.Model.Name }}`,
  `{{ .Spec.Model.URI }}`: fields of the service being rendered;
- `{{ .GlobalConfig.KEY }}`: platform settings passed by the caller;
- `{{ ChildName ARG "-suffix" }}` (or a backquoted suffix): a Kubernetes-safe child name;
- `{{ "text" }}` or ``{{ `text` }}``: the literal text, so `{{ "{{" }}` writes a literal `{{`
  (for example in an inline Jinja chat template passed as an argument).

Anything else is an error naming the unknown key or action, never an empty string.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any as AnyValue

from llmisvc.api.errors import FieldError, SpecError
from llmisvc.api.validate import field_path

MAX_NAME_LENGTH = 63
MD5_HEX_LENGTH = 32
# Part of a long parent kept in front of the digest: 63 - 32 = 31 characters, less the suffix.
_HEAD = MAX_NAME_LENGTH - MD5_HEX_LENGTH

_CHILD_NAME = re.compile(r'^ChildName\s+(\.[A-Za-z0-9_.]+)\s+(?:"((?:[^"\\]|\\.)*)"|`([^`]*)`)$')
_FIELD = re.compile(r"^\.[A-Za-z0-9_.]+$")
_LITERAL = re.compile(r'^(?:"((?:[^"\\]|\\.)*)"|`([^`]*)`)$')


def child_name(parent: str, suffix: str) -> str:
    """Return a child resource name of at most 63 characters built from `parent` and `suffix`.

    Returns the plain concatenation when it fits. Otherwise the parent is cut so that the cut
    parent, the 32 hex digits of md5(parent) and the suffix fit in 63 characters. When the
    suffix is 31 characters or longer, the name is at most 31 characters of the parent, then
    md5(parent + suffix), then as much of the suffix as fits. Trailing non-alphanumerics of a
    shortened name are removed, because a DNS-1123 label must end with a letter or digit.
    """
    if len(parent) + len(suffix) <= MAX_NAME_LENGTH:
        return parent + suffix
    if len(suffix) >= _HEAD:
        digest = hashlib.md5((parent + suffix).encode()).hexdigest()
        name = parent[:_HEAD] + digest
        name += suffix[: max(0, MAX_NAME_LENGTH - len(name))]
    else:
        digest = hashlib.md5(parent.encode()).hexdigest()
        name = parent[: _HEAD - len(suffix)] + digest + suffix
    return _strip_trailing_non_alphanumerics(name)


# The name templates use for `child_name`, so Go-template-minded callers find it.
ChildName = child_name


def _strip_trailing_non_alphanumerics(name: str) -> str:
    while name and not name[-1].isalnum():
        name = name[:-1]
    return name


class TemplateContext:
    """Values that template actions can reference, built from a service document.

    `service` is the merged LLMInferenceService dict; `global_config` maps `.GlobalConfig`
    keys to values.
    """

    def __init__(self, service: dict, global_config: dict[str, AnyValue] | None = None):
        metadata = service.get("metadata") or {}
        model = (service.get("spec") or {}).get("model") or {}
        self.values: dict[str, AnyValue] = {
            ".ObjectMeta.Name": metadata.get("name", ""),
            ".ObjectMeta.Namespace": metadata.get("namespace") or "default",
            ".Spec.Model.Name": model.get("name") or metadata.get("name", ""),
            ".Spec.Model.URI": model.get("uri", ""),
        }
        for key, value in (global_config or {}).items():
            self.values[f".GlobalConfig.{key}"] = value

    def lookup(self, key: str) -> AnyValue:
        """Return the value of a field reference such as `.ObjectMeta.Name`.

        Raises KeyError with a message naming the key and the known keys.
        """
        if key not in self.values:
            known = ", ".join(sorted(self.values))
            raise KeyError(f"unknown template key {key}; known keys: {known}")
        return self.values[key]


def _parse(text: str) -> list[tuple[str, str, bool, bool]]:
    """Split `text` into ("text", value, False, False) and ("action", body, trim_left, trim_right).

    An action ends at the first `}}` outside a quoted string, so `{{ "}}" }}` is one action.
    `{{- ` and ` -}}` ask for the whitespace before or after the action to be trimmed.
    Raises ValueError for an action without its closing `}}`.
    """
    pieces: list[tuple[str, str, bool, bool]] = []
    position = 0
    while True:
        start = text.find("{{", position)
        if start < 0:
            pieces.append(("text", text[position:], False, False))
            return pieces
        pieces.append(("text", text[position:start], False, False))
        index, quote, end = start + 2, None, -1
        while index < len(text):
            char = text[index]
            if quote is not None:
                if char == "\\" and quote == '"':
                    index += 1
                elif char == quote:
                    quote = None
            elif char in "\"`":
                quote = char
            elif text.startswith("}}", index):
                end = index
                break
            index += 1
        if end < 0:
            raise ValueError(f"unterminated template action in {text!r}: add the closing }}}}")
        body = text[start + 2:end]
        trim_left = body.startswith("- ") or body == "-"
        trim_right = body.endswith(" -")
        body = body[1:] if trim_left else body
        body = body[:-1] if trim_right else body
        pieces.append(("action", body.strip(), trim_left, trim_right))
        position = end + 2


def render_string(text: str, context: TemplateContext) -> str:
    """Render every `{{ ... }}` action in `text`; raise KeyError/ValueError for bad actions."""
    if "{{" not in text:
        return text

    pieces = _parse(text)
    output: list[str] = []
    trim_next = False
    for kind, body, trim_left, trim_right in pieces:
        if kind == "text":
            output.append(body.lstrip() if trim_next else body)
            trim_next = False
            continue
        if trim_left and output:
            output[-1] = output[-1].rstrip()
        output.append(str(_evaluate(body, context)))
        trim_next = trim_right
    return "".join(output)


def _evaluate(action: str, context: TemplateContext) -> AnyValue:
    child = _CHILD_NAME.match(action)
    if child:
        parent = context.lookup(child.group(1))
        suffix = child.group(2) if child.group(2) is not None else child.group(3)
        if child.group(2) is not None:
            suffix = bytes(suffix, "utf-8").decode("unicode_escape")
        return child_name(str(parent), suffix)
    if _FIELD.match(action):
        return context.lookup(action)
    literal = _LITERAL.match(action)
    if literal:
        if literal.group(1) is not None:
            return bytes(literal.group(1), "utf-8").decode("unicode_escape")
        return literal.group(2)
    raise ValueError(f"unsupported template action {{{{ {action} }}}}: use a field such as "
                     ".ObjectMeta.Name, .GlobalConfig.KEY or ChildName .ObjectMeta.Name \"-suffix\"")


def render_object(value: AnyValue, context: TemplateContext, path: str = "") -> AnyValue:
    """Return a copy of `value` with every template action in its strings rendered.

    Raises SpecError listing each failing string by its field path.
    """
    errors: list[FieldError] = []
    rendered = _render(value, context, path, errors)
    if errors:
        raise SpecError(errors)
    return rendered


def _render(value: AnyValue, context: TemplateContext, path: str, errors: list[FieldError]) -> AnyValue:
    if isinstance(value, str):
        try:
            return render_string(value, context)
        except (KeyError, ValueError) as exc:
            message = exc.args[0] if exc.args else str(exc)
            errors.append(FieldError(path, str(message)))
            return value
    if isinstance(value, dict):
        return {k: _render(v, context, field_path(path, str(k)), errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_render(v, context, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    return value
