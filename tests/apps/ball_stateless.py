"""Ball tracking with a stateless last task: its results do not depend on which process ran it.

The demo's ``aggregate`` keeps per-device state (trail, items seen) in the server process; a
fault test that restarts the server, or runs items on the device meanwhile, can only demand
equal results from a last task without such state. This one reports what tasks 0-5 found.
"""

from examples.ball_tracking import (
    blur_hsv,
    capture,
    contours,
    draw,
    enclosing_circle,
    mask,
    set_source,  # noqa: F401 (the module's --source hook)
)


def locate(snapshot, circle_xy, radius, centre):
    return True, {
        "centre": [int(v) for v in centre],
        "circle": [float(v) for v in circle_xy],
        "radius": float(radius),
        "snapshot_bytes": len(snapshot),
    }


tasks = [capture, blur_hsv, mask, contours, enclosing_circle, draw, locate]
