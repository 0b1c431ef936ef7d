"""The control process's SQLite store: services, configs, replicas, bounded events."""

from __future__ import annotations

from llmisvc.runtime.local.store import MAX_EVENTS_PER_SERVICE, Event, Store, stored_count


def test_service_generation_bumps_only_on_change(tmp_path):
    store = Store(tmp_path / "state.db")
    assert store.put_service("default", "a", {"spec": 1}, {"plan": 1}, bump_generation=True) == 1
    assert store.put_service("default", "a", {"spec": 2}, {"plan": 2}, bump_generation=True) == 2
    assert store.put_service("default", "a", {"spec": 2}, {"plan": 2}, bump_generation=False) == 2

    stored = store.get_service("default", "a")
    assert stored.resource == {"spec": 2}
    assert stored.plan == {"plan": 2}
    assert stored.created <= stored.updated
    assert [s.name for s in store.list_services()] == ["a"]


def test_delete_service_removes_replicas_and_events(tmp_path):
    store = Store(tmp_path / "state.db")
    store.put_service("default", "a", {}, {}, bump_generation=True)
    store.put_replica("r1", "default", "a", {"id": "r1"})
    store.add_event("default", "a", Event(1.0, "Normal", "Started", "replica/r1", "started"))
    store.delete_service("default", "a")
    assert store.get_service("default", "a") is None
    assert store.list_replicas("default", "a") == []
    assert store.list_events("default", "a") == []


def test_events_are_bounded_and_ordered(tmp_path):
    store = Store(tmp_path / "state.db")
    for index in range(MAX_EVENTS_PER_SERVICE + 25):
        store.add_event("default", "a", Event(float(index), "Normal", "Ready", "x", f"event {index}"))
    events = store.list_events("default", "a")
    assert len(events) == MAX_EVENTS_PER_SERVICE
    assert events[0].message == "event 25"
    assert events[-1].message == f"event {MAX_EVENTS_PER_SERVICE + 24}"
    assert [e.message for e in store.list_events("default", "a", limit=2)] == [
        f"event {MAX_EVENTS_PER_SERVICE + 23}", f"event {MAX_EVENTS_PER_SERVICE + 24}"
    ]


def test_state_survives_reopen(tmp_path):
    path = tmp_path / "state.db"
    store = Store(path)
    store.put_service("ns", "a", {"k": "v"}, {}, bump_generation=True)
    store.put_config("ns", "base", {"kind": "LLMInferenceServiceConfig"})
    store.set_setting("gateway", {"port": 8123})
    store.close()

    reopened = Store(path)
    assert reopened.get_service("ns", "a").resource == {"k": "v"}
    assert reopened.list_configs() == [{"kind": "LLMInferenceServiceConfig"}]
    assert reopened.get_setting("gateway") == {"port": 8123}
    assert stored_count(path) == 1
    assert stored_count(path, "configs") == 1
    assert stored_count(tmp_path / "absent.db") == 0
