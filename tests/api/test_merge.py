"""Layered merge: presets, then baseRefs in order, then the service."""

import pytest

from spec_factory import config, dump, minimal_service

from llmisvc.api import SpecError, load_documents, resolve
from llmisvc.api.merge import merge, merge_layers


def _container(args=None, env=None, ports=None, mounts=None, **extra):
    container = {"name": "main", **extra}
    if args is not None:
        container["args"] = args
    if env is not None:
        container["env"] = [{"name": k, "value": v} for k, v in env.items()]
    if ports is not None:
        container["ports"] = ports
    if mounts is not None:
        container["volumeMounts"] = mounts
    return container


def _template(*containers, volumes=None):
    template = {"containers": list(containers)}
    if volumes is not None:
        template["volumes"] = volumes
    return {"template": template}


def test_env_merged_by_name():
    base = _template(_container(env={"A": "1", "B": "2"}))
    overlay = _template(_container(env={"B": "3", "C": "4"}))
    env = merge(base, overlay)["template"]["containers"][0]["env"]
    assert env == [{"name": "A", "value": "1"}, {"name": "B", "value": "3"}, {"name": "C", "value": "4"}]


def test_args_replaced_whole():
    base = _template(_container(args=["--a", "1", "--b"]))
    overlay = _template(_container(args=["--c"]))
    assert merge(base, overlay)["template"]["containers"][0]["args"] == ["--c"]


def test_command_replaced_whole():
    base = _template(_container(command=["python", "-m", "x"]))
    overlay = _template(_container(command=["vllm"]))
    assert merge(base, overlay)["template"]["containers"][0]["command"] == ["vllm"]


def test_volumes_merged_by_name():
    base = _template(_container(), volumes=[{"name": "a", "emptyDir": {}}, {"name": "b", "emptyDir": {}}])
    overlay = _template(_container(), volumes=[{"name": "b", "emptyDir": {"medium": "Memory"}}, {"name": "c", "emptyDir": {}}])
    volumes = merge(base, overlay)["template"]["volumes"]
    assert [v["name"] for v in volumes] == ["a", "b", "c"]
    assert volumes[1]["emptyDir"] == {"medium": "Memory"}


def test_containers_merged_by_name():
    base = _template(_container(image="engine:1"), {"name": "sidecar", "image": "side:1"})
    overlay = _template({"name": "sidecar", "image": "side:2"}, {"name": "extra", "image": "x"})
    containers = merge(base, overlay)["template"]["containers"]
    assert [(c["name"], c["image"]) for c in containers] == [("main", "engine:1"), ("sidecar", "side:2"), ("extra", "x")]


def test_ports_merged_by_container_port():
    base = _template(_container(ports=[{"containerPort": 8000, "name": "http"}]))
    overlay = _template(_container(ports=[{"containerPort": 8000, "protocol": "TCP"}, {"containerPort": 9000}]))
    ports = merge(base, overlay)["template"]["containers"][0]["ports"]
    assert ports == [{"containerPort": 8000, "name": "http", "protocol": "TCP"}, {"containerPort": 9000}]


def test_volume_mounts_merged_by_mount_path():
    base = _template(_container(mounts=[{"name": "a", "mountPath": "/m"}]))
    overlay = _template(_container(mounts=[{"name": "b", "mountPath": "/m"}, {"name": "c", "mountPath": "/n"}]))
    mounts = merge(base, overlay)["template"]["containers"][0]["volumeMounts"]
    assert mounts == [{"name": "b", "mountPath": "/m"}, {"name": "c", "mountPath": "/n"}]


def test_other_lists_replaced_whole():
    base = {"template": {"tolerations": [{"key": "a"}, {"key": "b"}]}}
    overlay = {"template": {"tolerations": [{"key": "c"}]}}
    assert merge(base, overlay)["template"]["tolerations"] == [{"key": "c"}]


@pytest.mark.parametrize("zero", [None, "", [], {}])
def test_empty_value_keeps_earlier(zero):
    base = {"model": {"name": "kept"}, "router": {"scheduler": {"replicas": 2}}}
    assert merge(base, {"model": {"name": zero}})["model"]["name"] == "kept"
    assert merge(base, {"router": {"scheduler": zero}})["router"]["scheduler"] == {"replicas": 2}


def test_explicit_zero_replicas_overrides():
    assert merge({"replicas": 3}, {"replicas": 0}) == {"replicas": 0}


def test_merge_does_not_modify_inputs():
    base = _template(_container(env={"A": "1"}))
    overlay = _template(_container(env={"A": "2"}))
    merge(base, overlay)
    assert base["template"]["containers"][0]["env"] == [{"name": "A", "value": "1"}]
    assert overlay["template"]["containers"][0]["env"] == [{"name": "A", "value": "2"}]


