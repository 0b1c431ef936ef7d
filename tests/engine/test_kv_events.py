"""KV-cache events: wire layout, the ZMQ publisher, and the stream from a real engine."""

import time

import msgpack
import pytest
import requests
import zmq

from llmisvc.engine.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventsConfig,
    ZmqEventPublisher,
    decode_batch,
    encode_batch,
)
from llmisvc.protocol.block_hash import hash_blocks
from support import free_port, start, stop, wait_http

MODEL = "smol"


def subscriber(port: int) -> tuple[zmq.Context, zmq.Socket]:
    """Bind a SUB socket on 127.0.0.1 that publishers connect to (vLLM's connect mode)."""
    context = zmq.Context()
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.bind(f"tcp://127.0.0.1:{port}")
    return context, socket


def receive(socket: zmq.Socket, timeout: float) -> list[bytes] | None:
    if socket.poll(int(timeout * 1000)):
        return socket.recv_multipart()
    return None


def test_batch_wire_layout():
    events = [
        BlockStored([11, 12], None, list(range(8)), 4),
        BlockRemoved([11]),
        AllBlocksCleared(),
    ]
    raw = msgpack.unpackb(encode_batch(events, ts=1.5), raw=False)
    assert raw == [
        1.5,
        [
            ["BlockStored", [11, 12], None, list(range(8)), 4, None, "CPU"],
            ["BlockRemoved", [11], "CPU"],
            ["AllBlocksCleared"],
        ],
        0,
    ]
    ts, decoded, rank = decode_batch(encode_batch(events, ts=2.0))
    assert ts == 2.0
    assert rank == 0
    assert decoded[1] == ["BlockRemoved", [11], "CPU"]


def test_unsigned_64_bit_hashes_survive_msgpack():
    big = 2**64 - 1
    _, events, _ = decode_batch(encode_batch([BlockRemoved([big])]))
    assert events[0][1] == [big]


def test_config_validation():
    assert not KVEventsConfig.from_json({}).enabled
    assert KVEventsConfig.from_json({"enable_kv_cache_events": True, "publisher": "zmq"}).enabled
    with pytest.raises(ValueError, match="bogus"):
        KVEventsConfig.from_json({"bogus": 1})
    with pytest.raises(ValueError, match="publisher"):
        KVEventsConfig.from_json({"publisher": "kafka"})


def test_publisher_frames_and_replay():
    sub_port, replay_port = free_port(), free_port()
    context, socket = subscriber(sub_port)
    config = KVEventsConfig(
        enable_kv_cache_events=True,
        publisher="zmq",
        endpoint=f"tcp://127.0.0.1:{sub_port}",
        replay_endpoint=f"tcp://127.0.0.1:{replay_port}",
    )
    publisher = ZmqEventPublisher(config, "kv@test@m")
    try:
        # PUB drops messages until the connection is up (seconds on a loaded machine), so
        # publish until one arrives.
        frames = None
        for _ in range(300):
            publisher.publish([BlockRemoved([1])])
            frames = receive(socket, 0.1)
            if frames:
                break
        assert frames is not None
        topic, seq, payload = frames
        assert topic == b"kv@test@m"
        assert len(seq) == 8
        assert decode_batch(payload)[1] == [["BlockRemoved", [1], "CPU"]]
        first_seq = int.from_bytes(seq, "big")

        publisher.publish([])  # empty batches are not sent
        publisher.publish([AllBlocksCleared()])
        frames = receive(socket, 5)
        while frames and decode_batch(frames[2])[1] != [["AllBlocksCleared"]]:
            frames = receive(socket, 5)
        assert frames is not None
        assert int.from_bytes(frames[1], "big") > first_seq

        dealer = context.socket(zmq.DEALER)
        dealer.connect(f"tcp://127.0.0.1:{replay_port}")
        dealer.send_multipart([b"", first_seq.to_bytes(8, "big")])
        replayed = []
        while True:
            assert dealer.poll(5000)
            _, seq_bytes, payload = dealer.recv_multipart()
            if int.from_bytes(seq_bytes, "big", signed=True) == -1:
                break
            replayed.append(decode_batch(payload)[1])
        assert replayed[0] == [["BlockRemoved", [1], "CPU"]]
        assert replayed[-1] == [["AllBlocksCleared"]]
        dealer.close(linger=0)
    finally:
        publisher.close()
        socket.close(linger=0)
        context.term()


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def engine_with_events(tmp_path_factory):
    events_port, port = free_port(), free_port()
    context, socket = subscriber(events_port)
    config = f'{{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://127.0.0.1:{events_port}"}}'
    log = tmp_path_factory.mktemp("engine") / "engine.log"
    args = ["engine", "--port", str(port), "--served-model-name", MODEL, "--threads", "2",
            "--num-gpu-blocks-override", "24", "--kv-events-config", config]  # fmt: skip
    process = start(args, log)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=300, process=process)
        yield f"http://127.0.0.1:{port}", port, socket
    finally:
        stop(process)
        socket.close(linger=0)
        context.term()


