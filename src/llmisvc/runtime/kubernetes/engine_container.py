"""The model-server container of a workload pod: image, command and engine flags.

GPU templates (a container that requests `nvidia.com/gpu` or `amd.com/gpu`) default to vLLM
(`vllm serve`); other templates default to llmisvc's built-in engine. The annotation
`llmisvc.io/engine` (`llmisvc.io/prefill-engine` for the prefill pool) chooses explicitly:
`vllm`, `builtin` or `sim`.

Flags that follow from structured spec fields (model path, port, served model name,
parallelism, prefix caching, KV transfer for prefill/decode roles) are always generated. The
container's own `args` follow them, and a flag given in `args` replaces the generated one.
"""

from __future__ import annotations

import copy
import json

from llmisvc.api.resolve import DEFAULT_GLOBAL_CONFIG
from llmisvc.runtime.kubernetes.options import RenderOptions

ENGINE_ANNOTATION = "llmisvc.io/engine"
PREFILL_ENGINE_ANNOTATION = "llmisvc.io/prefill-engine"
ENGINES = ("vllm", "builtin", "sim")
GPU_RESOURCES = ("nvidia.com/gpu", "amd.com/gpu")

# The side channel port on which vLLM's NixlConnector serves KV block metadata.
NIXL_SIDE_CHANNEL_PORT = 5600
NIXL_KV_TRANSFER_CONFIG = {"kv_connector": "NixlConnector", "kv_role": "kv_both"}


def requests_gpu(container: dict) -> bool:
    """Return True when `container` requests or limits a GPU resource."""
    resources = container.get("resources") or {}
    for section in ("limits", "requests"):
        amounts = resources.get(section) or {}
        if any(str(amounts.get(name, "0")) not in ("0", "") for name in GPU_RESOURCES):
            return True
    return False


def choose_engine(container: dict, annotations: dict, role: str) -> str:
    """Return `vllm`, `builtin` or `sim` for a workload of `role` (`both`, `decode`, `prefill`).

    Raises ValueError for an annotation value outside ENGINES.
    """
    key = PREFILL_ENGINE_ANNOTATION if role == "prefill" else ENGINE_ANNOTATION
    chosen = annotations.get(key) or (
        annotations.get(ENGINE_ANNOTATION) if role == "prefill" else None
    )
    if chosen:
        if chosen not in ENGINES:
            raise ValueError(
                f"metadata.annotations[{key}]: must be one of {', '.join(ENGINES)}, got {chosen!r}"
            )
        return chosen
    return "vllm" if requests_gpu(container) else "builtin"


def _flag_name(arg: str) -> str | None:
    if not arg.startswith("--"):
        return None
    return arg.split("=", 1)[0]


def merge_flags(generated: list[str], user_args: list[str]) -> list[str]:
    """Return `generated` followed by `user_args`, minus generated flags the user also gives.

    Flags are `--name value` or `--name=value`; a generated flag followed by a value that does
    not start with `--` is removed together with that value.
    """
    user_flags = {_flag_name(a) for a in user_args} - {None}
    merged: list[str] = []
    skip_value = False
    for arg in generated:
        if skip_value:
            skip_value = False
            if not arg.startswith("--"):
                continue
        name = _flag_name(arg)
        if name in user_flags:
            skip_value = "=" not in arg
            continue
        merged.append(arg)
    return merged + list(user_args)


def lora_flags(lora: dict, adapter_paths: dict[str, str]) -> list[str]:
    """Return vLLM's LoRA flags for `spec.model.lora` with adapters at `adapter_paths`."""
    if not adapter_paths:
        return []
    flags = ["--enable-lora", "--lora-modules"]
    flags += [f"{name}={path}" for name, path in adapter_paths.items()]
    for field, flag in (("maxAdapters", "--max-loras"), ("maxCpuAdapters", "--max-cpu-loras"),
                        ("maxRank", "--max-lora-rank")):
        if lora.get(field):
            flags += [flag, str(lora[field])]
    return flags


def tracing_settings(tracing: dict, engine: str) -> tuple[list[str], list[dict]]:
    """Return (vLLM flags, env entries) that export OpenTelemetry traces per `spec.tracing`.

    Raises ValueError for tracing with an engine other than vLLM, or without an endpoint.
    """
    if not tracing:
        return [], []
    if engine != "vllm":
        raise ValueError(f"spec.tracing: request tracing needs the vllm engine, not {engine}")
    endpoint = tracing.get("exporterEndpoint")
    if not endpoint:
        raise ValueError("spec.tracing.exporterEndpoint: required to export traces")
    env = []
    for field, name in (("sampler", "OTEL_TRACES_SAMPLER"), ("samplerArg", "OTEL_TRACES_SAMPLER_ARG"),
                        ("exporter", "OTEL_TRACES_EXPORTER")):
        if tracing.get(field):
            env.append({"name": name, "value": str(tracing[field])})
    return ["--otlp-traces-endpoint", endpoint], env


