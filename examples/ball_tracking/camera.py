"""Frame sources for the ball tracker: a synthetic camera with ground truth, video files, cameras.

A source hands out BGR uint8 frames one at a time (``read``) until it returns None (the end of
the stream). ``open_source`` turns a user's ``--source`` spec into one.
"""

from __future__ import annotations

import math
import queue
import threading
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
from numpy.typing import NDArray

Frame = NDArray[np.uint8]

WIDTH, HEIGHT = 640, 480
OCCLUSION_PERIOD = 60
OCCLUDED_PHASES = range(50, 55)  # frames n with n % 60 in 50..54 have no ball

# Ball colours (BGR), all hue 60 (OpenCV scale) with saturation >= 150: well inside the
# tracker's HSV range (29, 86, 6)-(64, 255, 255) even after noise and blur.
_BALL_RIM = (50, 170, 50)
_BALL_BODY = (62, 200, 62)
_BALL_HIGHLIGHT = (90, 228, 90)

# Background palette (BGR): greys, browns and a muted blue. In every convex mix of these, green
# is never the largest channel, so no background pixel falls in the green range. Where the
# blurred ball edge blends into blue, the blend turns cyan and leaves the hue range early, which
# shifts the detected centre; the blue is kept muted so that the shift stays well under 1 px.
_PALETTE = np.array(
    [
        [172, 172, 172],  # light grey
        [110, 110, 110],  # mid grey
        [60, 95, 140],  # brown
        [48, 68, 100],  # dark brown
        [132, 120, 106],  # bluish grey (a stronger blue would shift the ball's edge, see below)
        [150, 172, 195],  # beige
    ],
    dtype=np.float32,
)

# Saturated non-green distractors (BGR): red, magenta, blue, orange (hue 15, far from 29). They
# sit in a border band the ball never reaches (its path keeps >= 56 px from every edge), so that
# they test the colour filter without biasing where the ball's edge is found.
_DISTRACTORS = ((40, 40, 200), (170, 50, 170), (190, 70, 30), (20, 120, 240))
_DISTRACTOR_BAND = 44

# The ball's path: centre +- amplitude; the radius varies in 22..34.
_AMPLITUDE_X, _AMPLITUDE_Y = 230.0, 150.0

_SHIFT = 4  # cv2 fixed-point bits: draw the ball at 1/16 px so truth is exact, not rounded
_NOISE_SIGMA = 6.0
_NOISE_PAD = 64  # per-frame noise is a window of a padded field, at one of 65 x 65 offsets


class Source(Protocol):
    """Where task 0 gets its frames."""

    def read(self) -> Frame | None:
        """The next BGR frame, or None at the end of the stream."""
        ...

    def close(self) -> None:
        """Release the device or file; ``read`` returns None afterwards."""
        ...


def _quantise(value: float) -> float:
    """The value cv2 actually draws at with ``_SHIFT`` fractional bits."""
    return round(value * (1 << _SHIFT)) / (1 << _SHIFT)


class SyntheticCamera:
    """A deterministic camera: a green ball on a Lissajous path over a textured background.

    ``frame(n)`` and ``truth(n)`` are pure functions of (seed, n), so tests know exactly where
    the ball is. The ball is absent ("occluded") on frames with ``n % 60`` in 50..54.
    """

    def __init__(self, seed: int = 0) -> None:
        if seed < 0:
            raise ValueError(f"synthetic camera seed must be >= 0, got {seed}")
        self.seed = seed
        rng = np.random.default_rng(seed)
        self._background = _render_background(rng)
        self._noise_up, self._noise_down = _noise_field(rng)
        self._phases = rng.uniform(0.0, 2.0 * math.pi, size=3).tolist()

    @staticmethod
    def occluded(n: int) -> bool:
        return n % OCCLUSION_PERIOD in OCCLUDED_PHASES

    def truth(self, n: int) -> tuple[float, float, float] | None:
        """The ball's centre x, y and radius in source pixels (640x480), None when occluded."""
        if n < 0:
            raise ValueError(f"frame number must be >= 0, got {n}")
        if self.occluded(n):
            return None
        px, py, pr = self._phases
        # Incommensurate periods: the path covers the frame and does not repeat for a long time.
        x = WIDTH / 2 + _AMPLITUDE_X * math.sin(2.0 * math.pi * n / 173.0 + px)
        y = HEIGHT / 2 + _AMPLITUDE_Y * math.sin(2.0 * math.pi * n / 127.0 + py)
        r = 28.0 + 6.0 * math.sin(2.0 * math.pi * n / 97.0 + pr)
        return _quantise(x), _quantise(y), _quantise(r)

    def frame(self, n: int) -> Frame:
        """Render frame n (640x480 BGR uint8)."""
        truth = self.truth(n)
        image = self._background.copy()
        if truth is not None:
            _draw_ball(image, *truth)
        # Noise: a window of a fixed noise field at an offset chosen by (seed, n). Saturating
        # uint8 add/subtract is ~20x faster than drawing fresh gaussian noise every frame.
        dy, dx = np.random.default_rng(self.seed * 1_000_003 + n).integers(
            0, _NOISE_PAD + 1, size=2
        )
        window = (slice(dy, dy + HEIGHT), slice(dx, dx + WIDTH))
        cv2.add(image, self._noise_up[window], dst=image)
        cv2.subtract(image, self._noise_down[window], dst=image)
        return image


