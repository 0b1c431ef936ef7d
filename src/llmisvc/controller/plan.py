"""Planning: turn a resolved LLMInferenceService into the workloads to run on this machine.

The plan is everything the local runtime needs and nothing it has to guess: per workload
the role, engine kind, engine flags, environment, thread count, device count, memory limit,
probes and grace period. Every spec value is either honoured here or rejected with its field
path, so a rejected spec never starts anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmisvc.controller.engine_args import (
    ENGINE_KINDS,
    EngineArgsError,
    engine_flags,
    split_user_args,
)
from llmisvc.controller.errors import PlanError, PlanIssue
from llmisvc.controller.machine import Machine
from llmisvc.controller.probes import (
    DEFAULT_LIVENESS,
    DEFAULT_READINESS,
    DEFAULT_STARTUP_TIMEOUT_S,
    Probe,
    ProbeSpecError,
    parse_probe,
)
from llmisvc.controller.quantity import QuantityError, parse_quantity

logger = logging.getLogger(__name__)

ENGINE_ANNOTATION = "llmisvc.io/engine"
PREFILL_ENGINE_ANNOTATION = "llmisvc.io/prefill-engine"
STOP_ANNOTATION = "serving.kserve.io/stop"
GPU_RESOURCE = "nvidia.com/gpu"
ROLE_LABEL = "llm-d.ai/role"

# Whether prefill and decode replicas run as separate roles with KV transfer. When True,
# prefill workloads get role "prefill" and main workloads role "decode", which the gateway
# entry passes on unchanged. When False, the prefill/decode shape starts every replica
# aggregated (role "both") and reports it in the plan's `aggregated_reason`.
PREFILL_DECODE_SPLIT = True

# `--kv-transfer-config` given to both pools of a split service unless the container's args
# set their own: vLLM's NixlConnector fields, which llmisvc's engine and simulator read too.
KV_TRANSFER_CONFIG = {"kv_connector": "NixlConnector", "kv_role": "kv_both"}

DEFAULT_GRACE_PERIOD_S = 30.0


# KV-cache sizing for built-in engine replicas (see _kv_cache_budget).
KV_SHARE_OF_LIMIT = 0.4
KV_SHARE_OF_MACHINE = 0.15
KV_DEFAULT_CAP_BYTES = 4 << 30

@dataclass
class Workload:
    """A set of identical replicas: the main (decode) pool or the prefill pool.

    `engine_args` excludes `--host`, `--port` and `--threads`, which the runtime adds per
    replica.
    `revision` is a digest of everything that defines a replica, so a changed template
    is detected by comparing revisions and rolled out one replica at a time.
    """

    name: str
    component: str  # "main" or "prefill"
    role: str  # "both", "decode" or "prefill"
    replicas: int
    engine: str
    model_uri: str
    served_model_name: str
    engine_args: list[str]
    env: dict[str, str]
    threads: int | None  # None when `args` set --threads or the engine (vLLM) has no such flag
    cpu_limit: float | None
    gpus_per_replica: int
    memory_limit_bytes: int | None
    serving_scheme: str
    readiness: Probe
    liveness: Probe
    liveness_explicit: bool
    startup: Probe | None
    startup_timeout_s: float
    grace_period_s: float
    labels: dict[str, str] = field(default_factory=dict)
    revision: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("readiness", "liveness", "startup"):
            probe = getattr(self, name)
            data[name] = probe.to_dict() if probe is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Workload":
        data = dict(data)
        for name in ("readiness", "liveness", "startup"):
            if data.get(name) is not None:
                data[name] = Probe.from_dict(data[name])
        return cls(**data)


@dataclass
class Plan:
    """Workloads of one service and the settings the gateway routes it with."""

    namespace: str
    name: str
    model_name: str
    shape: str
    workloads: list[Workload]
    scheduler_config: dict | None
    criticality: str | None
    stopped: bool
    warnings: list[str]
    aggregated_reason: str | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def workload(self, component: str) -> Workload | None:
        return next((workload for workload in self.workloads if workload.component == component), None)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["workloads"] = [workload.to_dict() for workload in self.workloads]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        data = dict(data)
        data["workloads"] = [Workload.from_dict(workload) for workload in data["workloads"]]
        return cls(**data)


def build_plan(resolved: Any, machine: Machine, pvc_root: Path | None = None) -> Plan:
    """Plan `resolved` (an api ResolvedService) for `machine`.

    `pvc_root` is the directory that replaces PersistentVolumeClaims in local mode
    (`pvc://claim/path` becomes `pvc_root/claim/path`); None rejects `pvc://` URIs.
    Returns the Plan. Raises PlanError listing every field that cannot be honoured.
    """
    issues: list[PlanIssue] = []
    warnings: list[str] = []
    spec = (resolved.obj or {}).get("spec", {}) or {}
    annotations = dict(resolved.annotations or {})
    annotations.update((resolved.obj.get("metadata") or {}).get("annotations") or {})

    _reject_unsupported_fields(spec, issues, warnings)
    model_uri = _local_model_uri(resolved.model_uri, pvc_root, issues)

    main_engine = _engine_kind(annotations.get(ENGINE_ANNOTATION), f"metadata.annotations[{ENGINE_ANNOTATION}]", issues)
    prefill_engine = main_engine
    if PREFILL_ENGINE_ANNOTATION in annotations:
        prefill_engine = _engine_kind(
            annotations[PREFILL_ENGINE_ANNOTATION], f"metadata.annotations[{PREFILL_ENGINE_ANNOTATION}]", issues
        )

    main_replicas = 1 if resolved.replicas is None else int(resolved.replicas)
    prefill_replicas = resolved.prefill_replicas
    total_replicas = main_replicas + (prefill_replicas or 0)
    split = resolved.shape == "pd" and PREFILL_DECODE_SPLIT

    workloads = [
        _plan_workload(
            resolved,
            component="main",
            role="decode" if split else "both",
            replicas=main_replicas,
            engine=main_engine,
            model_uri=model_uri,
            container=resolved.main_container or {},
            pod=spec.get("template") or {},
            parallelism=spec.get("parallelism") or {},
            path="spec",
            machine=machine,
            total_replicas=total_replicas,
            issues=issues,
            warnings=warnings,
        )
    ]
    if prefill_replicas is not None:
        prefill_spec = spec.get("prefill") or {}
        workloads.append(
            _plan_workload(
                resolved,
                component="prefill",
                role="prefill" if split else "both",
                replicas=int(prefill_replicas),
                engine=prefill_engine,
                model_uri=model_uri,
                container=resolved.prefill_container or resolved.main_container or {},
                pod=prefill_spec.get("template") or spec.get("template") or {},
                parallelism=prefill_spec.get("parallelism") or spec.get("parallelism") or {},
                path="spec.prefill",
                machine=machine,
                total_replicas=total_replicas,
                issues=issues,
                warnings=warnings,
            )
        )

    _check_devices(workloads, machine, issues, warnings)
    if resolved.shape in ("scheduler", "pd") and resolved.scheduler_config is not None:
        _check_scheduler_config(resolved, issues)

    if issues:
        raise PlanError(issues)

    aggregated_reason = None
    if resolved.shape == "pd" and not split:
        aggregated_reason = (
            f"prefill/decode split is not available yet: {main_replicas} decode and "
            f"{prefill_replicas} prefill replicas serve aggregated"
        )
    stopped = str(annotations.get(STOP_ANNOTATION, "")).lower() == "true"
    return Plan(
        namespace=resolved.namespace,
        name=resolved.name,
        model_name=resolved.model_name,
        shape=resolved.shape,
        workloads=workloads,
        scheduler_config=resolved.scheduler_config,
        criticality=resolved.criticality,
        stopped=stopped,
        warnings=warnings,
        aggregated_reason=aggregated_reason,
    )


def _reject_unsupported_fields(spec: dict, issues: list[PlanIssue], warnings: list[str]) -> None:
    """Reject fields that only a cluster can honour; warn about ones that do not apply here."""
    cluster_only = {
        "scaling": "autoscaling needs a Kubernetes cluster; set spec.replicas locally",
        "tracing": "tracing export is not available in local mode",
        "kvCacheOffloading": "KV cache offloading is not available in local mode",
        "worker": "multi-node workers need a Kubernetes cluster",
    }
    for key, reason in cluster_only.items():
        if spec.get(key):
            issues.append(PlanIssue(f"spec.{key}", reason))
        if (spec.get("prefill") or {}).get(key):
            issues.append(PlanIssue(f"spec.prefill.{key}", reason))
    router = spec.get("router") or {}
    if router.get("ingress"):
        warnings.append("spec.router.ingress is ignored locally: the local gateway is the entry point")
    if (router.get("gateway") or {}).get("refs"):
        warnings.append("spec.router.gateway.refs is ignored locally: the local gateway serves the service")
    if ((router.get("route") or {}).get("http") or {}).get("refs"):
        warnings.append("spec.router.route.http.refs is ignored locally: the local gateway routes by path and model")


def _local_model_uri(uri: str, pvc_root: Path | None, issues: list[PlanIssue]) -> str:
    """Return the model URI the engine loads, mapping `pvc://` into `pvc_root`."""
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme in ("s3", "oci", "gs", "http", "https"):
        issues.append(PlanIssue("spec.model.uri", f"{scheme}:// URIs are not available in local mode; use hf://, file:// or a path"))
        return uri
    if scheme == "pvc":
        if pvc_root is None:
            issues.append(PlanIssue("spec.model.uri", "pvc:// URIs need a local volume directory"))
            return uri
        return str(pvc_root / uri.split("://", 1)[1])
    return uri


def _engine_kind(value: str | None, path: str, issues: list[PlanIssue]) -> str:
    kind = (value or "builtin").strip()
    if kind not in ENGINE_KINDS:
        issues.append(PlanIssue(path, f"unknown engine {kind!r}; expected one of {', '.join(ENGINE_KINDS)}"))
        return "builtin"
    return kind


def _plan_workload(
    resolved: Any,
    *,
    component: str,
    role: str,
    replicas: int,
    engine: str,
    model_uri: str,
    container: dict,
    pod: dict,
    parallelism: dict,
    path: str,
    machine: Machine,
    total_replicas: int,
    issues: list[PlanIssue],
    warnings: list[str],
) -> Workload:
    """Plan one workload; issues and warnings are appended to the given lists."""
    container_path = f"{path}.template.containers[main]"
    flags = engine_flags(engine)

    if engine in ("builtin", "sim") and ((resolved.obj.get("spec") or {}).get("model") or {}).get("lora"):
        issues.append(PlanIssue("spec.model.lora", f"LoRA adapters are not supported by the {engine} engine"))
    if engine == "vllm" and not machine.vllm_installed:
        issues.append(PlanIssue(f"metadata.annotations[{ENGINE_ANNOTATION}]", "engine vllm requested but vLLM is not installed"))
    if engine == "vllm" and machine.gpu_count == 0:
        issues.append(PlanIssue(f"metadata.annotations[{ENGINE_ANNOTATION}]", "engine vllm needs a CUDA device and this machine has none"))

    try:
        user_args, arg_warnings = split_user_args([str(arg) for arg in container.get("args") or []], flags)
        warnings.extend(f"{container_path}.args: {warning}" for warning in arg_warnings)
    except EngineArgsError as exc:
        issues.append(PlanIssue(f"{container_path}.args", str(exc)))
        user_args = []

    parallel_args = _parallelism_args(parallelism, engine, f"{path}.parallelism", issues)
    gpus_per_replica = _gpus_per_replica(container, f"{container_path}.resources", issues)
    needed_devices = max(1, int(parallelism.get("tensor") or 1)) * max(1, int(parallelism.get("pipeline") or 1))
    if needed_devices > 1 and gpus_per_replica < needed_devices:
        issues.append(
            PlanIssue(
                f"{path}.parallelism",
                f"tensor x pipeline = {needed_devices} needs {needed_devices} {GPU_RESOURCE} per replica, "
                f"{container_path}.resources requests {gpus_per_replica} and this machine has {machine.gpu_count}",
            )
        )

    cpu_limit = _cpu_limit(container, f"{container_path}.resources", issues)
    _check_machine_fits(container, f"{container_path}.resources", machine, issues)
    # Threads beyond the CPU limit would only contend, so a fraction rounds down (minimum 1).
    # Without a limit the machine's cores are shared evenly by the service's replicas.
    threads: int | None = max(1, math.floor(cpu_limit)) if cpu_limit is not None else max(1, machine.cpu_count // max(1, total_replicas))
    memory_limit = _memory_limit(container, f"{container_path}.resources", issues)
    env = _env(container, f"{container_path}.env", issues)
    serving_scheme = "HTTPS" if any(arg.split("=", 1)[0] == "--ssl-certfile" for arg in user_args) else "HTTP"

    probes: dict[str, Probe | None] = {}
    for field_name, default in (
        ("readinessProbe", DEFAULT_READINESS),
        ("livenessProbe", DEFAULT_LIVENESS),
        ("startupProbe", None),
    ):
        try:
            probe = parse_probe(container.get(field_name), f"{container_path}.{field_name}", default)
        except ProbeSpecError as exc:
            issues.append(PlanIssue(f"{container_path}.{field_name}", str(exc)))
            probe = default
        if probe is not None and probe.kind == "http" and probe.scheme != serving_scheme:
            warnings.append(
                f"{container_path}.{field_name}: scheme {probe.scheme} but the {engine} engine serves "
                f"{serving_scheme}; probing with {serving_scheme}"
            )
        probes[field_name] = probe

    kv_budget = _kv_cache_budget(engine, user_args, memory_limit, machine, total_replicas)
    kv_args = ["--kv-cache-memory", str(kv_budget)] if kv_budget is not None else []
    engine_args = ["--model", model_uri, "--served-model-name", resolved.model_name] + parallel_args + kv_args + user_args
    if role in ("prefill", "decode") and not any(arg.split("=", 1)[0] == "--kv-transfer-config" for arg in user_args):
        engine_args += ["--kv-transfer-config", json.dumps(KV_TRANSFER_CONFIG)]
    if any(arg.split("=", 1)[0] == "--threads" for arg in user_args) or engine == "vllm":
        threads = None

    suffix = "-kserve" if component == "main" else "-kserve-prefill"
    workload = Workload(
        name=f"{resolved.name}{suffix}",
        component=component,
        role=role,
        replicas=replicas,
        engine=engine,
        model_uri=model_uri,
        served_model_name=resolved.model_name,
        engine_args=engine_args,
        env=env,
        threads=threads,
        cpu_limit=cpu_limit,
        gpus_per_replica=gpus_per_replica,
        memory_limit_bytes=memory_limit,
        serving_scheme=serving_scheme,
        readiness=probes["readinessProbe"],
        liveness=probes["livenessProbe"],
        liveness_explicit=bool(container.get("livenessProbe")),
        startup=probes["startupProbe"],
        startup_timeout_s=DEFAULT_STARTUP_TIMEOUT_S[engine],
        grace_period_s=float(pod.get("terminationGracePeriodSeconds", DEFAULT_GRACE_PERIOD_S)),
        labels={ROLE_LABEL: role},
    )
    workload.revision = _revision(workload)
    return workload


def _parallelism_args(parallelism: dict, engine: str, path: str, issues: list[PlanIssue]) -> list[str]:
    """Translate spec.parallelism to engine flags, rejecting what the engine cannot do."""
    args: list[str] = []
    for key, flag in (("tensor", "--tensor-parallel-size"), ("pipeline", "--pipeline-parallel-size"), ("data", "--data-parallel-size")):
        value = parallelism.get(key)
        if value is None or int(value) <= 1:
            continue
        if engine != "vllm":
            # The built-in engine and the simulator run each replica on one device; their
            # parallelism flags exist for vLLM compatibility and accept only 1.
            issues.append(PlanIssue(f"{path}.{key}", f"the {engine} engine does not support {key} parallelism (got {value}); use engine vllm or more replicas"))
            continue
        args += [flag, str(int(value))]
    for key in ("dataLocal", "dataRPCPort", "expert"):
        if parallelism.get(key) and engine != "vllm":
            issues.append(PlanIssue(f"{path}.{key}", f"the {engine} engine does not support {key}"))
    if parallelism.get("expert") and engine == "vllm":
        args.append("--enable-expert-parallel")
    return args


def _resource(container: dict, name: str) -> Any:
    """Return a container's limit for `name`, else its request, else None."""
    resources = container.get("resources") or {}
    for section in ("limits", "requests"):
        value = (resources.get(section) or {}).get(name)
        if value is not None:
            return value
    return None


