"""Task 1 never returns: for what a second Ctrl-C does while an item is stuck, here or there.

It says on stderr when it starts, so that a test knows the run is under way.
"""

import sys
import threading

_n = {"n": 0}


def emit():
    _n["n"] += 1
    return True, _n["n"]


def hang(n):
    print(f"hang: item {n} is in task 1", file=sys.stderr, flush=True)
    threading.Event().wait()
    return True, n


def result(n):
    return True, {"n": n}


tasks = [emit, hang, result]
