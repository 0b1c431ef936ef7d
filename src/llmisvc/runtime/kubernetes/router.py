"""Router objects: llmisvc's gateway as the scheduler Deployment, its Service and RBAC, the
InferencePool, and the HTTPRoute.

The llmisvc gateway schedules and proxies requests itself, so the HTTPRoute's backend is the
gateway's Service (or, without a scheduler, the workload Service). The InferencePool is
rendered for tools that read it, but no Gateway is pointed at it: that would need an endpoint
picker speaking Envoy's external-processing protocol, which the llmisvc gateway is not.
"""

from __future__ import annotations

import copy

import yaml

from llmisvc.runtime.kubernetes import names as n
from llmisvc.runtime.kubernetes.context import ServiceContext
from llmisvc.runtime.kubernetes.workload import WORKLOAD_PORT

GATEWAY_PORT = 8000
CONFIG_DIR = "/etc/llmisvc"
CONFIG_FILE = "service.yaml"
EPP_CONFIG_DIR = "/etc/llmisvc/epp"
TOKEN_DIR = "/var/run/llmisvc"
TOKEN_FILE = f"{TOKEN_DIR}/admin-token"
READY_FILE = "/tmp/llmisvc-service-synced"
POOL_API_VERSION = "inference.networking.k8s.io/v1"
GATEWAY_API_VERSION = "gateway.networking.k8s.io/v1"


def has_scheduler(ctx: ServiceContext) -> bool:
    """Return True when the service runs llmisvc's scheduler (shapes `scheduler` and `pd`)."""
    return ctx.shape in ("scheduler", "pd")


def _router(ctx: ServiceContext) -> dict:
    return ctx.spec.get("router") or {}


def _pool_ref(ctx: ServiceContext) -> str | None:
    pool = ((_router(ctx).get("scheduler") or {}).get("pool") or {})
    return (pool.get("ref") or {}).get("name")


def sync_config(ctx: ServiceContext) -> dict:
    """Return the `llmisvc discover` config: the gateway's service entry and which pods feed it.

    The selector is the one the rendered InferencePool uses (decode and prefill pods alike).
    NOTE: with `router.scheduler.pool.ref` the referenced pool's own selector is not read, so
    its pods must carry the same workload labels.
    """
    config: dict = {
        "namespace": ctx.namespace,
        "name": ctx.name,
        "entry": {
            "model": ctx.model_name,
            "shape": ctx.shape,
            "scheduler_config": ctx.scheduler_config,
            "criticality": (ctx.spec.get("model") or {}).get("criticality") or "Standard",
        },
        "discovery": {
            "namespace": ctx.namespace,
            "selector": n.pool_selector(ctx.name),
            "targetPort": WORKLOAD_PORT,
        },
    }
    if ctx.scheduler_config_ref:
        # `router.scheduler.config.ref` names a ConfigMap key; it is mounted into the discovery
        # container, which reads it into the entry's scheduler_config before every send.
        config["schedulerConfigFile"] = f"{EPP_CONFIG_DIR}/{ctx.scheduler_config_ref['key']}"
    return config


