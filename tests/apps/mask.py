"""A pipeline whose cuts compress well and whose result holds numeric lists: for negotiation.

Task 0 draws a square on a 200x200 frame (40 kB, mostly zeros); the result carries its outline
as rows of ints, floats, and a large compressible array, so that both encodings are worth using.
"""

import numpy as np

from offload import current_item


def capture():
    n = current_item().item
    frame = np.zeros((200, 200), np.uint8)
    frame[n % 150 : n % 150 + 40, 20:60] = 255
    return True, frame


def locate(frame):
    ys, xs = np.nonzero(frame)
    return True, (frame > 0, [[int(x), int(y)] for x, y in zip(xs[::50], ys[::50], strict=True)])


def summarise(mask, outline):
    n = current_item().item
    return True, {
        "item": n,
        "outline": outline,
        "ratios": [n / 3, n / 7],
        "mask": np.repeat(mask, 2, axis=0),
    }


tasks = [capture, locate, summarise]
