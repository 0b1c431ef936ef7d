"""An in-memory Kubernetes API server double that speaks the real REST and watch protocol.

It serves discovery (`/api`, `/apis`, group versions), list with label selectors, watch
streams with resourceVersion and `timeoutSeconds`, get, create, replace, merge patch,
server-side apply (`application/apply-patch+yaml`), status subresources, delete with
finalizers and deletion timestamps, and owner-reference garbage collection.

Compared with a real cluster, no controllers run, so Deployments get no pods or conditions
unless a test writes them. There is no admission, schema validation or authentication. There
are no field managers either: server-side apply replaces the applied fields and keeps status
and server-set metadata.

Test hooks: `close_watches()` ends every open watch stream (a reconnect), and
`delete(..., silent=True)` removes an object without sending its DELETED event (a missed
event).
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import yaml
from aiohttp import web


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool = True
    status: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


CORE_KINDS = [
    Kind("", "v1", "Pod", "pods", status=True),
    Kind("", "v1", "Service", "services", status=True),
    Kind("", "v1", "ServiceAccount", "serviceaccounts"),
    Kind("", "v1", "ConfigMap", "configmaps"),
    Kind("", "v1", "Event", "events"),
    Kind("", "v1", "Namespace", "namespaces", namespaced=False, status=True),
    Kind("apps", "v1", "Deployment", "deployments", status=True),
    Kind("autoscaling", "v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers", status=True),
    Kind("rbac.authorization.k8s.io", "v1", "Role", "roles"),
    Kind("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings"),
    Kind("events.k8s.io", "v1", "Event", "events"),
]
LLMISVC_KINDS = [
    Kind("serving.kserve.io", version, kind, plural, status=True)
    for version in ("v1alpha1", "v1alpha2")
    for kind, plural in (("LLMInferenceService", "llminferenceservices"),
                         ("LLMInferenceServiceConfig", "llminferenceserviceconfigs"))
]
GATEWAY_KINDS = [
    Kind("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes", status=True),
    Kind("gateway.networking.k8s.io", "v1", "Gateway", "gateways", status=True),
    Kind("inference.networking.k8s.io", "v1", "InferencePool", "inferencepools", status=True),
]


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target, patch):
    """Apply an RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in path.split("/")[1:]]


def json_patch(target, operations: list[dict]):
    """Apply RFC 6902 JSON patch operations (add, remove, replace, test)."""
    result = copy.deepcopy(target)
    for operation in operations:
        *parents, last = _pointer(operation["path"])
        node = result
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        op = operation["op"]
        if op == "test":
            current = node[int(last)] if isinstance(node, list) else node.get(last)
            if current != operation["value"]:
                raise ApiError(422, "Invalid", f"test failed at {operation['path']}")
        elif op == "remove":
            if isinstance(node, list):
                node.pop(int(last))
            else:
                node.pop(last, None)
        elif op in ("add", "replace"):
            value = copy.deepcopy(operation["value"])
            if isinstance(node, list):
                if last == "-":
                    node.append(value)
                elif op == "add":
                    node.insert(int(last), value)
                else:
                    node[int(last)] = value
            else:
                node[last] = value
        else:
            raise ApiError(422, "Invalid", f"unsupported JSON patch op {op}")
    return result


def matches_selector(labels: dict, selector: str | None) -> bool:
    """Return True when `labels` satisfy an equality-based label selector string."""
    for term in [t.strip() for t in (selector or "").split(",") if t.strip()]:
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


