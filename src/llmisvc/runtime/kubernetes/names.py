"""Child object names, labels and owner references, as KServe's controller sets them.

Every name goes through `ChildName`, which keeps it within 63 characters.
"""

from __future__ import annotations

from llmisvc.api.templates import child_name as ChildName

PART_OF = "llminferenceservice"
WORKLOAD_COMPONENT = "llminferenceservice-workload"
PREFILL_COMPONENT = "llminferenceservice-workload-prefill"
SCHEDULER_COMPONENT = "llminferenceservice-router-scheduler"
ROUTER_COMPONENT = "llminferenceservice-router"
LEADER_COMPONENT = "llminferenceservice-workload-leader"
WORKER_COMPONENT = "llminferenceservice-workload-worker"
LEADER_PREFILL_COMPONENT = "llminferenceservice-workload-leader-prefill"
WORKER_PREFILL_COMPONENT = "llminferenceservice-workload-worker-prefill"

ROLE_LABEL = "llm-d.ai/role"
STOP_ANNOTATION = "serving.kserve.io/stop"
# Set to `llmisvc` on every child the operator applies. Together with the service's
# `app.kubernetes.io/name` label it finds the children the spec no longer needs.
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "llmisvc"


class ChildNames:
    """The names of every child object of one LLMInferenceService."""

    def __init__(self, name: str):
        self.service = name
        self.main = ChildName(name, "-kserve")
        self.prefill = ChildName(name, "-kserve-prefill")
        self.multi_node = ChildName(name, "-kserve-mn")
        self.multi_node_prefill = ChildName(name, "-kserve-mn-prefill")
        self.workload_service = ChildName(name, "-kserve-workload-svc")
        self.workload_role = ChildName(name, "-kserve-role")
        self.workload_role_binding = ChildName(name, "-kserve-rb")
        self.scheduler = ChildName(name, "-kserve-router-scheduler")
        self.scheduler_config = ChildName(name, "-kserve-router-scheduler-config")
        self.scheduler_service = ChildName(name, "-epp-service")
        self.scheduler_account = ChildName(name, "-epp-sa")
        self.scheduler_role = ChildName(name, "-epp-role")
        self.scheduler_role_binding = ChildName(name, "-epp-rb")
        self.route = ChildName(name, "-kserve-route")
        self.pool = ChildName(name, "-inference-pool")


def base_labels(name: str, component: str) -> dict[str, str]:
    """Return the labels KServe puts on every child of service `name` for `component`."""
    return {
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/part-of": PART_OF,
    }


def workload_labels(name: str, component: str, role: str) -> dict[str, str]:
    """Return the labels of a workload pod: base labels, `kserve.io/component` and the role."""
    return {**base_labels(name, component), "kserve.io/component": "workload", ROLE_LABEL: role}


def pool_selector(name: str) -> dict[str, str]:
    """Return the labels every model-server pod of service `name` carries (decode and prefill)."""
    return {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/part-of": PART_OF,
        "kserve.io/component": "workload",
    }


def owner_reference(api_version: str, kind: str, name: str, uid: str) -> dict:
    """Return a controller owner reference to the LLMInferenceService `name` with `uid`."""
    return {
        "apiVersion": api_version,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def is_stopped(annotations: dict | None) -> bool:
    """Return True when the stop annotation is set to "true" (case-insensitive)."""
    return str((annotations or {}).get(STOP_ANNOTATION, "")).lower() == "true"
