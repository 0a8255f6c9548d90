"""Task 1 never returns: for what a second Ctrl-C does while an item is stuck, here or there.

It says on stderr when it starts, so that a test knows the run is under way. It is stuck in
Python code, as a slow task is: CPython runs signal handlers in the main thread between steps of
Python code, so a task blocked forever inside one C call would delay even a second Ctrl-C.
"""

import sys
import threading

_n = {"n": 0}


def emit():
    _n["n"] += 1
    return True, _n["n"]


def hang(n):
    print(f"hang: item {n} is in task 1", file=sys.stderr, flush=True)
    never = threading.Event()
    while not never.wait(0.05):
        pass
    return True, n


def result(n):
    return True, {"n": n}


tasks = [emit, hang, result]
