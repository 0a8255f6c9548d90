"""Items whose remaining tasks, run on the device, wait at a gate: to fill an offline buffer.

Task 0 emits ``ITEMS`` items; it holds item 1 back until item 0's remaining tasks have started
on the device, so what the buffer holds when it fills is deterministic. The device's task 1
blocks for item 0 until ``open_gate()``; ``reset()`` closes it and starts the items again.
"""

import threading

from offload import current_item

ITEMS = 20
_next = {"n": 0}
_zero_started = threading.Event()
_gate = threading.Event()


def reset() -> None:
    _gate.clear()
    _zero_started.clear()
    _next["n"] = 0


def open_gate() -> None:
    _gate.set()


def emit():
    n = _next["n"]
    if n >= ITEMS:
        return False, None
    if n == 1:
        _zero_started.wait(30)
    _next["n"] = n + 1
    return True, n


def hold(n):
    if current_item().item == 0 and not current_item().on_server:
        _zero_started.set()
        _gate.wait(30)
    return True, n


def result(n):
    return True, {"n": n}


tasks = [emit, hold, result]
