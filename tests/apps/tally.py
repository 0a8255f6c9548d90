"""A stateful aggregate that shows double counting: ``seen`` counts items per device run.

Task 1 takes a few milliseconds on the server (``set_server_delay``), so that items are in flight
when a test cuts the link. ``hang_on_server(*items)`` makes task 1 block on the server for those
items until ``reset()`` (a server that stops answering).
"""

import threading
import time

from offload import current_item

SERVER_DELAY = 0.003
_seen: dict[tuple[str, str], int] = {}
_next = {"n": 0}
_hang: set[int] = set()
_delay = {"seconds": SERVER_DELAY}
_release = threading.Event()


def hang_on_server(*items: int) -> None:
    """Task 1 on the server blocks for ``items`` until ``reset()``."""
    _release.clear()
    _hang.update(items)


def set_server_delay(seconds: float) -> None:
    _delay["seconds"] = seconds


def reset() -> None:
    """Release hung items; back to the default server delay."""
    _release.set()
    _hang.clear()
    _delay["seconds"] = SERVER_DELAY


def restart() -> None:
    """As a fresh process: items count from 1 again, no run seen."""
    _next["n"] = 0
    _seen.clear()


def emit():
    _next["n"] += 1
    return True, _next["n"]


def work(n):
    ctx = current_item()
    if ctx.on_server:
        if ctx.item in _hang:
            _release.wait(60)
        time.sleep(_delay["seconds"])
    return True, n


def tally(n):
    ctx = current_item()
    key = (ctx.device_id, ctx.run_id)
    _seen[key] = _seen.get(key, 0) + 1
    return True, {"n": n, "seen": _seen[key]}


tasks = [emit, work, tally]
