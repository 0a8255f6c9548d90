"""Hostile clients on loopback (issue 18): each test mounts one attack against a real server and
checks the bound that holds it, whatever the machine's speed."""

from __future__ import annotations

import importlib
import os
import resource
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hpack import Encoder
from hyperframe.frame import ContinuationFrame, HeadersFrame, RstStreamFrame, SettingsFrame

from offload import (
    CodecError,
    ItemContext,
    Limits,
    RunningServer,
    ServerConfig,
    _batch,
    encode,
    load_pipeline,
)
from offload._cloud.executor import MAX_ERROR_CHARS, MAX_ID_CHARS
from offload._cloud.serve import raise_open_files_limit
from offload._cloud.servicer import TASK_STATE_ARGS
from offload._codec import compress_value, expand, wire_problem
from offload._pipeline import run_tasks
from offload._wire import BATCH_METHOD
from offload.v1 import offload_pb2 as pb
from offload.v1 import offload_pb2_grpc as pb_grpc

from ..helpers import wait_until

# The module, not the package's `tasks` list that shadows it.
bt = importlib.import_module("examples.ball_tracking.tasks")
METHOD = "/offload.v1.Offload/ExecuteRemaining"
KiB = 1024
MiB = 1024 * KiB


ECHOING = "tests.apps.careless"  # task 1 echoes its input, or raises with it whole


def echoing_state(data: bytes, item: int, run: str = "r") -> pb.TaskState:
    pipeline = load_pipeline(ECHOING)
    msg = pb.TaskState(
        pipeline=pipeline.name,
        fingerprint=pipeline.fingerprint,
        device_id="attacker",
        run_id=run,
        item=item,
        next_task=1,
    )
    msg.args.CopyFrom(encode(data))
    return msg


def send(port: int, states: list[pb.TaskState]) -> list[pb.ItemResult]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return send_on(channel, states)


def send_on(channel: grpc.Channel, states: list[pb.TaskState]) -> list[pb.ItemResult]:
    return list(pb_grpc.OffloadStub(channel).ExecuteRemaining(iter(states), timeout=60))


# --- item 3: remembered answers ---------------------------------------------------------------


