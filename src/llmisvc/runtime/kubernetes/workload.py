"""Workload objects: model-server Deployments or LeaderWorkerSets, HPA, workload Service, and
the prefill/decode sidecar with its RBAC.

Names and labels follow KServe's controller: Deployment `<name>-kserve` (role `both`, or
`decode` beside a prefill pool) and `<name>-kserve-prefill` (role `prefill`). With `worker`
the workload is a LeaderWorkerSet `<name>-kserve-mn` (`<name>-kserve-mn-prefill`).
"""

from __future__ import annotations

import copy

from llmisvc.runtime.kubernetes import names as n
from llmisvc.runtime.kubernetes.context import ServiceContext
from llmisvc.runtime.kubernetes.engine_container import choose_engine, engine_container, lora_flags
from llmisvc.runtime.kubernetes.storage import adapter_storage, model_storage

WORKLOAD_PORT = 8000
# In the decode pod the engine listens here, behind the sidecar on WORKLOAD_PORT.
ENGINE_PORT_BEHIND_SIDECAR = 8001
SIDECAR_NAME = "llm-d-routing-sidecar"
LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"


def _merge_by_name(items: list[dict], extra: list[dict], key: str = "name") -> list[dict]:
    by_key = {item.get(key): item for item in extra}
    kept = [item for item in items if item.get(key) not in by_key]
    return kept + list(extra)


def _pod_spec(ctx: ServiceContext, template: dict | None, role: str, port: int,
              parallelism: dict) -> dict:
    """Return the pod spec for one workload: the merged template with engine and model."""
    if ctx.spec.get("kvCacheOffloading") is not None:
        raise ValueError("spec.kvCacheOffloading: not supported in Kubernetes mode yet; remove it "
                         "or pass the engine's offloading flags in the template's args")
    spec = copy.deepcopy(template or {})
    containers = spec.get("containers") or []
    main = next((c for c in containers if c.get("name") == "main"), {"name": "main"})
    engine = choose_engine(main, ctx.annotations, role)
    initializer = (ctx.spec.get("storageInitializer") or {}).get("enabled", True) is not False
    storage = model_storage(ctx.model_uri, ctx.options.storage_initializer_image, initializer)
    lora = (ctx.spec.get("model") or {}).get("lora") or {}
    adapter_paths, adapters = adapter_storage(lora.get("adapters") or [],
                                              ctx.options.storage_initializer_image, initializer)
    storage.volumes += adapters.volumes
    storage.init_containers += adapters.init_containers
    storage.volume_mounts += adapters.volume_mounts

    container = engine_container(
        main,
        engine=engine,
        model_path=storage.model_path,
        port=port,
        served_model_name=ctx.model_name,
        parallelism=parallelism,
        role=role,
        options=ctx.options,
        lora=lora_flags(lora, adapter_paths),
        tracing=ctx.spec.get("tracing"),
    )
    container["volumeMounts"] = _merge_by_name(
        container.get("volumeMounts") or [], storage.volume_mounts, key="mountPath"
    )
    spec["containers"] = [container] + [c for c in containers if c.get("name") != "main"]
    if storage.volumes:
        spec["volumes"] = _merge_by_name(spec.get("volumes") or [], storage.volumes)
    if storage.init_containers:
        spec["initContainers"] = _merge_by_name(
            spec.get("initContainers") or [], storage.init_containers
        )
    return spec


