"""A small asyncio client for the Kubernetes REST API (aiohttp): get, list, watch,
server-side apply, delete and status patches for the kinds llmisvc renders and reads.

Credentials come from kopf's login (`from_connection_info`) or explicit arguments, so the
operator and the scheduler's pod discovery talk to the API server the same way.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
from dataclasses import dataclass
from typing import AsyncIterator
from urllib.parse import urlencode

import aiohttp

logger = logging.getLogger(__name__)

FIELD_MANAGER = "llmisvc"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


@dataclass(frozen=True)
class ResourceType:
    """The REST location of a kind: API version, kind, plural and scope."""

    api_version: str
    kind: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
        """Return the URL path for the collection, an object, or its subresource."""
        prefix = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        parts = [prefix]
        if self.namespaced and namespace:
            parts.append(f"namespaces/{namespace}")
        parts.append(self.plural)
        if name:
            parts.append(name)
            if subresource:
                parts.append(subresource)
        return "/".join(parts)


_TYPES = [
    ResourceType("v1", "Pod", "pods"),
    ResourceType("v1", "Service", "services"),
    ResourceType("v1", "ServiceAccount", "serviceaccounts"),
    ResourceType("v1", "ConfigMap", "configmaps"),
    ResourceType("v1", "Event", "events"),
    ResourceType("apps/v1", "Deployment", "deployments"),
    ResourceType("autoscaling/v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers"),
    ResourceType("rbac.authorization.k8s.io/v1", "Role", "roles"),
    ResourceType("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings"),
    ResourceType("gateway.networking.k8s.io/v1", "HTTPRoute", "httproutes"),
    ResourceType("gateway.networking.k8s.io/v1", "Gateway", "gateways"),
    ResourceType("inference.networking.k8s.io/v1", "InferencePool", "inferencepools"),
    ResourceType("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet", "leaderworkersets"),
    ResourceType("serving.kserve.io/v1alpha1", "LLMInferenceService", "llminferenceservices"),
    ResourceType("serving.kserve.io/v1alpha2", "LLMInferenceService", "llminferenceservices"),
    ResourceType("serving.kserve.io/v1alpha1", "LLMInferenceServiceConfig",
                 "llminferenceserviceconfigs"),
    ResourceType("serving.kserve.io/v1alpha2", "LLMInferenceServiceConfig",
                 "llminferenceserviceconfigs"),
]
RESOURCE_TYPES: dict[tuple[str, str], ResourceType] = {(t.api_version, t.kind): t for t in _TYPES}


class ApiError(Exception):
    """An API request failed; `status` is the HTTP status, `reason` the Status reason."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class WatchExpired(Exception):
    """The watch's resourceVersion is too old (410 Gone); the caller must re-list."""


def resource_type(api_version: str, kind: str) -> ResourceType:
    """Return the REST location of (`api_version`, `kind`); raises KeyError for other kinds."""
    try:
        return RESOURCE_TYPES[(api_version, kind)]
    except KeyError:
        raise KeyError(f"unsupported kind {kind} in {api_version}") from None


