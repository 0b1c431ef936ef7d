"""Formula tables for every scheduler plugin, run through the real scheduler pipeline."""

from __future__ import annotations

import collections

import pytest

from llmisvc.scheduler import Datastore, EndpointSpec, Scheduler, SchedulingRequest
from llmisvc.scheduler.metrics_scrape import EngineMetrics
from llmisvc.scheduler.plugins.active_request_scorer import active_scores
from llmisvc.scheduler.plugins.load_aware_scorer import load_score
from llmisvc.scheduler.plugins.queue_scorer import queue_scores
from llmisvc.scheduler.plugins.session_affinity_scorer import decode_token, encode_token


def make_scheduler(plugins, profile, endpoints=3, seed=1, labels=None):
    datastore = Datastore()
    datastore.set_endpoints(
        [EndpointSpec(f"10.0.0.{i}:8000", labels=(labels or {}).get(i, {})) for i in range(endpoints)]
    )
    config = {"plugins": plugins, "schedulingProfiles": [{"name": "p", "plugins": profile}]}
    return Scheduler.from_config(config, datastore=datastore, model_name="m", seed=seed), datastore


def set_metrics(datastore, address, waiting=0, running=0, kv=0.0):
    datastore.update_metrics(address, EngineMetrics(running=running, waiting=waiting, kv_usage=kv))


@pytest.mark.parametrize(
    "waiting, threshold, expected",
    [(0, 128, 0.5), (1, 128, 0.5 * (1 - 1 / 128)), (64, 128, 0.25), (128, 128, 0.0), (500, 128, 0.0), (5, 10, 0.25)],
)
def test_load_aware_formula(waiting, threshold, expected):
    assert load_score(waiting, threshold) == pytest.approx(expected)


@pytest.mark.parametrize(
    "queues, expected",
    [
        ({"a": 0, "b": 10}, {"a": 1.0, "b": 0.0}),
        ({"a": 2, "b": 4, "c": 6}, {"a": 1.0, "b": 0.5, "c": 0.0}),
        ({"a": 3, "b": 3}, {"a": 1.0, "b": 1.0}),
        ({}, {}),
    ],
)
def test_queue_formula(queues, expected):
    assert queue_scores(queues) == pytest.approx(expected)


@pytest.mark.parametrize(
    "counts, expected",
    [
        ({"a": 0, "b": 0}, {"a": 1.0, "b": 1.0}),
        ({"a": 0, "b": 4}, {"a": 1.0, "b": 0.0}),
        ({"a": 1, "b": 2, "c": 4}, {"a": 0.75, "b": 0.5, "c": 0.0}),
    ],
)
def test_active_request_formula(counts, expected):
    assert active_scores(counts) == pytest.approx(expected)


@pytest.mark.parametrize("usage, expected", [(0.0, 1.0), (0.25, 0.75), (1.0, 0.0), (1.5, 0.0)])
def test_kv_utilization_formula(usage, expected):
    scheduler, datastore = make_scheduler(
        [{"type": "kv-cache-utilization-scorer"}], [{"pluginRef": "kv-cache-utilization-scorer"}], endpoints=1
    )
    set_metrics(datastore, "10.0.0.0:8000", kv=usage)
    result = scheduler.schedule(SchedulingRequest("r", "m", prompt_text="x"))
    assert result.scores["p"]["10.0.0.0:8000"]["kv-cache-utilization-scorer"] == pytest.approx(expected)


def test_scores_combine_by_weight():
    scheduler, datastore = make_scheduler(
        [{"type": "queue-scorer"}, {"type": "kv-cache-utilization-scorer"}],
        [{"pluginRef": "queue-scorer", "weight": 3}, {"pluginRef": "kv-cache-utilization-scorer", "weight": 2}],
        endpoints=2,
    )
    set_metrics(datastore, "10.0.0.0:8000", waiting=0, kv=0.9)  # 3*1 + 2*0.1 = 3.2
    set_metrics(datastore, "10.0.0.1:8000", waiting=4, kv=0.0)  # 3*0 + 2*1 = 2.0
    result = scheduler.schedule(SchedulingRequest("r", "m", prompt_text="x"))
    totals = result.profile_results["p"].totals
    assert totals["10.0.0.0:8000"] == pytest.approx(3.2)
    assert totals["10.0.0.1:8000"] == pytest.approx(2.0)
    assert result.target.address == "10.0.0.0:8000"


def test_prefix_scorer_fraction_of_blocks():
    scheduler, _ = make_scheduler([{"type": "prefix-cache-scorer"}], [{"pluginRef": "prefix-cache-scorer"}], endpoints=2)
    shared = "s" * 64 * 3
    first = scheduler.schedule(SchedulingRequest("1", "m", prompt_text=shared + "a" * 64))
    second = scheduler.schedule(SchedulingRequest("2", "m", prompt_text=shared + "b" * 64 * 5))
    scores = second.scores["p"]
    assert scores[first.target.address]["prefix-cache-scorer"] == pytest.approx(3 / 8)
    other = next(a for a in scores if a != first.target.address)
    assert scores[other]["prefix-cache-scorer"] == 0.0
    assert second.target.address == first.target.address


