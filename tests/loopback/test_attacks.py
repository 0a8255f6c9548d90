"""Hostile clients on loopback (issue 18): each test mounts one attack against a real server and
checks the bound that holds it, whatever the machine's speed."""

from __future__ import annotations

import importlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from offload import ItemContext, RunningServer, encode, load_pipeline
from offload._cloud.executor import MAX_ERROR_CHARS, MAX_ID_CHARS
from offload._pipeline import run_tasks
from offload.v1 import offload_pb2 as pb
from offload.v1 import offload_pb2_grpc as pb_grpc

from ..helpers import install

# The module, not the package's `tasks` list that shadows it.
bt = importlib.import_module("examples.ball_tracking.tasks")
KiB = 1024
MiB = 1024 * KiB


def _emit() -> tuple[bool, bytes]:
    return True, b""


def _echo_or_raise(data: bytes) -> tuple[bool, bytes]:
    """A careless task: its error echoes its whole input; otherwise it passes it on."""
    if data.startswith(b"!"):
        raise ValueError(data)
    return True, data


def _answer(data: bytes) -> tuple[bool, dict[str, Any]]:
    return True, {"data": data}


ECHOING = install("attack_echoing", tasks=[_emit, _echo_or_raise, _answer])


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
