"""Status of an LLMInferenceService computed from observed facts, as KServe reports it.

These are pure functions. The local controller and the Kubernetes operator gather the facts
(ready replicas, route and pool state) and call `build_status`, and nothing here reads a runtime.

Condition tree:

- `Ready` is True when `WorkloadsReady` and `RouterReady` are both True;
- `WorkloadsReady` summarises `MainWorkloadReady`, `WorkerWorkloadReady`,
  `PrefillWorkloadReady` and `PrefillWorkerWorkloadReady` (those the spec has);
- `RouterReady` summarises `SchedulerWorkloadReady`, `HTTPRoutesReady` and
  `InferencePoolReady` (those the spec manages); with none of them it is True.

With the `serving.kserve.io/stop: "true"` annotation every condition is False with reason
`Stopped`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"
READY = "Ready"
WORKLOADS_READY = "WorkloadsReady"
ROUTER_READY = "RouterReady"
MAIN_WORKLOAD_READY = "MainWorkloadReady"
WORKER_WORKLOAD_READY = "WorkerWorkloadReady"
PREFILL_WORKLOAD_READY = "PrefillWorkloadReady"
PREFILL_WORKER_WORKLOAD_READY = "PrefillWorkerWorkloadReady"
SCHEDULER_WORKLOAD_READY = "SchedulerWorkloadReady"
HTTP_ROUTES_READY = "HTTPRoutesReady"
INFERENCE_POOL_READY = "InferencePoolReady"
WORKLOAD_CONDITIONS = (MAIN_WORKLOAD_READY, WORKER_WORKLOAD_READY, PREFILL_WORKLOAD_READY,
                       PREFILL_WORKER_WORKLOAD_READY)
ROUTER_CONDITIONS = (SCHEDULER_WORKLOAD_READY, HTTP_ROUTES_READY, INFERENCE_POOL_READY)
STOPPED_REASON = "Stopped"
STOP_ANNOTATION = "serving.kserve.io/stop"


def stop_requested(annotations: dict | None) -> bool:
    """Return True when `annotations` (a service's metadata.annotations) ask for a stop.

    Only the string "true" (any case) stops a service, as in KServe.
    """
    return str((annotations or {}).get(STOP_ANNOTATION, "")).lower() == "true"


@dataclass
class Condition:
    """A status condition; `status` is "True", "False" or "Unknown"."""

    type: str
    status: str
    reason: str = ""
    message: str = ""
    lastTransitionTime: str = ""
    observedGeneration: int | None = None

    def to_dict(self) -> dict:
        """Return the condition as a status dict, leaving out empty fields."""
        data = {"type": self.type, "status": self.status}
        for key in ("reason", "message", "lastTransitionTime"):
            if getattr(self, key):
                data[key] = getattr(self, key)
        if self.observedGeneration is not None:
            data["observedGeneration"] = self.observedGeneration
        return data


@dataclass
class WorkloadFacts:
    """Observed state of one workload: desired and ready replica counts.

    `reason` and `message` explain a shortfall in the runtime's words (`CrashLoopBackOff`,
    `replica 2 exited with code 1`); they are used only while not all replicas are ready.
    """

    desired: int
    ready: int
    reason: str = ""
    message: str = ""


@dataclass
class ComponentFacts:
    """Observed state of a routing component (HTTPRoute, InferencePool): ready or why not."""

    ready: bool
    reason: str = ""
    message: str = ""


@dataclass
class ObservedFacts:
    """Everything `build_status` needs; None means the spec has no such component."""

    generation: int | None = None
    stopped: bool = False
    main: WorkloadFacts | None = None
    worker: WorkloadFacts | None = None
    prefill: WorkloadFacts | None = None
    prefill_worker: WorkloadFacts | None = None
    scheduler: WorkloadFacts | None = None
    http_routes: ComponentFacts | None = None
    inference_pool: ComponentFacts | None = None
    url: str | None = None
    addresses: list[str] = field(default_factory=list)


def _workload_condition(kind: str, facts: WorkloadFacts, generation: int | None) -> Condition:
    counts = f"{facts.ready}/{facts.desired} replicas ready"
    if facts.ready >= facts.desired:
        return Condition(kind, TRUE, "", counts, observedGeneration=generation)
    reason = facts.reason or "MinimumReplicasUnavailable"
    message = f"{counts}: {facts.message}" if facts.message else counts
    return Condition(kind, FALSE, reason, message, observedGeneration=generation)


def _component_condition(kind: str, facts: ComponentFacts, generation: int | None) -> Condition:
    if facts.ready:
        return Condition(kind, TRUE, "", facts.message, observedGeneration=generation)
    return Condition(kind, FALSE, facts.reason or "NotReady", facts.message, observedGeneration=generation)


def _summary(kind: str, parts: list[Condition], generation: int | None) -> Condition:
    """Return a condition that is True when every part is True, else carries the first failure."""
    for part in parts:
        if part.status != TRUE:
            return Condition(kind, part.status, part.reason or part.type,
                             f"{part.type}: {part.message}" if part.message else part.type,
                             observedGeneration=generation)
    return Condition(kind, TRUE, observedGeneration=generation)


def compute_conditions(facts: ObservedFacts) -> list[Condition]:
    """Return the conditions for `facts`, leaf conditions first and `Ready` last.

    lastTransitionTime is left empty; `build_status` fills it.
    """
    generation = facts.generation
    workload_parts = [
        (MAIN_WORKLOAD_READY, facts.main),
        (WORKER_WORKLOAD_READY, facts.worker),
        (PREFILL_WORKLOAD_READY, facts.prefill),
        (PREFILL_WORKER_WORKLOAD_READY, facts.prefill_worker),
    ]
    router_parts = [(SCHEDULER_WORKLOAD_READY, facts.scheduler)]
    component_parts = [(HTTP_ROUTES_READY, facts.http_routes), (INFERENCE_POOL_READY, facts.inference_pool)]
    present = [kind for kind, part in workload_parts + router_parts + component_parts if part is not None]

    if facts.stopped:
        message = "stopped by the serving.kserve.io/stop annotation"
        kinds = present + [WORKLOADS_READY, ROUTER_READY, READY]
        return [Condition(kind, FALSE, STOPPED_REASON, message, observedGeneration=generation) for kind in kinds]

    workloads = [_workload_condition(k, p, generation) for k, p in workload_parts if p is not None]
    router = [_workload_condition(k, p, generation) for k, p in router_parts if p is not None]
    router += [_component_condition(k, p, generation) for k, p in component_parts if p is not None]
    workloads_ready = _summary(WORKLOADS_READY, workloads, generation)
    if not workloads:
        workloads_ready = Condition(WORKLOADS_READY, UNKNOWN, "NoWorkloads", "no workload observed yet",
                                    observedGeneration=generation)
    router_ready = _summary(ROUTER_READY, router, generation)
    ready = _summary(READY, [workloads_ready, router_ready], generation)
    return workloads + router + [workloads_ready, router_ready, ready]


def _timestamp(now: datetime | None) -> str:
    moment = now or datetime.now(timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_status(facts: ObservedFacts, previous: dict | None = None, now: datetime | None = None) -> dict:
    """Return a `status` dict (conditions, observedGeneration, url, address, addresses).

    `previous` is the last status written; a condition keeps its lastTransitionTime while
    its status is unchanged, as Kubernetes conditions do. `now` defaults to the current UTC
    time.
    """
    before = {c.get("type"): c for c in (previous or {}).get("conditions") or [] if isinstance(c, dict)}
    stamp = _timestamp(now)
    conditions = []
    for condition in compute_conditions(facts):
        old = before.get(condition.type)
        unchanged = old is not None and old.get("status") == condition.status and old.get("lastTransitionTime")
        condition.lastTransitionTime = old["lastTransitionTime"] if unchanged else stamp
        conditions.append(condition.to_dict())

    status: dict = {"conditions": conditions}
    if facts.generation is not None:
        status["observedGeneration"] = facts.generation
    if facts.url and not facts.stopped:
        status["url"] = facts.url
        status["address"] = {"url": facts.url}
    if facts.addresses and not facts.stopped:
        status["addresses"] = [{"url": url} for url in facts.addresses]
    return status


def condition(status: dict, kind: str) -> dict | None:
    """Return the condition of type `kind` from a status dict, or None."""
    for item in status.get("conditions") or []:
        if item.get("type") == kind:
            return item
    return None


def is_ready(status: dict) -> bool:
    """Return True when the status's Ready condition is True."""
    ready = condition(status, READY)
    return ready is not None and ready.get("status") == TRUE
