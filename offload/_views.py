"""A pipeline's view of an item: ``publish_view(jpeg)`` hands an image to the server's dashboard.

A task calls it with a JPEG; the view is kept for the item's device (``current_item``) until the
server's executor answers the item, when the dashboard's listener takes it, in the same thread.
So no registry is shared between servers in one process, a server without a dashboard keeps at
most one view per thread, and a view published by a task that runs on the device goes nowhere.
"""

from __future__ import annotations

import threading

from ._pipeline import ItemContext, current_item

MAX_VIEW_BYTES = 512 * 1024  # the demo's bound on a snapshot (a 500x375 JPEG is ~25 kB)
JPEG_MAGIC = b"\xff\xd8"  # the start-of-image marker

_local = threading.local()


def publish_view(jpeg: bytes) -> None:
    """Show ``jpeg`` as the latest view of the current item's device on the dashboard.

    Call it from a task (the last one, which always runs on the server). Raises ``ValueError``
    for anything but JPEG bytes of at most ``MAX_VIEW_BYTES``, ``RuntimeError`` outside a task.
    """
    if not isinstance(jpeg, bytes | bytearray | memoryview):
        raise ValueError(f"publish_view takes JPEG bytes, not {type(jpeg).__name__}")
    data = bytes(jpeg)
    if not data.startswith(JPEG_MAGIC):
        raise ValueError("publish_view takes a JPEG (cv2.imencode('.jpg', ...)): not one")
    if len(data) > MAX_VIEW_BYTES:
        raise ValueError(
            f"publish_view: the view is {len(data)} bytes, more than {MAX_VIEW_BYTES}: "
            "publish a smaller image or a lower JPEG quality"
        )
    _local.view = (current_item(), data)


def take_view(device_id: str, run_id: str, item: int) -> bytes | None:
    """The view a task of this item published in this thread (once), else None."""
    held: tuple[ItemContext, bytes] | None = getattr(_local, "view", None)
    if held is None:
        return None
    context, data = held
    if (context.device_id, context.run_id, context.item) != (device_id, run_id, item):
        return None  # another item's (a server without a dashboard ran it in this thread)
    _local.view = None
    return data
