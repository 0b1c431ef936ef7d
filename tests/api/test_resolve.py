"""Resolution: presets by shape, scheduler config extraction, ResolvedService fields."""

import pytest

from spec_factory import MODEL_URI, SHAPE_FILES, dump, minimal_service

from llmisvc.api import SpecError, load_documents, resolve
from llmisvc.api.presets import load_presets

EPP_CONFIG = """apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: pd-profile-handler
  parameters:
    threshold: 0
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
schedulingProfiles:
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - pluginRef: max-score-picker
- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: max-score-picker
"""


def _resolve_text(text: str):
    (resource,) = load_documents(text)
    return resolve(resource)


def _resolve(service: dict):
    return _resolve_text(dump(service))


EXPECTED = {
    "default-scheduler.yaml": ("scheduler", 3, None, ["kserve-config-llm-template", "kserve-config-llm-scheduler",
                                                      "kserve-config-llm-router-route"]),
    "no-scheduler.yaml": ("no-scheduler", 3, None, ["kserve-config-llm-template",
                                                    "kserve-config-llm-router-route-service"]),
    "prefill-decode.yaml": ("pd", 1, 2, ["kserve-config-llm-decode-template", "kserve-config-llm-prefill-template",
                                         "kserve-config-llm-scheduler", "kserve-config-llm-router-route"]),
}


@pytest.mark.parametrize("version", ["v1alpha1", "v1alpha2"])
@pytest.mark.parametrize("name", SHAPE_FILES)
def test_example_shapes_resolve(example_text, name, version):
    resolved = _resolve_text(example_text(name, version))
    shape, replicas, prefill_replicas, presets = EXPECTED[name]
    assert resolved.shape == shape
    assert resolved.replicas == replicas
    assert resolved.prefill_replicas == prefill_replicas
    assert resolved.applied_presets == presets
    assert resolved.model_uri == MODEL_URI
    assert resolved.main_container["name"] == "main"
    assert resolved.scheduler_config is None
    assert resolved.obj["apiVersion"] == f"serving.kserve.io/{version}"


def test_pd_roles_labelled(example_text):
    resolved = _resolve_text(example_text("prefill-decode.yaml"))
    assert resolved.labels == {"llm-d.ai/role": "decode"}
    assert resolved.spec["prefill"]["labels"] == {"llm-d.ai/role": "prefill"}
    assert resolved.prefill_container["name"] == "main"


def test_user_resources_kept_over_preset():
    service = minimal_service(template={"containers": [{"name": "main", "resources": {"requests": {"cpu": "500m"}}}]},
                              prefill={"template": {"containers": [{"name": "main", "resources": {
                                  "limits": {"memory": "4Gi"}}}]}})
    resolved = _resolve(service)
    assert resolved.main_container["resources"] == {"requests": {"cpu": "500m"}}
    assert resolved.main_container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert resolved.prefill_container["resources"] == {"limits": {"memory": "4Gi"}}
    assert resolved.prefill_replicas == 1


def test_no_router_is_no_scheduler_shape():
    resolved = _resolve(minimal_service())
    assert resolved.shape == "no-scheduler"
    assert resolved.applied_presets == ["kserve-config-llm-template"]
    assert resolved.replicas is None
    assert resolved.criticality == "Standard"


def test_v1alpha1_criticality():
    service = minimal_service("v1alpha1")
    service["spec"]["model"]["criticality"] = "Sheddable"
    assert _resolve(service).criticality == "Sheddable"


def test_pool_ref_skips_scheduler_preset():
    resolved = _resolve(minimal_service(router={"scheduler": {"pool": {"ref": {"name": "existing"}}}, "route": {}}))
    assert "kserve-config-llm-scheduler" not in resolved.applied_presets
    assert resolved.shape == "scheduler"


def test_route_refs_skip_route_preset():
    resolved = _resolve(minimal_service(router={"route": {"http": {"refs": [{"name": "my-route"}]}}}))
    assert resolved.applied_presets == ["kserve-config-llm-template"]


def test_data_parallel_selects_worker_preset():
    resolved = _resolve(minimal_service(parallelism={"data": 4, "dataLocal": 2},
                                        prefill={"replicas": 1, "parallelism": {"data": 2}}))
    assert "kserve-config-llm-worker-data-parallel" in resolved.applied_presets
    assert "kserve-config-llm-prefill-worker-data-parallel" in resolved.applied_presets
    assert resolved.spec["worker"]["containers"][0]["name"] == "main"


