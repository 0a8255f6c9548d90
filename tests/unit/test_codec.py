"""The value codec: exact round trips, and clear refusals of what cannot or must not travel."""

from __future__ import annotations

from typing import Any

import lz4.block as lz4_block  # type: ignore[import-untyped]
import numpy as np
import pytest
import zstandard

from offload import CodecError, Limits, decode, encode
from offload._codec import ALLOWED_DTYPES, CODEC_NAMES, Codec, compress_value, wire_problem
from offload.v1 import offload_pb2 as pb

from ..helpers import assert_same

CODECS = [pb.CODEC_ZSTD, pb.CODEC_LZ4]


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


# --- packed lists and compression (only between peers that said they read them) ---------------

TRAIL = {"device": "d", "seen": 9, "trail": [[3 * i, 480 - i] for i in range(32)]}
NOT_PACKABLE = [
    [1, True],  # a bool is no int
    [1, 2.0],  # nor a float an int: each keeps its own type
    [np.int64(3), 4],
    [[1, 2], [3]],  # ragged rows
    [[1, 2], (3, 4)],  # a tuple row
    [[], []],
    [[1.5], [2]],
]


def packed_roundtrip(value: Any, limits: Limits = Limits()) -> Any:
    wire = encode(value, limits, packed=True).SerializeToString()
    return decode(pb.Value.FromString(wire), limits)


@pytest.mark.parametrize(
    "value",
    [
        [1, -2, 2**63 - 1, -(2**63)],
        [0.5, -0.0, float("inf"), 1e300],
        [[1, 2], [3, 4], [5, 6]],
        [[0.5, 1.5, 2.5]],
        TRAIL,
        (5, [1, 2]),  # a tuple stays a tuple; the list inside it is packed
        *NOT_PACKABLE,
    ],
    ids=repr,
)
def test_a_packed_value_decodes_to_the_same_python_values(value: Any) -> None:
    assert_same(value, packed_roundtrip(value))


def test_numeric_lists_and_rows_of_them_travel_packed_in_fewer_bytes() -> None:
    packed = encode(TRAIL, packed=True)
    trail = next(e.value for e in packed.map_value.entries if e.key == "trail")
    assert trail.WhichOneof("kind") == "packed_list"
    assert trail.packed_list.row_length == 2
    assert packed.ByteSize() < encode(TRAIL).ByteSize() / 2


@pytest.mark.parametrize("value", NOT_PACKABLE, ids=repr)
def test_a_list_that_is_not_all_ints_or_all_floats_is_not_packed(value: list[Any]) -> None:
    assert encode(value, packed=True).WhichOneof("kind") == "list_value"


def test_an_int_beyond_64_bits_in_a_list_is_refused_packed_or_not() -> None:
    for packed in (False, True):
        with pytest.raises(CodecError, match=r"args\[1\]: int .* does not fit in 64 bits"):
            encode([1, 2**64], packed=packed)


@pytest.mark.parametrize(
    ("packed", "error"),
    [
        (pb.PackedList(ints=[1, 2, 3], row_length=2), "3 values do not make rows of 2"),
        (pb.PackedList(ints=[1], floats=[2.0]), "both ints and floats"),
        (pb.PackedList(ints=range(11)), "11 elements, more than 10"),
        (pb.PackedList(ints=range(22), row_length=2), "rows of 2, more than 10"),
        (pb.PackedList(ints=range(11), row_length=11), "rows of 11, more than 10"),
    ],
)
def test_a_malformed_packed_list_is_refused(packed: pb.PackedList, error: str) -> None:
    with pytest.raises(CodecError, match=error):
        decode(pb.Value(packed_list=packed), Limits(max_elements=10))


FRAME = np.zeros((480, 640, 3), np.uint8)
FRAME[100:200, 300:400] = (0, 0, 255)


def compressed(value: Any, codec: Codec) -> pb.Value:
    wire = encode(value)
    assert compress_value(wire, codec) is not None
    assert wire.WhichOneof("kind") == "compressed"
    return pb.Value.FromString(wire.SerializeToString())


@pytest.mark.parametrize("codec", CODECS, ids=CODEC_NAMES.get)
def test_a_compressed_value_decodes_to_the_same_value(codec: Codec) -> None:
    value = (FRAME, {"mask": FRAME[:, :, 2] > 0, "trail": [[1, 2]] * 500, "name": "x" * 3000})
    wire = compressed(value, codec)
    assert wire.ByteSize() < encode(value).ByteSize() / 50
    assert_same(value, decode(wire))


@pytest.mark.parametrize("codec", CODECS, ids=CODEC_NAMES.get)
def test_what_does_not_shrink_is_sent_as_it_is(codec: Codec) -> None:
    noise = np.random.default_rng(3).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    for value in (noise, cv2_jpeg(), b"tiny" * 100):
        wire = encode(value)
        assert compress_value(wire, codec) is None
        assert wire == encode(value)


def cv2_jpeg() -> bytes:
    cv2 = pytest.importorskip("cv2")
    frame = np.random.default_rng(4).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    ok, jpeg = cv2.imencode(".jpg", cv2.GaussianBlur(frame, (5, 5), 0))
    assert ok
    return bytes(jpeg)


LIMIT = 1024 * 1024