def test_prefix_scorer_short_prompt_scores_zero():
    scheduler, _ = make_scheduler([{"type": "prefix-cache-scorer"}], [{"pluginRef": "prefix-cache-scorer"}], endpoints=2)
    result = scheduler.schedule(SchedulingRequest("1", "m", prompt_text="short"))
    assert all(s["prefix-cache-scorer"] == 0.0 for s in result.scores["p"].values())


def test_utilization_detector_drops_saturated():
    scheduler, datastore = make_scheduler([{"type": "utilization-detector"}], [{"pluginRef": "utilization-detector"}], endpoints=3)
    set_metrics(datastore, "10.0.0.0:8000", waiting=6)  # queue over 5
    set_metrics(datastore, "10.0.0.1:8000", kv=0.81)  # KV over 0.8
    set_metrics(datastore, "10.0.0.2:8000", waiting=5, kv=0.8)  # at the thresholds: kept
    picks = {scheduler.schedule(SchedulingRequest(str(i), "m", prompt_text="x")).target.address for i in range(20)}
    assert picks == {"10.0.0.2:8000"}


def test_utilization_detector_keeps_all_when_all_saturated():
    scheduler, datastore = make_scheduler([{"type": "utilization-detector"}], [{"pluginRef": "utilization-detector"}], endpoints=2)
    set_metrics(datastore, "10.0.0.0:8000", waiting=50)
    set_metrics(datastore, "10.0.0.1:8000", waiting=50)
    picks = {scheduler.schedule(SchedulingRequest(str(i), "m", prompt_text="x")).target.address for i in range(40)}
    assert picks == {"10.0.0.0:8000", "10.0.0.1:8000"}
    assert scheduler.saturated()


def test_utilization_detector_treats_stale_as_saturated():
    clock = [100.0]
    datastore = Datastore(scrape_interval=0.05, staleness=1.0, clock=lambda: clock[0])
    datastore.set_endpoints([EndpointSpec("a:1"), EndpointSpec("b:1")])
    config = {"plugins": [{"type": "utilization-detector"}], "schedulingProfiles": [{"name": "p", "plugins": [{"pluginRef": "utilization-detector"}]}]}
    scheduler = Scheduler.from_config(config, datastore=datastore, model_name="m", seed=3)
    datastore.update_metrics("a:1", EngineMetrics(waiting=0, kv_usage=0.0))
    datastore.update_metrics("b:1", EngineMetrics(waiting=0, kv_usage=0.0))
    clock[0] += 0.5
    datastore.update_metrics("b:1", EngineMetrics(waiting=0, kv_usage=0.0))
    clock[0] += 0.7  # a is 1.2 s old (stale), b 0.7 s (fresh)
    assert datastore.is_stale(datastore.get("a:1"))
    assert not datastore.is_stale(datastore.get("b:1"))
    picks = {scheduler.schedule(SchedulingRequest(str(i), "m", prompt_text="x")).target.address for i in range(20)}
    assert picks == {"b:1"}
    assert not scheduler.saturated()


def test_role_filters():
    labels = {0: {"llm-d.ai/role": "prefill"}, 1: {"llm-d.ai/role": "decode"}, 2: {"llm-d.ai/role": "both"}}
    prefill, _ = make_scheduler([{"type": "prefill-filter"}], [{"pluginRef": "prefill-filter"}], labels=labels)
    decode, _ = make_scheduler([{"type": "decode-filter"}], [{"pluginRef": "decode-filter"}], labels=labels)
    prefill_picks = {prefill.schedule(SchedulingRequest(str(i), "m", prompt_text="x")).target.address for i in range(30)}
    decode_picks = {decode.schedule(SchedulingRequest(str(i), "m", prompt_text="x")).target.address for i in range(60)}
    assert prefill_picks == {"10.0.0.0:8000"}
    assert decode_picks == {"10.0.0.1:8000", "10.0.0.2:8000"}


def test_label_selector_filter():
    labels = {0: {"zone": "a", "gpu": "h100"}, 1: {"zone": "b"}, 2: {"zone": "a"}}
    scheduler, _ = make_scheduler(
        [{"type": "label-selector-filter", "parameters": {"matchLabels": {"zone": "a"}, "matchExpressions": [{"key": "gpu", "operator": "Exists"}]}}],
        [{"pluginRef": "label-selector-filter"}],
        labels=labels,
    )
    picks = {scheduler.schedule(SchedulingRequest(str(i), "m", prompt_text="x")).target.address for i in range(20)}
    assert picks == {"10.0.0.0:8000"}