def test_route_preset_rendered_with_pool_backend():
    resolved = _resolve(minimal_service(name="chat", router={"scheduler": {}, "route": {}}))
    rule = resolved.spec["router"]["route"]["http"]["spec"]["rules"][0]
    assert rule["matches"][0]["path"]["value"] == "/default/chat/v1"
    assert rule["backendRefs"][0]["name"] == "chat-inference-pool"
    assert rule["backendRefs"][0]["kind"] == "InferencePool"


def _pd_with_scheduler_args(args: list[str]) -> dict:
    return minimal_service(replicas=1, prefill={"replicas": 1}, router={
        "route": {}, "gateway": {},
        "scheduler": {"template": {"containers": [{"name": "main", "args": args}]}},
    })


@pytest.mark.parametrize("flag", ["--config-text", "--configText", "-configText"])
def test_config_text_arg_recognised(flag):
    resolved = _resolve(_pd_with_scheduler_args(["--pool-name", "x", flag, EPP_CONFIG, "--v", "4"]))
    assert resolved.scheduler_config["plugins"][0] == {"type": "pd-profile-handler", "parameters": {"threshold": 0}}
    args = resolved.spec["router"]["scheduler"]["template"]["containers"][0]["args"]
    assert args == ["--pool-name", "x", "--v", "4"]
    assert resolved.spec["router"]["scheduler"]["config"]["inline"] == resolved.scheduler_config


@pytest.mark.parametrize("flag", ["--config-text", "--configText"])
def test_config_text_equals_form_recognised(flag):
    resolved = _resolve(_pd_with_scheduler_args([f"{flag}={EPP_CONFIG}"]))
    assert resolved.scheduler_config["kind"] == "EndpointPickerConfig"
    assert resolved.spec["router"]["scheduler"]["template"]["containers"][0]["args"] == []


def test_config_text_not_duplicated_in_render():
    resolved = _resolve(_pd_with_scheduler_args(["--config-text", EPP_CONFIG]))
    rendered = dump(resolved.obj)
    assert rendered.count("pd-profile-handler") == 1
    assert "--config-text" not in rendered


def test_config_text_twice_rejected():
    with pytest.raises(SpecError) as info:
        _resolve(_pd_with_scheduler_args(["--config-text", EPP_CONFIG, "--configText", EPP_CONFIG]))
    assert info.value.errors[0].path == "spec.router.scheduler.config"


def test_config_text_and_inline_rejected():
    service = _pd_with_scheduler_args(["--config-text", EPP_CONFIG])
    service["spec"]["router"]["scheduler"]["config"] = {"inline": {"plugins": []}}
    with pytest.raises(SpecError) as info:
        _resolve(service)
    assert "more than once" in str(info.value)


def test_config_file_and_inline_rejected():
    service = _pd_with_scheduler_args(["--config-file", "/etc/epp/config.yaml"])
    service["spec"]["router"]["scheduler"]["config"] = {"inline": {"plugins": []}}
    with pytest.raises(SpecError) as info:
        _resolve(service)
    assert "--config-file, spec.router.scheduler.config.inline" in str(info.value)


def test_config_text_invalid_yaml_rejected():
    with pytest.raises(SpecError) as info:
        _resolve(_pd_with_scheduler_args(["--config-text", "plugins: [unclosed"]))
    assert info.value.errors[0].path == "spec.router.scheduler.template.containers[0].args[0]"


def test_config_text_missing_value_rejected():
    with pytest.raises(SpecError) as info:
        _resolve(_pd_with_scheduler_args(["--config-text"]))
    assert "needs a value" in str(info.value)


def test_config_file_arg_kept_and_reported():
    resolved = _resolve(_pd_with_scheduler_args(["--config-file", "/etc/epp/config.yaml"]))
    assert resolved.scheduler_config is None
    assert resolved.scheduler_config_file == "/etc/epp/config.yaml"
    assert resolved.spec["router"]["scheduler"]["template"]["containers"][0]["args"] == [
        "--config-file", "/etc/epp/config.yaml"]


def test_inline_config_passed_through():
    resolved = _resolve(minimal_service(router={"scheduler": {"config": {"inline": {"plugins": [{"type": "queue-scorer"}]}}}}))
    assert resolved.scheduler_config == {"plugins": [{"type": "queue-scorer"}]}


