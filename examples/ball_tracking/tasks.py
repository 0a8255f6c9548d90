"""The seven tasks of the ball tracker (the classic pyimagesearch colour tracker, the "seed").

Tasks 0-5 are pure per-frame work (task 0 owns the camera); task 6 aggregates across items and
devices on the server and keeps its state in the server's state store (``current_state``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Literal

import cv2
import numpy as np
from numpy.typing import NDArray

from offload import current_item, current_state, publish_view
from offload._state import LOCAL

from .camera import Frame, Source, open_source

Mask = NDArray[np.uint8]
Contour = NDArray[np.int32]
Point = tuple[float, float]
Centre = tuple[int, int]
# What draw and aggregate accept: tuples from a local task, or lists from a decoded wire value.
PointIn = Sequence[float]
CentreIn = Sequence[int]
JSONValue = int | float | str | bool | None | list["JSONValue"] | dict[str, "JSONValue"]
Filtered = Literal[False]

FRAME_WIDTH = 500  # the seed resized every frame to this width (imutils.resize, INTER_AREA)
GREEN_LOWER = (29, 86, 6)  # HSV range of the seed's green ball
GREEN_UPPER = (64, 255, 255)
MIN_RADIUS = 10.0  # a smaller blob is noise, not the ball (strictly greater is kept)
CIRCLE_COLOUR = (0, 255, 255)  # yellow, BGR
CENTRE_COLOUR = (0, 0, 255)  # red, BGR

TRAIL_LENGTH = 32
ACTIVE_WINDOW_S = 30.0  # a device is active if its last capture is this close to the item's
JPEG_QUALITY = 80

# What a real camera never sends is refused (an item from the wire may claim anything): a frame
# is what capture makes, at most a 1:2 portrait; a snapshot is a JPEG; the frames kept for a
# viewer are bounded in bytes too. A refusal fails that item, naming what was wrong.
MAX_FRAME_HEIGHT = 2 * FRAME_WIDTH
MAX_CONTOURS = 16_384  # an opened mask of the largest frame holds at most ~14 000 blobs
MAX_SNAPSHOT_BYTES = 512 * 1024  # a JPEG of the largest frame of noise at quality 80 fits
# Per-device state and snapshots are the store's: in this process, offload._state.LOCAL keeps
# 10 000 devices, least recently seen first out, and snapshots within 32 MiB in all.
MAX_DEVICES = LOCAL.max_devices
MAX_FRAMES_BYTES = LOCAL.max_published_bytes

# --- the source that task 0 reads -----------------------------------------------------------

_source_lock = threading.Lock()
_source: Source | None = None


def set_source(spec: str) -> None:
    """Choose what ``capture`` reads: 'synthetic', 'synthetic:SEED', a camera index, a file.

    The new source is opened first, so a bad spec raises ValueError and leaves the current
    source in place; otherwise the previous source is released.
    """
    global _source
    new = open_source(spec)
    with _source_lock:
        old, _source = _source, new
    if old is not None:
        old.close()


def _current_source() -> Source:
    global _source
    if _source is None:
        # Opened lazily, on the first capture: the server imports this module too and must
        # never open the device's camera. OFFLOAD_SOURCE picks the default source.
        spec = os.environ.get("OFFLOAD_SOURCE", "synthetic")
        try:
            _source = open_source(spec)
        except ValueError as exc:
            raise ValueError(f"OFFLOAD_SOURCE: {exc}") from None
    return _source


# --- per-frame tasks (0-5) ------------------------------------------------------------------


def capture() -> tuple[bool, Frame | None]:
    """Task 0: the next frame, resized to width 500; (False, None) at the end of the stream."""
    with _source_lock:
        frame = _current_source().read()
    if frame is None:
        return False, None
    height, width = frame.shape[:2]
    size = (FRAME_WIDTH, int(height * FRAME_WIDTH / width))  # imutils.resize's arithmetic
    resized: Frame = np.ascontiguousarray(
        cv2.resize(frame, size, interpolation=cv2.INTER_AREA), dtype=np.uint8
    )
    return True, resized


def _check_image(name: str, image: NDArray[np.generic], channels: int) -> None:
    """Refuse an image that capture could not have made (its width, height, type, channels)."""
    want = (FRAME_WIDTH, 3) if channels == 3 else (FRAME_WIDTH,)
    if (
        not isinstance(image, np.ndarray)
        or image.dtype != np.uint8
        or image.ndim != len(want) + 1
        or image.shape[1:] != want
        or not 1 <= image.shape[0] <= MAX_FRAME_HEIGHT
    ):
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(
            f"{name} is {shape} of {getattr(image, 'dtype', '?')}: expected uint8 of "
            f"(1..{MAX_FRAME_HEIGHT}, {', '.join(map(str, want))}), as capture makes"
        )


def blur_hsv(frame: Frame) -> tuple[bool, tuple[Frame, Frame]]:
    """Task 1: blur away sensor noise, then convert to HSV, where a colour is one hue range."""
    _check_image("the frame", frame, 3)
    blurred = cv2.GaussianBlur(frame, (11, 11), 0)
    hsv: Frame = np.asarray(cv2.cvtColor(blurred, cv2.COLOR_BGR2HSV), dtype=np.uint8)
    return True, (frame, hsv)


def mask(frame: Frame, hsv: Frame) -> tuple[bool, tuple[Frame, Mask]]:
    """Task 2: pixels in the ball's colour range, with specks removed (erode) and holes closed."""
    _check_image("the frame", frame, 3)
    _check_image("the HSV frame", hsv, 3)
    return True, (frame, _open(np.asarray(cv2.inRange(hsv, GREEN_LOWER, GREEN_UPPER), np.uint8)))