def test_session_affinity_scorer_and_header():
    scheduler, _ = make_scheduler([{"type": "session-affinity-scorer"}], [{"pluginRef": "session-affinity-scorer"}], endpoints=4)
    first = scheduler.schedule(SchedulingRequest("1", "m", prompt_text="x"))
    token = first.response_headers["x-session-token"]
    assert decode_token(token) == first.target.address
    for i in range(10):
        again = scheduler.schedule(SchedulingRequest(str(i), "m", prompt_text="x", headers={"x-session-token": token}))
        assert again.target.address == first.target.address
        assert again.scores["p"][first.target.address]["session-affinity-scorer"] == 1.0
    assert decode_token(encode_token("h:1")) == "h:1"
    assert decode_token("!!!") is None


def test_no_hit_lru_spreads_cold_requests():
    scheduler, _ = make_scheduler(
        [{"type": "prefix-cache-scorer"}, {"type": "no-hit-lru-scorer"}],
        [{"pluginRef": "prefix-cache-scorer"}, {"pluginRef": "no-hit-lru-scorer"}],
        endpoints=4,
    )
    picks = [scheduler.schedule(SchedulingRequest(str(i), "m", prompt_text=f"{i:03d}" * 40)).target.address for i in range(8)]
    # Every cold request goes to the least recently used endpoint: a strict rotation.
    assert len(set(picks[:4])) == 4
    assert picks[4:] == picks[:4]


def test_no_hit_lru_neutral_on_hit():
    scheduler, _ = make_scheduler(
        [{"type": "prefix-cache-scorer"}, {"type": "no-hit-lru-scorer"}],
        [{"pluginRef": "prefix-cache-scorer"}, {"pluginRef": "no-hit-lru-scorer"}],
        endpoints=3,
    )
    scheduler.schedule(SchedulingRequest("1", "m", prompt_text="z" * 200))
    result = scheduler.schedule(SchedulingRequest("2", "m", prompt_text="z" * 200))
    assert {s["no-hit-lru-scorer"] for s in result.scores["p"].values()} == {0.5}


def test_max_score_picker_breaks_ties_randomly():
    scheduler, _ = make_scheduler([{"type": "queue-scorer"}], [{"pluginRef": "queue-scorer"}], endpoints=4)
    counts = collections.Counter(scheduler.schedule(SchedulingRequest(str(i), "m", prompt_text="x")).target.address for i in range(400))
    assert len(counts) == 4
    assert min(counts.values()) > 50


def test_random_picker_ignores_scores():
    scheduler, datastore = make_scheduler(
        [{"type": "queue-scorer"}, {"type": "random-picker"}], [{"pluginRef": "queue-scorer"}, {"pluginRef": "random-picker"}], endpoints=3
    )
    set_metrics(datastore, "10.0.0.0:8000", waiting=0)
    set_metrics(datastore, "10.0.0.1:8000", waiting=9)
    set_metrics(datastore, "10.0.0.2:8000", waiting=9)
    counts = collections.Counter(scheduler.schedule(SchedulingRequest(str(i), "m", prompt_text="x")).target.address for i in range(300))
    assert len(counts) == 3


def test_weighted_random_picker_follows_scores():
    scheduler, datastore = make_scheduler(
        [{"type": "kv-cache-utilization-scorer"}, {"type": "weighted-random-picker"}],
        [{"pluginRef": "kv-cache-utilization-scorer"}, {"pluginRef": "weighted-random-picker"}],
        endpoints=3,
    )
    set_metrics(datastore, "10.0.0.0:8000", kv=0.1)  # score 0.9
    set_metrics(datastore, "10.0.0.1:8000", kv=0.7)  # score 0.3
    set_metrics(datastore, "10.0.0.2:8000", kv=1.0)  # score 0: never chosen
    counts = collections.Counter(scheduler.schedule(SchedulingRequest(str(i), "m", prompt_text="x")).target.address for i in range(3000))
    assert counts["10.0.0.2:8000"] == 0
    # A-Res picks with probability proportional to weight: 0.9 / 1.2 = 75 %.
    assert 0.70 < counts["10.0.0.0:8000"] / 3000 < 0.80


def test_round_robin_shape_cycles_ready_endpoints():
    datastore = Datastore()
    datastore.set_endpoints([EndpointSpec("a:1"), EndpointSpec("b:1"), EndpointSpec("c:1", ready=False)])
    scheduler = Scheduler.from_config(None, shape="no-scheduler", datastore=datastore, model_name="m")
    picks = [scheduler.schedule(SchedulingRequest(str(i), "m")).target.address for i in range(4)]
    assert picks == ["a:1", "b:1", "a:1", "b:1"]


def test_default_profile_prefix_beats_idle_load():
    datastore = Datastore()
    datastore.set_endpoints([EndpointSpec(f"e{i}:1") for i in range(4)])
    scheduler = Scheduler.from_config(None, datastore=datastore, model_name="m", seed=5)
    for endpoint in datastore.all_endpoints():
        set_metrics(datastore, endpoint.address, waiting=0)
    prompt = "system prompt " * 100
    first = scheduler.schedule(SchedulingRequest("1", "m", prompt_text=prompt + "question one"))
    for i in range(10):
        result = scheduler.schedule(SchedulingRequest(str(i), "m", prompt_text=prompt + f"question {i}"))
        assert result.target.address == first.target.address
