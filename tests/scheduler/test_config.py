"""EndpointPickerConfig loading: llm-d defaulting and errors that name plugin and parameter."""

from __future__ import annotations

import pytest

from llmisvc.scheduler import ConfigError, parse_config

LLM_D_YAML = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
  parameters:
    maxPrefixBlocksToMatch: 128
    lruCapacityPerServer: 1000
- type: load-aware-scorer
  name: load
  parameters:
    threshold: 64
- type: decode-filter
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: decode-filter
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: load
"""


def test_llm_d_yaml_defaults():
    config = parse_config(LLM_D_YAML)
    profile = config.profiles[0]
    assert config.handler == "single-profile-handler"
    assert profile.picker == "max-score-picker"
    assert profile.filters == ["decode-filter"]
    assert profile.scorers == [("prefix-cache-scorer", 3.0), ("load", 1.0)]
    assert config.plugins["load"].parameters == {"threshold": 64}
    assert config.plugins["prefix-cache-scorer"].parameters["blockSizeTokens"] == 16
    assert config.plugins["prefix-cache-scorer"].parameters["lruCapacityPerServer"] == 1000


def test_default_for_empty_config():
    for source in (None, "", {}):
        config = parse_config(source)
        profile = config.profiles[0]
        assert profile.filters == ["utilization-detector"]
        assert profile.scorers == [("prefix-cache-scorer", 2.0), ("load-aware-scorer", 1.0)]
        assert profile.picker == "max-score-picker"
        assert config.plugins["utilization-detector"].parameters == {"queueDepthThreshold": 5, "kvCacheUtilThreshold": 0.8}


def test_llm_d_api_version_accepted():
    config = parse_config({"apiVersion": "llm-d.ai/v1alpha1", "kind": "EndpointPickerConfig", "plugins": [{"type": "queue-scorer"}], "schedulingProfiles": [{"name": "x", "plugins": [{"pluginRef": "queue-scorer"}]}]})
    assert config.profiles[0].scorers == [("queue-scorer", 1.0)]


def _one(plugin, ref=None):
    name = plugin.get("name", plugin["type"])
    return {"plugins": [plugin], "schedulingProfiles": [{"name": "p", "plugins": [ref or {"pluginRef": name}]}]}


@pytest.mark.parametrize(
    "document, plugin, parameter, fragment",
    [
        (_one({"type": "prefix-cache-scorr"}), "prefix-cache-scorr", None, "unknown plugin type"),
        (_one({"type": "load-aware-scorer", "parameters": {"treshold": 5}}), "load-aware-scorer", "treshold", "unknown parameter 'treshold'"),
        (_one({"type": "load-aware-scorer", "parameters": {"threshold": 0}}), "load-aware-scorer", "threshold", "must be > 0"),
        (_one({"type": "load-aware-scorer", "parameters": {"threshold": "high"}}), "load-aware-scorer", "threshold", "must be int"),
        (_one({"type": "utilization-detector", "name": "sat", "parameters": {"kvCacheUtilThreshold": 1.5}}), "sat", "kvCacheUtilThreshold", "between 0 and 1"),
        (_one({"type": "prefix-cache-scorer", "parameters": {"autoTune": "yes"}}), "prefix-cache-scorer", "autoTune", "must be bool"),
        (_one({"type": "max-score-picker", "parameters": {"maxNumOfEndpoints": True}}), "max-score-picker", "maxNumOfEndpoints", "must be int"),
        (_one({"type": "queue-scorer"}, {"pluginRef": "queue-scorer", "weight": -1}), "queue-scorer", "weight", "weight"),
        (_one({"type": "decode-filter"}, {"pluginRef": "decode-filter", "weight": 2}), "decode-filter", "weight", "only scorers take a weight"),
        (_one({"type": "queue-scorer"}, {"pluginRef": "missing"}), "missing", None, "names no plugin"),
        (_one({"type": "label-selector-filter", "parameters": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}), "label-selector-filter", "matchExpressions", "operator"),
        (_one({"type": "precise-prefix-cache-scorer", "parameters": {"tokenizer": "/no/such/tokenizer.json"}}), "precise-prefix-cache-scorer", "tokenizer", "not a file"),
        (_one({"type": "precise-prefix-cache-scorer", "parameters": {"kvEventsConfig": {"zmqEndpoint": "http://x"}}}), "precise-prefix-cache-scorer", "kvEventsConfig", "zmqEndpoint"),
    ],
)
def test_config_errors_name_plugin_and_parameter(document, plugin, parameter, fragment):
    with pytest.raises(ConfigError) as info:
        parse_config(document)
    assert info.value.plugin == plugin
    assert info.value.parameter == parameter
    assert fragment in str(info.value)
    assert plugin in str(info.value)


@pytest.mark.parametrize(
    "document, fragment",
    [
        ("plugins: [", "not valid YAML"),
        ({"apiVersion": "v1", "plugins": []}, "apiVersion"),
        ({"kind": "Pod", "plugins": []}, "kind"),
        ({"plugins": [{"type": "queue-scorer"}], "schedulingProfiles": [{"name": "a", "plugins": []}, {"name": "b", "plugins": []}]}, "profile handler"),
        ({"plugins": [{"type": "queue-scorer"}, {"type": "queue-scorer"}], "schedulingProfiles": [{"name": "a"}]}, "duplicate"),
        ({"plugins": [{"type": "queue-scorer"}], "schedulingProfiles": [], "extra": 1}, "unknown field 'extra'"),
    ],
)
def test_config_structure_errors(document, fragment):
    with pytest.raises(ConfigError) as info:
        parse_config(document)
    assert fragment in str(info.value)


def test_config_from_container_args(tmp_path):
    from llmisvc.scheduler.config import config_from_args

    text = "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: [{pluginRef: queue-scorer}]}]\n"
    (tmp_path / "epp.yaml").write_text(text)
    assert config_from_args(["--config-text", text]) == text
    assert config_from_args([f"--config-text={text}", "--v=4"]) == text
    assert config_from_args(["--poolName", "x", "--config-file", "epp.yaml"], base_dir=tmp_path) == text
    assert config_from_args(["--config-file=" + str(tmp_path / "epp.yaml")]) == text
    assert config_from_args(["--poolName", "x"]) is None
    assert parse_config(config_from_args(["--config-text", text])).profiles[0].scorers == [("queue-scorer", 1.0)]


def test_config_from_args_errors(tmp_path):
    from llmisvc.scheduler.config import config_from_args

    with pytest.raises(ConfigError) as info:
        config_from_args(["--config-file", "missing.yaml"], base_dir=tmp_path)
    assert "cannot read --config-file" in str(info.value)
    with pytest.raises(ConfigError) as info:
        config_from_args(["--config-text", "a", "--config-file", "b"])
    assert "not both" in str(info.value)
