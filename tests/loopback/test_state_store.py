"""The Redis store on a real redis-server: effectively-once commits across replicas, bounds, and
what a server does while Redis is down or slow.

A "replica" here is a ``RemoteExecutor`` of its own (its own process memory, cache and answers)
on the shared Redis; the process tests run real server processes.
"""

from __future__ import annotations

import json
import signal
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from offload import LinkConfig, RunningServer, ServerConfig, encode, load_pipeline, serve
from offload._cloud import redis_state
from offload._cloud.executor import RemoteExecutor, RequestRejected
from offload._cloud.redis_state import MAX_RUNS, RedisStore
from offload._state import Changes, decode_state
from offload.v1 import offload_pb2 as pb
from offload.v1 import offload_pb2_grpc as pb_grpc

from ..helpers import ClientThread, RedisServer, wait_until

STATEFUL = "tests.apps.stateful"


@pytest.fixture
def config(redis_server: RedisServer) -> ServerConfig:
    return ServerConfig(pipeline=STATEFUL, host="127.0.0.1", port=0, state=redis_server.url)


@pytest.fixture
def replicas(config: ServerConfig) -> Iterator[list[RemoteExecutor]]:
    """Three executors on one Redis, as three server processes would be."""
    pipeline = load_pipeline(STATEFUL)
    executors = [RemoteExecutor(pipeline, config) for _ in range(3)]
    yield executors
    for executor in executors:
        executor.store.close()


def item(n: int, device: str = "dev-a", run: str = "run-1") -> pb.TaskState:
    pipeline = load_pipeline(STATEFUL)
    state = pb.TaskState(
        pipeline=pipeline.name,
        fingerprint=pipeline.fingerprint,
        device_id=device,
        run_id=run,
        item=n,
        next_task=1,
        capture_time=1000.0 + n,
    )
    state.args.CopyFrom(encode(n + 1))  # task 0's value for item n
    return state


def output(result: pb.ItemResult) -> dict[str, Any]:
    from offload import decode  # noqa: PLC0415

    value = decode(result.output)
    assert isinstance(value, dict)
    return value


