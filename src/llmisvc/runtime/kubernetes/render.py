"""Render a resolved LLMInferenceService into the Kubernetes objects KServe's controller
would create for it, with llmisvc's gateway, sidecar and engine images.

`render_manifests` is pure: the same input gives the same list in the same order. The
`llmisvc render --target kubernetes` command prints it; the operator applies it.
"""

from __future__ import annotations

from llmisvc.runtime.kubernetes.context import ServiceContext
from llmisvc.runtime.kubernetes.names import is_stopped
from llmisvc.runtime.kubernetes.options import RenderOptions
from llmisvc.runtime.kubernetes.router import http_route, inference_pool, scheduler_objects
from llmisvc.runtime.kubernetes.workload import main_workload, prefill_workload

DEFAULT_API_VERSION = "serving.kserve.io/v1alpha2"


def service_context(resolved, owner_uid: str | None = None,
                    options: RenderOptions | None = None) -> ServiceContext:
    """Return the rendering context for `resolved` (an `llmisvc.api.ResolvedService`).

    `owner_uid` defaults to `metadata.uid` of the resolved object, if it has one.
    """
    obj = resolved.obj
    metadata = obj.get("metadata") or {}
    return ServiceContext(
        name=resolved.name,
        namespace=resolved.namespace,
        api_version=obj.get("apiVersion") or DEFAULT_API_VERSION,
        kind=obj.get("kind") or "LLMInferenceService",
        uid=owner_uid or metadata.get("uid"),
        spec=obj.get("spec") or {},
        annotations=dict(metadata.get("annotations") or {}),
        model_uri=resolved.model_uri,
        model_name=resolved.model_name,
        shape=resolved.shape,
        scheduler_config=resolved.scheduler_config,
        options=options or RenderOptions(),
        scheduler_config_ref=getattr(resolved, "scheduler_config_ref", None),
    )


def render_context(ctx: ServiceContext) -> list[dict]:
    """Return every child object for `ctx`; none while the stop annotation is set."""
    if is_stopped(ctx.annotations):
        return []
    return (
        main_workload(ctx)
        + prefill_workload(ctx)
        + scheduler_objects(ctx)
        + inference_pool(ctx)
        + http_route(ctx)
    )


def render_manifests(resolved, owner_uid: str | None = None,
                     options: RenderOptions | None = None) -> list[dict]:
    """Render `resolved` (an `llmisvc.api.ResolvedService`) into Kubernetes object dicts.

    Children carry an owner reference to the service when `owner_uid` (or the resolved
    object's `metadata.uid`) is known. Raises ValueError for a spec that cannot be rendered
    (an unknown engine annotation, a malformed `pvc://` URI).
    """
    return render_context(service_context(resolved, owner_uid, options))
