"""Service status derived from observed replicas and gateway state."""

from __future__ import annotations

from llmisvc.controller.status import AGGREGATED_REASON, ObservedService, ObservedWorkload, service_status

URL = "http://127.0.0.1:8000/default/svc"


def conditions(status: dict) -> dict[str, dict]:
    return {condition["type"]: condition for condition in status["conditions"]}


def observed(*workloads: ObservedWorkload, router_ready: bool = True, **fields) -> ObservedService:
    return ObservedService(list(workloads), router_ready, "routed", uses_scheduler=True, stopped=False, **fields)


def test_all_ready():
    status = service_status(observed(ObservedWorkload("main", 3, 3, 3)), 2, URL)
    by_type = conditions(status)
    assert by_type["Ready"]["status"] == "True"
    assert by_type["MainWorkloadReady"]["status"] == "True"
    assert by_type["SchedulerWorkloadReady"]["status"] == "True"
    assert status["observedGeneration"] == 2
    assert status["url"] == URL


def test_missing_replicas():
    by_type = conditions(service_status(observed(ObservedWorkload("main", 3, 1, 3)), 1, URL))
    assert by_type["Ready"]["status"] == "False"
    assert by_type["MainWorkloadReady"]["reason"] == "MinimumReplicasUnavailable"
    assert "1/3" in by_type["MainWorkloadReady"]["message"]


def test_crash_loop_reason_propagates():
    workload = ObservedWorkload("main", 2, 1, 2, crash_looping=["svc-kserve-abc"])
    by_type = conditions(service_status(observed(workload), 1, URL))
    assert by_type["MainWorkloadReady"]["reason"] == "CrashLoopBackOff"
    assert by_type["Ready"]["reason"] == "CrashLoopBackOff"
    assert "svc-kserve-abc" in by_type["MainWorkloadReady"]["message"]


def test_oom_killed_reason():
    workload = ObservedWorkload("main", 1, 0, 1, oom_killed=["svc-kserve-abc"])
    assert conditions(service_status(observed(workload), 1, URL))["Ready"]["reason"] == "OOMKilled"


def test_prefill_workload_condition():
    status = service_status(observed(ObservedWorkload("main", 1, 1, 1), ObservedWorkload("prefill", 2, 0, 2)), 1, URL)
    by_type = conditions(status)
    assert by_type["PrefillWorkloadReady"]["status"] == "False"
    assert by_type["WorkloadsReady"]["status"] == "False"


def test_gateway_down_fails_router():
    by_type = conditions(service_status(observed(ObservedWorkload("main", 1, 1, 1), router_ready=False), 1, URL))
    assert by_type["RouterReady"]["status"] == "False"
    assert by_type["Ready"]["status"] == "False"


def test_stopped_service():
    stopped = ObservedService([ObservedWorkload("main", 0, 0, 0)], False, "", True, stopped=True)
    by_type = conditions(service_status(stopped, 3, URL))
    assert by_type["Ready"]["reason"] == "Stopped"
    assert by_type["MainWorkloadReady"]["reason"] == "Stopped"


def test_aggregated_note_on_ready():
    status = service_status(observed(ObservedWorkload("main", 1, 1, 1), aggregated_reason="aggregated"), 1, URL)
    ready = conditions(status)["Ready"]
    assert ready["status"] == "True"
    assert ready["reason"] == AGGREGATED_REASON


def test_transition_time_kept_while_unchanged():
    first = service_status(observed(ObservedWorkload("main", 1, 1, 1)), 1, URL)
    first["conditions"][-1]["lastTransitionTime"] = "2020-01-01T00:00:00Z"
    second = service_status(observed(ObservedWorkload("main", 1, 1, 1)), 1, URL, first)
    assert conditions(second)["Ready"]["lastTransitionTime"] == "2020-01-01T00:00:00Z"
