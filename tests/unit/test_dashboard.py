"""The dashboard's fleet board and ``publish_view`` (fed through the executor's listener seam),
and its settings."""

from __future__ import annotations

import tracemalloc

import pytest

from offload import ConfigError, ServerConfig, ServerSecurity, load_pipeline, publish_view
from offload._cloud.dashboard import (
    CONNECTED_SECONDS,
    LATENCIES,
    SIZE_SAMPLE,
    WINDOW_SECONDS,
    FleetBoard,
)
from offload._pipeline import _current
from offload._views import MAX_VIEW_BYTES, take_view
from offload.server import main as server_main
from offload.v1 import offload_pb2 as pb

from ..helpers import COUNTER, context

JPEG = b"\xff\xd8\xff\xe0" + b"x" * 1000


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def answer(
    board: FleetBoard,
    device: str,
    item: int,
    *,
    next_task: int = 1,
    status: int = pb.ItemResult.COMPLETED,
    cpu: float = 0.002,
    captured: float | None = None,
    duplicate: bool = False,
    view: bytes | None = None,
) -> None:
    """One answer as the executor gives it: tasks run (publishing ``view``), then listeners."""
    state = pb.TaskState(
        pipeline=COUNTER, device_id=device, run_id="r1", item=item, next_task=next_task
    )
    state.capture_time = board.clock() - 0.05 if captured is None else captured
    if view is not None:
        token = _current.set(context(item, device=device, run="r1"))
        try:
            publish_view(view)
        finally:
            _current.reset(token)
    result = pb.ItemResult(item=item, status=status, server_cpu_seconds=cpu, duplicate=duplicate)  # type: ignore[arg-type]
    result.task_times.extend(pb.TaskTime(task=t, seconds=0.001) for t in range(next_task, 3))
    board.observe(state, result)


def row(board: FleetBoard, device: str) -> dict[str, object]:
    return next(d for d in board.snapshot()["devices"] if d["id"] == device)


def test_a_row_shows_split_counts_rate_latency_and_cloud_cpu_of_its_device() -> None:
    clock = Clock()
    board = FleetBoard(load_pipeline(COUNTER), clock=clock)
    for second in range(10):
        for i in range(4):
            answer(board, "cam", second * 4 + i, next_task=2)
        clock.now += 1
    answer(board, "cam", 100, status=pb.ItemResult.FILTERED)
    answer(board, "cam", 101, status=pb.ItemResult.FAILED)
    cam = row(board, "cam")
    assert cam["split"] == 1 and cam["cloud_from"] == "check"
    assert cam["completed"] == 40 and cam["filtered"] == 1 and cam["failed"] == 1
    assert cam["items_per_second"] == pytest.approx(4.0)
    assert cam["latency_p50"] == pytest.approx(0.05) and cam["latency_p95"] == pytest.approx(0.05)
    assert cam["cloud_cpu_per_item"] == pytest.approx(0.002)
    assert cam["connected"] is True and cam["since"] == 1_000_000.0


def test_a_young_devices_rates_count_only_the_seconds_since_it_was_first_seen() -> None:
    clock = Clock()
    board = FleetBoard(load_pipeline(COUNTER), clock=clock)
    answer(board, "old", 0)
    clock.now += 100
    for i in range(4):
        answer(board, "new", i)
    assert row(board, "new")["items_per_second"] is None  # no complete second yet
    clock.now += 1
    for i in range(4, 8):
        answer(board, "new", i)
    clock.now += 1
    new = row(board, "new")
    assert new["items_per_second"] == 4.0 and new["items_per_second_window"] == 4.0
    assert row(board, "old")["items_per_second_window"] == pytest.approx(1 / 102)


def test_a_device_silent_for_longer_than_the_connected_window_shows_disconnected() -> None:
    clock = Clock()
    board = FleetBoard(load_pipeline(COUNTER), clock=clock)
    answer(board, "cam", 0)
    clock.now += CONNECTED_SECONDS + 1
    assert row(board, "cam")["connected"] is False
    answer(board, "cam", 1)
    assert row(board, "cam")["since"] == clock.now  # a new connected spell


def test_a_replayed_answer_counts_no_cloud_cpu() -> None:
    board = FleetBoard(load_pipeline(COUNTER), clock=Clock())
    answer(board, "cam", 0, cpu=0.004)
    answer(board, "cam", 0, cpu=0.004, duplicate=True)
    assert row(board, "cam")["cloud_cpu_per_item"] == pytest.approx(0.004)


def test_the_saving_compares_the_splits_with_sending_every_item_after_task_0() -> None:
    board = FleetBoard(load_pipeline(COUNTER), clock=Clock())
    answer(board, "raw", 0, next_task=1)  # runs tasks 1 and 2 here: 2 ms
    assert board.snapshot()["fleet"]["cloud_seconds_per_item_all"] == pytest.approx(0.002)
    for i in range(200):
        answer(board, "cut", i, next_task=2)  # task 2 only: 1 ms
    fleet = board.snapshot()["fleet"]
    assert fleet["cloud_seconds_per_item"] == pytest.approx(0.001, rel=0.01)
    assert fleet["bytes_per_item_all"] is not None


