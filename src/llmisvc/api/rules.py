"""Cross-field rules of an LLMInferenceService spec, checked after the structure is valid.

Each rule appends FieldErrors. Rules read the cleaned document defensively, because a
document with structural errors still gets its semantic errors reported in the same pass.
"""

from __future__ import annotations

import re
from typing import Any as AnyValue

from llmisvc.api.errors import FieldError
from llmisvc.api.quantity import parse_quantity
from llmisvc.api.route_rules import check_http_route
from llmisvc.api.uri import check_model_uri

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
IANA_SERVICE_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
MAX_NAME_LENGTH = 63
CONTAINER_LISTS = ("containers", "initContainers", "ephemeralContainers")
PROBES = ("livenessProbe", "readinessProbe", "startupProbe")
VOLUME_SOURCES = (
    "awsElasticBlockStore", "azureDisk", "azureFile", "cephfs", "cinder", "configMap", "csi",
    "downwardAPI", "emptyDir", "ephemeral", "fc", "flexVolume", "flocker", "gcePersistentDisk",
    "gitRepo", "glusterfs", "hostPath", "image", "iscsi", "nfs", "persistentVolumeClaim",
    "photonPersistentDisk", "portworxVolume", "projected", "quobyte", "rbd", "scaleIO", "secret",
    "storageos", "vsphereVolume",
)


def _dict(value: AnyValue) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value: AnyValue) -> list:
    return value if isinstance(value, list) else []


def dns1123_label_error(name: AnyValue) -> str | None:
    """Return why `name` is not a DNS-1123 label, or None when it is one."""
    if not isinstance(name, str):
        return None
    if len(name) > MAX_NAME_LENGTH:
        return f"must be at most {MAX_NAME_LENGTH} characters, got {len(name)} in {name!r}"
    if not DNS1123_LABEL.match(name):
        return (f"{name!r} is not a DNS-1123 label: use lowercase letters, digits and '-', "
                "starting and ending with a letter or digit")
    return None


def check_metadata(doc: dict, errors: list[FieldError]) -> None:
    """Check metadata.name (a DNS-1123 label), metadata.namespace and label syntax."""
    metadata = _dict(doc.get("metadata"))
    name = metadata.get("name")
    if name is None and "metadata" in doc:
        if not any(e.path.startswith("metadata.name") for e in errors):
            errors.append(FieldError("metadata.name", "required field is missing"))
    reason = dns1123_label_error(name)
    if reason:
        errors.append(FieldError("metadata.name", reason))
    reason = dns1123_label_error(metadata.get("namespace"))
    if reason:
        errors.append(FieldError("metadata.namespace", reason))
    check_labels(metadata.get("labels"), "metadata.labels", errors)
    check_annotation_keys(metadata.get("annotations"), "metadata.annotations", errors)


def _is_qualified_name(key: str) -> bool:
    prefix, slash, name = key.rpartition("/")
    if slash and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix)):
        return False
    return len(name) <= MAX_NAME_LENGTH and LABEL_NAME.match(name) is not None


def check_annotation_keys(annotations: AnyValue, path: str, errors: list[FieldError]) -> None:
    """Check that annotation keys are Kubernetes qualified names ([prefix/]name)."""
    for key in _dict(annotations):
        if isinstance(key, str) and not _is_qualified_name(key):
            errors.append(FieldError(f"{path}[{key}]", "invalid annotation key: use [prefix/]name with a "
                                                      "name of at most 63 alphanumerics, '-', '_' or '.'"))


def check_labels(labels: AnyValue, path: str, errors: list[FieldError]) -> None:
    """Check Kubernetes label keys ([prefix/]name) and values (at most 63 characters)."""
    for key, value in _dict(labels).items():
        if not isinstance(key, str):
            continue
        if not _is_qualified_name(key):
            errors.append(FieldError(f"{path}[{key}]", "invalid label key: use [prefix/]name with a "
                                                      "name of at most 63 alphanumerics, '-', '_' or '.'"))
        if isinstance(value, str) and (len(value) > MAX_NAME_LENGTH or not LABEL_VALUE.match(value)):
            errors.append(FieldError(f"{path}[{key}]", f"invalid label value {value!r}: at most 63 "
                                                      "alphanumerics, '-', '_' or '.'"))


