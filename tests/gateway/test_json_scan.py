"""The top-level field scan agrees with a full JSON parse."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmisvc.gateway.json_scan import ScanError, top_level_fields

NAMES = frozenset({"model", "stream", "stream_options", 'odd"key', "esc\\aped"})

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
keys = st.sampled_from(sorted(NAMES)) | st.text(max_size=10)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(keys, values, max_size=8), st.sampled_from([None, 2]), st.booleans())
def test_scan_matches_full_parse(document, indent, ascii_only):
    body = json.dumps(document, indent=indent, ensure_ascii=ascii_only).encode()
    expected = {k: v for k, v in orjson.loads(body).items() if k in NAMES}
    assert top_level_fields(body, NAMES) == expected


def test_scan_skips_nested_model_keys():
    body = json.dumps(
        {"messages": [{"role": "user", "content": 'say "model": "x" ] } {', "model": "inner"}], "model": "outer"}
    ).encode()
    assert top_level_fields(body, frozenset({"model"})) == {"model": "outer"}


@pytest.mark.parametrize("body", [b"", b"[1]", b"{", b'{"a" 1}', b'{"a": "x', b'{"model": "x"', b'{"a": [1, 2}'])
def test_scan_rejects_broken_structure(body):
    with pytest.raises(ScanError):
        top_level_fields(body, frozenset({"model"}))
