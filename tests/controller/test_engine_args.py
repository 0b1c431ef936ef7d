"""Container args checked against the engines' own flag parsers."""

from __future__ import annotations

import pytest

from llmisvc.controller.engine_args import EngineArgsError, engine_flags, split_user_args


@pytest.fixture(scope="module")
def builtin():
    return engine_flags("builtin")


def test_builtin_flags_come_from_its_parser(builtin):
    assert builtin.accepts("--max-num-seqs")
    assert builtin.takes_value("--max-num-seqs")
    assert not builtin.takes_value("--enable-prefix-caching")
    assert not builtin.accepts("--no-such-flag")


def test_sim_flags_include_latency_model():
    sim = engine_flags("sim")
    assert sim.accepts("--itl-ms")
    assert not sim.accepts("--kv-cache-memory-bytes-per-token")


def test_inline_and_separate_values(builtin):
    kept, warnings = split_user_args(["--seed=3", "--max-num-seqs", "8", "--enable-prefix-caching"], builtin)
    assert kept == ["--seed=3", "--max-num-seqs", "8", "--enable-prefix-caching"]
    assert warnings == []


def test_missing_value_rejected(builtin):
    with pytest.raises(EngineArgsError, match="expects a value"):
        split_user_args(["--max-num-seqs"], builtin)


def test_positional_rejected(builtin):
    with pytest.raises(EngineArgsError, match="unexpected positional argument 'org/model'"):
        split_user_args(["org/model"], builtin)


def test_host_dropped_with_warning(builtin):
    kept, warnings = split_user_args(["--host=0.0.0.0", "--seed", "1"], builtin)
    assert kept == ["--seed", "1"]
    assert "--host=0.0.0.0" in warnings[0]


@pytest.mark.parametrize("flag", ["--model", "--served-model-name", "-tp", "--tensor-parallel-size"])
def test_spec_flags_rejected(builtin, flag):
    with pytest.raises(EngineArgsError, match="set from the spec"):
        split_user_args([flag, "1"], builtin)


def test_vllm_flags_pass_through():
    assert engine_flags("vllm") is None
    kept, _ = split_user_args(["--gpu-memory-utilization", "0.8", "--enforce-eager"], None)
    assert kept == ["--gpu-memory-utilization", "0.8", "--enforce-eager"]