def test_config_ref_exposed():
    resolved = _resolve(minimal_service(router={"scheduler": {"config": {"ref": {"name": "epp", "key": "c.yaml"}}}}))
    assert resolved.scheduler_config is None
    assert resolved.scheduler_config_ref == {"name": "epp", "key": "c.yaml"}


def test_stop_annotation():
    service = minimal_service()
    service["metadata"]["annotations"] = {"serving.kserve.io/stop": "true"}
    assert _resolve(service).stopped
    assert not _resolve(minimal_service()).stopped


def test_volume_mount_without_volume_rejected():
    service = minimal_service(template={"containers": [{"name": "main", "volumeMounts": [
        {"name": "models", "mountPath": "/models"}]}]})
    with pytest.raises(SpecError) as info:
        _resolve(service)
    assert [e.path for e in info.value.errors] == ["spec.template.containers[0].volumeMounts[2].name"]


def test_main_container_required():
    replacement = load_documents(dump({
        "apiVersion": "serving.kserve.io/v1alpha2", "kind": "LLMInferenceServiceConfig",
        "metadata": {"name": "kserve-config-llm-template"}, "spec": {"template": {"containers": [{"name": "other"}]}},
    }))[0]
    (resource,) = load_documents(dump(minimal_service()))
    with pytest.raises(SpecError) as info:
        resolve(resource, {"kserve-config-llm-template": replacement})
    assert info.value.errors[0].path == "spec.template.containers"


def test_applied_configs_for_status():
    resolved = _resolve(minimal_service(router={"route": {}}))
    assert resolved.applied_configs() == [
        {"name": "kserve-config-llm-template", "namespace": "default", "source": "Preset"},
        {"name": "kserve-config-llm-router-route-service", "namespace": "default", "source": "Preset"},
    ]


def test_presets_are_valid_configs():
    presets = load_presets()
    assert len(presets) == 8
    assert all(p.kind == "LLMInferenceServiceConfig" for p in presets.values())


def test_resolve_refuses_config_kind():
    (resource,) = load_documents(dump({
        "apiVersion": "serving.kserve.io/v1alpha2", "kind": "LLMInferenceServiceConfig",
        "metadata": {"name": "c"}, "spec": {}}))
    with pytest.raises(SpecError):
        resolve(resource)


def test_gateway_refs_become_route_parents():
    resolved = _resolve(minimal_service(router={"route": {}, "gateway": {"refs": [
        {"name": "team-gw", "namespace": "infra", "sectionName": "https"}, {"name": "second"}]}}))
    parents = resolved.spec["router"]["route"]["http"]["spec"]["parentRefs"]
    assert parents == [
        {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "team-gw", "namespace": "infra",
         "sectionName": "https"},
        {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "second"},
    ]


def test_user_parent_refs_win_over_gateway_refs():
    route = {"http": {"spec": {"parentRefs": [{"name": "mine"}]}}}
    resolved = _resolve(minimal_service(router={"route": route, "gateway": {"refs": [{"name": "team-gw"}]}}))
    assert resolved.spec["router"]["route"]["http"]["spec"]["parentRefs"] == [
        {"name": "mine", "group": "gateway.networking.k8s.io", "kind": "Gateway"}]


def test_default_gateway_without_refs():
    resolved = _resolve(minimal_service(router={"route": {}, "gateway": {}}))
    parent = resolved.spec["router"]["route"]["http"]["spec"]["parentRefs"][0]
    assert (parent["name"], parent["namespace"]) == ("kserve-ingress-gateway", "kserve")


