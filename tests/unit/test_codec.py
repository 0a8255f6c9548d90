"""The value codec: exact round trips, and clear refusals of what cannot or must not travel."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from offload import CodecError, Limits, decode, encode
from offload._codec import ALLOWED_DTYPES
from offload.v1 import offload_pb2 as pb

from ..helpers import assert_same


def roundtrip(value: Any, limits: Limits = Limits()) -> Any:
    wire = encode(value, limits).SerializeToString()
    return decode(pb.Value.FromString(wire), limits)


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