def _gpus_per_replica(container: dict, path: str, issues: list[PlanIssue]) -> int:
    value = _resource(container, GPU_RESOURCE)
    if value is None:
        return 0
    try:
        count = parse_quantity(value)
    except QuantityError as exc:
        issues.append(PlanIssue(f"{path}.limits[{GPU_RESOURCE}]", str(exc)))
        return 0
    if count != int(count):
        issues.append(PlanIssue(f"{path}.limits[{GPU_RESOURCE}]", f"must be a whole number of devices, got {value}"))
    return int(count)


def _check_machine_fits(container: dict, path: str, machine: Machine, issues: list[PlanIssue]) -> None:
    """Reject CPU or memory requests and limits that one replica could never get on this machine."""
    resources = container.get("resources") or {}
    for kind in ("requests", "limits"):
        values = resources.get(kind) or {}
        for name, available, unit in (("cpu", machine.cpu_count, "CPUs"), ("memory", machine.memory_bytes, "bytes")):
            if values.get(name) is None or available is None:
                continue
            try:
                requested = parse_quantity(values[name])
            except QuantityError:
                continue  # reported by the limit parsers
            if requested > available:
                issues.append(
                    PlanIssue(
                        f"{path}.{kind}.{name}",
                        f"{values[name]} exceeds this machine's {available} {unit}; lower it or run on Kubernetes",
                    )
                )


