"""A stateful aggregate that shows double counting: ``seen`` counts items per device run.

Task 1 takes a few milliseconds on the server (``server_delay``), so that items are in flight
when a test cuts the link. ``hang_on_server`` makes task 1 block on the server for the items
it names until ``release`` is set (a server that stops answering).
"""

import threading
import time

from offload import current_item

_seen: dict[tuple[str, str], int] = {}
_next = {"n": 0}
hang_on_server: set[int] = set()
server_delay = {"seconds": 0.003}
release = threading.Event()


def emit():
    _next["n"] += 1
    return True, _next["n"]


def work(n):
    ctx = current_item()
    if ctx.on_server:
        if ctx.item in hang_on_server:
            release.wait(60)
        time.sleep(server_delay["seconds"])
    return True, n


def tally(n):
    ctx = current_item()
    key = (ctx.device_id, ctx.run_id)
    _seen[key] = _seen.get(key, 0) + 1
    return True, {"n": n, "seen": _seen[key]}


tasks = [emit, work, tally]
