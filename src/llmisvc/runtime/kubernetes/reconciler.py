"""Reconcile one LLMInferenceService on a cluster: resolve, render, server-side apply, delete
children the spec no longer needs, observe, and write status.

Every call works from the current state of the API server (level-triggered), so running it
again after any event, missed or not, converges.
"""

from __future__ import annotations

import asyncio
import logging

from llmisvc.api import resolve
from llmisvc.api.errors import SpecError
from llmisvc.api.load import load_document
from llmisvc.runtime.kubernetes import status as st
from llmisvc.runtime.kubernetes.client import ApiError, KubeClient
from llmisvc.runtime.kubernetes.names import MANAGED_BY, MANAGED_BY_LABEL, PART_OF, is_stopped
from llmisvc.runtime.kubernetes.options import RenderOptions
from llmisvc.runtime.kubernetes.render import render_context, service_context
from llmisvc.runtime.kubernetes.router import has_scheduler

logger = logging.getLogger(__name__)

SERVICE_API = "serving.kserve.io/v1alpha2"
SERVICE_KIND = "LLMInferenceService"
CONFIG_KIND = "LLMInferenceServiceConfig"

# Every kind rendering can produce, in the order children are deleted when no longer needed.
CHILD_KINDS = [
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
    ("inference.networking.k8s.io/v1", "InferencePool"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("apps/v1", "Deployment"),
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"),
    ("v1", "Service"),
    ("v1", "ConfigMap"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("v1", "ServiceAccount"),
]


def children_selector(name: str) -> str:
    """Return the label selector of every child the operator applied for service `name`."""
    return (f"app.kubernetes.io/name={name},app.kubernetes.io/part-of={PART_OF},"
            f"{MANAGED_BY_LABEL}={MANAGED_BY}")


def _resource(obj: dict):
    """Validate a stored object as an llmisvc Resource (server-set metadata removed)."""
    cleaned = {key: value for key, value in obj.items() if key != "status"}
    meta = dict(cleaned.get("metadata") or {})
    for key in ("managedFields", "resourceVersion", "generation", "creationTimestamp", "uid",
                "deletionTimestamp", "deletionGracePeriodSeconds", "finalizers", "ownerReferences",
                "selfLink"):
        meta.pop(key, None)
    cleaned["metadata"] = meta
    resource, errors = load_document(cleaned)
    if errors and cleaned.get("apiVersion") == SERVICE_API:
        # Without a conversion webhook the API server returns a v1alpha1 object unchanged
        # under v1alpha2, so a v1alpha1-only field (model.criticality) is valid as v1alpha1.
        resource, _ = load_document({**cleaned, "apiVersion": "serving.kserve.io/v1alpha1"})
    if resource is None:
        raise SpecError(errors)
    return resource


class Reconciler:
    """Reconciles services against one API server; safe to call concurrently.

    `system_namespace` contains LLMInferenceServiceConfig objects that every namespace may use
    as `baseRefs` (KServe keeps its presets in its own namespace the same way).
    """

    def __init__(self, client: KubeClient, options: RenderOptions | None = None,
                 system_namespace: str | None = None):
        self.client = client
        self.options = options or RenderOptions()
        self.system_namespace = system_namespace
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        # (namespace, name) of each service -> Gateways its route attached to at the last pass.
        self.gateways: dict[tuple[str, str], set[tuple[str, str]]] = {}

    def _lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self._locks.setdefault((namespace, name), asyncio.Lock())

    async def _configs(self, namespace: str) -> dict:
        configs = {}
        namespaces = [self.system_namespace, namespace] if self.system_namespace else [namespace]
        for config_namespace in namespaces:
            try:
                items, _ = await self.client.list(SERVICE_API, CONFIG_KIND, config_namespace)
            except ApiError as error:
                if error.status != 404:
                    raise
                items = []
            for item in items:
                try:
                    resource = _resource(item)
                except SpecError as error:
                    logger.warning("ignoring invalid %s %s/%s: %s", CONFIG_KIND, config_namespace,
                                   item["metadata"]["name"], error)
                    continue
                configs[resource.name] = resource
        return configs

    async def reconcile(self, namespace: str, name: str) -> None:
        """Bring the children and status of service `namespace/name` up to date.

        Raises SpecError for a spec that does not resolve (status is written first) and
        ApiError when the API server rejects a request.
        """
        async with self._lock(namespace, name):
            service = await self.client.get(SERVICE_API, SERVICE_KIND, namespace, name)
            if service is None or service["metadata"].get("deletionTimestamp"):
                return
            await self._reconcile(service)

    async def _reconcile(self, service: dict) -> None:
        meta = service["metadata"]
        namespace, name, uid = meta.get("namespace", "default"), meta["name"], meta["uid"]
        try:
            resolved = resolve(_resource(service), await self._configs(namespace))
            ctx = service_context(resolved, owner_uid=uid, options=self.options)
            desired = render_context(ctx)
        except (SpecError, ValueError) as error:
            failed = st.Condition("PresetsCombined", "False", "InvalidSpec", str(error))
            await self._write_status(service, [failed, st.Condition("Ready", "False", "InvalidSpec", str(error))])
            raise

        for obj in desired:
            try:
                await self.client.apply(obj)
            except ApiError as error:
                # A 404 here usually means the kind's CRD (LeaderWorkerSet, Gateway API) is
                # not installed; the message names the object so the user can tell.
                message = f"applying {obj['kind']} {namespace}/{obj['metadata']['name']} failed: {error}"
                await self._write_status(service, [st.Condition("Ready", "False", "ReconcileError", message)])
                raise
        await self.prune(namespace, name, uid, desired)
        logger.info("reconciled %s/%s: %d children applied", namespace, name, len(desired))

        conditions, url, addresses = await self.observe(ctx, desired)
        await self._write_status(service, conditions, url, addresses)

    async def prune(self, namespace: str, name: str, uid: str, desired: list[dict]) -> int:
        """Delete children of `uid` that are not in `desired`; return how many were deleted."""
        keep = {(obj["kind"], obj["metadata"]["name"]) for obj in desired}
        deleted = 0
        for api_version, kind in CHILD_KINDS:
            try:
                items, _ = await self.client.list(api_version, kind, namespace, children_selector(name))
            except ApiError as error:
                if error.status == 404:  # the kind's CRD is not installed
                    continue
                raise
            for item in items:
                owners = item["metadata"].get("ownerReferences") or []
                if (kind, item["metadata"]["name"]) in keep or not any(o.get("uid") == uid for o in owners):
                    continue
                if await self.client.delete(api_version, kind, namespace, item["metadata"]["name"]):
                    logger.info("deleted %s %s/%s: no longer in the spec of %s", kind, namespace,
                                item["metadata"]["name"], name)
                    deleted += 1
        return deleted

    async def observe(self, ctx, desired: list[dict]) -> tuple[list[st.Condition], str | None, list[dict]]:
        """Return (conditions, url, addresses) read from the children on the API server."""
        if is_stopped(ctx.annotations):
            types = ["MainWorkloadReady"] + (["PrefillWorkloadReady"] if ctx.spec.get("prefill") is not None else [])
            if (ctx.spec.get("router") or {}).get("route") is not None:
                types += ["GatewaysReady", "HTTPRoutesReady"]
            if has_scheduler(ctx):
                types += ["SchedulerWorkloadReady"]
            self.gateways[(ctx.namespace, ctx.name)] = set()
            return st.stopped(types), None, []

        by_name = {(obj["kind"], obj["metadata"]["name"]): obj for obj in desired}
        names = ctx.names
        observed: list[st.Condition] = []

        async def workload(condition_type: str, deployment: str, lws: str) -> None:
            if ("Deployment", deployment) in by_name:
                current = await self.client.get("apps/v1", "Deployment", ctx.namespace, deployment)
            elif ("LeaderWorkerSet", lws) in by_name:
                current = await self.client.get("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet",
                                                ctx.namespace, lws)
            else:
                return
            observed.append(st.workload_condition(condition_type, current))

        await workload("MainWorkloadReady", names.main, names.multi_node)
        await workload("PrefillWorkloadReady", names.prefill, names.multi_node_prefill)
        await workload("SchedulerWorkloadReady", names.scheduler, "")

        routes, gateways = await self._observe_routes(ctx, by_name.get(("HTTPRoute", names.route)))
        if routes or gateways:
            observed.append(st.gateways_condition(gateways))
        if routes:
            observed.append(st.route_condition(routes))
        self.gateways[(ctx.namespace, ctx.name)] = set(gateways)

        managed = by_name.get(("HTTPRoute", names.route))
        hostnames = (managed or {}).get("spec", {}).get("hostnames")
        url, addresses = st.gateway_url(gateways, f"/{ctx.namespace}/{ctx.name}", hostnames)
        return st.aggregate(observed), url, addresses

    async def _observe_routes(self, ctx, managed: dict | None):
        """Return the routes to evaluate, as (namespace, name, route or None), and the Gateways
        they and `router.gateway.refs` name, as {(namespace, name): gateway or None}.

        The routes are the managed route and those in `router.route.http.refs`, as KServe's
        controller evaluates both.
        """
        api = "gateway.networking.k8s.io/v1"
        router = ctx.spec.get("router") or {}
        keys = []
        if managed is not None:
            keys.append((ctx.namespace, ctx.names.route))
        for ref in ((router.get("route") or {}).get("http") or {}).get("refs") or []:
            keys.append((ref.get("namespace") or ctx.namespace, ref["name"]))

        routes = []
        gateway_keys = [(ref.get("namespace") or ctx.namespace, ref["name"])
                        for ref in (router.get("gateway") or {}).get("refs") or []]
        for namespace, name in keys:
            route = await self.client.get(api, "HTTPRoute", namespace, name)
            routes.append((namespace, name, route))
            spec = route or (managed if name == ctx.names.route else None) or {}
            for parent in (spec.get("spec") or {}).get("parentRefs") or []:
                if parent.get("kind", "Gateway") == "Gateway":
                    gateway_keys.append((parent.get("namespace") or namespace, parent["name"]))

        gateways = {}
        for key in gateway_keys:
            if key not in gateways:
                gateways[key] = await self.client.get(api, "Gateway", *key)
        return routes, gateways

    async def _write_status(self, service: dict, conditions: list[st.Condition],
                            url: str | None = None, addresses: list[dict] | None = None) -> None:
        current = service.get("status") or {}
        meta = service["metadata"]
        new = {
            "observedGeneration": meta.get("generation"),
            "conditions": st.to_status_conditions(conditions, current.get("conditions") or []),
            "url": url,
            "addresses": addresses or None,
        }
        if all(current.get(key) == value for key, value in new.items()):
            return
        await self.client.patch_status(SERVICE_API, SERVICE_KIND, meta.get("namespace", "default"),
                                       meta["name"], new)

    async def cleanup(self, namespace: str, name: str, uid: str) -> None:
        """Delete every child of the service (the finalizer step before it goes away)."""
        async with self._lock(namespace, name):
            deleted = await self.prune(namespace, name, uid, [])
            self.gateways.pop((namespace, name), None)
            logger.info("cleaned up %s/%s: %d children deleted", namespace, name, deleted)

    def services_behind_gateway(self, namespace: str, name: str) -> list[tuple[str, str]]:
        """Return the services whose routes attached to Gateway `namespace/name` last time."""
        return [key for key, gateways in self.gateways.items() if (namespace, name) in gateways]
