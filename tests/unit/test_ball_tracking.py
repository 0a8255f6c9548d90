"""The ball-tracking example: synthetic camera, detection accuracy, aggregation, sources."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import pytest

import examples.ball_tracking as bt
from offload import Pipeline, load_pipeline
from offload._pipeline import Status, run_tasks

from ..helpers import context, run_all

SCALE = 640 / 500  # pipeline coordinates (width 500) -> synthetic source pixels (width 640)
CAPTURE, ENCLOSING_CIRCLE, AGGREGATE = 0, 4, 6


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return load_pipeline("examples.ball_tracking")


@pytest.fixture(autouse=True)
def fresh_state() -> Iterator[None]:
    """Each test starts from the default source and no aggregation state."""
    bt.set_source("synthetic")
    bt.reset_state()
    yield
    bt.set_source("synthetic")
    bt.reset_state()


def test_exports(pipeline: Pipeline) -> None:
    assert [t.__name__ for t in bt.tasks] == [
        "capture", "blur_hsv", "mask", "contours", "enclosing_circle", "draw", "aggregate",
    ]  # fmt: skip
    assert bt.__version__ == "1"
    assert pipeline.tasks == tuple(bt.tasks)


def test_synthetic_camera_is_deterministic() -> None:
    a, b, other = bt.SyntheticCamera(0), bt.SyntheticCamera(0), bt.SyntheticCamera(1)
    for n in (0, 1, 57, 123):
        frame = a.frame(n)
        assert frame.shape == (480, 640, 3) and frame.dtype == np.uint8
        assert np.array_equal(frame, a.frame(n))  # same camera, same frame twice
        assert np.array_equal(frame, b.frame(n))  # a new camera with the same seed
        assert not np.array_equal(frame, other.frame(n))
        assert a.truth(n) != other.truth(n)
    assert not np.array_equal(a.frame(0), a.frame(1))


def test_truth_is_none_exactly_on_occluded_frames() -> None:
    camera = bt.SyntheticCamera(0)
    for n in range(300):
        truth = camera.truth(n)
        assert (truth is None) == (n % 60 in range(50, 55)), n
        if truth is not None:
            x, y, r = truth
            assert 22 <= r <= 34
            assert r <= x <= 640 - r and r <= y <= 480 - r  # the ball is fully in the frame


def test_capture_resizes_to_width_500() -> None:
    ok, frame = bt.capture()
    assert ok
    assert frame is not None
    assert frame.shape == (375, 500, 3) and frame.dtype == np.uint8
    assert frame.flags.c_contiguous


def test_detection_accuracy_on_synthetic_frames(pipeline: Pipeline) -> None:
    camera = bt.SyntheticCamera(0)
    worst = 0.0
    for n in range(240):
        outcome = run_all(pipeline, n, at=float(n))
        truth = camera.truth(n)
        if truth is None:
            assert (outcome.status, outcome.task) == (Status.FILTERED, ENCLOSING_CIRCLE), n
            continue
        assert outcome.status is Status.COMPLETED, (n, outcome.error)
        result = outcome.value
        tx, ty, tr = truth
        cx, cy = result["centre"]
        error = math.hypot(cx * SCALE - tx, cy * SCALE - ty)
        worst = max(worst, error)
        # The seed truncates the centroid to int: up to 1.28 px per axis here, by design.
        assert error <= 3.0, (n, result["centre"], truth)
        x, y = result["circle"]
        assert math.hypot(x * SCALE - tx, y * SCALE - ty) <= 2.0, (n, result["circle"], truth)
        assert abs(result["radius"] * SCALE - tr) <= 4.0, (n, result["radius"], truth)
    assert worst > 0.0  # the comparison above really ran


def test_result_is_plain_json(pipeline: Pipeline) -> None:
    outcome = run_all(pipeline, 0)
    assert outcome.status is Status.COMPLETED
    result = outcome.value
    assert json.loads(json.dumps(result)) == result  # no numpy scalars, tuples or arrays
    assert set(result) == {
        "item", "centre", "circle", "radius", "trail", "items_seen", "devices_active",
    }  # fmt: skip


def test_draw_marks_the_frame_and_sends_a_jpeg_snapshot() -> None:
    frame = np.zeros((375, 500, 3), np.uint8)
    # Lists, not tuples: how a decoded item from the wire may carry the circle and centre.
    ok, (snapshot, circle, radius, centre) = bt.draw(frame, [100.0, 120.0], 30.0, [101, 119])
    assert ok
    assert frame[119, 101].tolist() == [0, 0, 255]  # red centre dot
    assert frame[120, 130].tolist() == [0, 255, 255]  # yellow circle, radius 30 to the right
    assert (circle, radius, centre) == ((100.0, 120.0), 30.0, (101, 119))
    decoded = cv2.imdecode(np.frombuffer(snapshot, np.uint8), cv2.IMREAD_COLOR)
    assert decoded is not None and decoded.shape == frame.shape
    assert decoded[119, 101, 2] > 200 and decoded[119, 101, 0] < 60  # still a red dot
    assert len(snapshot) < frame.nbytes // 10


def _aggregate(pipeline: Pipeline, item: int, centre: tuple[int, int], **kw: Any) -> Any:
    snapshot = b"\xff\xd8 jpeg"
    args = (snapshot, (float(centre[0]), float(centre[1])), 20.0, centre)
    outcome = run_tasks(pipeline, AGGREGATE, AGGREGATE + 1, args, context(item, **kw))
    assert outcome.status is Status.COMPLETED, outcome.error
    return outcome.value


def test_aggregate_trail_count_and_restart(pipeline: Pipeline) -> None:
    for n in range(40):
        result = _aggregate(pipeline, n, (n, 2 * n), at=float(n))
        assert result["item"] == n
        assert result["items_seen"] == n + 1
        assert len(result["trail"]) == min(n + 1, 32)  # grows, then is capped
        assert result["trail"][-1] == [n, 2 * n] == result["centre"]
    assert result["trail"][0] == [8, 16]  # the 32 most recent centres, oldest first
    assert bt.latest_frame("dev-a") is not None

    # The device restarted: a new run starts a new trail and a new count.
    result = _aggregate(pipeline, 0, (7, 7), run="run-2", at=41.0)
    assert result["trail"] == [[7, 7]]
    assert result["items_seen"] == 1


def test_aggregate_counts_active_devices(pipeline: Pipeline) -> None:
    for n in range(6):
        first = _aggregate(pipeline, n, (1, 1), device="dev-a", at=100.0 + n)
        second = _aggregate(pipeline, n, (2, 2), device="dev-b", at=100.5 + n)
        assert first["devices_active"] == (1 if n == 0 else 2)
        assert second["devices_active"] == 2
        assert first["items_seen"] == second["items_seen"] == n + 1  # per device
        assert first["trail"][-1] == [1, 1] and second["trail"][-1] == [2, 2]
    # Relative to the item's capture time: dev-b's last item (105.5) is more than 30 s before.
    assert _aggregate(pipeline, 6, (1, 1), device="dev-a", at=140.0)["devices_active"] == 1


def test_set_source_rejects_bad_specs() -> None:
    with pytest.raises(ValueError, match=r"no-such-clip\.mp4.*no such file.*synthetic"):
        bt.set_source("/nonexistent/no-such-clip.mp4")
    with pytest.raises(ValueError, match=r"SEED"):
        bt.set_source("synthetic:abc")
    with pytest.raises(ValueError, match=r"cannot read this file as a video"):
        bt.set_source(__file__)
    ok, frame = bt.capture()  # a failed set_source keeps the current source
    assert ok and frame is not None


def test_set_source_synthetic_seed_replaces_source() -> None:
    bt.set_source("synthetic:7")
    _, first = bt.capture()
    bt.set_source("synthetic:7")  # a fresh source starts again at frame 0
    _, again = bt.capture()
    bt.set_source("synthetic:8")
    _, other = bt.capture()
    assert first is not None and again is not None and other is not None
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


class Counted:
    """A source of ``count`` numbered frames that notes every read; ``fail_at`` raises there."""

    def __init__(self, count: int, fail_at: int | None = None) -> None:
        self.reads = 0
        self.count, self.fail_at = count, fail_at
        self.third_read = threading.Event()
        self.closed = False

    def read(self) -> bt.camera.Frame | None:
        self.reads += 1
        if self.reads == 3:
            self.third_read.set()
        if self.reads - 1 == self.fail_at:
            raise OSError("the device went away")
        n = self.reads - 1
        return None if n >= self.count else np.full((2, 2, 3), n, np.uint8)

    def close(self) -> None:
        self.closed = True


def test_a_video_file_is_decoded_ahead_of_capture_same_frames_in_order_bounded() -> None:
    source = Counted(6)
    ahead = bt.camera.ReadAhead(source, depth=2)
    first = ahead.read()
    assert first is not None and first[0, 0, 0] == 0
    # Read on its own thread: frames 1 and 2 are decoded before capture asks for them.
    assert source.third_read.wait(30.0)
    taken = [0]
    while (frame := ahead.read()) is not None:
        taken.append(int(frame[0, 0, 0]))
        assert source.reads <= len(taken) + 2 + 1  # at most depth frames held, one being read
    assert taken == [0, 1, 2, 3, 4, 5] and ahead.read() is None
    ahead.close()
    assert source.closed


def test_a_read_ahead_source_raises_the_read_error_where_capture_reads() -> None:
    ahead = bt.camera.ReadAhead(Counted(6, fail_at=1))
    assert ahead.read() is not None
    with pytest.raises(OSError, match="the device went away"):
        ahead.read()
    assert ahead.read() is None
    ahead.close()


def test_open_source_decodes_a_video_file_ahead_on_one_thread(tmp_path: Any) -> None:
    path = tmp_path / "clip.avi"
    video = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10, (64, 48))
    for n in range(3):
        video.write(np.full((48, 64, 3), 40 * n, np.uint8))
    video.release()
    source = bt.open_source(str(path))
    assert isinstance(source, bt.camera.ReadAhead)
    # Decoded on one thread: beside capture, FFmpeg's own threads would only add CPU.
    assert source._source._capture.get(cv2.CAP_PROP_N_THREADS) == 1  # type: ignore[attr-defined]
    frames = []
    while (frame := source.read()) is not None:
        frames.append(frame)
    source.close()
    assert len(frames) == 3 and all(f.shape == (48, 64, 3) for f in frames)
