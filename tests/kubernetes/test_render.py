"""Rendering of KServe-style samples into Kubernetes objects: golden files, schema
validation of every object, and the names, labels and wiring KServe users rely on.

Set LLMISVC_UPDATE_GOLDEN=1 to rewrite the golden files after an intended change.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from k8s_schemas import validate_object

from llmisvc.api import load_file, resolve
from llmisvc.api.templates import child_name
from llmisvc.runtime.kubernetes.render import render_manifests
from support import LLMISVC, REPO

HERE = Path(__file__).parent
SAMPLES = sorted((HERE / "samples").glob("*.yaml"))
GOLDEN = HERE / "golden"
UID = "6f1c2d3e-4b5a-4c6d-8e7f-0a1b2c3d4e5f"


def render(sample: str, uid: str | None = UID) -> list[dict]:
    resource = load_file(HERE / "samples" / f"{sample}.yaml")[0]
    return render_manifests(resolve(resource), owner_uid=uid)


def by_key(objects: list[dict]) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def main_container(pod_spec: dict) -> dict:
    return next(c for c in pod_spec["containers"] if c["name"] == "main")


@pytest.mark.parametrize("sample", [p.stem for p in SAMPLES])
def test_render_matches_golden(sample):
    text = yaml.safe_dump_all(render(sample), sort_keys=False)
    golden = GOLDEN / f"{sample}.yaml"
    if os.environ.get("LLMISVC_UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"missing golden file {golden}; run with LLMISVC_UPDATE_GOLDEN=1"
    assert text == golden.read_text()


@pytest.mark.parametrize("sample", [p.stem for p in SAMPLES])
def test_rendered_objects_validate(sample):
    objects = render(sample)
    assert objects
    for obj in objects:
        errors = validate_object(obj)
        assert errors == [], f"{obj['kind']} {obj['metadata']['name']}: {errors}"


@pytest.mark.parametrize("sample", [p.stem for p in SAMPLES])
def test_every_child_owned_and_labelled(sample):
    for obj in render(sample):
        meta = obj["metadata"]
        assert len(meta["name"]) <= 63
        assert meta["ownerReferences"] == [{
            "apiVersion": meta["ownerReferences"][0]["apiVersion"],
            "kind": "LLMInferenceService",
            "name": load_file(HERE / "samples" / f"{sample}.yaml")[0].name,
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }]
        assert meta["labels"]["app.kubernetes.io/part-of"] == "llminferenceservice"


def test_render_without_uid_has_no_owner():
    for obj in render("scheduler", uid=None):
        assert "ownerReferences" not in obj["metadata"]


def test_scheduler_shape_names_and_labels():
    objects = by_key(render("scheduler"))
    workload = objects[("Deployment", "qwen-chat-kserve")]
    assert workload["metadata"]["labels"] == {
        "app.kubernetes.io/component": "llminferenceservice-workload",
        "app.kubernetes.io/name": "qwen-chat",
        "app.kubernetes.io/part-of": "llminferenceservice",
        "kserve.io/component": "workload",
        "llm-d.ai/role": "both",
        "app.kubernetes.io/managed-by": "llmisvc",
    }
    assert workload["spec"]["replicas"] == 2

    scheduler = objects[("Deployment", "qwen-chat-kserve-router-scheduler")]
    assert scheduler["metadata"]["labels"]["app.kubernetes.io/component"] == \
        "llminferenceservice-router-scheduler"
    pod = scheduler["spec"]["template"]["spec"]
    gateway = main_container(pod)
    assert gateway["command"] == ["llmisvc", "gateway"]
    assert "--admin-token-file" in gateway["args"]
    discover = next(c for c in pod["containers"] if c["name"] == "pool-discovery")
    assert discover["command"] == ["llmisvc", "discover"]
    config = yaml.safe_load(objects[("ConfigMap", "qwen-chat-kserve-router-scheduler-config")]
                            ["data"]["service.yaml"])
    assert config["entry"]["model"] == "Qwen/Qwen2.5-7B-Instruct"
    assert config["entry"]["shape"] == "scheduler"
    pool = objects[("InferencePool", "qwen-chat-inference-pool")]
    assert config["discovery"]["selector"] == pool["spec"]["selector"]["matchLabels"]

    assert ("Service", "qwen-chat-kserve-workload-svc") in objects
    assert objects[("Service", "qwen-chat-kserve-workload-svc")]["spec"]["ports"][0]["port"] == 8000
    for key in [("Service", "qwen-chat-epp-service"), ("ServiceAccount", "qwen-chat-epp-sa"),
                ("Role", "qwen-chat-epp-role"), ("RoleBinding", "qwen-chat-epp-rb"),
                ("InferencePool", "qwen-chat-inference-pool"), ("HTTPRoute", "qwen-chat-kserve-route")]:
        assert key in objects, key


def test_route_points_at_gateway_service():
    objects = by_key(render("scheduler"))
    route = objects[("HTTPRoute", "qwen-chat-kserve-route")]
    backends = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    assert backends == [{"group": "", "kind": "Service", "name": "qwen-chat-epp-service",
                         "port": 8000, "weight": 1}]
    assert route["spec"]["parentRefs"][0]["name"] == "kserve-ingress-gateway"
    paths = [m["path"]["value"] for rule in route["spec"]["rules"] for m in rule["matches"]]
    assert all(p.startswith("/llm/qwen-chat") for p in paths)


def test_no_object_points_at_pool_as_picker():
    for sample in [p.stem for p in SAMPLES]:
        for obj in render(sample):
            text = json.dumps(obj)
            if obj["kind"] == "InferencePool":
                assert "endpointPickerRef" not in obj["spec"]
            if obj["kind"] == "HTTPRoute":
                assert '"kind": "InferencePool"' not in text


def test_inference_pool_selects_both_roles():
    pool = by_key(render("pd"))[("InferencePool", "llama-pd-inference-pool")]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    selector = pool["spec"]["selector"]["matchLabels"]
    decode = by_key(render("pd"))[("Deployment", "llama-pd-kserve")]
    prefill = by_key(render("pd"))[("Deployment", "llama-pd-kserve-prefill")]
    for deployment in (decode, prefill):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]


def test_no_scheduler_route_uses_workload_service():
    objects = by_key(render("no-scheduler"))
    kinds = {kind for kind, _ in objects}
    assert "InferencePool" not in kinds
    assert ("Deployment", "smollm2-kserve-router-scheduler") not in objects
    route = objects[("HTTPRoute", "smollm2-kserve-route")]
    backends = [b["name"] for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    assert backends == ["smollm2-kserve-workload-svc"]


def test_pd_decode_pod_runs_sidecar():
    objects = by_key(render("pd"))
    decode = objects[("Deployment", "llama-pd-kserve")]
    pod = decode["spec"]["template"]["spec"]
    assert decode["metadata"]["labels"]["llm-d.ai/role"] == "decode"
    sidecar = next(c for c in pod["initContainers"] if c["name"] == "llm-d-routing-sidecar")
    assert sidecar["command"] == ["llmisvc", "sidecar"]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["args"][:4] == ["--port", "8000", "--vllm-port", "8001"]
    engine = main_container(pod)
    assert engine["ports"][0]["containerPort"] == 8001
    assert engine["args"][engine["args"].index("--port") + 1] == "8001"
    assert pod["serviceAccountName"] == "llama-pd-kserve"
    role = objects[("Role", "llama-pd-kserve-role")]
    assert role["rules"][0] == {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    assert role["rules"][1]["resources"] == ["inferencepools"]
    assert "inference.networking.k8s.io" in role["rules"][1]["apiGroups"]
    binding = objects[("RoleBinding", "llama-pd-kserve-rb")]
    assert binding["subjects"][0]["name"] == "llama-pd-kserve"
    assert binding["roleRef"]["name"] == "llama-pd-kserve-role"


def test_pd_gateway_delegates_legs_to_sidecar():
    def gateway_args(sample: str) -> list[str]:
        scheduler = next(o for o in render(sample)
                         if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-kserve-router-scheduler"))
        return main_container(scheduler["spec"]["template"]["spec"])["args"]

    args = gateway_args("pd")
    assert args[args.index("--pd-legs") + 1] == "sidecar"
    # Without a prefill pool there is no sidecar to delegate to.
    assert "--pd-legs" not in gateway_args("scheduler")


def test_pd_multi_node_decode_leader_runs_sidecar():
    objects = by_key(render("pd-worker"))
    lws = objects[("LeaderWorkerSet", "deepseek-pd-kserve-mn")]
    template = lws["spec"]["leaderWorkerTemplate"]
    leader = template["leaderTemplate"]["spec"]
    sidecar = next(c for c in leader["initContainers"] if c["name"] == "llm-d-routing-sidecar")
    assert sidecar["args"][:4] == ["--port", "8000", "--vllm-port", "8001"]
    engine = main_container(leader)
    assert engine["args"][engine["args"].index("--port") + 1] == "8001"
    assert leader["serviceAccountName"] == "deepseek-pd-kserve"
    assert template["leaderTemplate"]["metadata"]["labels"]["llm-d.ai/role"] == "decode"
    # Workers only join the leader's engine; requests never reach them.
    worker = template["workerTemplate"]["spec"]
    assert all(c["name"] != "llm-d-routing-sidecar" for c in worker.get("initContainers") or [])
    assert ("Role", "deepseek-pd-kserve-role") in objects
    assert ("RoleBinding", "deepseek-pd-kserve-rb") in objects
    prefill = objects[("Deployment", "deepseek-pd-kserve-prefill")]
    engine = main_container(prefill["spec"]["template"]["spec"])
    assert engine["args"][engine["args"].index("--port") + 1] == "8000"


def test_pd_prefill_workload():
    prefill = by_key(render("pd"))[("Deployment", "llama-pd-kserve-prefill")]
    assert prefill["metadata"]["labels"]["app.kubernetes.io/component"] == \
        "llminferenceservice-workload-prefill"
    assert prefill["metadata"]["labels"]["llm-d.ai/role"] == "prefill"
    assert prefill["spec"]["replicas"] == 1
    engine = main_container(prefill["spec"]["template"]["spec"])
    assert engine["args"][engine["args"].index("--port") + 1] == "8000"


def test_gpu_template_runs_vllm_with_nixl():
    decode = by_key(render("pd"))[("Deployment", "llama-pd-kserve")]
    engine = main_container(decode["spec"]["template"]["spec"])
    assert engine["image"].startswith("vllm/vllm-openai")
    assert engine["command"] == ["vllm", "serve", "/mnt/models"]
    args = engine["args"]
    assert args[args.index("--served-model-name") + 1] == "meta-llama/Llama-3.1-8B-Instruct"
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert "--enable-prefix-caching" in args
    config = json.loads(args[args.index("--kv-transfer-config") + 1])
    assert config == {"kv_connector": "NixlConnector", "kv_role": "kv_both"}


def test_cpu_template_runs_builtin_engine():
    workload = by_key(render("no-scheduler"))[("Deployment", "smollm2-kserve")]
    engine = main_container(workload["spec"]["template"]["spec"])
    assert engine["image"].startswith("llmisvc/llmisvc:")
    assert engine["command"] == ["llmisvc", "engine"]
    assert "--kv-transfer-config" not in engine["args"]


def test_pvc_model_mounted_read_only():
    workload = by_key(render("no-scheduler"))[("Deployment", "smollm2-kserve")]
    pod = workload["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)
    assert volume["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    mount = next(m for m in main_container(pod)["volumeMounts"] if m["name"] == volume["name"])
    assert mount == {"name": volume["name"], "mountPath": "/mnt/models", "readOnly": True,
                     "subPath": "smollm2-135m-instruct"}
    assert "initContainers" not in pod


def test_hf_model_downloaded_by_init_container():
    workload = by_key(render("scheduler"))[("Deployment", "qwen-chat-kserve")]
    pod = workload["spec"]["template"]["spec"]
    init = next(c for c in pod["initContainers"] if c["name"] == "storage-initializer")
    assert init["args"] == ["hf://Qwen/Qwen2.5-7B-Instruct", "/mnt/models"]
    mount = next(m for m in main_container(pod)["volumeMounts"] if m["mountPath"] == "/mnt/models")
    assert mount["readOnly"] is True


def test_scaling_renders_hpa_without_fixed_replicas():
    objects = by_key(render("scaling"))
    hpa = objects[("HorizontalPodAutoscaler", "tiny-scaled-kserve")]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "tiny-scaled-kserve"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)
    assert "replicas" not in objects[("Deployment", "tiny-scaled-kserve")]["spec"]
    init = objects[("Deployment", "tiny-scaled-kserve")]["spec"]["template"]["spec"]["initContainers"]
    assert init[0]["args"][0] == "s3://models/smollm2-135m-instruct"


def test_worker_renders_leader_worker_set():
    objects = by_key(render("dp-worker"))
    lws = objects[("LeaderWorkerSet", "deepseek-dp-kserve-mn")]
    assert ("Deployment", "deepseek-dp-kserve") not in objects
    template = lws["spec"]["leaderWorkerTemplate"]
    assert template["size"] == 2
    leader = template["leaderTemplate"]["metadata"]["labels"]
    worker = template["workerTemplate"]["metadata"]["labels"]
    assert leader["app.kubernetes.io/component"] == "llminferenceservice-workload-leader"
    assert worker["app.kubernetes.io/component"] == "llminferenceservice-workload-worker"
    args = main_container(template["leaderTemplate"]["spec"])["args"]
    assert args[args.index("--data-parallel-size") + 1] == "16"
    assert args[args.index("--data-parallel-size-local") + 1] == "8"
    assert "--enable-expert-parallel" in args


def test_long_name_goes_through_child_name():
    resource = load_file(HERE / "samples" / "no-scheduler.yaml")[0]
    long_name = "a" * 60
    resource.obj["metadata"]["name"] = long_name
    resource.name = long_name
    objects = render_manifests(resolve(resource), owner_uid=UID)
    names = {o["metadata"]["name"] for o in objects}
    assert child_name(long_name, "-kserve") in names
    assert child_name(long_name, "-kserve-workload-svc") in names
    assert all(len(name) <= 63 for name in names)


def test_stop_annotation_renders_nothing():
    resource = load_file(HERE / "samples" / "scheduler.yaml")[0]
    resource.obj["metadata"]["annotations"] = {"serving.kserve.io/stop": "true"}
    assert render_manifests(resolve(resource), owner_uid=UID) == []


def test_render_cli_kubernetes_target():
    result = subprocess.run(
        LLMISVC + ["render", "-f", str(HERE / "samples" / "pd.yaml"), "--target", "kubernetes"],
        capture_output=True, text=True, timeout=120,
    )
    if "invalid choice" in result.stderr or "unrecognized arguments" in result.stderr:
        pytest.skip("render --target kubernetes is not wired in the render command yet")
    assert result.returncode == 0, result.stderr
    kinds = [doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc]
    assert "Deployment" in kinds
    assert "HTTPRoute" in kinds


def test_validation_rejects_unknown_fields():
    objects = by_key(render("pd"))
    deployment = objects[("Deployment", "llama-pd-kserve")]
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert validate_object(deployment) != []
    route = objects[("HTTPRoute", "llama-pd-kserve-route")]
    route["spec"]["rules"][0]["backendRefs"][0]["prot"] = 8000
    assert validate_object(route) != []
    pool = objects[("InferencePool", "llama-pd-inference-pool")]
    pool["spec"]["targetPorts"] = [{"number": 70000}]
    assert validate_object(pool) != []


def test_validation_runs_cel_rules():
    objects = by_key(render("pd"))
    route = objects[("HTTPRoute", "llama-pd-kserve-route")]
    del route["spec"]["rules"][0]["backendRefs"][0]["port"]
    assert any("Must have port for Service reference" in e for e in validate_object(route))
    pool = objects[("InferencePool", "llama-pd-inference-pool")]
    pool["spec"]["targetPorts"] = [{"number": 8000}, {"number": 8000}]
    assert any("port number must be unique" in e for e in validate_object(pool))


EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_render_valid_objects(path):
    resources = load_file(path)
    configs = {r.name: r for r in resources if r.kind == "LLMInferenceServiceConfig"}
    services = [r for r in resources if r.kind == "LLMInferenceService"]
    assert services
    for service in services:
        objects = render_manifests(resolve(service, configs), owner_uid=UID)
        assert any(o["kind"] == "Deployment" for o in objects)
        for obj in objects:
            errors = validate_object(obj)
            assert errors == [], f"{obj['kind']} {obj['metadata']['name']}: {errors}"


def test_scheduler_config_ref_mounted():
    resource = load_file(HERE / "samples" / "scheduler.yaml")[0]
    resource.obj["spec"]["router"]["scheduler"] = {"config": {"ref": {"name": "epp-profiles", "key": "pd.yaml"}}}
    objects = by_key(render_manifests(resolve(resource), owner_uid=UID))
    pod = objects[("Deployment", "qwen-chat-kserve-router-scheduler")]["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "epp-config")
    assert volume["configMap"] == {"name": "epp-profiles", "items": [{"key": "pd.yaml", "path": "pd.yaml"}]}
    discover = next(c for c in pod["containers"] if c["name"] == "pool-discovery")
    assert {"name": "epp-config", "mountPath": "/etc/llmisvc/epp", "readOnly": True} in discover["volumeMounts"]
    config = yaml.safe_load(objects[("ConfigMap", "qwen-chat-kserve-router-scheduler-config")]
                            ["data"]["service.yaml"])
    assert config["schedulerConfigFile"] == "/etc/llmisvc/epp/pd.yaml"


def test_router_ingress_rejected():
    resource = load_file(HERE / "samples" / "no-scheduler.yaml")[0]
    resource.obj["spec"]["router"]["ingress"] = {}
    with pytest.raises(ValueError, match="spec.router.ingress"):
        render_manifests(resolve(resource), owner_uid=UID)


def test_storage_initializer_disabled():
    resource = load_file(HERE / "samples" / "scheduler.yaml")[0]
    resource.obj["spec"]["storageInitializer"] = {"enabled": False}
    objects = by_key(render_manifests(resolve(resource), owner_uid=UID))
    pod = objects[("Deployment", "qwen-chat-kserve")]["spec"]["template"]["spec"]
    assert not any(c["name"] == "storage-initializer" for c in pod.get("initContainers") or [])
    assert main_container(pod)["command"] == ["vllm", "serve", "Qwen/Qwen2.5-7B-Instruct"]

    resource = load_file(HERE / "samples" / "scaling.yaml")[0]
    resource.obj["spec"]["storageInitializer"] = {"enabled": False}
    with pytest.raises(ValueError, match="s3://"):
        render_manifests(resolve(resource), owner_uid=UID)


def test_lora_adapters_on_vllm():
    resource = load_file(HERE / "samples" / "scheduler.yaml")[0]
    resource.obj["spec"]["model"]["lora"] = {
        "adapters": [{"name": "sql-adapter", "uri": "hf://example/qwen-sql-lora"},
                     {"name": "domain", "uri": "pvc://adapters/domain-lora"}],
        "maxAdapters": 2, "maxRank": 16,
    }
    objects = by_key(render_manifests(resolve(resource), owner_uid=UID))
    deployment = objects[("Deployment", "qwen-chat-kserve")]
    assert validate_object(deployment) == []
    pod = deployment["spec"]["template"]["spec"]
    args = main_container(pod)["args"]
    assert "--enable-lora" in args
    modules = args[args.index("--lora-modules") + 1: args.index("--lora-modules") + 3]
    assert modules == ["sql-adapter=/mnt/lora/sql-adapter", "domain=/mnt/lora/domain"]
    assert args[args.index("--max-loras") + 1] == "2"
    assert args[args.index("--max-lora-rank") + 1] == "16"
    init = {c["name"]: c for c in pod["initContainers"]}
    assert init["storage-initializer-lora-sql-adapter"]["args"] == [
        "hf://example/qwen-sql-lora", "/mnt/lora/sql-adapter"]
    mounts = {m["mountPath"]: m for m in main_container(pod)["volumeMounts"]}
    assert mounts["/mnt/lora/domain"]["subPath"] == "domain-lora"
    assert mounts["/mnt/lora/domain"]["readOnly"] is True


def test_lora_rejected_on_builtin_engine():
    resource = load_file(HERE / "samples" / "no-scheduler.yaml")[0]
    resource.obj["spec"]["model"]["lora"] = {"adapters": [{"name": "a", "uri": "hf://example/a"}]}
    with pytest.raises(ValueError, match="spec.model.lora"):
        render_manifests(resolve(resource), owner_uid=UID)


def test_tracing_configures_vllm():
    resource = load_file(HERE / "samples" / "scheduler.yaml")[0]
    resource.obj["spec"]["tracing"] = {"exporterEndpoint": "http://otel-collector:4317",
                                       "sampler": "parentbased_traceidratio", "samplerArg": "0.1"}
    objects = by_key(render_manifests(resolve(resource), owner_uid=UID))
    engine = main_container(objects[("Deployment", "qwen-chat-kserve")]["spec"]["template"]["spec"])
    assert engine["args"][engine["args"].index("--otlp-traces-endpoint") + 1] == "http://otel-collector:4317"
    env = {e["name"]: e.get("value") for e in engine["env"]}
    assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
    assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.1"


def test_tracing_and_offloading_rejected_where_unsupported():
    resource = load_file(HERE / "samples" / "no-scheduler.yaml")[0]
    resource.obj["spec"]["tracing"] = {"exporterEndpoint": "http://otel-collector:4317"}
    with pytest.raises(ValueError, match="spec.tracing"):
        render_manifests(resolve(resource), owner_uid=UID)

    resource = load_file(HERE / "samples" / "scheduler.yaml")[0]
    resource.obj["spec"]["kvCacheOffloading"] = {"cpu": "10Gi"}
    with pytest.raises(ValueError, match="spec.kvCacheOffloading"):
        render_manifests(resolve(resource), owner_uid=UID)


def test_scaling_keda_rejected():
    resource = load_file(HERE / "samples" / "scaling.yaml")[0]
    resource.obj["spec"]["scaling"]["wva"] = {"keda": {}}
    with pytest.raises(ValueError, match="spec.scaling.wva.keda"):
        render_manifests(resolve(resource), owner_uid=UID)


def test_builtin_pd_side_channel_on_pod_ip():
    resource = next(r for r in load_file(REPO / "examples" / "prefill-decode.yaml")
                    if r.kind == "LLMInferenceService")
    objects = render_manifests(resolve(resource), owner_uid=UID)
    deployments = [o for o in objects if o["kind"] == "Deployment"
                   and o["metadata"]["labels"].get("llm-d.ai/role") in ("decode", "prefill")]
    assert len(deployments) == 2
    for deployment in deployments:
        engine = main_container(deployment["spec"]["template"]["spec"])
        assert engine["command"] == ["llmisvc", "engine"]
        assert "--kv-transfer-config" in engine["args"]
        env = {e["name"]: e for e in engine["env"]}
        assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"]["value"] == "5600"
