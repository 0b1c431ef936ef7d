"""The llmisvc operator: kopf handlers that reconcile LLMInferenceService objects.

- LLMInferenceService create, update, resume and a periodic timer: reconcile (resolve, render,
  server-side apply, delete children no longer needed, write status).
- LLMInferenceService delete: the finalizer `serving.kserve.io/llmisvc-finalizer` keeps the
  object until every child is deleted.
- LLMInferenceServiceConfig events: reconcile the services of that namespace (all services
  for configs in the system namespace), because their merged spec may have changed.
- Deployments, HTTPRoutes and Gateways are watched by re-listing reflectors: any change,
  including a deletion found only by the re-list after a watch reconnect, reconciles the
  owning service, so status follows what the cluster reports and deleted children come back.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import kopf

from llmisvc.api.errors import SpecError
from llmisvc.runtime.kubernetes.client import ApiError, KubeClient
from llmisvc.runtime.kubernetes.names import MANAGED_BY, MANAGED_BY_LABEL, PART_OF
from llmisvc.runtime.kubernetes.options import RenderOptions
from llmisvc.runtime.kubernetes.reconciler import CONFIG_KIND, SERVICE_API, SERVICE_KIND, Reconciler
from llmisvc.runtime.kubernetes.reflector import Reflector

logger = logging.getLogger(__name__)

GROUP = "serving.kserve.io"
SERVICES = "llminferenceservices"
CONFIGS = "llminferenceserviceconfigs"
FINALIZER = "serving.kserve.io/llmisvc-finalizer"
ANNOTATION_PREFIX = "llmisvc.io"
# Delay before kopf retries a handler after the API server rejected a request.
RETRY_DELAY_SECONDS = 10


@dataclass
class OperatorConfig:
    """Operator settings from the command line."""

    namespaces: list[str] = field(default_factory=list)
    system_namespace: str | None = None
    resync_seconds: float = 60.0
    watch_timeout: int = 300
    liveness_endpoint: str | None = None
    options: RenderOptions = field(default_factory=RenderOptions)


def connection_info(settings) -> kopf.ConnectionInfo:
    """Return API credentials: the pod's service account in a cluster, else the kubeconfig.

    Raises kopf.LoginError when neither is available.
    """
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.LoginError("no service account token and no kubeconfig found")
    return info


class OperatorState:
    """Long-lived operator state, created at start-up: the client, the reconciler, the child
    reflectors and the reconcile requests in flight."""

    def __init__(self, config: OperatorConfig):
        self.config = config
        self.client: KubeClient | None = None
        self.reconciler: Reconciler | None = None
        self.tasks: list[asyncio.Task] = []
        self.reflectors: list[Reflector] = []
        self._running: dict[tuple[str, str], asyncio.Task] = {}
        self._again: set[tuple[str, str]] = set()

    def request(self, namespace: str, name: str) -> None:
        """Schedule a reconcile of `namespace/name`; requests during a run coalesce into one
        more run."""
        key = (namespace, name)
        if key in self._running:
            self._again.add(key)
            return
        self._running[key] = asyncio.create_task(self._run(key))

    async def _run(self, key: tuple[str, str]) -> None:
        try:
            while True:
                self._again.discard(key)
                try:
                    await self.reconciler.reconcile(*key)
                except (SpecError, ValueError) as error:
                    logger.warning("invalid spec for %s/%s: %s", *key, error)
                except (ApiError, OSError, asyncio.TimeoutError) as error:
                    logger.warning("reconcile of %s/%s failed: %s", *key, error)
                if key not in self._again:
                    return
        finally:
            self._running.pop(key, None)

    async def on_child_event(self, event_type: str, obj: dict) -> None:
        """Reconcile the service that owns a changed or deleted child."""
        meta = obj.get("metadata") or {}
        labels = meta.get("labels") or {}
        if labels.get(MANAGED_BY_LABEL) != MANAGED_BY or not labels.get("app.kubernetes.io/name"):
            return
        self.request(meta.get("namespace") or "default", labels["app.kubernetes.io/name"])

    async def on_gateway_event(self, event_type: str, obj: dict) -> None:
        """Reconcile the services whose routes attach to a changed Gateway."""
        meta = obj.get("metadata") or {}
        for key in self.reconciler.services_behind_gateway(meta.get("namespace") or "default",
                                                           meta.get("name") or ""):
            self.request(*key)

    async def start(self, info: kopf.ConnectionInfo) -> None:
        """Create the client and reconciler and start the child reflectors."""
        self.client = KubeClient.from_connection_info(info)
        self.reconciler = Reconciler(self.client, self.config.options, self.config.system_namespace)
        namespaces = self.config.namespaces or [None]
        selector = f"app.kubernetes.io/part-of={PART_OF},{MANAGED_BY_LABEL}={MANAGED_BY}"
        for namespace in namespaces:
            for api_version, kind in (("apps/v1", "Deployment"), ("gateway.networking.k8s.io/v1", "HTTPRoute")):
                self.reflectors.append(Reflector(
                    self.client, api_version, kind, self.on_child_event, namespace=namespace,
                    label_selector=selector, watch_timeout=self.config.watch_timeout, retry_delay=5.0))
        # Gateways usually live in another namespace than the services, so watch them everywhere.
        self.reflectors.append(Reflector(
            self.client, "gateway.networking.k8s.io/v1", "Gateway", self.on_gateway_event,
            watch_timeout=self.config.watch_timeout, retry_delay=5.0))
        self.tasks = [asyncio.create_task(reflector.run()) for reflector in self.reflectors]

    async def stop(self) -> None:
        """Cancel reflectors and reconciles and close the client."""
        for task in self.tasks + list(self._running.values()):
            task.cancel()
        await asyncio.gather(*self.tasks, *self._running.values(), return_exceptions=True)
        if self.client is not None:
            await self.client.close()


async def _reconcile_handler(state: OperatorState, namespace: str, name: str) -> None:
    try:
        await state.reconciler.reconcile(namespace, name)
    except (SpecError, ValueError) as error:
        raise kopf.PermanentError(f"invalid spec: {error}") from error
    except (ApiError, OSError, asyncio.TimeoutError) as error:
        raise kopf.TemporaryError(str(error), delay=RETRY_DELAY_SECONDS) from error


def build_registry(state: OperatorState) -> kopf.OperatorRegistry:
    """Return a kopf registry with the operator's handlers bound to `state`."""
    registry = kopf.OperatorRegistry()
    config = state.config

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=ANNOTATION_PREFIX, key="last-handled-configuration")
        settings.watching.server_timeout = config.watch_timeout
        settings.watching.client_timeout = config.watch_timeout + 30
        await state.start(connection_info(settings))

    @kopf.on.login(registry=registry)
    def login(settings: kopf.OperatorSettings, **_) -> kopf.ConnectionInfo:
        return connection_info(settings)

    @kopf.on.cleanup(registry=registry)
    async def shutdown(**_) -> None:
        await state.stop()

    @kopf.on.resume(GROUP, SERVICES, registry=registry)
    @kopf.on.create(GROUP, SERVICES, registry=registry)
    @kopf.on.update(GROUP, SERVICES, registry=registry)
    async def reconcile_service(namespace: str, name: str, **_) -> None:
        await _reconcile_handler(state, namespace, name)

    @kopf.timer(GROUP, SERVICES, interval=config.resync_seconds, initial_delay=config.resync_seconds,
                registry=registry)
    async def resync_service(namespace: str, name: str, **_) -> None:
        state.request(namespace, name)

    @kopf.on.delete(GROUP, SERVICES, registry=registry)
    async def delete_service(namespace: str, name: str, uid: str, **_) -> None:
        try:
            await state.reconciler.cleanup(namespace, name, uid)
        except (ApiError, OSError, asyncio.TimeoutError) as error:
            raise kopf.TemporaryError(str(error), delay=RETRY_DELAY_SECONDS) from error

    @kopf.on.event(GROUP, CONFIGS, registry=registry)
    async def config_changed(namespace: str, name: str, **_) -> None:
        scope = None if namespace == config.system_namespace else namespace
        items, _ = await state.client.list(SERVICE_API, SERVICE_KIND, scope)
        for item in items:
            meta = item["metadata"]
            state.request(meta.get("namespace") or "default", meta["name"])
        logger.info("%s %s/%s changed: %d services queued", CONFIG_KIND, namespace, name, len(items))

    return registry


async def run_operator(config: OperatorConfig, stop_flag: asyncio.Event | None = None) -> None:
    """Run the operator until `stop_flag` is set or the process is signalled."""
    state = OperatorState(config)
    registry = build_registry(state)
    logger.info("operator starting (namespaces: %s)", ", ".join(config.namespaces) or "all")
    await kopf.operator(
        registry=registry,
        standalone=True,
        clusterwide=not config.namespaces,
        namespaces=config.namespaces,
        liveness_endpoint=config.liveness_endpoint,
        stop_flag=stop_flag,
    )
    logger.info("operator stopped")