def _kv_cache_budget(
    engine: str, user_args: list[str], memory_limit: int | None, machine: Machine, total_replicas: int
) -> int | None:
    """Return the built-in engine's KV-cache budget in bytes, or None to leave sizing to the args.

    An engine sizes its pool from the machine's RAM alone, so several replicas would each claim the
    same share. With a memory limit the pool gets KV_SHARE_OF_LIMIT of it, which leaves room for
    weights and activations. Without one, the service's replicas split KV_SHARE_OF_MACHINE of
    physical memory equally.
    """
    if engine != "builtin" or (machine.memory_bytes is None and memory_limit is None):
        return None
    if any(arg.split("=", 1)[0] in ("--kv-cache-memory", "--num-gpu-blocks-override") for arg in user_args):
        return None
    if memory_limit is not None:
        return int(memory_limit * KV_SHARE_OF_LIMIT)
    return int(min(machine.memory_bytes * KV_SHARE_OF_MACHINE / max(1, total_replicas), KV_DEFAULT_CAP_BYTES))


def _cpu_limit(container: dict, path: str, issues: list[PlanIssue]) -> float | None:
    limits = (container.get("resources") or {}).get("limits") or {}
    if limits.get("cpu") is None:
        return None
    try:
        return parse_quantity(limits["cpu"])
    except QuantityError as exc:
        issues.append(PlanIssue(f"{path}.limits.cpu", str(exc)))
        return None