def _sidecar(ctx: ServiceContext) -> dict:
    """Return the decode pod's routing sidecar, a native sidecar (init container, restart Always).

    It serves the workload port and runs the prefill leg against the `x-prefiller-host-port`
    that the scheduler chose, then the decode leg against the local engine. It accepts only
    prefill hosts that are pods of this service's pool.
    """
    return {
        "name": SIDECAR_NAME,
        "image": ctx.options.llmisvc_image,
        "command": ["llmisvc", "sidecar"],
        "args": [
            "--port", str(WORKLOAD_PORT),
            "--vllm-port", str(ENGINE_PORT_BEHIND_SIDECAR),
            "--connector", "nixlv2",
            "--enable-ssrf-protection",
            "--inference-pool-namespace", ctx.namespace,
            "--inference-pool-name", ctx.pool_name,
        ],
        "restartPolicy": "Always",
        "ports": [{"name": "http", "containerPort": WORKLOAD_PORT, "protocol": "TCP"}],
        "env": [
            {"name": "INFERENCE_POOL_NAME", "value": ctx.pool_name},
            {"name": "INFERENCE_POOL_NAMESPACE", "value": ctx.namespace},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        ],
        "readinessProbe": {
            "tcpSocket": {"port": WORKLOAD_PORT},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
    }


def _add_sidecar(ctx: ServiceContext, pod_spec: dict) -> None:
    """Put the routing sidecar into a decode pod spec, with the service account its RBAC binds."""
    pod_spec["initContainers"] = _merge_by_name(pod_spec.get("initContainers") or [], [_sidecar(ctx)])
    pod_spec["serviceAccountName"] = ctx.names.main


def _template_meta(ctx: ServiceContext, labels: dict, spec_part: dict) -> dict:
    """Return pod template metadata: selector labels plus the spec's labels and annotations."""
    meta: dict = {"labels": {**(ctx.spec.get("labels") or {}), **(spec_part.get("labels") or {}),
                             **labels}}
    annotations = {**(ctx.spec.get("annotations") or {}), **(spec_part.get("annotations") or {})}
    if annotations:
        meta["annotations"] = annotations
    return meta


def _deployment(ctx: ServiceContext, name: str, labels: dict, replicas: int | None,
                pod_spec: dict, spec_part: dict) -> dict:
    spec: dict = {
        "selector": {"matchLabels": dict(labels)},
        "template": {"metadata": _template_meta(ctx, labels, spec_part), "spec": pod_spec},
    }
    # With `scaling` the HPA owns the replica count, so the Deployment must not fight it.
    if replicas is not None and not spec_part.get("scaling"):
        spec = {"replicas": replicas, **spec}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": ctx.metadata(name, labels),
        "spec": spec,
    }


def _group_size(parallelism: dict) -> int:
    """Return the pods per LeaderWorkerSet group: data-parallel ranks over local ranks,
    else the pipeline-parallel size."""
    data = int(parallelism.get("data") or 0)
    local = int(parallelism.get("dataLocal") or 0)
    if data and local:
        return max(1, data // local)
    return max(1, int(parallelism.get("pipeline") or 1))


def _leader_worker_set(ctx: ServiceContext, name: str, role: str, spec_part: dict,
                       replicas: int | None, prefill: bool) -> dict:
    leader_component = n.LEADER_PREFILL_COMPONENT if prefill else n.LEADER_COMPONENT
    worker_component = n.WORKER_PREFILL_COMPONENT if prefill else n.WORKER_COMPONENT
    leader_labels = n.workload_labels(ctx.name, leader_component, role)
    worker_labels = n.workload_labels(ctx.name, worker_component, role)
    parallelism = spec_part.get("parallelism") or {}

    # A decode leader serves through the routing sidecar, like a single-pod decode workload.
    behind_sidecar = role == "decode"
    leader_port = ENGINE_PORT_BEHIND_SIDECAR if behind_sidecar else WORKLOAD_PORT
    leader_spec = _pod_spec(ctx, spec_part.get("template"), role, leader_port, parallelism)
    if behind_sidecar:
        _add_sidecar(ctx, leader_spec)
    worker_spec = _pod_spec(ctx, spec_part.get("worker"), role, WORKLOAD_PORT, parallelism)
    # NOTE: workers join the leader's engine through its data-parallel RPC port. The flags
    # that make a vLLM worker headless must come from the worker template's own args.
    spec: dict = {
        "leaderWorkerTemplate": {
            "size": _group_size(parallelism),
            "restartPolicy": "RecreateGroupOnPodRestart",
            "leaderTemplate": {"metadata": _template_meta(ctx, leader_labels, spec_part),
                               "spec": leader_spec},
            "workerTemplate": {"metadata": _template_meta(ctx, worker_labels, spec_part),
                               "spec": worker_spec},
        },
        "startupPolicy": "LeaderCreated",
    }
    if replicas is not None and not spec_part.get("scaling"):
        spec = {"replicas": replicas, **spec}
    return {
        "apiVersion": LWS_API_VERSION,
        "kind": "LeaderWorkerSet",
        "metadata": ctx.metadata(name, n.base_labels(ctx.name, leader_component)),
        "spec": spec,
    }


def _hpa(ctx: ServiceContext, target: dict, scaling: dict) -> dict:
    """Return an autoscaling/v2 HPA for `target` from the spec's `scaling` block.

    Raises ValueError for the KEDA actuator (`scaling.wva.keda`), which is not rendered.
    """
    if (scaling.get("wva") or {}).get("keda") is not None:
        raise ValueError("spec.scaling.wva.keda: the KEDA actuator is not supported in "
                         "Kubernetes mode; use spec.scaling.wva.hpa")
    hpa_spec: dict = {
        "scaleTargetRef": {
            "apiVersion": target["apiVersion"],
            "kind": target["kind"],
            "name": target["metadata"]["name"],
        },
        "minReplicas": int(scaling.get("minReplicas") or 1),
        "maxReplicas": int(scaling.get("maxReplicas") or scaling.get("minReplicas") or 1),
        # NOTE: this Pods metric needs a custom-metrics adapter (for example prometheus-adapter)
        # that exposes the engine's vllm:num_requests_waiting gauge under this name.
        "metrics": [
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": "vllm_num_requests_waiting"},
                    "target": {"type": "AverageValue", "averageValue": "5"},
                },
            }
        ],
    }
    behavior = ((scaling.get("wva") or {}).get("hpa") or {}).get("behavior")
    if behavior:
        hpa_spec["behavior"] = copy.deepcopy(behavior)
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": ctx.metadata(target["metadata"]["name"], target["metadata"]["labels"]),
        "spec": hpa_spec,
    }


