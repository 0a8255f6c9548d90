"""The ball-tracking example at full length and in a fresh interpreter: the real webcam clip's
1004 frames (seconds of OpenCV: too long for tests/unit), the source named by OFFLOAD_SOURCE."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

import examples.ball_tracking as bt
from offload import Pipeline, load_pipeline
from offload._pipeline import Status

from ..helpers import ROOT, WEBCAM_CLIP, run_all

CAPTURE, ENCLOSING_CIRCLE = 0, 4


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


def test_offload_source_environment_variable() -> None:
    # In a fresh interpreter: the variable is read when the first capture opens the source.
    code = (
        "import numpy as np, examples.ball_tracking as bt\n"
        "ok, frame = bt.capture()\n"
        "bt.set_source('synthetic:5')\n"
        "_, expected = bt.capture()\n"
        "print(ok and np.array_equal(frame, expected))\n"
    )
    env = {**os.environ, "OFFLOAD_SOURCE": "synthetic:5"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "True", done.stderr


def _ranges(items: list[int]) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for i in items:
        if spans and spans[-1][1] == i - 1:
            spans[-1] = (spans[-1][0], i)
        else:
            spans.append((i, i))
    return spans


@pytest.mark.skipif(
    not WEBCAM_CLIP.is_file(), reason=f"real webcam clip not found at {WEBCAM_CLIP}"
)
def test_real_webcam_clip(pipeline: Pipeline) -> None:
    bt.set_source(str(WEBCAM_CLIP))
    completed, missed = 0, []
    for n in range(2000):
        outcome = run_all(pipeline, n, at=n / 23.98)
        if outcome.status is Status.FILTERED and outcome.task == CAPTURE:
            break  # end of the clip
        if outcome.status is Status.COMPLETED:
            completed += 1
        else:
            assert (outcome.status, outcome.task) == (Status.FILTERED, ENCLOSING_CIRCLE), n
            missed.append(n)
    assert n == 1004
    assert completed == 879
    # As measured with the pinned OpenCV; shared/data/README.md summarises the same misses
    # ("scattered in 788-820", "962-1003": frame 969 is in fact a hit).
    assert _ranges(missed) == [
        (0, 26), (463, 488), (647, 648), (788, 805), (807, 808), (810, 812), (814, 814),
        (816, 820), (962, 968), (970, 1003),
    ]  # fmt: skip
