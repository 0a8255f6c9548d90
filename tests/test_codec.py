"""The value codec: exact round trips, and clear refusals of what cannot or must not travel."""

from __future__ import annotations

import io
import json
import math
import socket
import sys
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from offload import (
    ClientConfig,
    CodecError,
    GrpcTransport,
    Limits,
    Pipeline,
    current_item,
    decode,
    encode,
    load_pipeline,
)
from offload._cloud.serve import RunningServer
from offload._codec import ALLOWED_DTYPES
from offload._device.client import Client
from offload.v1 import offload_pb2 as pb

from .conftest import run_split


def roundtrip(value: Any, limits: Limits = Limits()) -> Any:
    wire = encode(value, limits).SerializeToString()
    return decode(pb.Value.FromString(wire), limits)


def assert_same(a: Any, b: Any) -> None:
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and (a == b or (np.isnan(a) and np.isnan(b)))
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, float) and math.isnan(a):  # NaN equals nothing, itself included
        assert math.isnan(b)
    else:
        assert a == b


@pytest.mark.parametrize("dtype", sorted(ALLOWED_DTYPES))
def test_every_allowed_dtype_round_trips(dtype: str) -> None:
    rng = np.random.default_rng(1)
    array = (rng.random((3, 4, 2)) * 100).astype(np.dtype(dtype))
    back = roundtrip(array)
    assert back.dtype.str == dtype
    assert_same(array, back)


def test_non_contiguous_views_round_trip_as_their_values() -> None:
    base = np.arange(60, dtype=np.int32).reshape(3, 4, 5)
    for view in (base[:, ::2, 1:], base.T, base[::-1], np.asfortranarray(base)):
        back = roundtrip(view)
        assert_same(np.ascontiguousarray(view), back)
        assert back.flags.c_contiguous


def test_zero_d_empty_and_scalar_arrays() -> None:
    assert_same(np.array(7, dtype=np.int16), roundtrip(np.array(7, dtype=np.int16)))
    assert_same(np.zeros((0, 3), dtype=np.float32), roundtrip(np.zeros((0, 3), dtype=np.float32)))
    for scalar in (np.float32(1.5), np.uint8(255), np.bool_(True), np.complex64(1 + 2j)):
        assert_same(scalar, roundtrip(scalar))


def test_decoded_arrays_are_writable_for_tasks_that_draw_in_place() -> None:
    back = roundtrip(np.zeros((4, 4, 3), dtype=np.uint8))
    back[0, 0] = 255
    assert back.flags.writeable


def test_nested_python_values_keep_their_types_and_order() -> None:
    value = {
        "z": (1, -(2**63), 2**63 - 1, 2.5, float("inf"), None, True, "ünïcode", b"\x00\xff"),
        "a": [[], (), {}, [np.arange(3)], {"inner": (np.float64(0.1),)}],
    }
    assert_same(value, roundtrip(value))


