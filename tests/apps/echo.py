"""A pipeline whose items are byte strings of chosen sizes: for message size limits.

``set_source("100,65000,70000")`` makes task 0 emit one item of each size, then end; an item of 7
bytes gets a 100 kB result.
"""

_sizes: list[int] = []


def set_source(spec):
    _sizes[:] = [int(s) for s in spec.split(",") if s]


def emit():
    if not _sizes:
        return False, None
    return True, b"x" * _sizes.pop(0)


def measure(data):
    return True, len(data)


def record(n):
    if n == 7:  # an item of 7 bytes gets an answer too large for a 64 KiB limit
        return True, {"n": n, "blob": b"y" * 100_000}
    return True, {"n": n}


tasks = [emit, measure, record]