def _open(binary: Mask) -> Mask:
    opened = cv2.erode(binary, None, iterations=2)  # type: ignore[call-overload]
    opened = cv2.dilate(opened, None, iterations=2)  # type: ignore[call-overload]
    return np.asarray(opened, dtype=np.uint8)


def contours(frame: Frame, mask: Mask) -> tuple[bool, tuple[Frame, list[Contour]]]:
    """Task 3: the outer outlines of the blobs in the mask.

    The mask must be one that task 2 could make: opening is idempotent, so opening it again
    changes nothing (~0.1 ms). This refuses specks, which would make findContours return one
    outline per pixel (a million from a 4 MiB mask: seconds of CPU and gigabytes).
    """
    _check_image("the frame", frame, 3)
    _check_image("the mask", mask, 1)
    if mask.shape[0] != frame.shape[0] or not np.array_equal(_open(mask), mask):
        raise ValueError(
            "the mask is not one task 2 makes: a mask of the frame's size, with no specks "
            "that erosion removes"
        )
    # findContours returned 3 values in OpenCV 3 and 2 since 4; the copy protects the input,
    # which OpenCV < 3.2 modified in place.
    found = cv2.findContours(mask.copy(), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    outlines = found[0] if len(found) == 2 else found[1]
    return True, (frame, [np.asarray(c, dtype=np.int32) for c in outlines])


def enclosing_circle(
    frame: Frame, contours: Sequence[Contour]
) -> Filtered | tuple[bool, tuple[Frame, Point, float, Centre]]:
    """Task 4: the largest blob's enclosing circle and centroid; filters frames with no ball."""
    if len(contours) == 0:
        return False
    if len(contours) > MAX_CONTOURS:
        raise ValueError(f"{len(contours)} outlines: a frame's mask holds at most {MAX_CONTOURS}")
    largest = max(contours, key=cv2.contourArea)
    (x, y), radius = cv2.minEnclosingCircle(largest)
    moments = cv2.moments(largest)
    if moments["m00"] == 0 or radius <= MIN_RADIUS:
        return False
    centre = (int(moments["m10"] / moments["m00"]), int(moments["m01"] / moments["m00"]))
    return True, (frame, (float(x), float(y)), float(radius), centre)


def draw(
    frame: Frame, circle_xy: PointIn, radius: float, centre: CentreIn
) -> tuple[bool, tuple[bytes, Point, float, Centre]]:
    """Task 5: draw the circle and its centre on the frame, and JPEG it for the cloud viewer.

    The raw frame is carried from capture to here only because this task needs it; after it,
    an item is a ~20 kB snapshot instead of a 560 kB frame, which is what makes cutting after
    this task cheap on a slow link.
    """
    _check_image("the frame", frame, 3)
    x, y = circle_xy
    cx, cy = centre
    cv2.circle(frame, (int(x), int(y)), int(radius), CIRCLE_COLOUR, 2)
    cv2.circle(frame, (int(cx), int(cy)), 5, CENTRE_COLOUR, -1)
    ok, jpeg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("OpenCV could not JPEG-encode the annotated frame")
    return True, (jpeg.tobytes(), (x, y), radius, (cx, cy))


# --- aggregation (task 6, on the server) ----------------------------------------------------
#
# The state lives in the server's store (offload.current_state(): this process's memory, or
# Redis shared by replicas), so trail, items_seen, devices_active and the latest snapshot are
# the same whichever replica runs an item, and survive a replica's death.

CAPTURES = "capture"  # fleet index: each device's latest capture time
SNAPSHOT = "snapshot"  # published per device: the latest annotated JPEG


def aggregate(
    snapshot: bytes, circle_xy: PointIn, radius: float, centre: CentreIn
) -> tuple[bool, dict[str, JSONValue]]:
    """Task 6: the ball's trail per device, items seen, devices active; a JSON-friendly result.

    O(log devices) per item: the trail, the device's state and the snapshot are bounded, and
    the store counts devices active in a sorted index.
    """
    if not isinstance(snapshot, bytes) or not snapshot.startswith(b"\xff\xd8"):
        raise ValueError("the snapshot is not a JPEG (draw makes one)")
    if len(snapshot) > MAX_SNAPSHOT_BYTES:
        raise ValueError(
            f"the snapshot is {len(snapshot)} bytes: a frame's JPEG is at most {MAX_SNAPSHOT_BYTES}"
        )
    ctx = current_item()
    state = current_state()
    cx, cy = (int(v) for v in centre)
    x, y = (float(v) for v in circle_xy)
    device = state.device
    if device.get("run") != ctx.run_id:  # a restart of the device: a new trail
        device.clear()
        device.update(run=ctx.run_id, trail=[], seen=0)
    trail: list[JSONValue] = device["trail"]
    trail.append([cx, cy])
    del trail[:-TRAIL_LENGTH]
    device["seen"] += 1
    # The latest capture, not the latest arrival: a resent old item must not age a device.
    state.mark(CAPTURES, ctx.capture_time)
    # Relative to the item's own capture time, so results depend on the data alone and not
    # on when the server got round to it.
    active = state.count(
        CAPTURES, ctx.capture_time - ACTIVE_WINDOW_S, ctx.capture_time + ACTIVE_WINDOW_S
    )
    state.publish(SNAPSHOT, snapshot)  # kept in the state store
    publish_view(snapshot)  # the server's dashboard shows it
    return True, {
        "item": ctx.item,
        "centre": [cx, cy],
        "circle": [x, y],
        "radius": float(radius),
        "trail": [list(p) for p in trail],  # type: ignore[arg-type]
        "items_seen": device["seen"],
        "devices_active": active,
    }


def latest_frame(device_id: str) -> bytes | None:
    """The last annotated snapshot (JPEG) aggregate saw from a device, in this process's store
    (a server with --state redis:// keeps it in Redis: ``RedisStore.published``)."""
    return LOCAL.published(device_id, SNAPSHOT)


def reset_state() -> None:
    """Forget every device's trail, counts and frames in this process (for tests)."""
    LOCAL.clear()