def check_spec(spec: dict, errors: list[FieldError], check_route_paths: bool = True) -> None:
    """Check the cross-field rules of an LLMInferenceService (or config) spec.

    `check_route_paths` False skips the HTTPRoute path rules that KServe's v1alpha2 config
    CRD leaves out (see `route_rules.check_http_route`).
    """
    model = _dict(spec.get("model"))
    uri = model.get("uri")
    if isinstance(uri, str):
        reason = check_model_uri(uri)
        if reason:
            errors.append(FieldError("spec.model.uri", reason))
    if isinstance(model.get("name"), str) and not model["name"].strip():
        errors.append(FieldError("spec.model.name", "must not be empty; omit it to use metadata.name"))

    _check_workload(spec, "spec", errors)
    if isinstance(spec.get("prefill"), dict):
        _check_workload(spec["prefill"], "spec.prefill", errors)

    _check_router(_dict(spec.get("router")), errors, check_route_paths)
    _check_base_refs(spec.get("baseRefs"), errors)
    for key in ("labels",):
        check_labels(spec.get(key), f"spec.{key}", errors)


def _check_workload(workload: dict, path: str, errors: list[FieldError]) -> None:
    if "scaling" in workload and "replicas" in workload:
        errors.append(FieldError(f"{path}.scaling", f"must not be set together with {path}.replicas: "
                                                    "use replicas for a fixed count or scaling for autoscaling"))
    if isinstance(workload.get("scaling"), dict):
        _check_scaling(workload["scaling"], f"{path}.scaling", errors)

    parallelism = _dict(workload.get("parallelism"))
    data, local = parallelism.get("data"), parallelism.get("dataLocal")
    if isinstance(data, int) and isinstance(local, int) and data >= 1 and local >= 1:
        if local > data:
            errors.append(FieldError(f"{path}.parallelism.dataLocal",
                                     f"must be <= parallelism.data ({data}), got {local}"))
        elif data % local:
            errors.append(FieldError(f"{path}.parallelism.dataLocal",
                                     f"must divide parallelism.data ({data}) evenly, got {local}"))
    if isinstance(local, int) and data is None:
        errors.append(FieldError(f"{path}.parallelism.dataLocal", "needs parallelism.data to be set"))

    check_labels(workload.get("labels"), f"{path}.labels", errors)
    for pod_key in ("template", "worker"):
        if isinstance(workload.get(pod_key), dict):
            check_pod_spec(workload[pod_key], f"{path}.{pod_key}", errors)


def _check_scaling(scaling: dict, path: str, errors: list[FieldError]) -> None:
    low, high = scaling.get("minReplicas"), scaling.get("maxReplicas")
    if isinstance(low, int) and isinstance(high, int) and low > high:
        errors.append(FieldError(f"{path}.minReplicas", f"must be <= maxReplicas ({high}), got {low}"))
    if "wva" not in scaling:
        errors.append(FieldError(f"{path}.wva", "is required when scaling is set: it selects the autoscaler"))
        return
    wva = _dict(scaling["wva"])
    if "hpa" in wva and "keda" in wva:
        errors.append(FieldError(f"{path}.wva", "set either hpa or keda, not both"))
    elif "hpa" not in wva and "keda" not in wva:
        errors.append(FieldError(f"{path}.wva", "must set hpa or keda as the autoscaler backend"))

    keda = _dict(wva.get("keda"))
    idle = keda.get("idleReplicaCount")
    if idle is not None and low is None:
        errors.append(FieldError(f"{path}.minReplicas", "is required when wva.keda.idleReplicaCount is set"))
    elif isinstance(idle, int) and isinstance(low, int) and idle >= low:
        errors.append(FieldError(f"{path}.wva.keda.idleReplicaCount",
                                 f"must be < minReplicas ({low}), got {idle}"))
    advanced = _dict(keda.get("advanced"))
    modifiers = _dict(advanced.get("scalingModifiers"))
    if any(modifiers.get(key) for key in ("formula", "target", "activationTarget", "metricType")):
        errors.append(FieldError(f"{path}.wva.keda.advanced.scalingModifiers",
                                 "must not be set: the autoscaler controls the scaling formula"))
    if _dict(advanced.get("horizontalPodAutoscalerConfig")).get("name"):
        errors.append(FieldError(f"{path}.wva.keda.advanced.horizontalPodAutoscalerConfig.name",
                                 "must not be set: the controller names the HorizontalPodAutoscaler"))


