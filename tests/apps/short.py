"""A pipeline of many short tasks (tens of microseconds each), for the slow-device emulation: at
100x, a sleep after each of them to stretch it costs more than asked for on a loaded machine.

``cpu`` collects the CPU time each item's tasks used, from the start of task 0 to the end of
the last task (the items of a client-only run, all in one thread).
"""

import time

from offload import current_item

cpu: list[float] = []
_began = [0.0]


def reset() -> None:
    """Forget the CPU times collected so far."""
    cpu.clear()


def capture():
    _began[0] = time.thread_time()
    return True, current_item().item


def step(n):
    return True, (n * 31 + sum(range(2000))) % 1_000_003


def summarise(n):
    cpu.append(time.thread_time() - _began[0])
    return True, {"item": current_item().item, "value": n}


tasks = [capture, *[step] * 24, summarise]
