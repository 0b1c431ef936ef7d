"""Scheduler endpoint discovery on Kubernetes: the model-server pods of one InferencePool.

An endpoint is a pod that matches the pool selector, has a pod IP, reports the `Ready`
condition and has no deletion timestamp (a terminating pod is drained: it gets no new
requests). The pod list is re-read on every watch reconnect (see `reflector.py`), so a pod
whose DELETE event was missed does not keep receiving traffic.

Endpoints are reported in the gateway admin API's entry shape:
`{"address": "10.0.0.7:8000", "role": "decode", "ready": true, "labels": {...}}`.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

from llmisvc.runtime.kubernetes.client import KubeClient
from llmisvc.runtime.kubernetes.names import ROLE_LABEL
from llmisvc.runtime.kubernetes.reflector import Reflector

logger = logging.getLogger(__name__)

EndpointsHandler = Callable[[list[dict]], Awaitable[None]]


def label_selector(match_labels: dict[str, str]) -> str:
    """Return the `labelSelector` query value for equality `match_labels`."""
    return ",".join(f"{key}={value}" for key, value in sorted(match_labels.items()))


def pod_is_ready(pod: dict) -> bool:
    """Return True when the pod serves: Ready condition True, an IP, not terminating."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    if meta.get("deletionTimestamp") or not status.get("podIP"):
        return False
    return any(
        condition.get("type") == "Ready" and condition.get("status") == "True"
        for condition in status.get("conditions") or []
    )


def pod_endpoint(pod: dict, target_port: int) -> dict:
    """Return the endpoint entry for a ready pod."""
    labels = dict((pod.get("metadata") or {}).get("labels") or {})
    return {
        "address": f"{pod['status']['podIP']}:{target_port}",
        "role": labels.get(ROLE_LABEL, "both"),
        "ready": True,
        "labels": labels,
    }


class PodDiscovery:
    """Report the ready endpoints of pods matching `match_labels` in `namespace`.

    `on_endpoints` gets the full, sorted endpoint list whenever it changes. `run()` loops
    until cancelled.
    """

    def __init__(self, client: KubeClient, namespace: str, match_labels: dict[str, str],
                 target_port: int, on_endpoints: EndpointsHandler, *, watch_timeout: int = 300):
        self.target_port = target_port
        self.on_endpoints = on_endpoints
        self.endpoints: list[dict] = []
        self.reflector = Reflector(
            client, "v1", "Pod", self._on_pod_event, namespace=namespace,
            label_selector=label_selector(match_labels), watch_timeout=watch_timeout,
        )

    def current_endpoints(self) -> list[dict]:
        """Return the endpoints of the pods in the cache that are ready, sorted by address."""
        endpoints = [
            pod_endpoint(pod, self.target_port)
            for pod in self.reflector.items.values()
            if pod_is_ready(pod)
        ]
        return sorted(endpoints, key=lambda endpoint: endpoint["address"])

    async def _on_pod_event(self, event_type: str, pod: dict) -> None:
        endpoints = self.current_endpoints()
        if endpoints == self.endpoints:
            return
        self.endpoints = endpoints
        logger.info("pool endpoints changed after %s of pod %s: %s", event_type,
                    (pod.get("metadata") or {}).get("name"),
                    [endpoint["address"] for endpoint in endpoints])
        await self.on_endpoints(endpoints)

    async def run(self) -> None:
        """Watch pods until cancelled."""
        await self.reflector.run()