def bomb(codec: Codec, size: int, declared: int, content_size: bool = True) -> pb.Value:
    """``size`` zero bytes (a Value of ``size`` + 5 bytes), compressed, declaring ``declared``."""
    raw = pb.Value(bytes_value=bytes(size)).SerializeToString()
    if codec == pb.CODEC_ZSTD:
        data = zstandard.ZstdCompressor(level=1, write_content_size=content_size).compress(raw)
    else:
        data = lz4_block.compress(raw, store_size=False)
    return pb.Value(compressed=pb.Compressed(codec=codec, size=declared, data=data))


@pytest.mark.parametrize("codec", CODECS, ids=CODEC_NAMES.get)
def test_a_compressed_value_declaring_more_than_the_limit_is_refused_before_decompressing(
    codec: Codec,
) -> None:
    # 16 MiB of zeros in a message well within the limit: refused by the size it declares.
    value = bomb(codec, 16 * LIMIT, 16 * LIMIT + 5)
    assert value.ByteSize() < LIMIT / 2
    with pytest.raises(CodecError, match=r"args\.compressed\.size: 16777221 bytes, more than "):
        decode(value, Limits(max_message_bytes=LIMIT))


@pytest.mark.parametrize(
    ("codec", "content_size"),
    [(pb.CODEC_ZSTD, True), (pb.CODEC_ZSTD, False), (pb.CODEC_LZ4, False)],
)
def test_a_compressed_value_that_inflates_beyond_its_declared_size_is_refused(
    codec: Codec, content_size: bool
) -> None:
    # It declares 1000 bytes and holds 16 MiB: decompression stops at the declared size.
    value = bomb(codec, 16 * LIMIT, 1000, content_size)
    with pytest.raises(CodecError, match=r"args\.compressed"):
        decode(value, Limits(max_message_bytes=LIMIT))


def test_a_compressed_value_inside_another_is_refused() -> None:
    inner = compressed(FRAME, pb.CODEC_ZSTD)
    twice = pb.Value(
        compressed=pb.Compressed(
            codec=pb.CODEC_ZSTD,
            size=inner.ByteSize(),
            data=zstandard.ZstdCompressor().compress(inner.SerializeToString()),
        )
    )
    with pytest.raises(CodecError, match="holds another compressed value"):
        decode(twice)
    nested = pb.Value(list_value=pb.ValueList(items=[inner]))
    with pytest.raises(CodecError, match=r"args\[0\]: a compressed value inside another value"):
        decode(nested)


def test_compressed_garbage_is_refused_naming_the_field() -> None:
    for codec in CODECS:
        value = pb.Value(compressed=pb.Compressed(codec=codec, size=100, data=b"\x01" * 40))
        with pytest.raises(CodecError, match=r"args\.compressed"):
            decode(value)
    unknown = pb.Value(compressed=pb.Compressed(codec=pb.CODEC_PACKED, size=10, data=b"x"))
    with pytest.raises(CodecError, match="packed cannot be read here"):
        decode(unknown)


class _Uncountable(bytes):
    """A message whose bytes must not be counted one by one."""

    def count(self, *args: Any) -> int:
        raise AssertionError("counted the bytes of a message a few fields describe")


def test_a_frame_is_checked_on_the_wire_by_its_few_fields_not_by_counting_its_bytes() -> None:
    # A 562 kB frame holds no element: its walk skips the array by its length (a few µs),
    # where counting its bytes for 0x0A took 0.3 ms of the server's CPU per item.
    frame = np.full((375, 500, 3), 10, np.uint8)  # every byte 0x0A: the count bound fails
    state = pb.TaskState(pipeline="p", device_id="d", next_task=1, accepts=[pb.CODEC_PACKED])
    state.args.CopyFrom(encode((frame, frame[:, :, 0].copy())))
    field = pb.TaskState.DESCRIPTOR.fields_by_name["args"].number
    assert wire_problem(_Uncountable(state.SerializeToString()), field, Limits()) is None
    # Many elements in a large message: past the first fields, counted and walked as before.
    many = pb.TaskState(next_task=1)
    many.args.CopyFrom(encode([frame.tobytes()] + [[None] * 60_000] * 2))
    problem = wire_problem(many.SerializeToString(), field, Limits())
    assert problem is not None and "more than 100000 elements" in problem


@pytest.mark.parametrize("codec", CODECS, ids=CODEC_NAMES.get)
def test_the_schedulers_sample_of_a_large_cut_compresses_slices_of_it_and_reads_its_ratio(
    codec: Codec, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every cut compressed whole with every codec cost a device at K=6 a third of its work.
    from offload import _codec  # noqa: PLC0415

    rng = np.random.default_rng(5)
    rows = np.linspace(0, 255, 375 * 500 * 3).reshape(375, 500, 3)  # a picture-like frame
    frame = (rows + rng.normal(0, 1, rows.shape)).clip(0, 255).astype(np.uint8)
    raw = encode(frame).SerializeToString()
    whole = len(raw) / len(_codec._COMPRESS[codec](raw))
    compressed: list[int] = []
    compress = _codec._COMPRESS[codec]

    def counted(data: bytes) -> bytes:
        compressed.append(len(data))
        return compress(data)

    monkeypatch.setitem(_codec._COMPRESS, codec, counted)
    ratio, seconds = _codec.compression_cost(raw, codec)
    assert sum(compressed) == _codec.COST_SLICES * _codec.COST_SLICE < len(raw) / 4
    assert 0.75 * whole < ratio < 1.25 * whole
    assert seconds > 0