KITCHEN_SINK = """
apiVersion: serving.kserve.io/v1alpha2
kind: LLMInferenceService
metadata:
  name: llama-3-8b
  namespace: llm
  labels: {team: research}
  annotations: {llmisvc.io/engine: vllm}
spec:
  model:
    uri: hf://meta-llama/Llama-3.1-8B-Instruct
    name: meta-llama/Llama-3.1-8B-Instruct
  replicas: 2
  parallelism: {tensor: 2}
  template:
    serviceAccountName: llm-runner
    nodeSelector: {nvidia.com/gpu.product: H100}
    tolerations:
      - {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}
    affinity:
      podAntiAffinity:
        preferredDuringSchedulingIgnoredDuringExecution:
          - weight: 100
            podAffinityTerm:
              topologyKey: kubernetes.io/hostname
              labelSelector: {matchLabels: {app: llama}}
    securityContext: {runAsNonRoot: true, fsGroup: 2000}
    containers:
      - name: main
        image: vllm/vllm-openai:v0.10.0
        args: [--max-model-len=8192, --gpu-memory-utilization=0.9]
        env:
          - name: HF_TOKEN
            valueFrom: {secretKeyRef: {name: hf-token, key: token}}
          - name: POD_NAME
            valueFrom: {fieldRef: {fieldPath: metadata.name}}
        resources:
          limits: {nvidia.com/gpu: "2", memory: 64Gi, cpu: "8"}
          requests: {nvidia.com/gpu: "2", memory: 32Gi, cpu: "4"}
        startupProbe:
          httpGet: {path: /health, port: 8000}
          failureThreshold: 60
          periodSeconds: 10
        securityContext:
          allowPrivilegeEscalation: false
          capabilities: {drop: [ALL]}
        volumeMounts:
          - {name: cache, mountPath: /models}
    volumes:
      - name: cache
        persistentVolumeClaim: {claimName: model-cache}
  router:
    route: {}
    gateway: {refs: [{name: ingress, namespace: gateways}]}
    scheduler:
      config:
        inline:
          apiVersion: inference.networking.x-k8s.io/v1alpha1
          kind: EndpointPickerConfig
          plugins: [{type: queue-scorer}, {type: max-score-picker}]
          schedulingProfiles:
            - name: default
              plugins: [{pluginRef: queue-scorer, weight: 1}, {pluginRef: max-score-picker}]
"""


def test_kubernetes_fields_kept_through_resolve():
    resolved = _resolve_text(KITCHEN_SINK)
    template = resolved.spec["template"]
    assert template["serviceAccountName"] == "llm-runner"
    assert template["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
    assert template["tolerations"][0]["operator"] == "Exists"
    assert template["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["weight"] == 100
    assert template["securityContext"] == {"runAsNonRoot": True, "fsGroup": 2000}
    assert [v["name"] for v in template["volumes"]] == ["home", "dshm", "cache"]
    main = resolved.main_container
    assert main["image"] == "vllm/vllm-openai:v0.10.0"
    assert main["env"][0]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert main["startupProbe"]["failureThreshold"] == 60
    assert main["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert main["volumeMounts"][-1] == {"name": "cache", "mountPath": "/models"}
    assert resolved.scheduler_config["plugins"][0] == {"type": "queue-scorer"}
    assert resolved.obj["metadata"]["annotations"] == {"llmisvc.io/engine": "vllm"}
    assert resolved.namespace == "llm"
    assert resolved.model_name == "meta-llama/Llama-3.1-8B-Instruct"


def test_crd_defaults_filled_in():
    service = minimal_service(
        scaling={"maxReplicas": 3, "wva": {"hpa": {}}},
        template={"containers": [{"name": "main", "ports": [{"containerPort": 9000}]}]},
        router={"route": {}, "scheduler": {"pool": {"spec": {
            "selector": {"matchLabels": {"app": "x"}}, "targetPorts": [{"number": 8000}],
            "endpointPickerRef": {"name": "epp", "port": {"number": 9002}}}}}},
    )
    spec = _resolve(service).spec
    assert spec["scaling"]["minReplicas"] == 1
    assert spec["scaling"]["wva"]["variantCost"] == "10.0"
    assert spec["template"]["containers"][0]["ports"][-1] == {"containerPort": 9000, "protocol": "TCP"}
    pool = spec["router"]["scheduler"]["pool"]["spec"]
    assert pool["appProtocol"] == "http"
    assert pool["endpointPickerRef"]["failureMode"] == "FailClose"
    assert pool["endpointPickerRef"]["kind"] == "Service"


def test_route_rules_default_when_absent():
    preset = load_documents(dump({
        "apiVersion": "serving.kserve.io/v1alpha2", "kind": "LLMInferenceServiceConfig",
        "metadata": {"name": "kserve-config-llm-router-route-service"},
        "spec": {"router": {"route": {"http": {"spec": {"parentRefs": [{"name": "gw"}]}}}}},
    }))[0]
    (resource,) = load_documents(dump(minimal_service(router={"route": {}})))
    resolved = resolve(resource, {preset.name: preset})
    assert resolved.spec["router"]["route"]["http"]["spec"]["rules"] == [
        {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}]}]


def test_defaults_not_added_to_absent_parents():
    spec = _resolve(minimal_service()).spec
    assert "scaling" not in spec
    assert "router" not in spec
    assert "kvCacheOffloading" not in spec
