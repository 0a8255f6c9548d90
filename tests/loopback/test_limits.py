"""Bounds: message size at and over the limit, argument counts, idle and stalled streams."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable, Iterator

import grpc
import pytest

from offload import (
    Client,
    ClientConfig,
    GrpcTransport,
    ItemContext,
    Limits,
    RunningServer,
    ServerConfig,
    decode,
    encode,
    load_pipeline,
)
from offload._pipeline import run_tasks
from offload.testing import RemoteExecutor
from offload.v1 import offload_pb2 as pb
from offload.v1 import offload_pb2_grpc as pb_grpc

from ..helpers import COUNTER, exchange, state, wait_until

ECHO = "tests.apps.echo"
LIMIT = 64 * 1024
METHOD = "/offload.v1.Offload/ExecuteRemaining"


def echo_state(size: int, item: int = 0, run: str = "r") -> pb.TaskState:
    pipeline = load_pipeline(ECHO)
    msg = pb.TaskState(
        pipeline=pipeline.name,
        fingerprint=pipeline.fingerprint,
        device_id="d",
        run_id=run,
        item=item,
        next_task=1,
    )
    msg.args.CopyFrom(encode(b"x" * size))
    return msg


def state_of_size(total: int, item: int = 0) -> pb.TaskState:
    """A TaskState whose serialised size is exactly ``total`` bytes."""
    payload = total - echo_state(0, item).ByteSize()
    while echo_state(payload, item).ByteSize() > total:  # longer length prefixes
        payload -= 1
    msg = echo_state(payload, item)
    assert msg.ByteSize() == total
    return msg


def test_a_message_at_the_limit_passes_and_one_byte_more_is_resource_exhausted(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(ECHO, limits=Limits(max_message_bytes=LIMIT))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.stream_stream(
            METHOD,
            request_serializer=pb.TaskState.SerializeToString,
            response_deserializer=pb.ItemResult.FromString,
        )
        (answer,) = list(call(iter([state_of_size(LIMIT)]), timeout=10))
        assert answer.status == pb.ItemResult.COMPLETED
        with pytest.raises(grpc.RpcError) as err:
            list(call(iter([state_of_size(LIMIT + 1, item=1)]), timeout=10))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Any client (not only ours) is told which option to raise.
    assert f"more than this server's --max-message-bytes {LIMIT}" in err.value.details()


def run_echo(
    port: int, sizes: list[int], limit: int, compression: str = "auto"
) -> tuple[list[dict[str, object]], dict]:  # type: ignore[type-arg]
    pipeline = load_pipeline(ECHO)
    pipeline.set_source(",".join(map(str, sizes)))
    config = ClientConfig(
        pipeline=ECHO,
        local_tasks=1,
        device_id="d",
        limits=Limits(max_message_bytes=limit),
        compression=compression,
    )
    transport = GrpcTransport.from_config(config, f"127.0.0.1:{port}")
    out = io.StringIO()
    try:
        report = Client(pipeline, config, transport, out).run()
    finally:
        transport.close()
    return [json.loads(line) for line in out.getvalue().splitlines()], report


def test_the_client_fails_only_the_oversized_item_naming_the_option(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(ECHO, limits=Limits(max_message_bytes=LIMIT))
    lines, report = run_echo(server.port, [100, LIMIT + 1, 200], LIMIT)
    assert [line["status"] for line in lines] == ["completed", "failed", "completed"]
    assert "--max-message-bytes 65536" in str(lines[1]["error"])
    assert report["error"] is None


def test_a_server_with_a_smaller_limit_names_the_option_to_raise(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(ECHO, limits=Limits(max_message_bytes=LIMIT))
    # Sent as it is (compressed, the server refuses it by its declared size: test_codec.py).
    _, report = run_echo(server.port, [LIMIT * 2], 4 * LIMIT, compression="none")
    assert "RESOURCE_EXHAUSTED" in report["error"]
    assert "raise --max-message-bytes on the client and the server" in report["error"]


def test_a_result_over_the_limit_fails_that_item_not_the_stream(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(ECHO, limits=Limits(max_message_bytes=LIMIT))
    lines, report = run_echo(server.port, [100, 7, 200], LIMIT)
    assert [line["status"] for line in lines] == ["completed", "failed", "completed"]
    assert "the result is 100" in str(lines[1]["error"])
    assert "--max-message-bytes 65536" in str(lines[1]["error"])
    assert report["error"] is None


def test_an_argument_count_that_does_not_fit_fails_the_item_before_decoding(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(COUNTER)
    misfit = state(0, (1, 2, 3))
    # The third argument is a malformed array: the count is refused before it is decoded.
    misfit.args.tuple_value.items[2].array.dtype = "|u1"
    misfit.args.tuple_value.items[2].array.shape.extend([10])
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        answers = exchange(pb_grpc.OffloadStub(channel), [misfit, state(1, 2)])
    assert answers[0].status == pb.ItemResult.FAILED
    assert answers[0].task == 1
    expected = "TypeError: task 1 (check(n)) cannot take 3 positional arguments"
    assert answers[0].error.startswith(expected)
    assert answers[1].status == pb.ItemResult.COMPLETED  # the stream carries on
    # The device says the same when the mismatch happens locally: results do not depend on
    # where a task ran.
    pipeline = load_pipeline(COUNTER)
    context = ItemContext("d", "r", 0, 0.0, on_server=False)
    outcome = run_tasks(pipeline, 1, 3, (1, 2, 3), context)
    assert (outcome.task, outcome.error) == (1, answers[0].error)


def silent_after(states: list[pb.TaskState], release: threading.Event) -> Iterator[pb.TaskState]:
    yield from states
    release.wait(60)


def test_idle_streams_do_not_block_other_devices(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(COUNTER, workers=8)
    release = threading.Event()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.OffloadStub(channel)
        idle = [stub.ExecuteRemaining(silent_after([], release)) for _ in range(6)]
        try:
            answers = exchange(stub, [state(i, 1, device="busy") for i in range(20)])
            assert [decode(a.output)["seen"] for a in answers] == list(range(1, 21))
            assert server.servicer.active_streams >= 6  # the idle ones were really open
        finally:
            release.set()
            for call in idle:
                call.cancel()


def test_a_stalled_stream_is_dropped_and_frees_its_worker(
    start_server: Callable[..., RunningServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = start_server(ECHO, workers=2, stream_idle_seconds=0.5)
    release = threading.Event()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.OffloadStub(channel)
        # One device goes silent after an item; the other sends items whose 100 kB answers
        # it never reads, so the server's writes block once flow control is exhausted.
        silent = stub.ExecuteRemaining(silent_after([echo_state(1)], release))
        unread = stub.ExecuteRemaining(
            silent_after([echo_state(7, item=i) for i in range(200)], release)
        )
        try:
            # Both workers are taken; the reaper must free them. (Counted by its log lines: a
            # loaded machine may drop the first before a poll sees both open.)
            def dropped() -> bool:
                return sum("event=idle-drop" in r.getMessage() for r in caplog.records) == 2

            assert wait_until(dropped, 10)
            assert wait_until(lambda: server.servicer.active_streams == 0, 10)
        finally:
            release.set()
        assert next(silent).status == pb.ItemResult.COMPLETED
        with pytest.raises(grpc.RpcError) as err:
            next(silent)
        assert err.value.code() == grpc.StatusCode.CANCELLED
        read = 0
        with pytest.raises(grpc.RpcError) as err:
            for _ in unread:
                read += 1
        assert err.value.code() == grpc.StatusCode.CANCELLED
        assert read < 200
        # Both workers are free again: a new device is served.
        (answer,) = exchange(stub, [echo_state(5, item=0, run="after")])
    assert decode(answer.output) == {"n": 5}


def test_remembered_answers_are_bounded_over_all_runs() -> None:
    pipeline = load_pipeline(COUNTER)
    executor = RemoteExecutor(pipeline, ServerConfig(pipeline=COUNTER, dedup_total=5))
    for run in ("r1", "r2", "r3"):
        for i in range(3):
            executor.execute(state(i, i + 1, run_id=run))
            assert executor.remembered_answers <= 5
    # The most recent run still replays a resend; the least recently used one was forgotten.
    assert executor.execute(state(1, 2, run_id="r3")).duplicate
    assert executor.remembered_answers == 3
    assert not executor.execute(state(1, 2, run_id="r1")).duplicate