def _scheduler_pod_spec(ctx: ServiceContext) -> dict:
    """Return the scheduler pod: llmisvc's gateway as `main`, `llmisvc discover` beside it.

    The gateway replaces whatever endpoint picker the template names; only the template
    container's resources, env and security context, and the pod's placement, are kept. An
    init container writes a random admin token that both containers read, so only the
    discovery container can change the gateway's routing state.
    """
    template = copy.deepcopy((_router(ctx).get("scheduler") or {}).get("template") or {})
    template["volumes"] = [v for v in template.get("volumes") or [] if v.get("name") != "epp-config"]
    containers = template.get("containers") or []
    main = next((c for c in containers if c.get("name") == "main"), {})
    token_mount = {"name": "admin-token", "mountPath": TOKEN_DIR}
    config_mount = {"name": "scheduler-config", "mountPath": CONFIG_DIR, "readOnly": True}

    gateway = {
        "name": "main",
        "image": ctx.options.llmisvc_image,
        "command": ["llmisvc", "gateway"],
        "args": ["--host", "0.0.0.0", "--port", str(GATEWAY_PORT), "--admin-token-file", TOKEN_FILE]
        # With a prefill pool the decode pods' sidecars run the two legs; the gateway only
        # picks both endpoints and names the prefill one in x-prefiller-host-port.
        + (["--pd-legs", "sidecar"] if ctx.spec.get("prefill") is not None else []),
        "ports": [{"name": "http", "containerPort": GATEWAY_PORT, "protocol": "TCP"}],
        "volumeMounts": [{**token_mount, "readOnly": True}],
        "readinessProbe": {"tcpSocket": {"port": GATEWAY_PORT}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": GATEWAY_PORT}, "periodSeconds": 20,
                          "failureThreshold": 6},
    }
    for key in ("resources", "env", "envFrom", "securityContext"):
        if main.get(key):
            gateway[key] = main[key]
    discover = {
        "name": "pool-discovery",
        "image": ctx.options.llmisvc_image,
        "command": ["llmisvc", "discover"],
        "args": ["--config", f"{CONFIG_DIR}/{CONFIG_FILE}",
                 "--gateway-url", f"http://127.0.0.1:{GATEWAY_PORT}",
                 "--admin-token-file", TOKEN_FILE,
                 "--ready-file", READY_FILE],
        "volumeMounts": [config_mount, {**token_mount, "readOnly": True}],
        "readinessProbe": {"exec": {"command": ["test", "-f", READY_FILE]}, "periodSeconds": 2},
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
    }
    token = {
        "name": "admin-token",
        "image": ctx.options.llmisvc_image,
        "command": ["python", "-c",
                    f"import secrets; open('{TOKEN_FILE}', 'w').write(secrets.token_hex(32))"],
        "volumeMounts": [token_mount],
    }

    template["initContainers"] = [c for c in template.get("initContainers") or []
                                  if c.get("name") != "admin-token"] + [token]
    others = [c for c in containers if c.get("name") not in ("main", "pool-discovery")]
    template["containers"] = [gateway, discover] + others
    template["serviceAccountName"] = ctx.names.scheduler_account
    volumes = [v for v in template.get("volumes") or []
               if v.get("name") not in ("scheduler-config", "admin-token")]
    template["volumes"] = volumes + [
        {"name": "scheduler-config", "configMap": {"name": ctx.names.scheduler_config}},
        {"name": "admin-token", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
    ]
    ref = ctx.scheduler_config_ref
    if ref:
        source = {"name": ref.get("name") or "", "items": [{"key": ref["key"], "path": ref["key"]}]}
        if ref.get("optional") is not None:
            source["optional"] = bool(ref["optional"])
        template["volumes"].append({"name": "epp-config", "configMap": source})
        discover["volumeMounts"].append({"name": "epp-config", "mountPath": EPP_CONFIG_DIR,
                                         "readOnly": True})
    return template


def scheduler_objects(ctx: ServiceContext) -> list[dict]:
    """Return the scheduler's ConfigMap, Deployment, Service, ServiceAccount, Role and binding."""
    if not has_scheduler(ctx):
        return []
    labels = n.base_labels(ctx.name, n.SCHEDULER_COMPONENT)
    names = ctx.names
    replicas = (_router(ctx).get("scheduler") or {}).get("replicas", 1)
    config_text = yaml.safe_dump(sync_config(ctx), sort_keys=False)
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": ctx.metadata(names.scheduler_config, labels),
            "data": {CONFIG_FILE: config_text},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": ctx.metadata(names.scheduler, labels),
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": dict(labels)},
                "template": {"metadata": {"labels": dict(labels)},
                             "spec": _scheduler_pod_spec(ctx)},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": ctx.metadata(names.scheduler_service, labels),
            "spec": {
                "selector": dict(labels),
                "ports": [{"name": "http", "port": GATEWAY_PORT, "targetPort": GATEWAY_PORT,
                           "protocol": "TCP"}],
                "type": "ClusterIP",
            },
        },
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": ctx.metadata(names.scheduler_account, labels)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": ctx.metadata(names.scheduler_role, labels),
            "rules": [
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["inference.networking.k8s.io"], "resources": ["inferencepools"],
                 "verbs": ["get", "list", "watch"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": ctx.metadata(names.scheduler_role_binding, labels),
            "subjects": [{"kind": "ServiceAccount", "name": names.scheduler_account,
                          "namespace": ctx.namespace}],
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                        "name": names.scheduler_role},
        },
    ]