def _check_pool_spec(pool_spec: dict, errors: list[FieldError]) -> None:
    path = "spec.router.scheduler.pool.spec"
    picker = _dict(pool_spec.get("endpointPickerRef"))
    if picker and picker.get("kind", "Service") == "Service" and "port" not in picker:
        errors.append(FieldError(f"{path}.endpointPickerRef.port", "is required when kind is Service"))
    numbers = [_dict(p).get("number") for p in _list(pool_spec.get("targetPorts"))]
    duplicates = sorted({n for n in numbers if isinstance(n, int) and numbers.count(n) > 1})
    if duplicates:
        errors.append(FieldError(f"{path}.targetPorts", f"port numbers must be unique, got {duplicates} twice"))


def _check_router(router: dict, errors: list[FieldError], check_route_paths: bool) -> None:
    scheduler = _dict(router.get("scheduler"))
    pool = _dict(scheduler.get("pool"))
    if "spec" in pool and "ref" in pool:
        errors.append(FieldError("spec.router.scheduler.pool", "set either spec (a managed InferencePool) or "
                                                               "ref (an existing one), not both"))
    config = _dict(scheduler.get("config"))
    if "inline" in config and "ref" in config:
        errors.append(FieldError("spec.router.scheduler.config", "set either inline or ref, not both"))
    if isinstance(pool.get("spec"), dict):
        _check_pool_spec(pool["spec"], errors)
    http = _dict(_dict(router.get("route")).get("http"))
    if "spec" in http and "refs" in http:
        errors.append(FieldError("spec.router.route.http", "set either spec (a managed HTTPRoute) or "
                                                           "refs (existing ones), not both"))
    if isinstance(http.get("spec"), dict):
        check_http_route(http["spec"], "spec.router.route.http.spec", errors, check_route_paths)
    for key in ("labels",):
        check_labels(scheduler.get(key), f"spec.router.scheduler.{key}", errors)
    if isinstance(scheduler.get("template"), dict):
        check_pod_spec(scheduler["template"], "spec.router.scheduler.template", errors)


def _check_base_refs(refs: AnyValue, errors: list[FieldError]) -> None:
    seen: set[str] = set()
    for i, ref in enumerate(_list(refs)):
        name = _dict(ref).get("name")
        if not isinstance(ref, dict):
            continue
        if not name:
            errors.append(FieldError(f"spec.baseRefs[{i}].name", "required field is missing"))
        elif name in seen:
            errors.append(FieldError(f"spec.baseRefs[{i}].name", f"duplicate baseRef {name!r}"))
        else:
            seen.add(name)


