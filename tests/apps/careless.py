"""A careless pipeline for the attack tests: task 1's error echoes its whole input (an item that
starts with ``!``); otherwise the item's bytes come back as the answer."""


def emit():
    return True, b""


def echo_or_raise(data):
    if data.startswith(b"!"):
        raise ValueError(data)
    return True, data


def answer(data):
    return True, {"data": data}


tasks = [emit, echo_or_raise, answer]