def test_merge_layers_order():
    assert merge_layers([{"replicas": 1}, {"replicas": 2}, {"replicas": 3}]) == {"replicas": 3}


def _resolve(service: dict, *configs: dict):
    resources = load_documents(dump(*configs, service))
    by_name = {r.name: r for r in resources if r.kind == "LLMInferenceServiceConfig"}
    return resolve(resources[-1], by_name)


def _main_env(resolved) -> dict:
    return {e["name"]: e.get("value") for e in resolved.main_container.get("env", [])}


def test_base_refs_applied_in_order():
    first = config("first", replicas=1, template={"containers": [_container(env={"A": "first", "B": "first"})]})
    second = config("second", replicas=2, template={"containers": [_container(env={"B": "second"})]})
    service = minimal_service(baseRefs=[{"name": "first"}, {"name": "second"}])
    resolved = _resolve(service, first, second)
    assert resolved.replicas == 2
    assert _main_env(resolved) == {"A": "first", "B": "second"}
    assert resolved.applied_base_refs == ["first", "second"]


def test_base_refs_reverse_order_changes_result():
    first = config("first", replicas=1)
    second = config("second", replicas=2)
    service = minimal_service(baseRefs=[{"name": "second"}, {"name": "first"}])
    assert _resolve(service, first, second).replicas == 1


def test_service_overrides_base_refs():
    base = config("base", replicas=5, template={"containers": [_container(args=["--from-base"])]})
    service = minimal_service(baseRefs=[{"name": "base"}], replicas=2,
                              template={"containers": [_container(args=["--from-service"])]})
    resolved = _resolve(service, base)
    assert resolved.replicas == 2
    assert resolved.main_container["args"] == ["--from-service"]


def test_base_ref_overrides_preset():
    base = config("base", template={"containers": [_container(image="my-engine:2")]})
    resolved = _resolve(minimal_service(baseRefs=[{"name": "base"}]), base)
    assert resolved.main_container["image"] == "my-engine:2"
    assert resolved.main_container["ports"][0]["containerPort"] == 8000  # still from the preset


def test_base_ref_can_supply_model():
    base = config("model-source", model={"uri": "pvc://models/llama"})
    service = minimal_service(baseRefs=[{"name": "model-source"}])
    del service["spec"]["model"]
    resolved = _resolve(service, base)
    assert resolved.model_uri == "pvc://models/llama"


def test_missing_model_after_merge_rejected():
    service = minimal_service()
    del service["spec"]["model"]
    with pytest.raises(SpecError) as info:
        _resolve(service)
    assert [e.path for e in info.value.errors] == ["spec.model.uri"]


def test_missing_base_ref_names_it():
    service = minimal_service(baseRefs=[{"name": "present"}, {"name": "absent-config"}])
    with pytest.raises(SpecError) as info:
        _resolve(service, config("present"))
    assert str(info.value).startswith("spec.baseRefs[1].name: LLMInferenceServiceConfig 'absent-config' not found")


def test_base_ref_adds_scheduler_shape():
    base = config("with-scheduler", router={"scheduler": {}, "route": {}})
    resolved = _resolve(minimal_service(baseRefs=[{"name": "with-scheduler"}]), base)
    assert resolved.shape == "scheduler"
    assert "kserve-config-llm-scheduler" in resolved.applied_presets


def test_config_named_like_preset_replaces_it():
    replacement = config("kserve-config-llm-template", template={"containers": [_container(image="site:1")]})
    resolved = _resolve(minimal_service(), replacement)
    assert resolved.main_container == {"name": "main", "image": "site:1"}


def _example_specs():
    from spec_factory import EXAMPLES, SHAPE_FILES
    import yaml

    from llmisvc.api.presets import load_presets

    specs = [yaml.safe_load((EXAMPLES / name).read_text())["spec"] for name in SHAPE_FILES]
    return specs + [preset.spec for preset in load_presets().values()]


@pytest.mark.parametrize("index", range(len(_example_specs())))
def test_merge_with_itself_unchanged(index):
    spec = _example_specs()[index]
    assert merge(spec, spec) == spec


@pytest.mark.parametrize("index", range(len(_example_specs())))
def test_merge_with_empty_unchanged(index):
    spec = _example_specs()[index]
    assert merge(spec, {}) == spec
    assert merge({}, spec) == spec


def test_merge_layers_associative_on_presets():
    specs = _example_specs()
    for first, second, third in zip(specs, specs[1:], specs[2:]):
        assert merge(merge(first, second), third) == merge(first, merge(second, third))