def expected(n: int) -> dict[str, Any]:
    """What a client-only run answers for item n: each item counted once, in order."""
    return {"n": n + 1, "seen": n + 1, "total": (n + 1) * (n + 2) // 2}


def test_a_resend_that_lands_on_another_replica_is_replayed_not_run_again(
    replicas: list[RemoteExecutor],
) -> None:
    a, b, _ = replicas
    first = [a.execute(item(n)) for n in range(5)]
    resent = b.execute(item(3))
    assert resent.duplicate and output(resent) == output(first[3])
    # The next item continues from the state the other replica left.
    assert output(b.execute(item(5))) == expected(5)
    assert [output(r) for r in first] == [expected(n) for n in range(5)]


def test_replicas_taking_turns_on_one_device_see_each_others_state(
    replicas: list[RemoteExecutor],
) -> None:
    # Each replica's cached state is stale when its turn comes: the commit's compare-and-set
    # finds out, and the last task runs again on the state that won.
    results = [replicas[n % 3].execute(item(n)) for n in range(12)]
    assert [output(r) for r in results] == [expected(n) for n in range(12)]
    assert not any(r.duplicate for r in results)


def test_two_replicas_racing_on_one_device_never_lose_or_double_an_update(
    replicas: list[RemoteExecutor], redis_server: RedisServer
) -> None:
    # A fail-over: the old stream and the resent one both run the device's items at once.
    items = 60
    answers: dict[int, list[dict[str, Any]]] = {n: [] for n in range(items)}
    lock = threading.Lock()

    def stream(executor: RemoteExecutor) -> None:
        for n in range(items):
            result = executor.execute(item(n))
            with lock:
                answers[n].append(output(result))

    threads = [threading.Thread(target=stream, args=(e,)) for e in replicas[:2]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for n in range(items):
        assert answers[n] == [expected(n), expected(n)], n  # one computation, given twice
    state = decode_state(redis_server.client().hget(state_key("dev-a"), "d"))
    assert state["seen"] == items and state["total"] == expected(items - 1)["total"]


def state_key(device: str) -> str:
    return f"offload:{STATEFUL}:{{{STATEFUL}/{device}}}:state"


class DiesBeforeCommit(RedisStore):
    """A replica killed between computing an item and committing it."""

    def commit(self, *args: Any, **kwargs: Any) -> Any:
        raise SystemExit("killed")


def test_a_replica_killed_between_computing_and_committing_leaves_nothing_behind(
    config: ServerConfig, replicas: list[RemoteExecutor], redis_server: RedisServer
) -> None:
    survivor = replicas[0]
    for n in range(3):
        survivor.execute(item(n))
    before = sorted(redis_server.client().keys("*"))
    dying = RemoteExecutor(load_pipeline(STATEFUL), config, store=DiesBeforeCommit(config))
    with pytest.raises(SystemExit):
        dying.execute(item(3))
    dying.store.close()
    assert sorted(redis_server.client().keys("*")) == before
    assert redis_server.client().hget(state_key("dev-a"), "v") == b"3"
    # The device resends it to the survivor: computed once, from the state the dead one read.
    assert output(survivor.execute(item(3))) == expected(3)


def test_an_item_whose_answer_expired_is_refused_not_run_again(config: ServerConfig) -> None:
    small = replace(config, state_answers=4)
    executor = RemoteExecutor(load_pipeline(STATEFUL), small)
    other = RemoteExecutor(load_pipeline(STATEFUL), small)
    try:
        for n in range(10):
            executor.execute(item(n))
        assert other.execute(item(6)).duplicate  # still kept
        old = other.execute(item(2))
        assert old.duplicate and old.status == pb.ItemResult.FAILED
        assert "no longer remembered" in old.error and "keeps 4 per run" in old.error
        assert output(other.execute(item(10))) == expected(10)  # counted once each
    finally:
        executor.store.close()
        other.store.close()


def test_answers_expire_and_each_device_keeps_a_bounded_number_of_keys(
    config: ServerConfig, redis_server: RedisServer
) -> None:
    bounded = replace(config, state_answers=3, state_ttl=120.0)
    executor = RemoteExecutor(load_pipeline(STATEFUL), bounded)
    try:
        for run in range(MAX_RUNS + 3):  # a device restarted again and again
            for n in range(6):
                executor.execute(item(n, run=f"run-{run}"))
    finally:
        executor.store.close()
    client = redis_server.client()
    device_keys = client.keys(f"offload:{STATEFUL}:{{*dev-a}}:*")
    answer_keys = [k for k in device_keys if b":answers:" in k]
    assert len(answer_keys) == MAX_RUNS  # the oldest runs' answers were deleted
    for key in answer_keys:
        assert client.hlen(key) == 3 + 3  # 3 answers; high-water mark, bytes, oldest
    assert len(device_keys) == MAX_RUNS + 3  # + state, runs, published
    for key in [*device_keys, f"offload:{STATEFUL}:fleet:latest".encode()]:
        assert 0 < client.pttl(key) <= 120_000, key  # everything expires


def test_the_commit_script_stores_state_answer_and_high_water_mark_in_one_call(
    config: ServerConfig, redis_server: RedisServer
) -> None:
    store = RedisStore(config)
    try:
        state = store.state("dev-b")
        state.device["x"] = 1
        outcome = store.commit("dev-b", "r", 0, state, state.changes(), b"answer-0")
        assert outcome.verdict.value == "committed"
        client = redis_server.client()
        answers = client.hgetall(f"offload:{STATEFUL}:{{{STATEFUL}/dev-b}}:answers:r")
        assert answers == {b"0": b"answer-0", b"h": b"0", b"b": b"8", b"o": b"0"}
        assert decode_state(client.hget(state_key("dev-b"), "d")) == {"x": 1}
        # A commit from a stale read changes nothing and returns the state that won.
        outcome = store.commit("dev-b", "r", 1, _read_at(store, 0), Changes(b"x"), b"a1")
        assert outcome.verdict.value == "stale"
        assert client.hget(state_key("dev-b"), "v") == b"1"
        assert client.hlen(f"offload:{STATEFUL}:{{{STATEFUL}/dev-b}}:answers:r") == 4  # no a1
    finally:
        store.close()


def test_a_runs_answers_are_kept_within_a_byte_budget_and_a_jump_forgets_what_lies_behind(
    config: ServerConfig, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_state, "RUN_ANSWER_BYTES", 10_000)
    store = RedisStore(config)
    key = f"offload:{STATEFUL}:{{{STATEFUL}/big}}:answers:r"
    client = redis_server.client()
    try:
        for n in range(20):
            assert store.commit("big", "r", n, None, Changes(), bytes(3000)).verdict.value == (
                "committed"
            )
            kept = {int(f) for f in client.hkeys(key) if f.isdigit()}
            assert kept == set(range(max(0, n - 2), n + 1))  # 3 x 3000 bytes fit, 4 do not
            assert int(client.hget(key, "b")) == 3000 * len(kept)
        store.commit("big", "r", 10_000, None, Changes(), b"far")  # items 20.. ran elsewhere
        assert {f for f in client.hkeys(key) if f.isdigit()} == {b"10000"}
        assert store.commit("big", "r", 19, None, Changes(), b"x").verdict.value == "forgotten"
    finally:
        store.close()


def _read_at(store: RedisStore, version: int) -> Any:
    """A State that read version ``version`` of dev-b."""
    from offload._state import Snapshot, State  # noqa: PLC0415

    state = State("dev-b", lambda: Snapshot(version, b""), store)
    _ = state.device
    return state


class CountingPipelines:
    """Counts the store's round trips: each call or pipeline sent to Redis is one."""

    def __init__(self, store: RedisStore) -> None:
        self.trips = 0
        client = store.redis
        original_pipeline, original_hmget = client.pipeline, client.hmget

        def pipeline(*args: Any, **kwargs: Any) -> Any:
            pipe = original_pipeline(*args, **kwargs)
            send = pipe.execute

            def execute(*a: Any, **k: Any) -> Any:
                self.trips += 1
                return send(*a, **k)

            pipe.execute = execute  # type: ignore[method-assign]
            return pipe

        def hmget(*args: Any, **kwargs: Any) -> Any:
            self.trips += 1
            return original_hmget(*args, **kwargs)

        client.pipeline = pipeline  # type: ignore[method-assign]
        client.hmget = hmget  # type: ignore[method-assign]


def test_an_item_costs_one_round_trip_to_redis_once_the_device_is_known(
    replicas: list[RemoteExecutor],
) -> None:
    executor = replicas[0]
    store = executor.store
    assert isinstance(store, RedisStore)
    counter = CountingPipelines(store)
    executor.execute(item(0))
    first = counter.trips
    for n in range(1, 21):
        executor.execute(item(n))
    assert first == 2  # the device's state read, then the commit
    assert counter.trips - first == 20


# --- a server while Redis is down or slow -----------------------------------------------------


@pytest.fixture
def server(config: ServerConfig) -> Iterator[RunningServer]:
    running = serve(replace(config, state_timeout=0.5, metrics_port=0))
    yield running
    running.stop(grace=0)


def health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status)


def send(port: int, states: list[pb.TaskState]) -> list[pb.ItemResult]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.OffloadStub(channel)
        return list(stub.ExecuteRemaining(iter(states), timeout=10))


def metric(server: RunningServer, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read()
    total = 0.0
    for line in text.decode().splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("fault", ["down", "frozen"])
def test_while_redis_is_away_items_are_unavailable_and_health_is_not_serving(
    server: RunningServer, redis_server: RedisServer, fault: str
) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    assert [output(r) for r in send(server.port, [item(0)])] == [expected(0)]
    assert health(server.port) == serving
    if fault == "down":
        redis_server.stop()
    else:
        redis_server.signal(signal.SIGSTOP)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            send(server.port, [item(1)])
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        details = str(refused.value.details())
        assert f"the state store {redis_server.url}" in details and "resend it" in details
        assert ("slow" if fault == "frozen" else "unreachable") in details
        assert "\n" not in details
        assert health(server.port) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert metric(server, "offload_state_errors_total") >= 1
        assert metric(server, "offload_state_up") == 0
    finally:
        if fault == "down":
            redis_server.start()
        else:
            redis_server.signal(signal.SIGCONT)
    assert wait_until(lambda: health(server.port) == serving, 30)
    # Nothing was lost or counted: the resent item continues where the state was.
    assert [output(r) for r in send(server.port, [item(1)])] == [expected(1)]


def test_a_state_read_that_fails_inside_the_task_is_unavailable_not_a_failed_item(
    replicas: list[RemoteExecutor], redis_server: RedisServer
) -> None:
    redis_server.stop()
    with pytest.raises(RequestRejected) as refused:
        replicas[0].execute(item(0, device="new"))  # not cached: the task reads Redis
    assert refused.value.code == "UNAVAILABLE"
    assert "reading the device state" in str(refused.value)


def test_a_device_holding_its_last_task_loses_no_item_while_redis_is_away(
    server: RunningServer, redis_server: RedisServer
) -> None:
    # Each reconnection while Redis is down is answered UNAVAILABLE, "the item was not run":
    # those sends must not count towards --max-sends (3), or the held item would end failed.
    device = ClientThread(
        STATEFUL, server.port, 10**6, local_tasks=1, link=LinkConfig(outage="hold-last")
    )
    link = device.client.link
    assert link is not None
    assert wait_until(lambda: device.client.recorder.answers >= 5, 60)
    redis_server.stop()
    try:
        assert wait_until(lambda: link.stats.disconnects > LinkConfig().max_sends, 60), link.stats
    finally:
        redis_server.start()
    assert wait_until(lambda: link.stats.connects > link.stats.disconnects, 60)
    device.client.stop()
    lines, report = device.join()
    statuses = {json.loads(line)["status"] for line in lines}
    assert statuses == {"completed"}, report["link"]["events"]
    assert report["link"]["ran_locally"] == 0