def test_a_task_error_echoing_a_large_input_is_cut_and_remembered_small(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(ECHOING)
    items = 20
    answers = send(server.port, [echoing_state(b"!" * MiB, i) for i in range(items)])
    assert all(a.status == pb.ItemResult.FAILED for a in answers)
    assert all(len(a.error) < MAX_ERROR_CHARS + 100 for a in answers)
    assert answers[0].error.startswith("ValueError: b'!!!")
    assert "characters cut by the server" in answers[0].error
    # 20 MiB of input, ~4 kB remembered per item.
    assert server.servicer.executor.remembered_bytes < items * (MAX_ERROR_CHARS + 200)


def test_remembered_answers_are_bounded_in_bytes_within_a_run_and_over_all_runs(
    start_server: Callable[..., RunningServer],
) -> None:
    budget = 256 * KiB
    server = start_server(ECHOING, dedup_bytes=budget)
    executor = server.servicer.executor
    for run in ("r1", "r2", "r3"):
        # Each answer is ~64 KiB: 10 of them are 2.5 times the budget.
        states = [echoing_state(b"x" * (64 * KiB), i, run) for i in range(10)]
        assert all(a.status == pb.ItemResult.COMPLETED for a in send(server.port, states))
        assert 0 < executor.remembered_bytes <= budget
    # The newest answers are still replayed; the oldest ones of the same run were forgotten.
    resent = send(server.port, [echoing_state(b"x" * (64 * KiB), 9, "r3")])
    assert resent[0].duplicate and resent[0].status == pb.ItemResult.COMPLETED
    forgotten = send(server.port, [echoing_state(b"x" * (64 * KiB), 0, "r3")])
    assert forgotten[0].duplicate and forgotten[0].status == pb.ItemResult.FAILED
    assert "dedup_bytes=262144" in forgotten[0].error


# --- item 4: the demo's aggregate and its per-frame tasks -------------------------------------

BALL = "examples.ball_tracking"


def ball_state(next_task: int, args: Any, item: int = 0, device: str = "attacker") -> pb.TaskState:
    pipeline = load_pipeline(BALL)
    msg = pb.TaskState(
        pipeline=pipeline.name,
        fingerprint=pipeline.fingerprint,
        device_id=device,
        run_id="r",
        item=item,
        next_task=next_task,
        capture_time=1000.0,
    )
    msg.args.CopyFrom(encode(args))
    return msg


def test_a_mask_of_specks_is_refused_before_finding_contours(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(BALL)
    frame = np.zeros((bt.MAX_FRAME_HEIGHT, bt.FRAME_WIDTH, 3), np.uint8)
    specks = np.zeros(frame.shape[:2], np.uint8)
    specks[::2, ::2] = 255  # isolated pixels: one outline each
    wrong_size = np.full((2048, 2048), 255, np.uint8)  # no camera frame is this shape
    answers = send(
        server.port, [ball_state(3, (frame, specks)), ball_state(3, (frame, wrong_size), 1)]
    )
    assert [a.status for a in answers] == [pb.ItemResult.FAILED] * 2
    assert answers[0].task == answers[1].task == 3
    assert "the mask is not one task 2 makes" in answers[0].error
    assert "the mask is (2048, 2048) of uint8" in answers[1].error


def test_snapshots_are_refused_unless_a_jpeg_of_a_frame_and_kept_within_a_byte_budget(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(BALL)
    args = ((100.0, 100.0), 20.0, (100, 100))
    refused = send(
        server.port,
        [
            ball_state(6, (b"\xff\xd8" + bytes(bt.MAX_SNAPSHOT_BYTES), *args)),
            ball_state(6, (b"GIF89a", *args), item=1),
        ],
    )
    assert [a.status for a in refused] == [pb.ItemResult.FAILED] * 2
    assert f"a frame's JPEG is at most {bt.MAX_SNAPSHOT_BYTES}" in refused[0].error
    assert "not a JPEG" in refused[1].error
    # Snapshots as large as allowed, from more devices than the byte budget holds.
    snapshot = b"\xff\xd8" + bytes(bt.MAX_SNAPSHOT_BYTES - 2)
    devices = [f"d{i}" for i in range(bt.MAX_FRAMES_BYTES // len(snapshot) + 8)]
    for device in devices:
        (answer,) = send(server.port, [ball_state(6, (snapshot, *args), device=device)])
        assert answer.status == pb.ItemResult.COMPLETED
    kept = [bt.latest_frame(d) for d in devices]
    assert sum(len(k) for k in kept if k is not None) <= bt.MAX_FRAMES_BYTES
    assert kept[-1] == snapshot and kept[0] is None  # the least recently seen went first


def test_counting_active_devices_costs_the_same_with_ten_thousand_devices() -> None:
    pipeline = load_pipeline(BALL)
    args = (b"\xff\xd8", (1.0, 1.0), 20.0, (1, 1))

    def item_seconds(device: str, n: int) -> float:
        """The median CPU time of ``n`` items of ``device``."""
        times = []
        for i in range(n):
            began = time.thread_time()
            run_tasks(pipeline, 6, 7, args, ItemContext(device, "r", i, 1000.0, on_server=True))
            times.append(time.thread_time() - began)
        return statistics.median(times)

    alone = item_seconds("honest", 300)
    for i in range(bt.MAX_DEVICES):
        run_tasks(pipeline, 6, 7, args, ItemContext(f"d{i}", "r", 0, 1000.0, on_server=True))
    crowded = item_seconds("honest", 300)
    # Scanning every device made it ~20 times slower; counting buckets leaves it as it was.
    assert crowded < 3 * alone + 20e-6, (alone, crowded)
    last = run_tasks(pipeline, 6, 7, args, ItemContext("honest", "r", 9, 1000.0, on_server=True))
    assert last.value["devices_active"] == bt.MAX_DEVICES  # the oldest was evicted for it


def test_a_device_id_longer_than_the_limit_is_refused_and_logged_short(
    start_server: Callable[..., RunningServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = start_server(ECHOING)
    long_id = echoing_state(b"x", 0)
    long_id.device_id = "d" * MiB  # a key of state kept for 10 000 devices, and logged
    with pytest.raises(grpc.RpcError) as err:
        send(server.port, [long_id])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"device_id is {MiB} characters: give at most {MAX_ID_CHARS}" in err.value.details()
    assert server.servicer.executor.remembered_answers == 0
    assert max(len(r.getMessage()) for r in caplog.records) < 2 * MAX_ID_CHARS + 500


# --- item 1: read-ahead bounded in bytes ------------------------------------------------------


# Both RPCs serve items through one path: each bound holds on either.
RPCS = pytest.mark.parametrize("rpc", [METHOD, BATCH_METHOD], ids=["one", "batched"])


def framed(rpc: str, data: bytes) -> bytes:
    """An encoded item as a message of ``rpc`` (a batch of one for ExecuteBatches)."""
    return _batch.join((data,)) if rpc == BATCH_METHOD else data


def send_by(channel: grpc.Channel, rpc: str, states: list[pb.TaskState]) -> list[pb.ItemResult]:
    """``send_on`` over ``rpc``."""
    requests = (framed(rpc, s.SerializeToString()) for s in states)
    answers: list[pb.ItemResult] = []
    for data in channel.stream_stream(rpc)(requests, timeout=60):
        batch = pb.ResultBatch.FromString(data).results if rpc == BATCH_METHOD else None
        answers.extend(batch if batch is not None else [pb.ItemResult.FromString(data)])
    return answers


def unread_flood(
    channel: grpc.Channel, rpc: str, size: int, count: int, release: threading.Event, run: str
) -> Any:
    """A stream that sends ``count`` items of ``size`` bytes and never reads an answer: the
    server's first answer (as large as the item) fills the flow-control window, so its writes
    block while its reader goes on reading."""

    def requests() -> Iterator[bytes]:
        for i in range(count):
            yield framed(rpc, echoing_state(b"x" * size, i, run).SerializeToString())
        release.wait(60)

    return channel.stream_stream(rpc)(requests(), timeout=60)


@RPCS
def test_items_read_ahead_are_bounded_in_bytes_per_stream_and_in_all(
    start_server: Callable[..., RunningServer], rpc: str
) -> None:
    limit = 4 * MiB
    per_stream, total = limit, 2 * limit
    server = start_server(
        ECHOING,
        limits=Limits(max_message_bytes=limit),
        read_ahead_bytes=per_stream,
        read_ahead_total_bytes=total,
    )
    budget = server.servicer.read_budget
    release = threading.Event()
    # Gzip: 40 items of 4 MiB are ~200 kB on the wire, 160 MiB once read.
    with (
        grpc.insecure_channel(
            f"127.0.0.1:{server.port}", compression=grpc.Compression.Gzip
        ) as attacker,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as honest,
    ):
        size = limit - 64 * KiB
        floods = [unread_flood(attacker, rpc, size, 40, release, f"flood{i}") for i in range(2)]
        try:
            # Both streams stop reading once they hold their share, and the server its total.
            assert wait_until(lambda: budget.waiting == 2, 30), (budget.held, budget.waiting)
            # An honest device is still served while the budget is spent.
            answers = send_by(honest, rpc, [echoing_state(b"ok", 0, "honest")])
            assert answers[0].status == pb.ItemResult.COMPLETED
        finally:
            release.set()
            for call in floods:
                call.cancel()
    bound = total + 2 * (2 * limit)  # the total, plus one message per stream
    assert budget.peak <= bound, (budget.peak, bound)
    assert wait_until(lambda: budget.held == 0, 10)  # given back when the streams ended


# --- item 2: streams that send nothing --------------------------------------------------------


@RPCS
def test_streams_of_headers_alone_hold_no_worker_and_health_answers_throughout(
    start_server: Callable[..., RunningServer], rpc: str
) -> None:
    workers = 4
    server = start_server(ECHOING, workers=workers)
    release = threading.Event()

    def nothing() -> Iterator[pb.TaskState]:
        release.wait(60)
        yield from ()

    with (
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as attacker,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as honest,
    ):
        method = attacker.stream_stream(rpc)
        health = health_pb2_grpc.HealthStub(honest)
        request = health_pb2.HealthCheckRequest(service="offload.v1.Offload")
        idle = [method(nothing(), timeout=60) for _ in range(workers)]
        try:
            assert wait_until(lambda: server.servicer.active_streams == workers, 10)
            # As many streams as workers, none of them sending: a device is still served.
            (answer,) = send_by(honest, rpc, [echoing_state(b"ok", 0, "honest")])
            assert answer.status == pb.ItemResult.COMPLETED
            # Three times as many: the oldest silent ones make room for newer ones, and
            # health and devices are answered throughout.
            idle += [method(nothing(), timeout=60) for _ in range(2 * workers)]
            for i in range(1, 6):
                check = health.Check(request, timeout=10)
                assert check.status == health_pb2.HealthCheckResponse.SERVING
                (answer,) = send_by(honest, rpc, [echoing_state(b"ok", i, "honest")])
                assert answer.status == pb.ItemResult.COMPLETED
        finally:
            release.set()
            for call in idle:
                call.cancel()


# --- item 5: elements counted before parsing --------------------------------------------------


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, written by hand (no message objects: they are what
    the attack makes expensive)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out) + bytes([n])


def many_lists(lists: int, each: int) -> bytes:
    """args = [[None] * each] * lists, as wire bytes: 4 bytes per element."""
    none = field(1, b"")  # Value{none: Nothing{}}
    inner = field(8, field(1, none) * each)  # Value{list_value: [None] * each}
    return field(8, field(1, inner) * lists)


def raw_state(args: bytes, item: int = 0) -> bytes:
    head = echoing_state(b"", item)
    head.ClearField("args")
    return head.SerializeToString() + field(TASK_STATE_ARGS, args)


def test_the_total_of_elements_is_counted_on_the_wire_before_parsing() -> None:
    limits = Limits()
    limit = limits.max_total_elements
    under = many_lists(4, limit // 4 - 1)  # the 4 inner lists are elements of the outer one
    over = many_lists(4, limit // 4)  # each list within max_elements, the total not
    assert wire_problem(raw_state(under), TASK_STATE_ARGS, limits) is None
    problem = wire_problem(raw_state(over), TASK_STATE_ARGS, limits)
    assert problem is not None and f"more than {limit} elements in all" in problem
    # Bytes of 0x0A in data (a dark frame) are no elements: walked, skipped, let through.
    dark = np.full((375, 500, 3), 10, np.uint8)
    value = encode({"frame": dark, "points": [[1, 2]] * 1000, "n": [None] * 1000})
    wire = echoing_state(b"", 0)
    wire.args.CopyFrom(value)
    assert wire_problem(wire.SerializeToString(), TASK_STATE_ARGS, limits) is None
    # The count agrees with the parser's on what it lets through.
    assert pb.TaskState.FromString(raw_state(under)).args.list_value.items[3].list_value.items


def test_packed_and_compressed_elements_count_against_the_total_before_parsing() -> None:
    limits = Limits()
    limit = limits.max_total_elements
    # Packed lists hold an element per byte without a 0x0A each: 8 of 99 999 small ints.
    packed = pb.Value(packed_list=pb.PackedList(ints=[1] * (limit - 1)))
    many = pb.Value(list_value=pb.ValueList(items=[packed] * 8)).SerializeToString()
    problem = wire_problem(raw_state(many), TASK_STATE_ARGS, limits)
    assert problem is not None and f"more than {limit} elements in all" in problem
    floats = pb.Value(packed_list=pb.PackedList(floats=[0.5] * (limit // 2)))
    fine = pb.Value(list_value=pb.ValueList(items=[floats])).SerializeToString()
    assert wire_problem(raw_state(fine), TASK_STATE_ARGS, limits) is None
    # A compressed value is counted once decompressed, before its Value is parsed.
    bomb = pb.Value()
    bomb.ParseFromString(many_lists(40, 99_999))
    assert compress_value(bomb, pb.CODEC_ZSTD) is not None
    with pytest.raises(CodecError, match=f"more than {limit} elements in all"):
        expand(bomb, limits)


def test_a_message_of_millions_of_elements_is_refused_before_it_is_parsed(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(ECHOING)
    attack = raw_state(many_lists(40, 99_999))  # 16 MB: 4 million elements, each list in bounds
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            list(call(iter([attack]), timeout=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "more than 100000 elements in all" in err.value.details()
        assert "refused before parsing" in err.value.details()
        (answer,) = send_on(channel, [echoing_state(b"ok", 0, "honest")])
        assert answer.status == pb.ItemResult.COMPLETED


# --- items 9, 10, 12: HTTP/2 and connection floods --------------------------------------------

REQUEST_HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", METHOD),
    (":authority", "attacker"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
]


def raw_connection(port: int) -> socket.socket:
    """A TCP connection that has sent the HTTP/2 preface and an empty SETTINGS frame."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize())
    return sock


def rapid_reset(port: int, stop: threading.Event, opened: list[int]) -> None:
    """HEADERS then RST_STREAM, 100 streams a write, until ``stop`` (CVE-2023-44487)."""
    sock, encoder = raw_connection(port), Encoder()
    stream = 1
    with sock:
        while not stop.is_set() and stream < 2**31 - 200:
            frames = []
            for _ in range(100):
                headers = HeadersFrame(stream, encoder.encode(REQUEST_HEADERS))
                headers.flags.add("END_HEADERS")
                frames.append(headers.serialize() + RstStreamFrame(stream, 8).serialize())
                stream += 2
            try:
                sock.sendall(b"".join(frames))
            except OSError:
                return  # closed by the server: as good
            opened.append(100)


def test_a_rapid_reset_flood_does_not_starve_honest_devices(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(ECHOING)
    stop, opened = threading.Event(), list[int]()
    flood = [
        threading.Thread(target=rapid_reset, args=(server.port, stop, opened)) for _ in range(2)
    ]
    for thread in flood:
        thread.start()
    try:
        assert wait_until(lambda: sum(opened) >= 5000, 30)  # the flood is on
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as honest:
            # Each on a fresh stream, while the flood goes on: before, none got through.
            for i in range(3):
                (answer,) = send_on(honest, [echoing_state(b"ok", 0, f"honest{i}")])
                assert answer.status == pb.ItemResult.COMPLETED
    finally:
        stop.set()
        for thread in flood:
            thread.join(10)


def test_a_continuation_flood_is_cut_off(start_server: Callable[..., RunningServer]) -> None:
    server = start_server(ECHOING)
    sock = raw_connection(server.port)
    # HEADERS without END_HEADERS, then CONTINUATION frames of 16 kB headers, never ending.
    sock.sendall(HeadersFrame(1, Encoder().encode(REQUEST_HEADERS)).serialize())
    pad = b"\x00\x05x-pad\x7f\x81\x7f" + b"a" * 16384  # a literal header of 16 kB
    sent, cut = 0, False
    with sock:
        while sent < 256 * MiB:
            try:
                sock.sendall(ContinuationFrame(1, pad).serialize())
            except OSError:
                cut = True
                break
            sent += len(pad)
    assert cut, f"{sent / MiB:.0f} MiB of headers accepted"
    assert sent < 64 * MiB


def test_connections_that_never_finish_a_handshake_are_closed_and_bounded(
    start_server: Callable[..., RunningServer],
) -> None:
    limit = 8
    server = start_server(ECHOING, max_connections=limit, handshake_timeout=1.0)
    before = len(os.listdir("/proc/self/fd"))
    slow = [
        socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(3 * limit)
    ]
    try:
        # This process holds the client ends (3 x limit); the server holds at most `limit`.
        held = len(os.listdir("/proc/self/fd")) - before
        assert held <= 3 * limit + limit + 4, held
        # Each is closed by the server: the extra ones at once, the others at the timeout.
        for sock in slow:
            while sock.recv(4096):  # the server's SETTINGS, then the end (or a timeout: fails)
                pass
    finally:
        for sock in slow:
            sock.close()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        (answer,) = send_on(channel, [echoing_state(b"ok", 0, "honest")])
    assert answer.status == pb.ItemResult.COMPLETED


def test_the_open_files_limit_is_raised_to_fit_the_connections() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    config = ServerConfig(max_connections=1000)
    if hard != resource.RLIM_INFINITY and hard < 1000 + 2 * config.workers + 64:
        pytest.skip(f"the hard limit on open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    try:
        raise_open_files_limit(config)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 1000 + 2 * config.workers
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