def test_nan_survives() -> None:
    back = roundtrip([float("nan"), np.array([np.nan])])
    assert back[0] != back[0] and np.isnan(back[1][0])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (object(), "cannot send a object"),
        ({1: "x"}, "map key 1 is not a str"),
        (2**63, "does not fit in 64 bits"),
        (np.array(["a"]), "dtype <U1 cannot travel"),
        (np.array([object()]), "dtype object cannot travel"),
        ({"k": [1, {2}]}, "args['k'][1]: cannot send a set"),
    ],
)
def test_unsupported_values_name_the_path_and_type(value: Any, message: str) -> None:
    with pytest.raises(CodecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        encode(value)


def test_limits_on_depth_and_elements() -> None:
    limits = Limits(max_depth=3, max_elements=4)
    roundtrip([[[1]]], limits)
    with pytest.raises(CodecError, match="max_depth"):
        encode([[[[1]]]], limits)
    with pytest.raises(CodecError, match="max_elements"):
        encode([1, 2, 3, 4, 5], limits)
    wide = encode([1, 2, 3, 4, 5])
    with pytest.raises(CodecError, match="more than 4"):
        decode(wide, limits)


def make_array(dtype: str, shape: list[int], data: bytes) -> pb.Value:
    value = pb.Value()
    value.array.dtype = dtype
    value.array.shape.extend(shape)
    value.array.data = data
    return value


@pytest.mark.parametrize(
    ("dtype", "shape", "data", "message"),
    [
        ("|O", [1], b"12345678", "not an allowed dtype"),
        ("<U4", [1], b"\0" * 16, "not an allowed dtype"),
        ("|u1", [2, 3], b"12345", "5 bytes, but dtype |u1 x shape \\[2, 3\\] needs 6"),
        ("<f8", [2**40, 2**40], b"", "shape\\[0\\]: 1099511627776 is larger than any message"),
        ("<f8", [2**20, 2**20], b"", "needs 8796093022208"),  # 8 TiB: refused before allocating
        ("|u1", [0, 2**64 - 1], b"", "shape\\[1\\]"),  # empty, but NumPy cannot index it
        ("<c16", [0, 2, 2, 827, 830, 833, 4506, 55936], b"", "larger than NumPy can index"),
        ("<c16", [0, 2**24, 2**24, 2**11], b"", "larger than NumPy can index"),  # 2**63 bytes
        ("|u1", [1] * 40, b"1", "dimensions"),
    ],
)
def test_malformed_wire_arrays_are_refused_before_allocating(
    dtype: str, shape: list[int], data: bytes, message: str
) -> None:
    with pytest.raises(CodecError, match=message):
        decode(make_array(dtype, shape, data))


def test_an_empty_array_may_declare_any_shape_numpy_can_index() -> None:
    shape = [0, 2**24, 2**24, 2**11 - 1]  # x 16 bytes: just under 2**63
    back = decode(make_array("<c16", shape, b""))
    assert back.shape == tuple(shape) and back.size == 0


def test_unset_value_decodes_as_none() -> None:
    assert decode(pb.Value()) is None


def test_decode_errors_name_the_nested_field() -> None:
    value = encode({"k": [1, np.zeros(2, np.uint8)]})
    value.map_value.entries[0].value.list_value.items[1].array.dtype = "|O"
    with pytest.raises(CodecError, match=r"^args\['k'\]\[1\]\.dtype: '\|O' is not an allowed"):
        decode(value)


# --- a result's fate does not depend on where the last task ran ------------------------------

UNSENDABLE = [{"s": {1, 2}}, 2**70, np.array(["a"]), {3: "x"}]
SUPPORTED = "None, bool, int, float, str, bytes, numpy arrays and scalars, list, tuple, dict[str]"


def results_app(name: str, results: list[Any]) -> Pipeline:
    def emit() -> Any:
        return True, None

    def result() -> Any:
        return True, results[current_item().item]

    module = types.ModuleType(name)
    module.tasks = [emit, result]  # type: ignore[attr-defined]
    sys.modules[name] = module
    return load_pipeline(name)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def every_way(pipeline: Pipeline, port: int, frames: int) -> dict[str, list[str]]:
    """The output lines of client-only, all tasks here, split 1, and split 1 with no server."""
    runs = {
        "client-only": run_split(pipeline, None, frames=frames)[0],
        "K=N": run_split(pipeline, 2, frames=frames)[0],
        "split": run_split(pipeline, 1, port, frames=frames)[0],
    }
    away = GrpcTransport.from_config(
        ClientConfig(connect_timeout=0.05), f"127.0.0.1:{closed_port()}"
    )
    config = ClientConfig(pipeline=pipeline.name, local_tasks=1, frames=frames)
    out = io.StringIO()
    try:
        report = Client(pipeline, config, away, out).run()
    finally:
        away.close()
    assert report["link"]["ran_locally"] == frames
    runs["server away"] = out.getvalue().splitlines()
    return runs


def test_a_result_that_cannot_travel_fails_alike_whatever_the_split(
    start_server: Callable[..., RunningServer],
) -> None:
    pipeline = results_app("unsendable_app", [*UNSENDABLE, "fine"])
    runs = every_way(pipeline, start_server(pipeline).port, len(UNSENDABLE) + 1)
    assert runs["client-only"] == runs["K=N"] == runs["split"] == runs["server away"]
    records = [json.loads(line) for line in runs["client-only"]]
    assert records[-1] == {"item": 4, "status": "completed", "result": "fine"}
    assert {r["status"] for r in records[:-1]} == {"failed"}
    assert {r["task"] for r in records[:-1]} == {1}
    assert [r["error"] for r in records[:-1]] == [
        f"the result cannot be sent back: args['s']: cannot send a set; supported: {SUPPORTED}",
        f"the result cannot be sent back: args: int {2**70} does not fit in 64 bits; send it as "
        "a str",
        "the result cannot be sent back: args: arrays of dtype <U1 cannot travel; use a numeric "
        "or bool dtype",
        "the result cannot be sent back: args: map key 3 is not a str; only str keys travel",
    ]


EVERY_TYPE: dict[str, Any] = {
    "none": None,
    "bool": True,
    "int": -(2**63),
    "float": 0.1,
    "special": [float("nan"), float("inf"), -float("inf")],
    "str": "naïve",
    "bytes": b"\x00\xff",
    "array": np.array([[1, 2], [3, 4]], np.uint8),
    "empty": np.zeros((0, 3), np.float32),
    "scalars": [np.float32(1.5), np.int64(7), np.bool_(False)],
    "complex": [np.complex64(1 + 2j), np.array([3j, 4], np.complex128)],
    "list": [1, [2]],
    "tuple": (1, (2,)),
    "dict": {"z": 1, "a": {}},
}
EVERY_TYPE_JSON = (
    '{"none":null,"bool":true,"int":-9223372036854775808,"float":0.1,'
    '"special":[NaN,Infinity,-Infinity],"str":"na\\u00efve","bytes":"AP8=",'
    '"array":[[1,2],[3,4]],"empty":[],"scalars":[1.5,7,false],'
    '"complex":[[1.0,2.0],[[0.0,3.0],[4.0,0.0]]],"list":[1,[2]],"tuple":[1,[2]],'
    '"dict":{"z":1,"a":{}}}'
)


def test_each_type_is_written_to_output_in_its_documented_json_form_whatever_the_split(
    start_server: Callable[..., RunningServer],
) -> None:
    pipeline = results_app("every_type_app", [EVERY_TYPE])
    runs = every_way(pipeline, start_server(pipeline).port, 1)
    expected = [f'{{"item":0,"status":"completed","result":{EVERY_TYPE_JSON}}}']
    assert runs == dict.fromkeys(runs, expected)
