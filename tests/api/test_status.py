"""Status conditions computed from observed facts."""

from datetime import datetime, timezone

import pytest

from llmisvc.api.status import (
    ComponentFacts, ObservedFacts, WorkloadFacts, build_status, compute_conditions, condition, is_ready,
)

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
T1 = datetime(2026, 1, 1, 12, 5, 0, tzinfo=timezone.utc)


def _by_type(conditions) -> dict:
    return {c.type: c for c in conditions}


def _scheduler_facts(main_ready=3, scheduler_ready=1, route_ready=True, pool_ready=True) -> ObservedFacts:
    return ObservedFacts(
        generation=4,
        main=WorkloadFacts(3, main_ready),
        scheduler=WorkloadFacts(1, scheduler_ready),
        http_routes=ComponentFacts(route_ready, "" if route_ready else "NotAccepted", "route not accepted"),
        inference_pool=ComponentFacts(pool_ready),
        url="http://127.0.0.1:8000/default/svc",
    )


def test_all_ready():
    conditions = _by_type(compute_conditions(_scheduler_facts()))
    assert [c.type for c in compute_conditions(_scheduler_facts())] == [
        "MainWorkloadReady", "SchedulerWorkloadReady", "HTTPRoutesReady", "InferencePoolReady",
        "WorkloadsReady", "RouterReady", "Ready",
    ]
    assert all(c.status == "True" for c in conditions.values())
    assert conditions["MainWorkloadReady"].message == "3/3 replicas ready"


def test_main_workload_short_fails_ready():
    conditions = _by_type(compute_conditions(_scheduler_facts(main_ready=1)))
    assert conditions["MainWorkloadReady"].status == "False"
    assert conditions["MainWorkloadReady"].reason == "MinimumReplicasUnavailable"
    assert conditions["WorkloadsReady"].status == "False"
    assert conditions["RouterReady"].status == "True"
    assert conditions["Ready"].status == "False"
    assert conditions["Ready"].reason == "MinimumReplicasUnavailable"


def test_route_not_ready_fails_router():
    conditions = _by_type(compute_conditions(_scheduler_facts(route_ready=False)))
    assert conditions["HTTPRoutesReady"].status == "False"
    assert conditions["HTTPRoutesReady"].reason == "NotAccepted"
    assert conditions["RouterReady"].status == "False"
    assert conditions["WorkloadsReady"].status == "True"
    assert conditions["Ready"].status == "False"


@pytest.mark.parametrize("field,kind", [
    ("prefill", "PrefillWorkloadReady"),
    ("worker", "WorkerWorkloadReady"),
    ("prefill_worker", "PrefillWorkerWorkloadReady"),
])
def test_other_workloads_feed_workloads_ready(field, kind):
    facts = ObservedFacts(main=WorkloadFacts(1, 1), **{field: WorkloadFacts(2, 0, "CrashLoopBackOff", "exit 1")})
    conditions = _by_type(compute_conditions(facts))
    assert conditions[kind].status == "False"
    assert conditions[kind].reason == "CrashLoopBackOff"
    assert conditions[kind].message == "0/2 replicas ready: exit 1"
    assert conditions["WorkloadsReady"].reason == "CrashLoopBackOff"
    assert conditions["Ready"].status == "False"


def test_absent_components_have_no_condition():
    conditions = _by_type(compute_conditions(ObservedFacts(main=WorkloadFacts(1, 1))))
    assert set(conditions) == {"MainWorkloadReady", "WorkloadsReady", "RouterReady", "Ready"}
    assert conditions["RouterReady"].status == "True"
    assert conditions["Ready"].status == "True"


def test_no_workloads_is_unknown():
    conditions = _by_type(compute_conditions(ObservedFacts()))
    assert conditions["WorkloadsReady"].status == "Unknown"
    assert conditions["Ready"].status == "Unknown"


def test_stopped_marks_everything():
    facts = _scheduler_facts()
    facts.stopped = True
    status = build_status(facts, now=T0)
    assert {c["reason"] for c in status["conditions"]} == {"Stopped"}
    assert {c["status"] for c in status["conditions"]} == {"False"}
    assert "url" not in status
    assert not is_ready(status)


def test_build_status_fields():
    status = build_status(_scheduler_facts(), now=T0)
    assert status["observedGeneration"] == 4
    assert status["url"] == "http://127.0.0.1:8000/default/svc"
    assert status["address"] == {"url": "http://127.0.0.1:8000/default/svc"}
    ready = condition(status, "Ready")
    assert ready == {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T12:00:00Z",
                     "observedGeneration": 4}
    assert is_ready(status)


def test_transition_time_kept_while_status_unchanged():
    first = build_status(_scheduler_facts(), now=T0)
    second = build_status(_scheduler_facts(), previous=first, now=T1)
    assert condition(second, "Ready")["lastTransitionTime"] == "2026-01-01T12:00:00Z"
    third = build_status(_scheduler_facts(main_ready=0), previous=second, now=T1)
    assert condition(third, "Ready")["lastTransitionTime"] == "2026-01-01T12:05:00Z"
    assert condition(third, "RouterReady")["lastTransitionTime"] == "2026-01-01T12:00:00Z"


def test_addresses_listed():
    facts = ObservedFacts(main=WorkloadFacts(1, 1), addresses=["http://a", "http://b"])
    assert build_status(facts, now=T0)["addresses"] == [{"url": "http://a"}, {"url": "http://b"}]


def test_stop_requested_values():
    from llmisvc.api.status import stop_requested

    assert stop_requested({"serving.kserve.io/stop": "true"})
    assert stop_requested({"serving.kserve.io/stop": "True"})
    assert not stop_requested({"serving.kserve.io/stop": "false"})
    assert not stop_requested(None)
