"""The benchmark pipeline: the ball tracker with task 0 replaying a fixed list of frames.

Every system under test runs these same functions on the same frames. Capture is a resize of a
frame rendered beforehand (``prepare``), so that rendering the synthetic scene does not count as
device work. Client and server import this module by the same path, so fingerprints match; only
the device calls ``prepare``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from examples.ball_tracking import (
    SyntheticCamera,
    aggregate,
    blur_hsv,
    contours,
    draw,
    enclosing_circle,
    mask,
)
from examples.ball_tracking.tasks import FRAME_WIDTH

Frame = NDArray[np.uint8]

ROOT = Path(__file__).resolve().parents[1]
WEBCAM_CLIP = ROOT.parent / "shared" / "data" / "ball_real_webcam.mp4"
NAME = "bench.pipeline"

_frames: list[Frame] = []
_next = 0
_limit = 0


def render(source: str, count: int) -> list[Frame]:
    """``count`` raw frames: from the synthetic camera (seed 0) or the webcam clip, looped."""
    if source == "synthetic":
        camera = SyntheticCamera(0)
        return [camera.frame(n) for n in range(count)]
    capture = cv2.VideoCapture(str(WEBCAM_CLIP if source == "webcam" else source))
    frames: list[Frame] = []
    while len(frames) < count:
        ok, frame = capture.read()
        if not ok:
            if not frames:
                raise ValueError(f"no frames in {source!r} (is {WEBCAM_CLIP} there?)")
            capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
            continue
        frames.append(np.ascontiguousarray(frame, dtype=np.uint8))
    capture.release()
    return frames


def prepare(frames: list[Frame], items: int) -> None:
    """Replay ``frames`` (cycled) for ``items`` items, then end the stream."""
    global _frames, _next, _limit
    _frames, _next, _limit = frames, 0, items


def capture() -> tuple[bool, Frame | None]:
    """Task 0: the next prepared frame, resized to width 500 as the tracker's capture does."""
    global _next
    if _next >= _limit:
        return False, None
    frame = _frames[_next % len(_frames)]
    _next += 1
    height, width = frame.shape[:2]
    size = (FRAME_WIDTH, int(height * FRAME_WIDTH / width))
    resized: Frame = np.asarray(cv2.resize(frame, size, interpolation=cv2.INTER_AREA))
    return True, resized


tasks = [capture, blur_hsv, mask, contours, enclosing_circle, draw, aggregate]
