"""A tiny pipeline whose aggregate counts items per device: shows duplicates and failures."""

from offload import current_item

_counts: dict[tuple[str, str], int] = {}
_next = {"n": 0}


def emit():
    _next["n"] += 1
    return True, _next["n"]


def check(n):
    if n % 5 == 0:
        raise ValueError(f"item value {n} is a multiple of 5")
    return True, (n, n * n)


def count(n, square):
    ctx = current_item()
    key = (ctx.device_id, ctx.run_id)
    _counts[key] = _counts.get(key, 0) + 1
    return True, {"n": n, "square": square, "seen": _counts[key], "device": ctx.device_id}


tasks = [emit, check, count]