def engine_flags(
    engine: str,
    *,
    model_path: str,
    port: int,
    served_model_name: str,
    parallelism: dict,
    role: str,
    lora: list[str] | None = None,
) -> tuple[list[str], list[str]]:
    """Return (command, generated args) for `engine` serving `served_model_name` on `port`.

    `role` is `both`, `decode` or `prefill`; the last two get KV-transfer configuration.
    `lora` is vLLM's LoRA flags (see `lora_flags`). Raises ValueError for LoRA flags with
    an engine other than vLLM.
    """
    if lora and engine != "vllm":
        raise ValueError(f"spec.model.lora: LoRA adapters need the vllm engine, not {engine}; "
                         f"request a GPU or set the llmisvc.io/engine annotation to vllm")
    split = role in ("decode", "prefill")
    if engine == "vllm":
        command = ["vllm", "serve", model_path]
        args = ["--port", str(port), "--served-model-name", served_model_name]
        for field, flag in (
            ("tensor", "--tensor-parallel-size"),
            ("pipeline", "--pipeline-parallel-size"),
            ("data", "--data-parallel-size"),
            ("dataLocal", "--data-parallel-size-local"),
            ("dataRPCPort", "--data-parallel-rpc-port"),
        ):
            if parallelism.get(field):
                args += [flag, str(parallelism[field])]
        if parallelism.get("expert"):
            args.append("--enable-expert-parallel")
        args.append("--enable-prefix-caching")
        if split:
            args += ["--kv-transfer-config", json.dumps(NIXL_KV_TRANSFER_CONFIG, separators=(",", ":"))]
        return command, args + list(lora or [])

    command = ["llmisvc", "engine" if engine == "builtin" else "sim"]
    args = [
        "--model", model_path,
        "--host", "0.0.0.0",
        "--port", str(port),
        "--served-model-name", served_model_name,
        "--enable-prefix-caching",
    ]
    if split:
        args += ["--kv-transfer-config", json.dumps(NIXL_KV_TRANSFER_CONFIG, separators=(",", ":"))]
    return command, args


def _set_env(container: dict, name: str, entry: dict) -> None:
    env = container.setdefault("env", [])
    if not any(item.get("name") == name for item in env):
        env.append({"name": name, **entry})


def engine_container(
    template_container: dict,
    *,
    engine: str,
    model_path: str,
    port: int,
    served_model_name: str,
    parallelism: dict,
    role: str,
    options: RenderOptions,
    lora: list[str] | None = None,
    tracing: dict | None = None,
) -> dict:
    """Return the `main` container for a workload pod, built on the template's container.

    The template's image is kept when the user set it. When it is unset or the presets'
    placeholder engine image, the chosen engine's image is used. A template `command` is kept
    as written, because the user runs their own server. Otherwise the engine command and the
    generated flags are set.
    Probes default to `GET /health` on the engine port when the template has none.
    """
    container = copy.deepcopy(template_container)
    container["name"] = "main"
    if container.get("image") in (None, "", DEFAULT_GLOBAL_CONFIG["EngineImage"]):
        container["image"] = options.vllm_image if engine == "vllm" else options.llmisvc_image

    command, generated = engine_flags(
        engine,
        model_path=model_path,
        port=port,
        served_model_name=served_model_name,
        parallelism=parallelism,
        role=role,
        lora=lora,
    )
    trace_flags, trace_env = tracing_settings(tracing or {}, engine)
    generated += trace_flags
    if not container.get("command"):
        container["command"] = command
        container["args"] = merge_flags(generated, container.get("args") or [])
    for entry in trace_env:
        _set_env(container, entry["name"], {"value": entry["value"]})

    container["ports"] = [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    _set_env(container, "POD_IP", {"valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    # Both vLLM and the built-in engine read the KV side channel's address from these
    # variables; without them the built-in engine would listen on 127.0.0.1 only.
    if role in ("decode", "prefill"):
        _set_env(container, "VLLM_NIXL_SIDE_CHANNEL_HOST",
                 {"valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
        _set_env(container, "VLLM_NIXL_SIDE_CHANNEL_PORT", {"value": str(NIXL_SIDE_CHANNEL_PORT)})

    health = {"httpGet": {"path": "/health", "port": port, "scheme": "HTTP"}}
    container.setdefault(
        "readinessProbe", {**health, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3}
    )
    # Loading large weights can take many minutes, so liveness waits for startup to finish.
    container.setdefault(
        "startupProbe", {**health, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 180}
    )
    container.setdefault(
        "livenessProbe", {**health, "periodSeconds": 30, "timeoutSeconds": 10, "failureThreshold": 5}
    )
    return container
