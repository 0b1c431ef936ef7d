"""Reading a few top-level fields of a large JSON object without parsing all of it.

A round-robin service needs only `model` from a request body, yet a 220 KB prompt costs
orjson 0.1-0.3 ms to parse into Python objects. `top_level_fields` walks the object's
structure instead: string values are skipped with `bytes.find` for the closing quote
(a memchr scan), nested arrays and objects by bracket matching, and only the wanted values
are decoded. It does not validate the parts it skips; a malformed body that still has a
readable structure goes to the engine, which rejects it with its own 400.
"""

from __future__ import annotations

import re

from .jsonutil import JSONDecodeError, loads

# Bodies below this size are parsed whole: orjson is faster than the scan there.
SCAN_MIN_BYTES = 16384

_WHITESPACE = b" \t\r\n"
_STRUCTURE = re.compile(rb'["{}\[\]]')
_SCALAR_END = re.compile(rb"[,}\]\s]")


class ScanError(ValueError):
    """The body is not a JSON object with a readable top-level structure."""


def top_level_fields(body: bytes, names: frozenset[str]) -> dict:
    """Return {name: value} for the top-level keys of the JSON object `body` listed in `names`.

    Raises ScanError when `body` is not an object or its structure cannot be followed.
    """
    position = _skip_whitespace(body, 0)
    if position >= len(body) or body[position] != 0x7B:  # "{"
        raise ScanError("request body must be a JSON object")
    position = _skip_whitespace(body, position + 1)
    found: dict = {}
    if position < len(body) and body[position] == 0x7D:  # "}"
        return found
    while True:
        if position >= len(body) or body[position] != 0x22:  # '"'
            raise ScanError(f"expected a key at byte {position}")
        key_start = position
        key_end = _string_end(body, key_start)
        key = body[key_start + 1 : key_end - 1]
        position = _skip_whitespace(body, key_end)
        if position >= len(body) or body[position] != 0x3A:  # ":"
            raise ScanError(f"expected ':' at byte {position}")
        value_start = _skip_whitespace(body, position + 1)
        value_end = _value_end(body, value_start)
        name = key.decode("utf-8", "replace") if b"\\" not in key else loads(body[key_start:key_end])
        if name in names:
            try:
                found[name] = loads(body[value_start:value_end])
            except JSONDecodeError as exc:
                raise ScanError(f"invalid value of {name!r}: {exc}") from None
        position = _skip_whitespace(body, value_end)
        if position >= len(body):
            raise ScanError("unterminated object")
        if body[position] == 0x7D:  # "}"
            return found
        if body[position] != 0x2C:  # ","
            raise ScanError(f"expected ',' or '}}' at byte {position}")
        position = _skip_whitespace(body, position + 1)


def _skip_whitespace(body: bytes, position: int) -> int:
    length = len(body)
    while position < length and body[position] in _WHITESPACE:
        position += 1
    return position


def _string_end(body: bytes, start: int) -> int:
    """Return the index after the closing quote of the string opening at `start`."""
    position = start + 1
    while True:
        quote = body.find(b'"', position)
        if quote < 0:
            raise ScanError(f"unterminated string starting at byte {start}")
        backslashes = 0
        index = quote - 1
        while body[index] == 0x5C:  # "\"
            backslashes += 1
            index -= 1
        if backslashes % 2 == 0:
            return quote + 1
        position = quote + 1


def _value_end(body: bytes, start: int) -> int:
    """Return the index after the value starting at `start`."""
    if start >= len(body):
        raise ScanError("missing value")
    first = body[start]
    if first == 0x22:
        return _string_end(body, start)
    if first in (0x7B, 0x5B):  # "{" or "["
        depth = 0
        position = start
        while True:
            match = _STRUCTURE.search(body, position)
            if match is None:
                raise ScanError(f"unterminated value starting at byte {start}")
            char = body[match.start()]
            if char == 0x22:
                position = _string_end(body, match.start())
                continue
            depth += 1 if char in (0x7B, 0x5B) else -1
            position = match.start() + 1
            if depth == 0:
                return position
    match = _SCALAR_END.search(body, start)
    return match.start() if match is not None else len(body)
