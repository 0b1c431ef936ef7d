"""The LLMInferenceService and LLMInferenceServiceConfig field trees, per API version.

The accepted field set is that of KServe v0.20's CRDs for `serving.kserve.io/v1alpha1` and
`v1alpha2`. The versions differ in a few places. `model.criticality` exists only in
v1alpha1. `kvCacheOffloading`, `model.confidential` and some status fields exist only in
v1alpha2. The InferencePool spec under `router.scheduler.pool.spec` is the x-k8s.io
v1alpha2 one in v1alpha1 and the k8s.io v1 one in v1alpha2. A config's spec has the same
fields as a service's spec.
"""

from __future__ import annotations

import dataclasses
import functools

from llmisvc.api.kube_types import (
    GroupName, HorizontalPodAutoscalerBehavior, HTTPRouteSpec,
    InferencePoolSpecV1, InferencePoolSpecV1Alpha2, KindName, LocalObjectReference, NamespaceName, ObjectMeta,
    ObjectName, PersistentVolumeClaimSpec, PodSpec, SectionName,
)
from llmisvc.api.schema import (
    replace_at,
    Any, Bool, Int, Int64, Labels, Node, Quantity, Str, array, obj,
)

GROUP = "serving.kserve.io"
API_VERSIONS = (f"{GROUP}/v1alpha1", f"{GROUP}/v1alpha2")
SERVICE_KIND = "LLMInferenceService"
CONFIG_KIND = "LLMInferenceServiceConfig"
KINDS = (SERVICE_KIND, CONFIG_KIND)

Parallelism = obj(
    "ParallelismSpec",
    "How the model is split across devices and replicas.",
    data=Int.bounded(1).doc("Data-parallel size across all worker pods."),
    dataLocal=Int.bounded(1).doc("Data-parallel ranks per pod; at most `data`."),
    dataRPCPort=Int.bounded(1, 65535).doc("Port for data-parallel coordination."),
    expert=Bool.doc("Enable expert parallelism for mixture-of-experts models."),
    pipeline=Int.bounded(1).doc("Pipeline-parallel size."),
    tensor=Int.bounded(1).doc("Tensor-parallel size (devices per replica)."),
)
Scaling = obj(
    "ScalingSpec",
    "Autoscaling bounds; mutually exclusive with `replicas`. Refused in local mode.",
    required=("maxReplicas",),
    maxReplicas=Int.bounded(1),
    minReplicas=Int.bounded(1).defaulting(1),
    wva=obj(
        "WVASpec",
        "Workload Variant Autoscaler settings.",
        hpa=obj("HPASpec", behavior=HorizontalPodAutoscalerBehavior),
        keda=obj(
            "KEDASpec",
            advanced=obj(
                "AdvancedConfig",
                horizontalPodAutoscalerConfig=obj(
                    "HorizontalPodAutoscalerConfig", behavior=HorizontalPodAutoscalerBehavior, name=Str,
                ),
                restoreToOriginalReplicaCount=Bool,
                scalingModifiers=obj(
                    "ScalingModifiers",
                    activationTarget=Str,
                    formula=Str,
                    metricType=Str.one_of("AverageValue", "Value"),
                    target=Str,
                ),
            ),
            cooldownPeriod=Int.bounded(0),
            fallback=obj(
                "Fallback",
                required=("failureThreshold", "replicas"),
                behavior=Str.one_of(
                    "static", "currentReplicas", "currentReplicasIfHigher", "currentReplicasIfLower",
                ).defaulting("static"),
                failureThreshold=Int,
                replicas=Int,
            ),
            idleReplicaCount=Int.bounded(1),
            initialCooldownPeriod=Int.bounded(0),
            pollingInterval=Int.bounded(1),
        ),
        variantCost=Str.matching(r"^\d+(\.\d+)?$").defaulting("10.0"),
    ),
)
KVCacheOffloading = obj(
    "KVCacheOffloadingSpec",
    "KV-cache offloading to CPU memory and secondary storage. Refused in local mode.",
    required=("cpu",),
    cpu=Quantity.doc("CPU memory for offloaded KV blocks."),
    evictionPolicy=Str.one_of("lru", "arc").defaulting("lru"),
    secondary=array(obj(
        "SecondaryTier",
        fileSystem=obj(
            "FileSystemTier",
            emptyDir=obj("EmptyDirTier", required=("size",), size=Quantity),
            pvc=obj(
                "PVCTier",
                ref=obj("PVCReference", required=("name",), name=Str, path=Str),
                spec=PersistentVolumeClaimSpec,
            ),
        ),
    )),
)
Replicas = Int.bounded(0).doc("Number of model-server replicas (default 1).")
PodLabels = Labels.doc("Labels added to the workload's pods.")
PodAnnotations = Labels.doc("Annotations added to the workload's pods.")
Template = PodSpec.doc("Pod template of the workload; container `main` is the model server.")
Worker = PodSpec.doc("Pod template of multi-node workers (pipeline or data parallelism).")


