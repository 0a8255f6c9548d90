"""Item 4: the codec against pickle and against one memcpy of the payload.

Values: a 500x375x3 uint8 frame, a 500x375 mask and the contour list of a frame (the outputs of
capture, mask and contours). "offload" is what crosses the wire for a value: ``encode`` then
``SerializeToString`` out, ``FromString`` then ``decode`` in; pickle is protocol 5 in-band
(``dumps`` / ``loads``); memcpy copies the payload's bytes once into a preallocated buffer.
Each figure is the median of many calls; the last few outputs are kept alive (as a window of
items in flight would) so that the allocator reuses memory as it does in a real stream.
"""

from __future__ import annotations

import pickle
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from offload import Pipeline
from offload._codec import decode, encode
from offload._pipeline import ItemContext, run_tasks
from offload.v1 import offload_pb2 as pb

from . import pipeline as bench_pipeline
from .pipeline import Frame


def _time(fn: Callable[[], Any], calls: int) -> float:
    keep: deque[Any] = deque(maxlen=8)
    for _ in range(10):
        keep.append(fn())
    samples = []
    for _ in range(calls):
        began = time.perf_counter()
        out = fn()
        samples.append(time.perf_counter() - began)
        keep.append(out)
    return statistics.median(samples)


def _arrays(value: Any) -> list[np.ndarray]:
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, (list, tuple)):
        return [a for v in value for a in _arrays(v)]
    return []


def values(pipeline: Pipeline, frames: list[Frame]) -> dict[str, Any]:
    bench_pipeline.prepare(frames, 1)
    context = ItemContext("codec", "codec", 0, 0.0, False)
    frame = run_tasks(pipeline, 0, 1, None, context).value
    bench_pipeline.prepare(frames, 1)
    _, mask = run_tasks(pipeline, 0, 3, None, context).value
    bench_pipeline.prepare(frames, 1)
    _, contours = run_tasks(pipeline, 0, 4, None, context).value
    return {"frame 500x375x3 u8": frame, "mask 500x375 u8": mask, "contour list": contours}


def measure(value: Any, calls: int) -> dict[str, Any]:
    wire = encode(value).SerializeToString()
    pickled = pickle.dumps(value, protocol=5)
    arrays = _arrays(value)
    targets = [np.empty_like(a) for a in arrays]

    def memcpy() -> None:
        for target, array in zip(targets, arrays, strict=True):
            np.copyto(target, array)

    result = {
        "payload_bytes": sum(a.nbytes for a in arrays),
        "arrays": len(arrays),
        "offload_bytes": len(wire),
        "pickle_bytes": len(pickled),
        "offload_encode_us": _time(lambda: encode(value).SerializeToString(), calls),
        "offload_decode_us": _time(lambda: decode(pb.Value.FromString(wire)), calls),
        "pickle_encode_us": _time(lambda: pickle.dumps(value, protocol=5), calls),
        "pickle_decode_us": _time(lambda: pickle.loads(pickled), calls),  # noqa: S301
        "memcpy_us": _time(memcpy, calls),
    }
    for key in list(result):
        if key.endswith("_us"):
            result[key] = round(result[key] * 1e6, 2)
    result["offload_vs_pickle"] = round(
        (result["offload_encode_us"] + result["offload_decode_us"])
        / (result["pickle_encode_us"] + result["pickle_decode_us"]),
        3,
    )
    return result


def run(pipeline: Pipeline, frames: list[Frame], calls: int) -> dict[str, Any]:
    return {name: measure(value, calls) for name, value in values(pipeline, frames).items()}
