"""Planning: every spec value is honoured in the plan or rejected with its field path."""

from __future__ import annotations

import copy
import json

import pytest

from llmisvc.api import load_documents, resolve
from llmisvc.controller.errors import PlanError
from llmisvc.controller.machine import Machine
from llmisvc.controller.plan import build_plan

CPU_MACHINE = Machine(cpu_count=8, gpu_ids=(), vllm_installed=False)
GPU_MACHINE = Machine(cpu_count=8, gpu_ids=(0, 1), vllm_installed=True)

BASE = {
    "apiVersion": "serving.kserve.io/v1alpha1",
    "kind": "LLMInferenceService",
    "metadata": {"name": "svc"},
    "spec": {
        "model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct", "name": "smol"},
        "replicas": 2,
        "router": {"scheduler": {}, "route": {}, "gateway": {}},
    },
}


def spec(**changes) -> dict:
    """Return BASE with `changes` applied; keys are dotted paths, None deletes."""
    document = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        node = document
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return document


def plan_of(document: dict, machine: Machine = CPU_MACHINE):
    import json

    (resource,) = load_documents(json.dumps(document))
    return build_plan(resolve(resource), machine)


def issues_of(document: dict, machine: Machine = CPU_MACHINE) -> dict[str, str]:
    with pytest.raises(PlanError) as caught:
        plan_of(document, machine)
    return {issue.path: issue.reason for issue in caught.value.issues}


def main_container(**fields) -> list[dict]:
    return [{"name": "main", **fields}]


def test_default_plan_shape():
    plan = plan_of(BASE)
    (workload,) = plan.workloads
    assert plan.shape == "scheduler"
    assert plan.model_name == "smol"
    assert workload.name == "svc-kserve"
    assert workload.replicas == 2
    assert workload.engine == "builtin"
    assert workload.role == "both"
    assert workload.engine_args[:4] == ["--model", "hf://HuggingFaceTB/SmolLM2-135M-Instruct", "--served-model-name", "smol"]
    assert workload.grace_period_s == 30


def test_threads_divide_cores_among_replicas():
    assert plan_of(BASE).workloads[0].threads == 4
    assert plan_of(spec(**{"spec.replicas": 16})).workloads[0].threads == 1


def test_threads_follow_cpu_limit():
    document = spec(**{"spec.template": {"containers": main_container(resources={"limits": {"cpu": "3"}})}})
    assert plan_of(document).workloads[0].threads == 3
    fractional = spec(**{"spec.template": {"containers": main_container(resources={"limits": {"cpu": "500m"}})}})
    assert plan_of(fractional).workloads[0].threads == 1


def test_user_args_extend_generated_flags():
    document = spec(**{"spec.template": {"containers": main_container(args=["--max-num-seqs", "8", "--seed=3"])}})
    args = plan_of(document).workloads[0].engine_args
    assert args[-3:] == ["--max-num-seqs", "8", "--seed=3"]


def test_unknown_engine_flag_rejected():
    document = spec(**{"spec.template": {"containers": main_container(args=["--max-num-seq", "8"])}})
    reason = issues_of(document)["spec.template.containers[main].args"]
    assert "unknown flag '--max-num-seq'" in reason


def test_spec_owned_flag_rejected():
    document = spec(**{"spec.template": {"containers": main_container(args=["--served-model-name", "other"])}})
    assert "set from the spec" in issues_of(document)["spec.template.containers[main].args"]


def test_runtime_port_flag_dropped_with_warning():
    document = spec(**{"spec.template": {"containers": main_container(args=["--port", "8001", "--seed", "1"])}})
    plan = plan_of(document)
    assert "--port" not in plan.workloads[0].engine_args
    assert plan.workloads[0].engine_args[-2:] == ["--seed", "1"]
    assert any("--port 8001" in warning for warning in plan.warnings)


@pytest.mark.parametrize(
    "changes, path",
    [
        ({"spec.replicas": None, "spec.scaling": {"minReplicas": 1, "maxReplicas": 3, "wva": {"hpa": {}}}}, "spec.scaling"),
        ({"spec.tracing": {"exporter": "otlp", "exporterEndpoint": "collector:4317"}}, "spec.tracing"),
        ({"spec.model.lora": {"adapters": [{"uri": "hf://org/adapter", "name": "a"}]}}, "spec.model.lora"),
        ({"apiVersion": "serving.kserve.io/v1alpha2", "spec.kvCacheOffloading": {"cpu": "10Gi"}}, "spec.kvCacheOffloading"),
    ],
)
def test_cluster_only_fields_rejected(changes, path):
    assert path in issues_of(spec(**changes))


