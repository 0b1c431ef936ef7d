"""Approximate prefix index: LRU bounds, purge on removal, and chat/completions hash parity."""

from __future__ import annotations

from llmisvc.protocol.prompt_text import ChatRenderer
from llmisvc.scheduler import Datastore, EndpointSpec, Scheduler, SchedulingRequest
from llmisvc.scheduler.metrics_scrape import EngineMetrics
from llmisvc.scheduler.prefix_index import PrefixIndex, text_block_hashes

SMOL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_hashes_chain_and_seed():
    text = "abcd" * 64
    hashes = text_block_hashes(text, 64, 256, "model-a")
    assert len(hashes) == 4
    assert len(set(hashes)) == 4  # chained: equal blocks at different positions differ
    assert text_block_hashes(text, 64, 256, "model-b") != hashes
    assert text_block_hashes(text + "tail", 64, 256, "model-a") == hashes
    assert text_block_hashes(text, 64, 2, "model-a") == hashes[:2]


def test_lru_bound_per_endpoint():
    index = PrefixIndex(capacity=10)
    for start in range(0, 50, 5):
        index.add("a", list(range(start, start + 5)))
    assert index.entries("a") == 10
    assert index.match(list(range(40, 50))) == {"a": 10}
    assert index.match([0, 1]) == {}


def test_lru_touch_keeps_recent_blocks():
    index = PrefixIndex(capacity=4)
    index.add("a", [1, 2])
    index.add("a", [3, 4])
    index.add("a", [1, 2])  # touch: 3 and 4 are now oldest
    index.add("a", [5, 6])
    assert index.match([1, 2]) == {"a": 2}
    assert index.match([3]) == {}


def test_total_entries_cap():
    index = PrefixIndex(capacity=100, max_total_entries=120)
    index.add("a", list(range(0, 100)))
    index.add("b", list(range(1000, 1050)))
    assert index.total_entries <= 120
    assert index.entries("b") == 50


def test_purge_on_endpoint_removal():
    datastore = Datastore()
    datastore.set_endpoints([EndpointSpec("a:1"), EndpointSpec("b:1")])
    scheduler = Scheduler.from_config(None, datastore=datastore, model_name="m")
    scorer = scheduler.plugins["prefix-cache-scorer"]
    result = scheduler.schedule(SchedulingRequest("1", "m", prompt_text="p" * 640))
    assert scorer.index.entries(result.target.address) == 10
    datastore.set_endpoints([EndpointSpec(a) for a in ("a:1", "b:1") if a != result.target.address])
    assert scorer.index.entries(result.target.address) == 0
    assert scorer.index.total_entries == 0


def test_removal_waits_for_in_flight():
    datastore = Datastore()
    datastore.set_endpoints([EndpointSpec("a:1")])
    datastore.request_started("a:1")
    datastore.set_endpoints([])
    assert datastore.get("a:1").draining
    assert datastore.candidates() == []
    datastore.request_finished("a:1")
    assert datastore.get("a:1") is None


def test_capacity_auto_sized_from_engine():
    datastore = Datastore()
    datastore.set_endpoints([EndpointSpec("a:1")])
    scheduler = Scheduler.from_config(None, datastore=datastore, model_name="m")
    datastore.update_metrics("a:1", EngineMetrics(waiting=0, kv_usage=0.0, block_size=16, num_gpu_blocks=100))
    scheduler.schedule(SchedulingRequest("1", "m", prompt_text="q" * 64 * 300))
    scorer = scheduler.plugins["prefix-cache-scorer"]
    assert scorer.index.capacity("a:1") == 100
    assert scorer.index.entries("a:1") == 100


def _scheduler_pair(template):
    datastore = Datastore()
    datastore.set_endpoints([EndpointSpec(f"e{i}:1") for i in range(8)])
    return Scheduler.from_config(None, datastore=datastore, model_name="m", chat_template=template, seed=2)


def test_chat_and_completions_hash_alike():
    for template in (None, SMOL_TEMPLATE):
        scheduler = _scheduler_pair(template)
        messages = [{"role": "system", "content": "You are terse. " * 40}, {"role": "user", "content": "Question " * 30}]
        rendered = ChatRenderer(template).render(messages)
        chat = scheduler.schedule(SchedulingRequest("1", "m", body={"model": "m", "messages": messages}))
        completion = scheduler.schedule(SchedulingRequest("2", "m", body={"model": "m", "prompt": rendered}))
        scores = completion.scores["default"][chat.target.address]
        assert scores["prefix-cache-scorer"] == 1.0
        assert completion.target.address == chat.target.address


def test_chat_parts_render_like_strings():
    renderer = ChatRenderer(SMOL_TEMPLATE)
    as_parts = renderer.render([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    as_string = renderer.render([{"role": "user", "content": "a\nb"}])
    assert as_parts == as_string


def test_match_counts_each_endpoint_prefix():
    index = PrefixIndex()
    index.add("a", [1, 2, 3])
    index.add("b", [1, 2])
    index.add("c", [1])
    index.add("d", [2, 3])  # holds later blocks but not the first: no match
    assert index.match([1, 2, 3, 4]) == {"a": 3, "b": 2, "c": 1}
    assert index.match([5, 1]) == {}
    index.remove_endpoint("b")
    index.add("e", [1, 2])  # reuses b's bit; b's entries are gone
    assert index.match([1, 2, 3]) == {"a": 3, "e": 2, "c": 1}
