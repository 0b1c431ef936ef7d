"""pd-profile-handler and prefix-based-pd-decider in the real scheduler pipeline."""

from __future__ import annotations

import pytest

from llmisvc.scheduler.config import ConfigError
from llmisvc.scheduler.datastore import Datastore, EndpointSpec
from llmisvc.scheduler.framework import NoReadyEndpoints, SchedulingRequest
from llmisvc.scheduler.plugins.pd_profile_handler import DECISION_KEY
from llmisvc.scheduler.scheduler import Scheduler

PREFILL = "127.0.0.1:9001"
DECODE = "127.0.0.1:9002"
ROLE = "llm-d.ai/role"


def _datastore(prefill_ready: bool = True, with_prefill: bool = True) -> Datastore:
    datastore = Datastore()
    specs = [EndpointSpec(DECODE, "decode", {ROLE: "decode"}, True)]
    if with_prefill:
        specs.append(EndpointSpec(PREFILL, "prefill", {ROLE: "prefill"}, prefill_ready))
    datastore.set_endpoints(specs)
    return datastore


def _config(handler_parameters: dict | None = None, decider: dict | None = None) -> dict:
    plugins = [
        {"type": "pd-profile-handler", "parameters": handler_parameters or {}},
        {"type": "prefill-filter"},
        {"type": "decode-filter"},
        {"type": "prefix-cache-scorer"},
        {"type": "max-score-picker"},
    ]
    if decider is not None:
        plugins.append({"type": "prefix-based-pd-decider", "parameters": decider})
    return {
        "apiVersion": "llm-d.ai/v1alpha1",
        "kind": "EndpointPickerConfig",
        "plugins": plugins,
        "schedulingProfiles": [
            {"name": "prefill", "plugins": [{"pluginRef": "prefill-filter"}, {"pluginRef": "prefix-cache-scorer", "weight": 2}]},
            {"name": "decode", "plugins": [{"pluginRef": "decode-filter"}, {"pluginRef": "prefix-cache-scorer", "weight": 2}]},
        ],
    }


def _request(prompt: str, request_id: str = "r1") -> SchedulingRequest:
    return SchedulingRequest(request_id=request_id, model="m", body={"model": "m", "prompt": prompt})


LONG = "the quick brown fox jumps over the lazy dog " * 60  # 2,640 characters, ~660 tokens
SHORT = "hello there"


def test_default_pd_config_splits():
    scheduler = Scheduler.from_config(None, shape="pd", datastore=_datastore(), model_name="m")
    result = scheduler.schedule(_request(SHORT))
    assert result.target.address == DECODE
    assert result.prefill is not None
    assert result.prefill.address == PREFILL
    assert result.primary_profile == "decode"


def test_always_split_without_prefill_is_503():
    scheduler = Scheduler.from_config(None, shape="pd", datastore=_datastore(prefill_ready=False), model_name="m")
    with pytest.raises(NoReadyEndpoints) as error:
        scheduler.schedule(_request(LONG))
    assert error.value.status == 503
    assert "prefill pool" in error.value.message


def test_always_split_no_prefill_endpoint_is_503():
    scheduler = Scheduler.from_config(None, shape="pd", datastore=_datastore(with_prefill=False), model_name="m")
    with pytest.raises(NoReadyEndpoints):
        scheduler.schedule(_request(SHORT))


def test_threshold_short_prompt_decode_only():
    scheduler = Scheduler.from_config(_config({"threshold": 100}), shape="pd", datastore=_datastore(), model_name="m")
    result = scheduler.schedule(_request(SHORT))
    assert result.target.address == DECODE
    assert result.prefill is None


def test_threshold_short_prompt_no_prefill_pool_still_served():
    datastore = _datastore(with_prefill=False)
    scheduler = Scheduler.from_config(_config({"threshold": 100}), shape="pd", datastore=datastore, model_name="m")
    result = scheduler.schedule(_request(SHORT))
    assert result.target.address == DECODE
    assert result.prefill is None


def test_threshold_long_prompt_splits():
    scheduler = Scheduler.from_config(_config({"threshold": 100}), shape="pd", datastore=_datastore(), model_name="m")
    result = scheduler.schedule(_request(LONG))
    assert result.prefill is not None
    assert result.prefill.address == PREFILL


def test_cached_prompt_stays_on_decode():
    """Both picks enter the prefix index, so a repeated long prompt counts as cached."""
    scheduler = Scheduler.from_config(_config({"threshold": 100}), shape="pd", datastore=_datastore(), model_name="m")
    first = scheduler.schedule(_request(LONG, "r1"))
    index = scheduler.plugins["prefix-cache-scorer"].index
    assert first.prefill is not None
    assert index.entries(DECODE) > 0
    assert index.entries(PREFILL) > 0

    second = scheduler.schedule(_request(LONG, "r2"))
    assert second.prefill is None


def test_decider_takes_precedence():
    config = _config({"threshold": 0}, decider={"nonCachedTokens": 1000})
    scheduler = Scheduler.from_config(config, shape="pd", datastore=_datastore(), model_name="m")
    short = scheduler.schedule(_request(SHORT))
    assert short.prefill is None
    long_enough = scheduler.schedule(_request(LONG * 2))
    assert long_enough.prefill is not None


def test_decider_by_name():
    config = _config({"threshold": 0, "deciderPluginName": "prefix-based-pd-decider"}, decider={"nonCachedTokens": 50})
    scheduler = Scheduler.from_config(config, shape="pd", datastore=_datastore(), model_name="m")
    assert scheduler.schedule(_request(SHORT)).prefill is None


def test_unknown_decider_name_rejected():
    config = _config({"deciderPluginName": "missing"})
    with pytest.raises(ConfigError) as error:
        Scheduler.from_config(config, shape="pd", datastore=_datastore(), model_name="m")
    assert error.value.parameter == "deciderPluginName"


def test_unknown_profile_rejected():
    config = _config({"prefillProfile": "warmup"})
    with pytest.raises(ConfigError) as error:
        Scheduler.from_config(config, shape="pd", datastore=_datastore(), model_name="m")
    assert "warmup" in str(error.value)


def test_negative_threshold_rejected():
    with pytest.raises(ConfigError) as error:
        Scheduler.from_config(_config({"threshold": -1}), shape="pd", datastore=_datastore(), model_name="m")
    assert error.value.parameter == "threshold"


def test_decision_recorded_in_cycle_state():
    from llmisvc.scheduler.framework import CycleState

    scheduler = Scheduler.from_config(_config({"threshold": 100}), shape="pd", datastore=_datastore(), model_name="m")
    request = _request(LONG)
    state = CycleState(request, LONG, scheduler.datastore)
    state.values["profile_errors"] = {}
    results = {"decode": scheduler._run_profile(state, scheduler.profiles["decode"], scheduler.datastore.candidates())}
    assert scheduler.handler.pick_profiles(state, scheduler.profiles, results) == ["prefill"]
    assert state.values[DECISION_KEY]["split"] is True
    assert state.values[DECISION_KEY]["uncached_tokens"] == len(LONG) / 4
