"""A sensor that yields a small reading every 4 ms, whatever the machine: items arrive at the
device's pace, each long after the previous one was sent, as on a real camera (the linger tests:
without lingering, a message holds one item)."""

import time

import numpy as np

from offload import current_item

PERIOD = 0.004  # seconds between readings


def read():
    time.sleep(PERIOD)  # the sensor's own pace, not a wait for anything in the framework
    return True, np.full(64, current_item().item, np.float32)


def scale(x):
    return True, x * 2


def summarise(x):
    return True, {"item": current_item().item, "sum": float(x.sum())}


tasks = [read, scale, summarise]