class KubeClient:
    """An API-server client bound to one server URL and its credentials.

    The caller owns the client and must `await close()` it.
    """

    def __init__(self, server: str, *, token: str | None = None, ca_path: str | None = None,
                 cert_path: str | None = None, key_path: str | None = None,
                 insecure: bool = False, request_timeout: float = 30.0):
        self.server = server.rstrip("/")
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        ssl_context: ssl.SSLContext | bool | None = None
        if self.server.startswith("https://"):
            if insecure:
                ssl_context = False
            else:
                ssl_context = ssl.create_default_context(cafile=ca_path)
                if cert_path:
                    ssl_context.load_cert_chain(cert_path, key_path)
        self._connector_ssl = ssl_context
        self._headers = headers
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_connection_info(cls, info) -> "KubeClient":
        """Build a client from a `kopf.ConnectionInfo` (the operator's login)."""
        return cls(
            info.server,
            token=info.token,
            ca_path=info.ca_path,
            cert_path=info.certificate_path,
            key_path=info.private_key_path,
            insecure=bool(info.insecure),
        )

    @classmethod
    def in_cluster(cls) -> "KubeClient":
        """Build a client from the pod's service account; raises RuntimeError outside a cluster."""
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        if not host:
            raise RuntimeError("KUBERNETES_SERVICE_HOST is unset: not running in a cluster")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        with open(f"{SERVICE_ACCOUNT_DIR}/token") as token_file:
            token = token_file.read().strip()
        server_host = f"[{host}]" if ":" in host else host
        return cls(f"https://{server_host}:{port}", token=token, ca_path=f"{SERVICE_ACCOUNT_DIR}/ca.crt")

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._connector_ssl if self._connector_ssl is not None else None)
            self._session = aiohttp.ClientSession(headers=self._headers, connector=connector)
        return self._session

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()

    async def _request(self, method: str, path: str, *, params: dict | None = None,
                       body=None, content_type: str = "application/json") -> dict | None:
        url = self.server + path + (("?" + urlencode(params)) if params else "")
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else {}
        async with self._http().request(method, url, data=data, headers=headers,
                                        timeout=self._timeout) as response:
            text = await response.text()
            if response.status == 404 and method == "GET":
                return None
            if response.status >= 400:
                try:
                    status = json.loads(text)
                    raise ApiError(response.status, status.get("reason", ""), status.get("message", text))
                except (ValueError, AttributeError):
                    raise ApiError(response.status, "", text) from None
            return json.loads(text) if text else None

    async def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict | None:
        """Return the object, or None when it does not exist."""
        return await self._request("GET", resource_type(api_version, kind).path(namespace, name))

    async def list(self, api_version: str, kind: str, namespace: str | None = None,
                   label_selector: str | None = None) -> tuple[list[dict], str]:
        """Return (items, list resourceVersion) of `kind` in `namespace` (None: all namespaces)."""
        params = {"labelSelector": label_selector} if label_selector else None
        result = await self._request("GET", resource_type(api_version, kind).path(namespace),
                                     params=params)
        result = result or {}
        return result.get("items") or [], (result.get("metadata") or {}).get("resourceVersion", "")

    async def apply(self, obj: dict, field_manager: str = FIELD_MANAGER) -> dict:
        """Server-side apply `obj` (forcing ownership of conflicting fields) and return it."""
        meta = obj["metadata"]
        path = resource_type(obj["apiVersion"], obj["kind"]).path(meta.get("namespace"), meta["name"])
        return await self._request(
            "PATCH", path, params={"fieldManager": field_manager, "force": "true"}, body=obj,
            content_type="application/apply-patch+yaml",
        )

    async def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> bool:
        """Delete an object with background propagation; return False when it was gone."""
        path = resource_type(api_version, kind).path(namespace, name)
        try:
            await self._request("DELETE", path, body={"propagationPolicy": "Background"})
        except ApiError as error:
            if error.status == 404:
                return False
            raise
        return True

    async def patch_status(self, api_version: str, kind: str, namespace: str, name: str,
                           status: dict) -> dict | None:
        """Merge-patch the status subresource with `status`."""
        path = resource_type(api_version, kind).path(namespace, name, "status")
        return await self._request("PATCH", path, body={"status": status},
                                   content_type="application/merge-patch+json")

    async def watch(self, api_version: str, kind: str, namespace: str | None,
                    resource_version: str, label_selector: str | None = None,
                    timeout_seconds: int = 300) -> AsyncIterator[dict]:
        """Yield watch events (`{"type", "object"}`) after `resource_version` until the server
        closes the stream. Raises WatchExpired on 410 Gone."""
        params = {"watch": "true", "resourceVersion": resource_version,
                  "timeoutSeconds": str(timeout_seconds), "allowWatchBookmarks": "true"}
        if label_selector:
            params["labelSelector"] = label_selector
        url = self.server + resource_type(api_version, kind).path(namespace) + "?" + urlencode(params)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=timeout_seconds + 30)
        async with self._http().get(url, timeout=timeout) as response:
            if response.status == 410:
                raise WatchExpired(f"{kind} watch from resourceVersion {resource_version} expired")
            if response.status >= 400:
                raise ApiError(response.status, "", await response.text())
            async for line in response.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    if (event.get("object") or {}).get("code") == 410:
                        raise WatchExpired(f"{kind} watch from resourceVersion {resource_version} expired")
                    raise ApiError(int((event.get("object") or {}).get("code") or 500), "",
                                   str(event.get("object")))
                yield event
