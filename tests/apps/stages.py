"""A pipeline whose middle stages cost real CPU and whose items stay small.

Capture is cheap and the four middle stages each sort a 20 000-element window (stage 3 four
of them), so the split moves CPU work between device and server without the link mattering: the
automatic-mode tests use it to get a wide, machine-independent contrast between splits, widest
between K=3 and K=4.
"""

import numpy as np

from offload import current_item

SIZE = 20_000


def capture():
    n = current_item().item
    return True, np.random.default_rng(n).random(SIZE)


def _stage(x):
    # A real computation (sort + rescale) rather than a busy loop: the seed's mistake.
    y = np.sort(x)
    return True, (y - y.mean()) / (y.std() + 1e-9)


def stage_1(x):
    return _stage(x)


def stage_2(x):
    return _stage(x)


def stage_3(x):
    ok, y = _stage(np.tile(x, 4))
    return ok, y[::4]


def stage_4(x):
    return True, {"p50": float(np.median(x)), "p99": float(np.quantile(x, 0.99))}


def summarise(stats):
    return True, {"item": current_item().item, **stats}


tasks = [capture, stage_1, stage_2, stage_3, stage_4, summarise]