def test_item_sizes_are_sampled_at_every_cut_however_the_devices_interleave() -> None:
    board = FleetBoard(load_pipeline(COUNTER), clock=Clock())
    for i in range(2 * SIZE_SAMPLE):
        answer(board, "warm", i, next_task=2)  # so that the fleet's count is not where it began
    for i in range(2 * SIZE_SAMPLE):
        answer(board, "b", i, next_task=2)  # a count over the fleet would sample only b's
        answer(board, "a", i, next_task=1)
    assert board.snapshot()["fleet"]["bytes_per_item_all"] is not None


def test_the_history_has_one_value_a_second_from_the_first_answer_over_the_window() -> None:
    clock = Clock()
    board = FleetBoard(load_pipeline(COUNTER), clock=clock)
    assert board.snapshot()["history"]["items_per_second"] == []
    for i in range(3):
        answer(board, "cam", i)
    clock.now += 2
    history = board.snapshot()["history"]
    assert history["items_per_second"] == [3, 0]
    assert history["cloud_cpu_per_item"] == [pytest.approx(0.002), None]
    clock.now += 2 * WINDOW_SECONDS
    assert len(board.snapshot()["history"]["items_per_second"]) == WINDOW_SECONDS - 1


def test_the_board_keeps_at_most_max_devices_forgetting_the_least_recently_seen() -> None:
    board = FleetBoard(load_pipeline(COUNTER), max_devices=100, clock=Clock())
    for n in range(150):
        answer(board, f"cam-{n:03}", 0, view=JPEG)
    ids = [d["id"] for d in board.snapshot()["devices"]]
    assert len(ids) == 100 and ids[0] == "cam-050"
    assert board.view("cam-000") is None and board.view("cam-149") == JPEG
    assert board.view_bytes == 100 * len(JPEG)


def test_a_kept_device_holds_at_most_20_kb_however_long_its_ids() -> None:
    """docs/dashboard.md#bounds: 20 kB per kept device (256 kept), views aside."""
    clock = Clock()
    kept = 16
    board = FleetBoard(load_pipeline(COUNTER), max_devices=kept, clock=clock)
    answer(board, "warm-up", 0)
    result = pb.ItemResult(status=pb.ItemResult.COMPLETED, server_cpu_seconds=0.001)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(kept + 4):
            long = f"{n:04}-" + "x" * 100_000  # ids as long as a message allows, nearly
            state = pb.TaskState(device_id=long, run_id=long, next_task=1)
            for i in range(LATENCIES + 10):
                state.item, state.capture_time = i, clock.now - 0.01
                board.observe(state, result)
            clock.now += 1
            del state, long
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(board.snapshot()["devices"]) == kept
    assert held <= kept * 20_000, held


def test_views_are_bounded_in_bytes_in_all_the_least_recently_published_go_first() -> None:
    board = FleetBoard(load_pipeline(COUNTER), max_view_bytes=3 * len(JPEG), clock=Clock())
    for n in range(5):
        answer(board, f"cam-{n}", 0, view=JPEG)
    assert board.view_bytes == 3 * len(JPEG)
    assert [board.view(f"cam-{n}") is not None for n in range(5)] == [
        False,
        False,
        True,
        True,
        True,
    ]
    assert row(board, "cam-4")["view"] == 1


def test_publish_view_refuses_anything_but_a_bounded_jpeg() -> None:
    token = _current.set(context(0))
    try:
        with pytest.raises(ValueError, match="JPEG"):
            publish_view(b"<html>not an image</html>")
        with pytest.raises(ValueError, match=str(MAX_VIEW_BYTES)):
            publish_view(JPEG[:4] + bytes(MAX_VIEW_BYTES))
    finally:
        _current.reset(token)
    with pytest.raises(RuntimeError, match="inside a task"):
        publish_view(JPEG)


def test_a_view_is_taken_only_by_the_answer_to_its_own_item() -> None:
    token = _current.set(context(7, device="cam", run="r1"))
    try:
        publish_view(JPEG)
    finally:
        _current.reset(token)
    assert take_view("cam", "r1", 8) is None  # another item's answer leaves it
    assert take_view("cam", "r1", 7) == JPEG
    assert take_view("cam", "r1", 7) is None  # taken once


def test_a_dashboard_beyond_loopback_without_a_token_is_refused() -> None:
    with pytest.raises(ConfigError, match="--dashboard-port shows camera images"):
        ServerConfig(host="0.0.0.0", dashboard_port=8080)
    ServerConfig(host="0.0.0.0", dashboard_port=8080, security=ServerSecurity(token="t"))
    ServerConfig(host="::1", dashboard_port=8080)


def test_the_dashboard_with_several_processes_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        server_main(["--processes", "2", "--dashboard-port", "0", "--host", "127.0.0.1"])
    assert exit_.value.code == 2
    assert "--dashboard-port shows one process's devices" in capsys.readouterr().err
