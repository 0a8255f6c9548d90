"""Device workers against a real server on loopback: the same results whatever N, at every
split, and items reach the server in item order."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import pytest

from offload import RunningServer, current_item, load_pipeline

from ..helpers import WEBCAM_CLIP, install, run_split

BALL = "examples.ball_tracking"
TIMEOUT = 30.0


@pytest.mark.skipif(not WEBCAM_CLIP.exists(), reason=f"needs {WEBCAM_CLIP}")
def test_the_webcam_clip_gives_the_same_output_with_one_and_two_workers_at_several_splits(
    start_server: Callable[..., RunningServer],
) -> None:
    pipeline = load_pipeline(BALL)
    server = start_server(pipeline)
    source = str(WEBCAM_CLIP)
    reference, _ = run_split(pipeline, None, source=source, frames=40)
    assert {json.loads(line)["status"] for line in reference} >= {"completed"}
    for k in (None, 1, 3, 5, len(pipeline) - 1):
        port = None if k is None else server.port
        one, _ = run_split(pipeline, k, port, source=source, frames=40, device_workers=1)
        two, report = run_split(pipeline, k, port, source=source, frames=40, device_workers=2)
        assert one == reference, f"split {k}, one worker, differs from client-only"
        assert two == reference, f"split {k}, two workers, differ from one"
        assert report["device"]["workers"] == 2 and report["error"] is None


def test_items_reach_the_server_in_item_order_when_a_later_one_finishes_first(
    start_server: Callable[..., RunningServer],
) -> None:
    later_done = threading.Event()
    arrived: list[int] = []

    def emit() -> tuple[bool, int]:
        return True, current_item().item

    def slow_first(n: int) -> tuple[bool, int]:
        if current_item().on_server:
            return True, n
        if n == 0:  # item 1 finishes its device tasks while item 0 is still here
            assert later_done.wait(TIMEOUT)
        if n == 1:
            later_done.set()
        return True, n

    def aggregate(n: int) -> tuple[bool, list[int]]:
        arrived.append(n)  # the server aggregates in arrival order
        return True, list(arrived)

    name = install("tests_workers_order", tasks=[emit, slow_first, aggregate])
    pipeline = load_pipeline(name)
    server = start_server(pipeline)
    lines, report = run_split(pipeline, 2, server.port, frames=6, device_workers=2)
    assert report["error"] is None
    assert arrived == list(range(6))
    assert json.loads(lines[-1])["result"] == list(range(6))


def test_automatic_mode_with_two_workers_gives_the_client_only_results_across_split_changes(
    start_server: Callable[..., RunningServer],
) -> None:
    pipeline = load_pipeline(BALL)
    server = start_server(pipeline)
    reference, _ = run_split(pipeline, None, source="synthetic", frames=150)
    # A target nothing meets: the policy probes the far splits and moves between them.
    lines, report = run_split(
        pipeline, len(pipeline) - 1, server.port, source="synthetic", frames=150, fps=10_000.0,
        control_period=0.2, device_workers=2,
    )  # fmt: skip
    assert lines == reference
    assert report["scheduler"]["history"], "the split never changed: nothing was tested"