def _sidecar_rbac(ctx: ServiceContext) -> list[dict]:
    """Return the decode pod's ServiceAccount, Role and RoleBinding.

    The sidecar reads the InferencePool's selector and the pods it selects, to accept only
    prefill hosts of this service's pool.
    """
    labels = n.base_labels(ctx.name, n.WORKLOAD_COMPONENT)
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": ctx.metadata(ctx.names.main, labels)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": ctx.metadata(ctx.names.workload_role, labels),
            "rules": [
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["inference.networking.k8s.io", "inference.networking.x-k8s.io"],
                 "resources": ["inferencepools"], "verbs": ["get", "list", "watch"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": ctx.metadata(ctx.names.workload_role_binding, labels),
            "subjects": [{"kind": "ServiceAccount", "name": ctx.names.main,
                          "namespace": ctx.namespace}],
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                        "name": ctx.names.workload_role},
        },
    ]


def _workload_service(ctx: ServiceContext, selector: dict) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": ctx.metadata(ctx.names.workload_service,
                                 n.base_labels(ctx.name, n.WORKLOAD_COMPONENT)),
        "spec": {
            "selector": dict(selector),
            "ports": [{"name": "http", "port": WORKLOAD_PORT, "targetPort": WORKLOAD_PORT,
                       "protocol": "TCP"}],
            "type": "ClusterIP",
        },
    }


def main_workload(ctx: ServiceContext) -> list[dict]:
    """Return the main (or decode) workload, its HPA, sidecar RBAC and the workload Service."""
    spec = ctx.spec
    split = spec.get("prefill") is not None
    role = "decode" if split else "both"
    replicas = spec.get("replicas", 1)
    objects: list[dict] = []

    if split:
        objects += _sidecar_rbac(ctx)
    if spec.get("worker") is not None:
        workload = _leader_worker_set(ctx, ctx.names.multi_node, role, spec, replicas, prefill=False)
        selector = n.workload_labels(ctx.name, n.LEADER_COMPONENT, role)
    else:
        labels = n.workload_labels(ctx.name, n.WORKLOAD_COMPONENT, role)
        port = ENGINE_PORT_BEHIND_SIDECAR if split else WORKLOAD_PORT
        pod_spec = _pod_spec(ctx, spec.get("template"), role, port, spec.get("parallelism") or {})
        if split:
            _add_sidecar(ctx, pod_spec)
        workload = _deployment(ctx, ctx.names.main, labels, replicas, pod_spec, spec)
        selector = labels

    objects.append(workload)
    if spec.get("scaling"):
        objects.append(_hpa(ctx, workload, spec["scaling"]))
    objects.append(_workload_service(ctx, selector))
    return objects


def prefill_workload(ctx: ServiceContext) -> list[dict]:
    """Return the prefill workload and its HPA; empty without `prefill`."""
    prefill = ctx.spec.get("prefill")
    if prefill is None:
        return []
    replicas = prefill.get("replicas", 1)
    if prefill.get("worker") is not None:
        workload = _leader_worker_set(ctx, ctx.names.multi_node_prefill, "prefill", prefill,
                                      replicas, prefill=True)
    else:
        labels = n.workload_labels(ctx.name, n.PREFILL_COMPONENT, "prefill")
        template = prefill.get("template") or ctx.spec.get("template")
        parallelism = prefill.get("parallelism") or ctx.spec.get("parallelism") or {}
        pod_spec = _pod_spec(ctx, template, "prefill", WORKLOAD_PORT, parallelism)
        workload = _deployment(ctx, ctx.names.prefill, labels, replicas, pod_spec, prefill)
    objects = [workload]
    if prefill.get("scaling"):
        objects.append(_hpa(ctx, workload, prefill["scaling"]))
    return objects
