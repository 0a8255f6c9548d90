"""Ball tracking: the offload demo pipeline, in the seed Task Interface format.

Seven tasks, after the classic pyimagesearch colour tracker::

    0 capture           next frame from the source, resized to width 500   (device)
    1 blur_hsv          Gaussian blur 11x11, BGR -> HSV
    2 mask              green range (29,86,6)-(64,255,255), erode 2, dilate 2
    3 contours          external contours of the mask
    4 enclosing_circle  largest contour's circle and centroid; no ball -> filtered
    5 draw              circle and centre drawn; the frame becomes a JPEG snapshot
    6 aggregate         per-device trail, items seen, devices active   (server)

``set_source(spec)`` picks what ``capture`` reads (default: ``$OFFLOAD_SOURCE`` or the synthetic
camera, whose ground truth ``SyntheticCamera.truth`` lets tests check accuracy).
"""

from .camera import (
    Source,
    SyntheticCamera,
    SyntheticSource,
    VideoCaptureSource,
    open_source,
)
from .tasks import (
    aggregate,
    blur_hsv,
    capture,
    contours,
    draw,
    enclosing_circle,
    latest_frame,
    mask,
    reset_state,
    set_source,
)

__version__ = "1"

tasks = [capture, blur_hsv, mask, contours, enclosing_circle, draw, aggregate]

__all__ = [
    "Source",
    "SyntheticCamera",
    "SyntheticSource",
    "VideoCaptureSource",
    "__version__",
    "aggregate",
    "blur_hsv",
    "capture",
    "contours",
    "draw",
    "enclosing_circle",
    "latest_frame",
    "mask",
    "open_source",
    "reset_state",
    "set_source",
    "tasks",
]
