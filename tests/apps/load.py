"""A light pipeline for load tests: 16 KiB of per-item data whose digest the server computes.

Task 0 derives its data from the device id and item number alone (no module state), so that
many clients in one process can share the module, and a test can check every answer.
"""

import zlib

import numpy as np
import numpy.typing as npt

from offload import current_item

SIZE = 16 * 1024


def payload(device_id: str, item: int) -> npt.NDArray[np.uint8]:
    seed = [zlib.crc32(device_id.encode()), item]
    return np.random.default_rng(seed).integers(0, 256, SIZE, dtype=np.uint8)


def emit():
    ctx = current_item()
    return True, (ctx.item, payload(ctx.device_id, ctx.item))


def digest(item, data):
    return True, (item, int(data.sum(dtype=np.uint64)), zlib.crc32(data.tobytes()))


def record(item, total, crc):
    return True, {"item": item, "sum": total, "crc": crc, "device": current_item().device_id}


tasks = [emit, digest, record]