@pytest.mark.parametrize("uri", ["s3://bucket/model", "oci://registry/model:1"])
def test_remote_storage_uri_rejected(uri):
    issues = issues_of(spec(**{"spec.model.uri": uri}))
    assert "not available in local mode" in issues["spec.model.uri"]


def test_pipeline_parallel_rejected_on_builtin():
    issues = issues_of(spec(**{"spec.parallelism": {"pipeline": 2}}))
    assert "does not support pipeline parallelism" in issues["spec.parallelism.pipeline"]


def test_tensor_parallel_rejected_on_builtin():
    issues = issues_of(spec(**{"spec.parallelism": {"tensor": 2}}))
    assert "does not support tensor parallelism" in issues["spec.parallelism.tensor"]


def test_tensor_parallel_needs_devices():
    containers = main_container(resources={"limits": {"nvidia.com/gpu": "1"}})
    document = spec(**{"spec.replicas": 1, "spec.parallelism": {"tensor": 2}, "spec.template": {"containers": containers}})
    document["metadata"]["annotations"] = {"llmisvc.io/engine": "vllm"}
    issues = issues_of(document, GPU_MACHINE)
    assert "needs 2 nvidia.com/gpu per replica" in issues["spec.parallelism"]


def test_tensor_parallel_with_devices_planned():
    containers = main_container(resources={"limits": {"nvidia.com/gpu": "2"}})
    document = spec(**{"spec.replicas": 1, "spec.parallelism": {"tensor": 2}, "spec.template": {"containers": containers}})
    document["metadata"]["annotations"] = {"llmisvc.io/engine": "vllm"}
    workload = plan_of(document, GPU_MACHINE).workloads[0]
    assert workload.gpus_per_replica == 2
    assert "--tensor-parallel-size" in workload.engine_args


def test_gpu_oversubscription_rejected():
    containers = main_container(resources={"limits": {"nvidia.com/gpu": "1"}})
    document = spec(**{"spec.replicas": 3, "spec.template": {"containers": containers}})
    document["metadata"]["annotations"] = {"llmisvc.io/engine": "vllm"}
    issues = issues_of(document, GPU_MACHINE)
    assert "needs 3 devices in total and this machine has 2" in issues["spec.template.containers[main].resources"]


def test_gpu_request_falls_back_to_cpu_with_warning():
    containers = main_container(resources={"limits": {"nvidia.com/gpu": "1"}})
    plan = plan_of(spec(**{"spec.template": {"containers": containers}}))
    assert plan.workloads[0].gpus_per_replica == 0
    assert any("no CUDA device" in warning for warning in plan.warnings)


def test_vllm_without_install_rejected():
    document = spec()
    document["metadata"]["annotations"] = {"llmisvc.io/engine": "vllm"}
    issues = issues_of(document, Machine(cpu_count=8, gpu_ids=(0,), vllm_installed=False))
    assert "vLLM is not installed" in issues["metadata.annotations[llmisvc.io/engine]"]


def test_unknown_engine_annotation_rejected():
    document = spec()
    document["metadata"]["annotations"] = {"llmisvc.io/engine": "tgi"}
    assert "unknown engine 'tgi'" in issues_of(document)["metadata.annotations[llmisvc.io/engine]"]


def test_env_value_from_rejected():
    env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}, {"name": "A", "value": "1"}]
    issues = issues_of(spec(**{"spec.template": {"containers": main_container(env=env)}}))
    assert "spec.template.containers[main].env[0].valueFrom" in issues


def test_env_values_passed():
    env = [{"name": "A", "value": "1"}]
    assert plan_of(spec(**{"spec.template": {"containers": main_container(env=env)}})).workloads[0].env["A"] == "1"


def test_probes_from_template():
    probe = {"httpGet": {"path": "/ready", "port": 8000}, "periodSeconds": 7, "failureThreshold": 4, "initialDelaySeconds": 2}
    workload = plan_of(spec(**{"spec.template": {"containers": main_container(readinessProbe=probe)}})).workloads[0]
    assert workload.readiness.path == "/ready"
    assert workload.readiness.period_s == 7
    assert workload.readiness.failure_threshold == 4
    assert workload.readiness.initial_delay_s == 2


def test_https_probe_on_plain_engine_warns():
    probe = {"httpGet": {"path": "/health", "port": 8000, "scheme": "HTTPS"}}
    plan = plan_of(spec(**{"spec.template": {"containers": main_container(livenessProbe=probe)}}))
    assert any("scheme HTTPS" in warning for warning in plan.warnings)


def test_exec_probe_rejected():
    from llmisvc.controller.probes import DEFAULT_LIVENESS, ProbeSpecError, parse_probe

    with pytest.raises(ProbeSpecError, match="exec probes are not supported locally"):
        parse_probe({"exec": {"command": ["true"]}}, "spec.template.containers[main].livenessProbe", DEFAULT_LIVENESS)


