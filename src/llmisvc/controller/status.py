"""Status of a service derived only from what the runtime observed, in the API's model.

The runtime reports replica counts, crash loops and the gateway's state. This module turns
them into the API's ObservedFacts, and `llmisvc.api.status.build_status` builds the KServe
condition tree from them (`Ready` from `WorkloadsReady` and `RouterReady`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmisvc.api.status import READY, TRUE, ObservedFacts, WorkloadFacts, build_status, condition

# Reason on a True `Ready` condition while a prefill/decode spec runs without the split.
AGGREGATED_REASON = "PrefillDecodeAggregated"


@dataclass
class ObservedWorkload:
    """Runtime observation of one workload."""

    component: str  # "main" or "prefill"
    desired: int
    ready: int
    updated: int  # replicas at the planned revision
    crash_looping: list[str] = field(default_factory=list)  # replica ids
    oom_killed: list[str] = field(default_factory=list)  # replica ids last terminated for memory


@dataclass
class ObservedService:
    """Runtime observation of one service."""

    workloads: list[ObservedWorkload]
    router_ready: bool
    router_message: str
    uses_scheduler: bool
    stopped: bool
    rollout_message: str | None = None
    aggregated_reason: str | None = None


def _workload_facts(workload: ObservedWorkload) -> WorkloadFacts:
    if workload.crash_looping:
        return WorkloadFacts(workload.desired, workload.ready, "CrashLoopBackOff",
                             f"crash-looping replicas: {', '.join(workload.crash_looping)}")
    if workload.oom_killed:
        return WorkloadFacts(workload.desired, workload.ready, "OOMKilled",
                             f"replicas killed over their memory limit: {', '.join(workload.oom_killed)}")
    if workload.updated < workload.desired:
        return WorkloadFacts(workload.desired, workload.ready, "RollingUpdate",
                             f"{workload.updated}/{workload.desired} replicas at the new revision")
    return WorkloadFacts(workload.desired, workload.ready)


def service_status(observed: ObservedService, generation: int | None, url: str, previous: dict | None = None) -> dict:
    """Return the service's `status` dict (conditions, observedGeneration, url).

    The scheduler runs inside the gateway, so `SchedulerWorkloadReady` is the gateway's
    readiness for this service: one instance when routed, none otherwise.
    """
    facts = ObservedFacts(generation=generation, stopped=observed.stopped, url=url, addresses=[url])
    for workload in observed.workloads:
        workload_facts = _workload_facts(workload)
        if workload.component == "main":
            facts.main = workload_facts
        else:
            facts.prefill = workload_facts
    if observed.uses_scheduler or not observed.router_ready:
        facts.scheduler = WorkloadFacts(1, 1 if observed.router_ready else 0,
                                        "" if observed.router_ready else "GatewayNotReady", observed.router_message)
    status = build_status(facts, previous)
    ready = condition(status, READY)
    if observed.aggregated_reason and ready is not None and ready.get("status") == TRUE:
        ready["reason"] = AGGREGATED_REASON
        ready["message"] = observed.aggregated_reason
    return status
