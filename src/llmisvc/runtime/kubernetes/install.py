"""The objects `llmisvc install --print` emits: CRDs, the operator's namespace, RBAC and
Deployment."""

from __future__ import annotations

from llmisvc.runtime.kubernetes.crd import generate_crds

OPERATOR_NAME = "llmisvc-operator"
DEFAULT_NAMESPACE = "llmisvc-system"
LIVENESS_PORT = 8080

_READ = ["get", "list", "watch"]
_WRITE = ["get", "list", "watch", "create", "update", "patch", "delete"]

# Permissions of the operator. It must itself hold every permission that the Roles it
# creates grant (pods get/list/watch), because RBAC forbids granting more than one has.
OPERATOR_RULES = [
    {"apiGroups": ["serving.kserve.io"],
     "resources": ["llminferenceservices", "llminferenceserviceconfigs"], "verbs": _WRITE},
    {"apiGroups": ["serving.kserve.io"],
     "resources": ["llminferenceservices/status", "llminferenceservices/finalizers"],
     "verbs": ["get", "update", "patch"]},
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": _WRITE},
    {"apiGroups": [""], "resources": ["services", "serviceaccounts", "configmaps"], "verbs": _WRITE},
    {"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": _READ},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"], "verbs": _WRITE},
    {"apiGroups": ["autoscaling"], "resources": ["horizontalpodautoscalers"], "verbs": _WRITE},
    {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes"], "verbs": _WRITE},
    {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["gateways"], "verbs": _READ},
    {"apiGroups": ["inference.networking.k8s.io"], "resources": ["inferencepools"], "verbs": _WRITE},
    {"apiGroups": ["inference.networking.x-k8s.io"], "resources": ["inferencepools"], "verbs": _READ},
    {"apiGroups": ["leaderworkerset.x-k8s.io"], "resources": ["leaderworkersets"], "verbs": _WRITE},
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": _READ},
]


def install_manifests(namespace: str = DEFAULT_NAMESPACE, image: str | None = None) -> list[dict]:
    """Return CRDs, the namespace, the operator's ServiceAccount, ClusterRole, binding and
    Deployment; `image` defaults to the llmisvc image of this version."""
    from llmisvc.runtime.kubernetes.options import LLMISVC_IMAGE

    labels = {"app.kubernetes.io/name": OPERATOR_NAME, "app.kubernetes.io/part-of": "llmisvc"}
    return generate_crds() + [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": OPERATOR_NAME, "namespace": namespace, "labels": labels}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": OPERATOR_NAME, "labels": labels}, "rules": OPERATOR_RULES},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": OPERATOR_NAME, "labels": labels},
         "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_NAME, "namespace": namespace}],
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": OPERATOR_NAME}},
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": OPERATOR_NAME, "namespace": namespace, "labels": labels},
            "spec": {
                # One replica: the operator runs standalone (no kopf peering between replicas).
                "replicas": 1,
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": dict(labels)},
                "template": {
                    "metadata": {"labels": dict(labels)},
                    "spec": {
                        "serviceAccountName": OPERATOR_NAME,
                        "containers": [{
                            "name": "operator",
                            "image": image or LLMISVC_IMAGE,
                            "command": ["llmisvc", "operator"],
                            "args": ["--system-namespace", namespace,
                                     "--liveness", f"http://0.0.0.0:{LIVENESS_PORT}/healthz"],
                            "ports": [{"name": "health", "containerPort": LIVENESS_PORT}],
                            "livenessProbe": {"httpGet": {"path": "/healthz", "port": LIVENESS_PORT},
                                              "periodSeconds": 20, "failureThreshold": 3},
                            "resources": {"requests": {"cpu": "100m", "memory": "256Mi"},
                                          "limits": {"memory": "1Gi"}},
                            "securityContext": {"allowPrivilegeEscalation": False,
                                                "runAsNonRoot": True},
                        }],
                    },
                },
            },
        },
    ]