def check_pod_spec(pod: dict, path: str, errors: list[FieldError]) -> None:
    """Check a pod spec: unique container and volume names, ports, probes, env and resources."""
    # Duplicates within one list are schema errors (list maps); names must also be unique
    # across containers, initContainers and ephemeralContainers.
    names: dict[str, tuple[str, str]] = {}
    for list_key in CONTAINER_LISTS:
        for i, container in enumerate(_list(pod.get(list_key))):
            if not isinstance(container, dict):
                continue
            cpath = f"{path}.{list_key}[{i}]"
            name = container.get("name")
            if isinstance(name, str):
                if name in names and names[name][0] != list_key:
                    errors.append(FieldError(f"{cpath}.name", f"duplicate container name {name!r} "
                                                              f"(also at {names[name][1]})"))
                names.setdefault(name, (list_key, cpath))
                reason = dns1123_label_error(name)
                if reason:
                    errors.append(FieldError(f"{cpath}.name", reason))
            _check_container(container, cpath, errors)

    for i, volume in enumerate(_list(pod.get("volumes"))):
        if not isinstance(volume, dict):
            continue
        vpath = f"{path}.volumes[{i}]"
        sources = [s for s in VOLUME_SOURCES if s in volume]
        if len(sources) > 1:
            errors.append(FieldError(vpath, f"must have one volume source, got {', '.join(sources)}"))
    _check_resources(_dict(pod.get("resources")), f"{path}.resources", errors)


def _check_container(container: dict, path: str, errors: list[FieldError]) -> None:
    for i, env in enumerate(_list(container.get("env"))):
        env = _dict(env)
        if "value" in env and "valueFrom" in env:
            errors.append(FieldError(f"{path}.env[{i}]", "set either value or valueFrom, not both"))
        sources = list(_dict(env.get("valueFrom")))
        if "valueFrom" in env and len(sources) != 1:
            errors.append(FieldError(f"{path}.env[{i}].valueFrom",
                                     f"must have exactly one source, got {len(sources)}"))
        if env.get("name") == "":
            errors.append(FieldError(f"{path}.env[{i}].name", "must not be empty"))

    for probe_key in PROBES:
        probe = _dict(container.get(probe_key))
        for handler in ("httpGet", "tcpSocket", "grpc"):
            port = _dict(probe.get(handler)).get("port")
            _check_port_value(port, f"{path}.{probe_key}.{handler}.port", errors)
        handlers = [h for h in ("exec", "httpGet", "tcpSocket", "grpc") if h in probe]
        if len(handlers) > 1:
            errors.append(FieldError(f"{path}.{probe_key}", f"must have one handler, got {', '.join(handlers)}"))
        for field_name in ("periodSeconds", "timeoutSeconds", "failureThreshold", "successThreshold"):
            value = probe.get(field_name)
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                errors.append(FieldError(f"{path}.{probe_key}.{field_name}", f"must be >= 1, got {value}"))
        value = probe.get("initialDelaySeconds")
        if isinstance(value, int) and value < 0:
            errors.append(FieldError(f"{path}.{probe_key}.initialDelaySeconds", f"must be >= 0, got {value}"))
    _check_resources(_dict(container.get("resources")), f"{path}.resources", errors)


def _check_port_value(port: AnyValue, path: str, errors: list[FieldError]) -> None:
    if isinstance(port, bool) or port is None:
        return
    if isinstance(port, int) and not 1 <= port <= 65535:
        errors.append(FieldError(path, f"port must be between 1 and 65535, got {port}"))
    elif isinstance(port, str) and not port.isdigit() and (len(port) > 15 or not IANA_SERVICE_NAME.match(port)):
        errors.append(FieldError(path, f"{port!r} is not a port number or port name"))
    elif isinstance(port, str) and port.isdigit() and not 1 <= int(port) <= 65535:
        errors.append(FieldError(path, f"port must be between 1 and 65535, got {port}"))


def _check_resources(resources: dict, path: str, errors: list[FieldError]) -> None:
    limits, requests = _dict(resources.get("limits")), _dict(resources.get("requests"))
    for name, request in requests.items():
        if name not in limits:
            continue
        try:
            if parse_quantity(request) > parse_quantity(limits[name]):
                errors.append(FieldError(f"{path}.requests[{name}]",
                                         f"must be <= limits.{name} ({limits[name]}), got {request}"))
        except (ValueError, TypeError):
            continue  # already reported as an invalid quantity
