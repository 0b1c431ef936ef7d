"""Resolution of an LLMInferenceService into the merged, defaulted, rendered desired state.

`resolve` merges the presets chosen by the spec's shape, then the service's `baseRefs` in
order, then the service's own spec. It then renders template actions, defaults
`model.name`, moves a scheduler EndpointPickerConfig passed as container args into
`config.inline` and fills in the CRD's defaults for absent fields. Last it validates the
result again, because a merge can produce combinations that no single layer had.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

from llmisvc.api import presets as preset_data
from llmisvc.api.defaults import apply_defaults
from llmisvc.api.errors import FieldError, SpecError
from llmisvc.api.load import DEFAULT_NAMESPACE, Resource
from llmisvc.api.merge import merge_layers
from llmisvc.api.scheduler_config import move_config_text_to_inline
from llmisvc.api.status import stop_requested
from llmisvc.api.templates import TemplateContext, render_object
from llmisvc.api.types import CONFIG_KIND, SERVICE_KIND, resource_schema, spec_schema
from llmisvc.api.validate import validate_document

logger = logging.getLogger(__name__)

MAIN_CONTAINER = "main"
DEFAULT_CRITICALITY = "Standard"

# `.GlobalConfig` keys available to templates, with the values used when the caller passes
# none. The presets put these images in Kubernetes manifests, and the local runtime ignores them.
DEFAULT_GLOBAL_CONFIG: dict[str, str] = {
    "EngineImage": "docker.io/vllm/vllm-openai:latest",
    "SchedulerImage": "ghcr.io/llm-d/llm-d-inference-scheduler:latest",
    "SidecarImage": "ghcr.io/llm-d/llm-d-routing-sidecar:latest",
    "GatewayName": "kserve-ingress-gateway",
    "GatewayNamespace": "kserve",
}


@dataclass
class ResolvedService:
    """The desired state of one LLMInferenceService after presets, baseRefs and templates.

    `obj` is the merged document, and the other fields are read from it for convenience.
    `shape` is "scheduler", "no-scheduler" or "pd". `scheduler_config` is the
    EndpointPickerConfig dict, or None for the shape's default profile.
    `scheduler_config_ref` is `router.scheduler.config.ref` (a ConfigMap key) and
    `scheduler_config_file` is a `--config-file` path from the scheduler's args. Both are
    None when unused.
    """

    name: str
    namespace: str
    api_version: str
    obj: dict
    model_uri: str
    model_name: str
    replicas: int | None
    prefill_replicas: int | None
    shape: str
    labels: dict[str, str]
    annotations: dict[str, str]
    main_container: dict
    prefill_container: dict | None
    scheduler_config: dict | None
    criticality: str
    applied_presets: list[str] = field(default_factory=list)
    applied_base_refs: list[str] = field(default_factory=list)
    scheduler_config_ref: dict | None = None
    scheduler_config_file: str | None = None

    @property
    def spec(self) -> dict:
        """Return the merged spec."""
        return self.obj["spec"]

    @property
    def stopped(self) -> bool:
        """Return True when the `serving.kserve.io/stop: "true"` annotation is set."""
        return stop_requested(self.obj.get("metadata", {}).get("annotations"))

    def applied_configs(self) -> list[dict]:
        """Return `status.appliedConfigs` entries: presets first, then baseRefs, in merge order."""
        entries = [{"name": n, "namespace": self.namespace, "source": "Preset"} for n in self.applied_presets]
        entries += [{"name": n, "namespace": self.namespace, "source": "UserRef"} for n in self.applied_base_refs]
        return entries


def service_shape(spec: dict) -> str:
    """Return the deployment shape of a spec: "pd", "scheduler" or "no-scheduler"."""
    if spec.get("prefill") is not None:
        return "pd"
    if (spec.get("router") or {}).get("scheduler") is not None:
        return "scheduler"
    return "no-scheduler"


def resolve(
    service: Resource,
    configs: dict[str, Resource] | None = None,
    global_config: dict[str, str] | None = None,
) -> ResolvedService:
    """Merge, render and validate `service` into a ResolvedService.

    `configs` maps names to LLMInferenceServiceConfig resources that `baseRefs` may name
    (a config named like a preset replaces that preset). `global_config` adds to or
    overrides DEFAULT_GLOBAL_CONFIG for `{{ .GlobalConfig.* }}` actions.
    Raises SpecError for a missing baseRef, a template error or an invalid merged spec.
    """
    if service.kind != SERVICE_KIND:
        raise SpecError.single("kind", f"must be {SERVICE_KIND} to resolve, got {service.kind}")
    configs = configs or {}
    base_layers, base_names = _base_ref_layers(service, configs)

    # The shape is read after baseRefs, because a baseRef may add a scheduler or prefill.
    shape_spec = merge_layers(base_layers + [service.spec])
    preset_names = preset_data.select_presets(shape_spec)
    shipped = preset_data.load_presets()
    preset_layers = []
    for name in preset_names:
        override = configs.get(name)
        preset_layers.append((override if override is not None and override.kind == CONFIG_KIND else shipped[name]).spec)

    merged = merge_layers(preset_layers + base_layers + [service.spec])
    merged.pop("baseRefs", None)
    if service.spec.get("baseRefs"):
        merged["baseRefs"] = copy.deepcopy(service.spec["baseRefs"])
    # The service's own fields come first, in its order, so `render` reads like the input.
    spec = {key: merged[key] for key in service.spec if key in merged}
    spec.update((key, value) for key, value in merged.items() if key not in spec)
    _attach_route_to_gateways(spec, shape_spec)

    metadata = copy.deepcopy(service.obj.get("metadata") or {})
    metadata.setdefault("namespace", service.namespace or DEFAULT_NAMESPACE)
    model = spec.setdefault("model", {})
    model.setdefault("name", service.name)
    document = {"apiVersion": service.api_version, "kind": SERVICE_KIND, "metadata": metadata, "spec": spec}

    context = TemplateContext(document, {**DEFAULT_GLOBAL_CONFIG, **(global_config or {})})
    document["spec"] = render_object(spec, context, "spec")
    config_file = move_config_text_to_inline(document["spec"])
    apply_defaults(document["spec"], spec_schema(service.version))

    document, errors = validate_document(document, resource_schema(SERVICE_KIND, service.version))
    # The resolved checks explain merge-specific problems better, so they replace a plain
    # "required field is missing" at the same path.
    resolved_errors = _check_resolved(document.get("spec") or {})
    replaced = {e.path for e in resolved_errors}
    errors = [e for e in errors if e.path not in replaced] + resolved_errors
    if errors:
        raise SpecError(errors)

    logger.debug("resolved %s/%s: presets %s, baseRefs %s", service.namespace, service.name,
                 preset_names, base_names)
    return _build(service, document, preset_names, base_names, config_file)


def _base_ref_layers(service: Resource, configs: dict[str, Resource]) -> tuple[list[dict], list[str]]:
    layers, names, errors = [], [], []
    for i, ref in enumerate(service.spec.get("baseRefs") or []):
        name = ref.get("name")
        config = configs.get(name)
        if config is None or config.kind != CONFIG_KIND:
            errors.append(FieldError(
                f"spec.baseRefs[{i}].name",
                f"LLMInferenceServiceConfig {name!r} not found in namespace {service.namespace!r}: "
                "apply it first or remove the reference",
            ))
            continue
        layers.append(config.spec)
        names.append(name)
    if errors:
        raise SpecError(errors)
    return layers, names


def _attach_route_to_gateways(spec: dict, user_spec: dict) -> None:
    """Point a managed route's parentRefs at `router.gateway.refs` when the user names gateways.

    The route presets attach to the platform's default gateway. A service that names its own
    gateways expects its route there instead, unless it set parentRefs itself (`user_spec`
    is the merge of its baseRefs and its own spec).
    """
    router = spec.get("router") or {}
    gateway_refs = (router.get("gateway") or {}).get("refs") or []
    route_spec = ((router.get("route") or {}).get("http") or {}).get("spec")
    user_route_spec = (((user_spec.get("router") or {}).get("route") or {}).get("http") or {}).get("spec") or {}
    if not gateway_refs or route_spec is None or user_route_spec.get("parentRefs"):
        return
    parents = []
    for ref in gateway_refs:
        parent = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": ref.get("name", "")}
        for key in ("namespace", "sectionName"):
            if ref.get(key):
                parent[key] = ref[key]
        parents.append(parent)
    route_spec["parentRefs"] = parents


def _check_resolved(spec: dict) -> list[FieldError]:
    errors: list[FieldError] = []
    if not (spec.get("model") or {}).get("uri"):
        errors.append(FieldError("spec.model.uri", "required field is missing: set it in the service or a baseRef"))
    for workload_path, workload in (("spec", spec), ("spec.prefill", spec.get("prefill"))):
        if not isinstance(workload, dict):
            continue
        template = workload.get("template") or {}
        if not any(c.get("name") == MAIN_CONTAINER for c in template.get("containers") or []):
            errors.append(FieldError(f"{workload_path}.template.containers",
                                     f"needs a container named {MAIN_CONTAINER!r} (the model server)"))
        for pod_key in ("template", "worker"):
            errors += _check_mounts(workload.get(pod_key) or {}, f"{workload_path}.{pod_key}")
    return errors


def _check_mounts(pod: dict, path: str) -> list[FieldError]:
    volumes = {v.get("name") for v in pod.get("volumes") or []}
    errors = []
    for list_key in ("initContainers", "containers"):
        for i, container in enumerate(pod.get(list_key) or []):
            for j, mount in enumerate(container.get("volumeMounts") or []):
                if mount.get("name") not in volumes:
                    errors.append(FieldError(f"{path}.{list_key}[{i}].volumeMounts[{j}].name",
                                             f"volume {mount.get('name')!r} is not defined in {path}.volumes"))
    return errors


def _container(pod: dict | None, name: str) -> dict | None:
    for container in (pod or {}).get("containers") or []:
        if container.get("name") == name:
            return container
    return None


def _build(service: Resource, document: dict, preset_names: list[str], base_names: list[str],
           config_file: str | None) -> ResolvedService:
    spec = document["spec"]
    prefill = spec.get("prefill")
    scheduler = (spec.get("router") or {}).get("scheduler") or {}
    config = scheduler.get("config") or {}
    model = spec["model"]
    return ResolvedService(
        name=service.name,
        namespace=service.namespace,
        api_version=service.api_version,
        obj=document,
        model_uri=model["uri"],
        model_name=model["name"],
        replicas=spec.get("replicas"),
        prefill_replicas=(prefill.get("replicas", 1) if prefill is not None else None),
        shape=service_shape(spec),
        labels=dict(spec.get("labels") or {}),
        annotations=dict(spec.get("annotations") or {}),
        main_container=_container(spec.get("template"), MAIN_CONTAINER) or {},
        prefill_container=_container((prefill or {}).get("template"), MAIN_CONTAINER) if prefill is not None else None,
        scheduler_config=config.get("inline"),
        criticality=model.get("criticality", DEFAULT_CRITICALITY),
        applied_presets=preset_names,
        applied_base_refs=base_names,
        scheduler_config_ref=config.get("ref"),
        scheduler_config_file=config_file,
    )