def inference_pool(ctx: ServiceContext) -> list[dict]:
    """Return the InferencePool over the model-server pods; empty without a scheduler or
    when the spec references an existing pool."""
    if not has_scheduler(ctx) or _pool_ref(ctx):
        return []
    pool_spec = copy.deepcopy(((_router(ctx).get("scheduler") or {}).get("pool") or {}).get("spec") or {})
    # No endpointPickerRef: nothing here speaks Envoy's external-processing protocol.
    pool_spec.pop("endpointPickerRef", None)
    pool_spec["selector"] = {"matchLabels": n.pool_selector(ctx.name)}
    pool_spec["targetPorts"] = [{"number": WORKLOAD_PORT}]
    return [
        {
            "apiVersion": POOL_API_VERSION,
            "kind": "InferencePool",
            "metadata": ctx.metadata(ctx.names.pool, n.base_labels(ctx.name, n.SCHEDULER_COMPONENT)),
            "spec": pool_spec,
        }
    ]


def _parent_refs(ctx: ServiceContext, route_spec: dict) -> list[dict]:
    """Return the route's parents: `router.gateway.refs` when set (as KServe attaches managed
    routes to them), else the route spec's own parentRefs, else the default Gateway."""
    refs = (_router(ctx).get("gateway") or {}).get("refs") or []
    if not refs and route_spec.get("parentRefs"):
        return copy.deepcopy(route_spec["parentRefs"])
    if not refs:
        refs = [{"name": ctx.options.gateway_name, "namespace": ctx.options.gateway_namespace}]
    parents = []
    for ref in refs:
        parent = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": ref["name"],
                  "namespace": ref.get("namespace") or ctx.namespace}
        if ref.get("sectionName"):
            parent["sectionName"] = ref["sectionName"]
        parents.append(parent)
    return parents


def route_backend(ctx: ServiceContext) -> dict:
    """Return the HTTPRoute backendRef: the gateway's Service, or the workload Service
    without a scheduler."""
    service = ctx.names.scheduler_service if has_scheduler(ctx) else ctx.names.workload_service
    return {"group": "", "kind": "Service", "name": service, "port": GATEWAY_PORT, "weight": 1}


def http_route(ctx: ServiceContext) -> list[dict]:
    """Return the managed HTTPRoute `<name>-kserve-route`; empty when the spec has no
    `router.route` or references its own routes.

    Raises ValueError for `router.ingress`, which Kubernetes mode does not render.
    """
    if _router(ctx).get("ingress") is not None:
        raise ValueError("spec.router.ingress: not supported in Kubernetes mode; "
                         "use spec.router.route, which renders an HTTPRoute")
    route = _router(ctx).get("route")
    if route is None:
        return []
    http = route.get("http") or {}
    if http.get("refs"):
        return []
    user_spec = copy.deepcopy(http.get("spec") or {})
    backend = route_backend(ctx)
    prefix = f"/{ctx.namespace}/{ctx.name}"

    rules = user_spec.get("rules") or [
        {
            "matches": [{"path": {"type": "PathPrefix", "value": prefix}}],
            "filters": [
                {
                    "type": "URLRewrite",
                    "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}},
                }
            ],
        }
    ]
    for rule in rules:
        rule["backendRefs"] = [dict(backend)]

    spec = {**user_spec, "parentRefs": _parent_refs(ctx, user_spec), "rules": rules}
    return [
        {
            "apiVersion": GATEWAY_API_VERSION,
            "kind": "HTTPRoute",
            "metadata": ctx.metadata(ctx.names.route, n.base_labels(ctx.name, n.ROUTER_COMPONENT)),
            "spec": spec,
        }
    ]