def _memory_limit(container: dict, path: str, issues: list[PlanIssue]) -> int | None:
    limits = (container.get("resources") or {}).get("limits") or {}
    if limits.get("memory") is None:
        return None
    try:
        return int(parse_quantity(limits["memory"]))
    except QuantityError as exc:
        issues.append(PlanIssue(f"{path}.limits.memory", str(exc)))
        return None


def _env(container: dict, path: str, issues: list[PlanIssue]) -> dict[str, str]:
    env: dict[str, str] = {}
    for index, entry in enumerate(container.get("env") or []):
        name = entry.get("name")
        if entry.get("valueFrom"):
            issues.append(PlanIssue(f"{path}[{index}].valueFrom", f"env {name}: valueFrom (secrets, config maps, field refs) is not available locally; set value"))
            continue
        env[str(name)] = str(entry.get("value", ""))
    return env


def _check_devices(workloads: list[Workload], machine: Machine, issues: list[PlanIssue], warnings: list[str]) -> None:
    """Check that the service's CUDA device claims fit the machine, never oversubscribing."""
    wanted = sum(workload.gpus_per_replica * workload.replicas for workload in workloads)
    if wanted == 0:
        return
    if machine.gpu_count == 0 and all(workload.engine in ("builtin", "sim") for workload in workloads):
        warnings.append(f"{wanted} {GPU_RESOURCE} requested but this machine has no CUDA device; replicas run on the CPU")
        for workload in workloads:
            workload.gpus_per_replica = 0
            workload.revision = _revision(workload)
        return
    if wanted > machine.gpu_count:
        issues.append(
            PlanIssue(
                "spec.template.containers[main].resources",
                f"{GPU_RESOURCE}: the service needs {wanted} devices in total and this machine has {machine.gpu_count}",
            )
        )


def _check_scheduler_config(resolved: Any, issues: list[PlanIssue]) -> None:
    """Validate the EndpointPickerConfig with the scheduler's own parser, when it is installed."""
    try:
        from llmisvc.scheduler import ConfigError, Datastore, Scheduler
    except ImportError:
        logger.warning("llmisvc.scheduler is not importable; scheduler config of %s/%s not checked", resolved.namespace, resolved.name)
        return
    try:
        # Building the scheduler (not only parsing) also checks each plugin's parameters.
        Scheduler.from_config(resolved.scheduler_config, shape=resolved.shape, datastore=Datastore(), model_name=resolved.model_name)
    except (ConfigError, ValueError, TypeError) as exc:
        issues.append(PlanIssue("spec.router.scheduler.config.inline", f"invalid EndpointPickerConfig: {exc}"))


def _revision(workload: Workload) -> str:
    """Digest of the fields that define a replica.

    The replica count and the thread share derived from it are left out, so scaling never
    restarts running replicas.
    """
    data = workload.to_dict()
    for key in ("replicas", "revision", "threads"):
        data.pop(key)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]
