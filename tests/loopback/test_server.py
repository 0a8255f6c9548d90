"""The server over real gRPC on loopback: refusals, failures that stay per item, replays."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from offload import ConfigError, RunningServer, ServerConfig, decode, serve
from offload._logging import RefusalLog
from offload.v1 import offload_pb2 as pb
from offload.v1 import offload_pb2_grpc as pb_grpc

from ..helpers import COUNTER, exchange, state


@pytest.fixture
def counter_server(start_server: Callable[..., RunningServer]) -> Iterator[pb_grpc.OffloadStub]:
    server = start_server(COUNTER)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.OffloadStub(channel)


def test_each_item_gets_one_answer_in_order_with_server_times(
    counter_server: pb_grpc.OffloadStub,
) -> None:
    answers = exchange(counter_server, [state(i, i + 1) for i in range(4)])
    assert [a.item for a in answers] == [0, 1, 2, 3]
    assert [a.status for a in answers] == [pb.ItemResult.COMPLETED] * 4
    assert [t.task for t in answers[0].task_times] == [1, 2]
    assert answers[0].server_cpu_seconds > 0


def test_a_failing_task_fails_that_item_only(counter_server: pb_grpc.OffloadStub) -> None:
    answers = exchange(counter_server, [state(i, i + 1, run_id="fail") for i in range(6)])
    failed = [a for a in answers if a.status == pb.ItemResult.FAILED]
    assert [a.item for a in failed] == [4]
    assert failed[0].task == 1
    assert failed[0].error == "ValueError: item value 5 is a multiple of 5"
    assert answers[5].status == pb.ItemResult.COMPLETED


def test_a_resent_item_is_replayed_not_aggregated_twice(
    counter_server: pb_grpc.OffloadStub,
) -> None:
    first = exchange(counter_server, [state(0, 1, run_id="dup"), state(1, 2, run_id="dup")])
    again = exchange(counter_server, [state(1, 2, run_id="dup"), state(2, 3, run_id="dup")])
    assert again[0].duplicate and again[0].output == first[1].output
    assert decode(again[1].output)["seen"] == 3  # 3 distinct items, not 4


def test_another_pipeline_is_refused_with_failed_precondition(
    counter_server: pb_grpc.OffloadStub,
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        exchange(counter_server, [state(0, 1, fingerprint="0123456789abcdef")])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "pipeline mismatch" in err.value.details()
    assert "same --pipeline" in err.value.details()


@pytest.mark.parametrize("next_task", [0, 3, 99])
def test_next_task_outside_the_server_range_is_invalid(
    counter_server: pb_grpc.OffloadStub, next_task: int
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        exchange(counter_server, [state(0, 1, next_task=next_task)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"next_task {next_task} is outside [1, 2]" in err.value.details()


def test_a_malformed_array_is_invalid_and_names_the_field(
    counter_server: pb_grpc.OffloadStub,
) -> None:
    bad = state(0, 1)
    bad.args.array.dtype = "|u1"
    bad.args.array.shape.extend([10])
    bad.args.array.data = b"short"
    with pytest.raises(grpc.RpcError) as err:
        exchange(counter_server, [bad])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "args.data: 5 bytes" in err.value.details()


def test_devices_stream_concurrently_with_separate_state(
    counter_server: pb_grpc.OffloadStub,
) -> None:
    results: dict[str, list[int]] = {}

    def device(name: str) -> None:
        answers = exchange(
            counter_server, [state(i, 1, device=name, run_id="c") for i in range(20)]
        )
        results[name] = [decode(a.output)["seen"] for a in answers]

    threads = [threading.Thread(target=device, args=(f"dev{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {f"dev{i}": list(range(1, 21)) for i in range(4)}


def test_health_is_serving_and_turns_not_serving_on_stop(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(COUNTER)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="offload.v1.Offload")
        assert health.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    server.stop(grace=0.5)
    # The server no longer answers on the network: ask the servicer itself.
    after = server.health.Check(request, None)
    assert after.status == health_pb2.HealthCheckResponse.NOT_SERVING


def open_stream(stub: pb_grpc.OffloadStub, device: str) -> tuple[Any, threading.Event]:
    """A device stream that sends one item, takes its answer and stays open until released."""
    release = threading.Event()

    def requests() -> Iterator[pb.TaskState]:
        yield state(0, 1, device=device, run_id="open")
        release.wait(60)

    call = stub.ExecuteRemaining(requests(), timeout=60)
    assert next(call).status == pb.ItemResult.COMPLETED  # the server holds the stream now
    return call, release


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if "event=reject" in r.getMessage() and "RESOURCE_EXHAUSTED" in r.getMessage()
    ]


def test_a_full_server_refuses_a_device_saying_which_limit_and_logs_it_once(
    start_server: Callable[..., RunningServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="offload.server")
    server = start_server(COUNTER, workers=1)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.OffloadStub(channel)
        held, release = open_stream(stub, "first")
        try:
            for _ in range(5):  # a device retrying in a loop
                with pytest.raises(grpc.RpcError) as err:
                    exchange(stub, [state(0, 1, device="second")])
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "the server is full" in err.value.details()
                assert "--workers 1" in err.value.details()
            with pytest.raises(grpc.RpcError):
                exchange(stub, [state(0, 1, device="third")])
        finally:
            release.set()
            held.cancel()
    lines = refusal_lines(caplog)
    # Each refused device is named once, with the limit and the flag that raises it.
    assert len(lines) == 2, lines
    assert "device=second" in lines[0] and "device=third" in lines[1]
    assert all("workers=1" in line and "raise the server's --workers" in line for line in lines)


def test_a_full_server_still_answers_health_checks(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(COUNTER, workers=1)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        held, release = open_stream(pb_grpc.OffloadStub(channel), "first")
        try:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="offload.v1.Offload")
            answer = health.Check(request, timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            release.set()
            held.cancel()


def test_a_device_refused_again_soon_is_counted_into_its_next_log_line() -> None:
    refusals = RefusalLog(interval=0.5)
    assert refusals.count("pi") == 1  # the first is logged at once
    assert refusals.count("other") == 1
    quiet = 0
    while (reported := refusals.count("pi")) == 0:
        quiet += 1
        time.sleep(0.01)
    assert quiet >= 1
    assert reported == quiet + 1  # the refusals left out, and this one


def test_serve_refuses_a_server_that_could_take_no_stream() -> None:
    with pytest.raises(ConfigError, match="workers 0: at least 1 device stream must fit"):
        serve(ServerConfig(pipeline=COUNTER, host="127.0.0.1", port=0, workers=0))