def collect_events(socket: zmq.Socket, until, timeout: float = 60.0) -> list[tuple[bytes, int, list]]:
    """Receive batches until `until(events so far)` is true; return (topic, seq, event) triples."""
    received = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frames = receive(socket, 0.5)
        if frames is None:
            continue
        topic, seq, payload = frames
        for event in decode_batch(payload)[1]:
            received.append((topic, int.from_bytes(seq, "big"), event))
        if until([event for _, _, event in received]):
            return received
    raise AssertionError(f"expected events did not arrive within {timeout}s: {received}")


@pytest.mark.e2e
def test_engine_publishes_stored_and_removed(engine_with_events):
    base, port, socket = engine_with_events
    # PUB drops messages until the subscriber's connection is up, which on a loaded machine
    # can take seconds: send small prompts until their events arrive.
    deadline = time.monotonic() + 120
    warm = 0
    while receive(socket, 1.0) is None:
        assert time.monotonic() < deadline, "no KV event arrived within 120s"
        warm_ids = [9000 + warm * 20 + i for i in range(20)]
        warm += 1
        body = {"model": MODEL, "prompt": warm_ids, "max_tokens": 1}
        assert requests.post(f"{base}/v1/completions", json=body, timeout=120).status_code == 200
    while receive(socket, 0.5) is not None:
        pass

    ids = [2000 + i for i in range(100)]
    expected = hash_blocks(ids, 16)
    body = {"model": MODEL, "prompt": ids, "max_tokens": 1, "temperature": 0}
    assert requests.post(f"{base}/v1/completions", json=body, timeout=120).status_code == 200

    def stored_all(events):
        stored = [h for e in events if e[0] == "BlockStored" for h in e[1]]
        return all(h in stored for h in expected)

    received = collect_events(socket, stored_all)
    topics = {topic for topic, _, _ in received}
    assert topics == {f"kv@127.0.0.1:{port}@{MODEL}".encode()}
    first = next(e for _, _, e in received if e[0] == "BlockStored")
    assert first[1][0] == expected[0]
    assert first[2] is None
    assert first[3][:16] == ids[:16]
    assert first[4] == 16

    # Fill the 24-block pool with other prompts: the first prompt's blocks get evicted.
    for offset in range(3):
        other = [5000 + offset * 1000 + i for i in range(150)]
        response = requests.post(f"{base}/v1/completions", json={**body, "prompt": other}, timeout=120)
        assert response.status_code == 200

    def removed_some(events):
        removed = [h for e in events if e[0] == "BlockRemoved" for h in e[1]]
        return any(h in removed for h in expected)

    later = collect_events(socket, removed_some)
    sequence_numbers = [seq for _, seq, _ in received + later]
    assert sequence_numbers == sorted(sequence_numbers)

    assert requests.post(f"{base}/reset_prefix_cache", timeout=30).status_code == 200
    collect_events(socket, lambda events: ["AllBlocksCleared"] in events)
    again = requests.post(f"{base}/v1/completions", json=body, timeout=120).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
