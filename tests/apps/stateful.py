"""A stateful aggregate on the state API: ``seen`` and ``total`` per device run, in the store.

Run on replicas sharing one Redis, each item must be counted once whichever replica ran it.
``OFFLOAD_TEST_PAUSE`` names a file: while it exists, task 0 waits before capturing (a test's
outage: the device captures nothing new while no server answers). ``OFFLOAD_TEST_DELAY``: the
seconds task 1 takes on the server (items stay in flight).
"""

import os
import time
from pathlib import Path

from offload import current_item, current_state

_next = {"n": 0}


def emit():
    pause = os.environ.get("OFFLOAD_TEST_PAUSE")
    while pause and Path(pause).exists():
        time.sleep(0.01)  # polls the test's switch; the items already sent carry on meanwhile
    _next["n"] += 1
    return True, _next["n"]


def work(n):
    if current_item().on_server:
        time.sleep(float(os.environ.get("OFFLOAD_TEST_DELAY", "0")))
    return True, n


def count(n):
    ctx = current_item()
    state = current_state()
    device = state.device
    if device.get("run") != ctx.run_id:
        device.clear()
        device.update(run=ctx.run_id, seen=0, total=0)
    device["seen"] += 1
    device["total"] += n
    state.mark("latest", ctx.capture_time)
    state.publish("last", str(n).encode())
    return True, {"n": n, "seen": device["seen"], "total": device["total"]}


tasks = [emit, work, count]