class ApiServer:
    """The double. `start()` runs it on 127.0.0.1 in a background thread; `url` is its base URL."""

    def __init__(self, gateway_api: bool = True):
        self.kinds = CORE_KINDS + LLMISVC_KINDS + (GATEWAY_KINDS if gateway_api else [])
        self._lock = threading.RLock()
        self._objects: dict[tuple[str, str], dict[tuple[str, str], dict]] = {}
        self._rv = 0
        self._history: list[tuple[int, str, str, str, dict]] = []  # rv, group, plural, type, obj
        self._watchers: set[tuple[asyncio.Queue, str, str, str | None, str | None]] = set()
        self.requests: list[tuple[str, str]] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.url = ""
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> str:
        started = threading.Event()

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self._serve())
            started.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        started.wait(10)
        return self.url

    async def _serve(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self.loop is None:
            return
        self.close_watches()
        future = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop)
        future.result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def kubeconfig(self, path) -> None:
        """Write a kubeconfig that points at this server without credentials."""
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "double",
            "clusters": [{"name": "double", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {}}],
            "contexts": [{"name": "double", "context": {"cluster": "double", "user": "tester",
                                                        "namespace": "default"}}],
        }
        path.write_text(yaml.safe_dump(config))

    # ---- store -----------------------------------------------------------------------

    def kind_of(self, api_version: str, kind: str) -> Kind:
        for entry in self.kinds:
            if entry.api_version == api_version and entry.kind == kind:
                return entry
        raise KeyError(f"{api_version} {kind} is not served")

    def _kind_by_plural(self, group: str, version: str, plural: str) -> Kind:
        for entry in self.kinds:
            if (entry.group, entry.version, entry.plural) == (group, version, plural):
                return entry
        raise ApiError(404, "NotFound", f"the server could not find the requested resource {group}/{version}/{plural}")

    def _bucket(self, kind: Kind) -> dict:
        # Versions of one group share storage, as served versions of a CRD do.
        return self._objects.setdefault((kind.group, kind.plural), {})

    def _record(self, kind: Kind, event_type: str, obj: dict) -> None:
        self._history.append((self._rv, kind.group, kind.plural, event_type, copy.deepcopy(obj)))
        del self._history[:-5000]
        for queue, group, plural, namespace, selector in list(self._watchers):
            if (group, plural) != (kind.group, kind.plural):
                continue
            meta = obj.get("metadata") or {}
            if namespace and meta.get("namespace") != namespace:
                continue
            if not matches_selector(meta.get("labels") or {}, selector):
                continue
            event = {"type": event_type, "object": self._as_version(obj, kind)}
            self.loop.call_soon_threadsafe(queue.put_nowait, event)

    def _as_version(self, obj: dict, kind: Kind) -> dict:
        result = copy.deepcopy(obj)
        result["apiVersion"] = kind.api_version
        return result

    def _bump(self, obj: dict) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)

    def _store(self, kind: Kind, obj: dict, event_type: str) -> dict:
        self._bump(obj)
        key = (obj["metadata"].get("namespace") or "", obj["metadata"]["name"])
        self._bucket(kind)[key] = obj
        self._record(kind, event_type, obj)
        return obj

    def _remove(self, kind: Kind, namespace: str, name: str, silent: bool = False) -> None:
        obj = self._bucket(kind).pop((namespace or "", name), None)
        if obj is None:
            return
        self._bump(obj)
        if not silent:
            self._record(kind, "DELETED", obj)
        self._collect_garbage(obj["metadata"]["uid"])

    def _collect_garbage(self, owner_uid: str) -> None:
        for (group, plural), bucket in list(self._objects.items()):
            for (namespace, name), obj in list(bucket.items()):
                owners = obj["metadata"].get("ownerReferences") or []
                if any(owner.get("uid") == owner_uid for owner in owners):
                    kind = next(k for k in self.kinds if (k.group, k.plural) == (group, plural))
                    self._delete(kind, namespace, name)

    def _delete(self, kind: Kind, namespace: str, name: str, silent: bool = False) -> dict:
        obj = self._bucket(kind).get((namespace or "", name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{kind.plural} "{name}" not found')
        if obj["metadata"].get("finalizers"):
            if not obj["metadata"].get("deletionTimestamp"):
                obj["metadata"]["deletionTimestamp"] = _now()
                self._store(kind, obj, "MODIFIED")
            return obj
        self._remove(kind, namespace, name, silent=silent)
        return obj

    def _create(self, kind: Kind, namespace: str | None, body: dict) -> dict:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if kind.namespaced:
            meta["namespace"] = namespace or meta.get("namespace") or "default"
        if (meta.get("namespace") or "", meta.get("name")) in self._bucket(kind):
            raise ApiError(409, "AlreadyExists", f'{kind.plural} "{meta.get("name")}" already exists')
        if not meta.get("name"):
            raise ApiError(422, "Invalid", "metadata.name: Required value")
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        obj["apiVersion"] = kind.api_version
        obj["kind"] = kind.kind
        return self._store(kind, obj, "ADDED")

    def _update(self, kind: Kind, current: dict, new: dict, subresource: str | None,
                applied: bool = False) -> dict:
        """Store `new` over `current`: the status subresource changes only status; the main
        resource keeps status when the kind has a status subresource."""
        result = copy.deepcopy(current)
        if subresource == "status":
            result["status"] = copy.deepcopy(new.get("status"))
        else:
            for key, value in new.items():
                if key in ("metadata", "apiVersion", "kind") or (key == "status" and kind.status):
                    continue
                result[key] = copy.deepcopy(value)
            for key in [k for k in result if k not in new and k not in ("metadata", "apiVersion", "kind", "status")]:
                result.pop(key)
            meta = result["metadata"]
            for field in ("labels", "annotations", "finalizers", "ownerReferences"):
                value = (new.get("metadata") or {}).get(field)
                if value is not None:
                    meta[field] = copy.deepcopy(value)
                elif not applied:
                    # A patch or replace gives the whole object, so an absent field is removed;
                    # server-side apply leaves fields it does not mention alone.
                    meta.pop(field, None)
            if {k: v for k, v in result.items() if k not in ("metadata", "status")} != \
                    {k: v for k, v in current.items() if k not in ("metadata", "status")}:
                meta["generation"] = int(meta.get("generation") or 1) + 1
        if result == current:
            return current
        if result["metadata"].get("deletionTimestamp") and not result["metadata"].get("finalizers"):
            self._bucket(kind)[(result["metadata"].get("namespace") or "", result["metadata"]["name"])] = result
            self._remove(kind, result["metadata"].get("namespace") or "", result["metadata"]["name"])
            return result
        return self._store(kind, result, "MODIFIED")

    # ---- helpers for tests (thread-safe) ---------------------------------------------

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict | None:
        with self._lock:
            entry = self.kind_of(api_version, kind)
            obj = self._bucket(entry).get((namespace or "", name))
            return None if obj is None else self._as_version(obj, entry)

    def list(self, api_version: str, kind: str, namespace: str | None = None,
             selector: str | None = None) -> list[dict]:
        with self._lock:
            entry = self.kind_of(api_version, kind)
            return [self._as_version(obj, entry) for (ns, _), obj in sorted(self._bucket(entry).items())
                    if (namespace is None or ns == namespace)
                    and matches_selector(obj["metadata"].get("labels") or {}, selector)]

    def create(self, obj: dict) -> dict:
        with self._lock:
            entry = self.kind_of(obj["apiVersion"], obj["kind"])
            return self._as_version(self._create(entry, obj["metadata"].get("namespace"), obj), entry)

    def patch(self, api_version: str, kind: str, namespace: str, name: str, patch: dict,
              subresource: str | None = None) -> dict:
        with self._lock:
            entry = self.kind_of(api_version, kind)
            current = self._bucket(entry)[(namespace or "", name)]
            return self._update(entry, current, merge_patch(current, patch), subresource)

    def set_status(self, api_version: str, kind: str, namespace: str, name: str, status: dict) -> dict:
        return self.patch(api_version, kind, namespace, name, {"status": status}, subresource="status")

    def delete(self, api_version: str, kind: str, namespace: str, name: str, silent: bool = False) -> None:
        with self._lock:
            self._delete(self.kind_of(api_version, kind), namespace, name, silent=silent)

    def close_watches(self) -> None:
        """End every open watch stream, as an API server restart or a load balancer does."""
        with self._lock:
            for queue, *_ in list(self._watchers):
                self.loop.call_soon_threadsafe(queue.put_nowait, None)

    def watch_count(self) -> int:
        with self._lock:
            return len(self._watchers)

    # ---- HTTP ------------------------------------------------------------------------

    def _discovery(self, parts: list[str]) -> dict | None:
        if parts == ["api"]:
            return {"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": self.url}]}
        if parts == ["version"]:
            return {"major": "1", "minor": "33", "gitVersion": "v1.33.0-double"}
        groups: dict[str, list[str]] = {}
        for entry in self.kinds:
            if entry.group:
                versions = groups.setdefault(entry.group, [])
                if entry.version not in versions:
                    versions.append(entry.version)

        def group_doc(group: str) -> dict:
            versions = [{"groupVersion": f"{group}/{v}", "version": v} for v in groups[group]]
            return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": versions,
                    "preferredVersion": versions[-1]}

        if parts == ["apis"]:
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [group_doc(g) for g in groups]}
        if len(parts) == 2 and parts[0] == "apis" and parts[1] in groups:
            return group_doc(parts[1])
        if parts == ["api", "v1"] or (len(parts) == 3 and parts[0] == "apis"):
            group, version = ("", "v1") if parts[0] == "api" else (parts[1], parts[2])
            resources = []
            for entry in self.kinds:
                if (entry.group, entry.version) != (group, version):
                    continue
                verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
                resources.append({"name": entry.plural, "singularName": entry.kind.lower(),
                                  "namespaced": entry.namespaced, "kind": entry.kind, "verbs": verbs})
                if entry.status:
                    resources.append({"name": f"{entry.plural}/status", "singularName": "",
                                      "namespaced": entry.namespaced, "kind": entry.kind,
                                      "verbs": ["get", "patch", "update"]})
            if not resources:
                return None
            return {"kind": "APIResourceList", "apiVersion": "v1",
                    "groupVersion": f"{group}/{version}" if group else version, "resources": resources}
        return None

    @staticmethod
    def _parse_path(parts: list[str]) -> tuple[str, str, str | None, str, str | None, str | None]:
        """Return (group, version, namespace, plural, name, subresource) of a resource path."""
        if parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        else:
            group, version, rest = parts[1], parts[2], parts[3:]
        namespace = None
        if len(rest) >= 2 and rest[0] == "namespaces" and len(rest) != 2:
            namespace, rest = rest[1], rest[2:]
        plural = rest[0]
        name = rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else None
        return group, version, namespace, plural, name, subresource

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        self.requests.append((request.method, request.path_qs))
        try:
            if request.method == "GET":
                document = self._discovery(parts)
                if document is not None:
                    return web.json_response(document)
            if not parts or parts[0] not in ("api", "apis") or len(parts) < 3:
                raise ApiError(404, "NotFound", f"no route for {request.path}")
            group, version, namespace, plural, name, subresource = self._parse_path(parts)
            kind = self._kind_by_plural(group, version, plural)
            if request.method == "GET" and name is None and request.query.get("watch") in ("true", "1"):
                return await self._watch(request, kind, namespace)
            body = None
            if request.can_read_body:
                text = await request.text()
                body = yaml.safe_load(text) if text else None
            with self._lock:
                result = self._dispatch(request, kind, namespace, name, subresource, body)
            return web.json_response(result)
        except ApiError as error:
            status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": error.message, "reason": error.reason, "code": error.code}
            return web.json_response(status, status=error.code)

    def _dispatch(self, request: web.Request, kind: Kind, namespace: str | None, name: str | None,
                  subresource: str | None, body) -> dict:
        method = request.method
        bucket = self._bucket(kind)
        if name is None:
            if method == "GET":
                selector = request.query.get("labelSelector")
                items = [self._as_version(obj, kind) for (ns, _), obj in sorted(bucket.items())
                         if (namespace is None or ns == namespace)
                         and matches_selector(obj["metadata"].get("labels") or {}, selector)]
                return {"kind": f"{kind.kind}List", "apiVersion": kind.api_version,
                        "metadata": {"resourceVersion": str(self._rv)}, "items": items}
            if method == "POST":
                return self._as_version(self._create(kind, namespace, body or {}), kind)
            raise ApiError(405, "MethodNotAllowed", f"{method} on a collection")

        current = bucket.get((namespace or "", name))
        content_type = request.headers.get("Content-Type", "")
        if method == "GET":
            if current is None:
                raise ApiError(404, "NotFound", f'{kind.plural} "{name}" not found')
            return self._as_version(current, kind)
        if method == "DELETE":
            return self._as_version(self._delete(kind, namespace, name), kind)
        if method == "PATCH" and "apply-patch" in content_type:
            if current is None:
                return self._as_version(self._create(kind, namespace, body), kind)
            return self._as_version(self._update(kind, current, body, subresource, applied=True), kind)
        if current is None:
            raise ApiError(404, "NotFound", f'{kind.plural} "{name}" not found')
        if method == "PUT":
            return self._as_version(self._update(kind, current, body, subresource), kind)
        if method == "PATCH" and "json-patch" in content_type:
            return self._as_version(self._update(kind, current, json_patch(current, body), subresource), kind)
        if method == "PATCH" and "merge-patch" in content_type:
            return self._as_version(self._update(kind, current, merge_patch(current, body), subresource), kind)
        raise ApiError(415, "UnsupportedMediaType", f"{method} with {content_type!r}")

    async def _watch(self, request: web.Request, kind: Kind, namespace: str | None) -> web.StreamResponse:
        selector = request.query.get("labelSelector")
        since = int(request.query.get("resourceVersion") or 0)
        timeout = float(request.query.get("timeoutSeconds") or 1800)
        queue: asyncio.Queue = asyncio.Queue()
        watcher = (queue, kind.group, kind.plural, namespace, selector)
        with self._lock:
            oldest = self._history[0][0] if self._history else self._rv
            if since and since < oldest - 1:
                expired = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired",
                                                       "message": "too old resource version"}}
                self.loop.call_soon(queue.put_nowait, expired)
            else:
                for rv, group, plural, event_type, obj in self._history:
                    if rv <= since or (group, plural) != (kind.group, kind.plural):
                        continue
                    meta = obj["metadata"]
                    if namespace and meta.get("namespace") != namespace:
                        continue
                    if matches_selector(meta.get("labels") or {}, selector):
                        queue.put_nowait({"type": event_type, "object": self._as_version(obj, kind)})
            self._watchers.add(watcher)

        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    event = await asyncio.wait_for(queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
                if event is None:
                    break
                await response.write(json.dumps(event).encode() + b"\n")
                if event["type"] == "ERROR":
                    break
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            with self._lock:
                self._watchers.discard(watcher)
        return response