def test_memory_limit_and_grace_period():
    template = {"terminationGracePeriodSeconds": 5, "containers": main_container(resources={"limits": {"memory": "2Gi"}})}
    workload = plan_of(spec(**{"spec.template": template})).workloads[0]
    assert workload.memory_limit_bytes == 2 * 2**30
    assert workload.grace_period_s == 5


def test_revision_ignores_replica_count():
    first = plan_of(BASE).workloads[0]
    scaled = plan_of(spec(**{"spec.replicas": 5})).workloads[0]
    changed = plan_of(spec(**{"spec.template": {"containers": main_container(args=["--seed", "2"])}})).workloads[0]
    assert first.revision == scaled.revision
    assert first.revision != changed.revision


def test_prefill_decode_splits_roles():
    plan = plan_of(spec(**{"spec.prefill": {"replicas": 2}}))
    assert plan.shape == "pd"
    assert [w.component for w in plan.workloads] == ["main", "prefill"]
    assert [w.replicas for w in plan.workloads] == [2, 2]
    assert plan.workloads[1].name == "svc-kserve-prefill"
    assert [w.role for w in plan.workloads] == ["decode", "prefill"]
    assert plan.aggregated_reason is None
    for workload in plan.workloads:
        flag = workload.engine_args.index("--kv-transfer-config")
        assert json.loads(workload.engine_args[flag + 1])["kv_connector"] == "NixlConnector"


def test_stop_annotation_marks_plan_stopped():
    document = spec()
    document["metadata"]["annotations"] = {"serving.kserve.io/stop": "true"}
    assert plan_of(document).stopped


def test_sim_engine_and_flags():
    document = spec(**{"spec.template": {"containers": main_container(args=["--itl-ms", "3"])}})
    document["metadata"]["annotations"] = {"llmisvc.io/engine": "sim"}
    workload = plan_of(document).workloads[0]
    assert workload.engine == "sim"
    assert workload.engine_args[-2:] == ["--itl-ms", "3"]


def test_plan_round_trips_through_dict():
    from llmisvc.controller.plan import Plan

    plan = plan_of(spec(**{"spec.prefill": {"replicas": 1}}))
    assert Plan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()


def test_invalid_scheduler_config_rejected():
    config = {
        "apiVersion": "llm-d.ai/v1alpha1",
        "kind": "EndpointPickerConfig",
        "plugins": [{"type": "no-such-scorer"}],
        "schedulingProfiles": [{"name": "default", "plugins": [{"pluginRef": "no-such-scorer"}]}],
    }
    issues = issues_of(spec(**{"spec.router.scheduler": {"config": {"inline": config}}}))
    assert "unknown plugin type 'no-such-scorer'" in issues["spec.router.scheduler.config.inline"]


def test_resources_beyond_machine_rejected():
    machine = Machine(cpu_count=2, gpu_ids=(), vllm_installed=False, memory_bytes=8 * 2**30)
    resources = {"requests": {"cpu": "500"}, "limits": {"memory": "900Ti"}}
    issues = issues_of(spec(**{"spec.template": {"containers": main_container(resources=resources)}}), machine)
    assert "spec.template.containers[main].resources.requests.cpu" in issues
    assert "500" in issues["spec.template.containers[main].resources.requests.cpu"]
    assert "spec.template.containers[main].resources.limits.memory" in issues


def test_kv_cache_sized_from_memory_limit():
    machine = Machine(cpu_count=2, gpu_ids=(), vllm_installed=False, memory_bytes=8 * 2**30)
    limited = spec(**{"spec.template": {"containers": main_container(resources={"limits": {"memory": "2Gi"}})}})
    args = plan_of(limited, machine).workloads[0].engine_args
    assert args[args.index("--kv-cache-memory") + 1] == str(int(2 * 2**30 * 0.4))


def test_kv_cache_split_among_replicas():
    machine = Machine(cpu_count=2, gpu_ids=(), vllm_installed=False, memory_bytes=8 * 2**30)
    args = plan_of(spec(**{"spec.replicas": 3}), machine).workloads[0].engine_args
    assert args[args.index("--kv-cache-memory") + 1] == str(int(8 * 2**30 * 0.15 / 3))


def test_kv_cache_flag_from_user_args_kept():
    machine = Machine(cpu_count=2, gpu_ids=(), vllm_installed=False, memory_bytes=8 * 2**30)
    document = spec(**{"spec.template": {"containers": main_container(args=["--kv-cache-memory", "1GiB"])}})
    args = plan_of(document, machine).workloads[0].engine_args
    assert args.count("--kv-cache-memory") == 1
    assert args[-2:] == ["--kv-cache-memory", "1GiB"]