def _model(version: str) -> Node:
    fields = dict(
        confidential=obj(
            "ConfidentialSpec", "Confidential-computing model protection. Refused in local mode.",
            required=("enabled",), enabled=Bool, resourceId=Str,
        ),
        lora=obj(
            "LoRASpec",
            "LoRA adapters served beside the base model. Refused by the built-in engine.",
            adapters=Any.doc("Adapter list (free-form)."),
            maxAdapters=Int.bounded(1),
            maxCpuAdapters=Int.bounded(1),
            maxRank=Int.bounded(1),
        ),
        name=Str.doc("Served model name; defaults to metadata.name."),
        uri=Str.doc("Model location: hf://org/name, pvc://claim/path, s3://, oci://, "
                    "file:///path or a plain path."),
    )
    if version == "v1alpha1":
        fields["criticality"] = Str.one_of("Critical", "Standard", "Sheddable").doc(
            "Request criticality used for admission under saturation."
        )
        del fields["confidential"]
    return obj("LLMModelSpec", "The model to serve.", required=("uri",), fields=dict(sorted(fields.items())))


def _router(version: str) -> Node:
    pool_spec = InferencePoolSpecV1 if version == "v1alpha2" else InferencePoolSpecV1Alpha2
    refs = array(obj("UntypedObjectReference", name=ObjectName, namespace=NamespaceName))
    return obj(
        "RouterSpec",
        "How requests reach the workloads: route, gateway and scheduler.",
        gateway=obj(
            "GatewaySpec",
            "The Gateway the route attaches to; `{}` means the platform's default gateway.",
            refs=array(obj(
                "UntypedObjectReference", name=ObjectName, namespace=NamespaceName, sectionName=SectionName,
            )),
        ),
        ingress=obj("IngressSpec", "Ingress objects to use instead of a Gateway (Kubernetes).", refs=refs),
        route=obj(
            "GatewayRoutesSpec",
            "The HTTP route to the service; `{}` means a managed route.",
            group=Str.matching(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$").length(1, 63),
            http=obj(
                "HTTPRouteSpecRef",
                refs=array(LocalObjectReference).doc("Existing HTTPRoutes to use (mutually exclusive with spec)."),
                spec=HTTPRouteSpec,
            ),
            weight=Int.bounded(0, 1000000),
        ),
        scheduler=obj(
            "SchedulerSpec",
            "The endpoint picker; `{}` means the default prefix-cache and load-aware scheduler.",
            annotations=Labels,
            config=obj(
                "SchedulerConfigSpec",
                "EndpointPickerConfig for the scheduler, inline or from a ConfigMap.",
                inline=obj("EndpointPickerConfig", "Inline EndpointPickerConfig.", open_fields=True),
                ref=obj("ConfigMapKeySelector", required=("key",), key=Str, name=Str.defaulting(""), optional=Bool),
            ),
            labels=Labels,
            pool=obj(
                "InferencePoolSpecRef",
                "The InferencePool: a managed one from `spec`, or an existing one by `ref`.",
                ref=LocalObjectReference,
                spec=pool_spec,
            ),
            replicas=Int.bounded(0).doc("Scheduler replicas (Kubernetes)."),
            template=PodSpec.doc("Pod template of the scheduler (Kubernetes)."),
        ),
    )


def _workload_fields(version: str) -> dict[str, Node]:
    fields = dict(
        annotations=PodAnnotations,
        kvCacheOffloading=KVCacheOffloading,
        labels=PodLabels,
        parallelism=Parallelism,
        replicas=Replicas,
        scaling=Scaling,
        template=Template,
        worker=Worker,
    )
    if version == "v1alpha1":
        del fields["kvCacheOffloading"]
    return fields


@functools.cache
def spec_schema(version: str) -> Node:
    """Return the spec tree of an LLMInferenceService (or config) for API version `version`.

    `version` is `v1alpha1` or `v1alpha2`; raises ValueError otherwise.
    """
    if version not in ("v1alpha1", "v1alpha2"):
        raise ValueError(f"unknown API version {version!r}")
    fields = dict(
        **_workload_fields(version),
        baseRefs=array(
            obj("LocalObjectReference", name=Str.defaulting("")),
            "LLMInferenceServiceConfig objects merged under this spec, in order.",
        ),
        model=_model(version),
        prefill=obj(
            "WorkloadSpec",
            "The prefill workload of a prefill/decode split; the top-level fields describe decode.",
            fields=dict(sorted(_workload_fields(version).items())),
        ),
        router=_router(version),
        storageInitializer=obj("StorageInitializerSpec", enabled=Bool.doc("Download the model in an init container.")),
        tracing=obj(
            "TracingSpec", "OpenTelemetry tracing. Refused in local mode.",
            exporter=Str, exporterEndpoint=Str, sampler=Str, samplerArg=Str,
        ),
    )
    return obj("LLMInferenceServiceSpec", "Desired state of the service.", fields=dict(sorted(fields.items())))


def _status_schema(version: str, kind: str) -> Node:
    condition = obj(
        "Condition",
        required=("status", "type"),
        lastTransitionTime=Str,
        message=Str,
        reason=Str,
        severity=Str,
        status=Str,
        type=Str,
    )
    common = dict(
        annotations=Labels,
        conditions=array(condition, "Conditions; Ready is the summary."),
        observedGeneration=Int64,
    )
    if kind == CONFIG_KIND:
        if version == "v1alpha2":
            common["referencedBy"] = array(obj("Reference", name=ObjectName, namespace=NamespaceName))
        return obj("LLMInferenceServiceConfigStatus", fields=common)

    typed_ref = obj(
        "ObjectReference", required=("group", "kind", "name"),
        group=GroupName, kind=KindName, name=ObjectName, namespace=NamespaceName,
    )
    addressable = dict(CACerts=Str, audience=Str, name=Str, url=Str)
    address = dict(addressable)
    if version == "v1alpha2":
        address.update(
            models=array(obj("ModelRef", required=("name",), name=Str)),
            origin=typed_ref,
        )
    router = dict(
        gateways=array(obj(
            "GatewayStatus",
            required=("group", "kind", "name"),
            group=GroupName,
            httpRoutes=array(typed_ref),
            kind=KindName,
            listeners=array(SectionName),
            name=ObjectName,
            namespace=NamespaceName,
        )),
        scheduler=obj("SchedulerStatus", inferencePool=typed_ref, service=typed_ref),
    )
    fields = dict(
        **common,
        address=obj("Addressable", fields=dict(addressable)),
        addresses=array(obj("Addressable", fields=dict(sorted(address.items())))),
        url=Str.doc("URL of the service."),
    )
    if version == "v1alpha2":
        router["group"] = obj(
            "RouterGroup",
            required=("name",),
            members=array(obj(
                "RouterGroupMember",
                required=("name", "weight"),
                backendRef=obj(
                    "BackendRef", required=("name",),
                    group=GroupName.defaulting(""), kind=KindName.defaulting("Service"), name=ObjectName,
                    namespace=NamespaceName, port=Int.bounded(1, 65535),
                ),
                name=Str,
                stopped=Bool,
                weight=Int,
            )).keyed("name"),
            name=Str,
        )
        workload = obj("WorkloadStatus", required=("kind", "name"), apiGroup=Str, kind=Str, name=Str,
                       readyReplicas=Int)
        fields["appliedConfigs"] = array(obj(
            "AppliedConfig", required=("name", "namespace", "source"),
            name=ObjectName, namespace=NamespaceName, source=Str.one_of("Preset", "UserRef"),
        ))
        fields["workloads"] = obj(
            "WorkloadsStatus",
            prefill=workload,
            primary=workload,
            scheduler=workload,
            service=obj("ServiceRef", required=("kind", "name"), apiGroup=Str, kind=Str, name=Str),
        )
    fields["router"] = obj("RouterStatus", fields=dict(sorted(router.items())))
    return obj("LLMInferenceServiceStatus", "Observed state, written by the controller.",
               fields=dict(sorted(fields.items())))


# Constraints that KServe v0.20's LLMInferenceServiceConfig CRD leaves out although the
# service CRD states them. Presets rely on this: they put template actions such as
# `{{ .GlobalConfig.GatewayNamespace }}` in such fields, and the rules apply again to the
# rendered, merged service.
CONFIG_UNCONSTRAINED: dict[str, dict[str, tuple[str, ...]]] = {
    "v1alpha1": {
        "router.route.http.spec.rules[].matches[].headers[].name": ("pattern",),
    },
    "v1alpha2": {
        "router.route.http.spec.parentRefs[].namespace": ("pattern",),
        "router.route.http.spec.rules[].matches[].headers[].name": ("pattern",),
        "router.scheduler.pool.spec.selector.matchLabels{}": ("pattern", "min_length", "max_length"),
    },
}
_UNSET = {"pattern": "", "min_length": None, "max_length": None}


@functools.cache
def config_spec_schema(version: str) -> Node:
    """Return the spec tree of an LLMInferenceServiceConfig for API version `version`."""
    spec = spec_schema(version)
    for path, attributes in CONFIG_UNCONSTRAINED[version].items():
        unset = {attribute: _UNSET[attribute] for attribute in attributes}
        spec = replace_at(spec, path, lambda node, unset=unset: dataclasses.replace(node, **unset))
    return spec


@functools.cache
def resource_schema(kind: str, version: str) -> Node:
    """Return the whole document tree (apiVersion, kind, metadata, spec, status) of `kind`.

    Raises ValueError for an unknown kind or version.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    return obj(
        kind,
        required=("apiVersion", "kind", "metadata"),
        apiVersion=Str.doc("serving.kserve.io/v1alpha1 or serving.kserve.io/v1alpha2."),
        kind=Str.doc(f"{SERVICE_KIND} or {CONFIG_KIND}."),
        metadata=ObjectMeta,
        spec=config_spec_schema(version) if kind == CONFIG_KIND else spec_schema(version),
        status=_status_schema(version, kind),
    )