def _draw_ball(image: Frame, x: float, y: float, r: float) -> None:
    """A shaded ball; the highlights lie inside the rim circle, so the outline is the rim's."""
    scale = 1 << _SHIFT

    def disc(cx: float, cy: float, radius: float, colour: tuple[int, int, int]) -> None:
        centre = (round(cx * scale), round(cy * scale))
        # LINE_8, not LINE_AA: antialiasing would blend edges and make results less exact.
        cv2.circle(image, centre, round(radius * scale), colour, -1, cv2.LINE_8, _SHIFT)

    disc(x, y, r, _BALL_RIM)
    disc(x - 0.18 * r, y - 0.18 * r, 0.72 * r, _BALL_BODY)
    disc(x - 0.35 * r, y - 0.35 * r, 0.3 * r, _BALL_HIGHLIGHT)


def _smooth_field(rng: np.random.Generator, rows: int, cols: int) -> NDArray[np.float32]:
    """Random values on a coarse grid, upscaled smoothly to the frame size, in [0, 1]."""
    coarse = rng.random((rows, cols), dtype=np.float32)
    fine = cv2.resize(coarse, (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)
    return np.clip(fine, 0.0, 1.0)


def _render_background(rng: np.random.Generator) -> Frame:
    """A fixed textured scene: blotches of palette colours, fine texture, light falloff."""
    weights = np.stack([_smooth_field(rng, 4, 5) ** 4 for _ in _PALETTE]) + 1e-3
    weights /= weights.sum(axis=0, keepdims=True)
    scene = np.tensordot(weights, _PALETTE, axes=(0, 0))  # (H, W, 3)
    texture = 0.85 + 0.3 * _smooth_field(rng, 60, 80)  # fine grain, as on a wall or a desk
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    lx, ly = rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT)
    falloff = 1.0 - 0.25 * np.hypot(xx - lx, yy - ly) / math.hypot(WIDTH, HEIGHT)
    scene *= (texture * falloff)[:, :, None]
    background: Frame = np.clip(scene, 0, 255).astype(np.uint8)
    for colour in _DISTRACTORS:  # small saturated objects the tracker must ignore
        size = int(rng.integers(14, 32))
        across = int(rng.integers(4, _DISTRACTOR_BAND - size))  # distance from the edge
        side = int(rng.integers(4))
        along = int(rng.integers(4, (WIDTH if side < 2 else HEIGHT) - size - 4))
        x, y = [
            (along, across),
            (along, HEIGHT - across - size),
            (across, along),
            (WIDTH - across - size, along),
        ][side]
        if rng.random() < 0.5:
            cv2.rectangle(background, (x, y), (x + size - 1, y + size - 1), colour, -1)
        else:
            cv2.circle(background, (x + size // 2, y + size // 2), size // 2, colour, -1)
    return background


def _noise_field(rng: np.random.Generator) -> tuple[Frame, Frame]:
    """Gaussian noise (sigma 6) split into its positive and negative parts, both uint8."""
    shape = (HEIGHT + _NOISE_PAD, WIDTH + _NOISE_PAD, 3)
    noise = np.rint(rng.normal(0.0, _NOISE_SIGMA, size=shape)).clip(-255, 255)
    up: Frame = np.maximum(noise, 0).astype(np.uint8)
    down: Frame = np.maximum(-noise, 0).astype(np.uint8)
    return up, down


class SyntheticSource:
    """An endless stream of synthetic frames 0, 1, 2, ..."""

    def __init__(self, seed: int = 0) -> None:
        self.camera = SyntheticCamera(seed)
        self._next = 0
        self._closed = False

    def read(self) -> Frame | None:
        if self._closed:
            return None
        frame = self.camera.frame(self._next)
        self._next += 1
        return frame

    def close(self) -> None:
        self._closed = True


class VideoCaptureSource:
    """A video file or a camera, through cv2.VideoCapture."""

    def __init__(self, capture: cv2.VideoCapture, description: str) -> None:
        self._capture = capture
        self.description = description

    def read(self) -> Frame | None:
        ok, frame = self._capture.read()
        if not ok or frame is None:
            return None
        image: Frame = np.asarray(frame, dtype=np.uint8)
        if image.ndim == 2:  # some cameras deliver grey frames; the pipeline expects BGR
            image = np.asarray(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR), dtype=np.uint8)
        return image

    def close(self) -> None:
        self._capture.release()


class ReadAhead:
    """A source read on a thread of its own, ``depth`` frames ahead of ``read``.

    For a video file, decoding (~1 ms a frame, FFmpeg) then overlaps the resize and the tasks
    instead of adding to capture, the one serial stage when several device workers run the
    rest. The same frames in the same order; at most ``depth`` decoded frames are held.
    """

    def __init__(self, source: Source, depth: int = 2) -> None:
        self._source = source
        self._frames: queue.Queue[Frame | BaseException | None] = queue.Queue(depth)
        self._closed = threading.Event()
        self._ended = False
        self._thread = threading.Thread(target=self._read, name="read-ahead", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                frame: Frame | BaseException | None = self._source.read()
            except Exception as exc:  # raised to the reader, where a direct read would raise
                frame = exc
            while not self._closed.is_set():
                try:
                    self._frames.put(frame, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if frame is None or isinstance(frame, BaseException):
                return

    def read(self) -> Frame | None:
        if self._ended:
            return None
        got = self._frames.get()
        if got is None or isinstance(got, BaseException):
            self._ended = True
        if isinstance(got, BaseException):
            raise got
        return got

    def close(self) -> None:
        self._closed.set()
        self._ended = True
        self._thread.join()
        self._source.close()


ACCEPTED_SPECS = (
    "'synthetic', 'synthetic:SEED' (SEED a non-negative integer), a camera index such as '0', "
    "or the path of a video file OpenCV can read"
)


def open_source(spec: str) -> Source:
    """Open the source a spec names; ValueError (naming the spec) if it cannot be opened."""
    kind, sep, seed_text = spec.partition(":")
    if kind == "synthetic":
        if not sep:
            return SyntheticSource()
        if not seed_text.isdecimal():
            raise ValueError(
                f"source {spec!r}: SEED must be a non-negative integer; accepted: {ACCEPTED_SPECS}"
            )
        return SyntheticSource(int(seed_text))
    if spec.isdecimal():
        camera = cv2.VideoCapture(int(spec))
        if not camera.isOpened():
            raise ValueError(
                f"source {spec!r}: camera {int(spec)} cannot be opened (no such "
                f"device, or busy); accepted: {ACCEPTED_SPECS}"
            )
        return VideoCaptureSource(camera, f"camera {int(spec)}")
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ValueError(f"source {spec!r}: no such file; accepted: {ACCEPTED_SPECS}")
    # One decoder thread: it runs beside capture (ReadAhead), where FFmpeg's frame threads
    # only add CPU (~1.1 against ~1.35 ms a frame of the webcam clip, at the same speed).
    video = cv2.VideoCapture(str(path), cv2.CAP_ANY, [cv2.CAP_PROP_N_THREADS, 1])
    if not video.isOpened():  # a backend that refuses the setting
        video = cv2.VideoCapture(str(path))
    if not video.isOpened():
        raise ValueError(
            f"source {spec!r}: OpenCV cannot read this file as a video; accepted: {ACCEPTED_SPECS}"
        )
    return ReadAhead(VideoCaptureSource(video, str(path)))  # a camera's frames are read fresh
