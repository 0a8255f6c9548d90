"""The value codec: Python / NumPy values <-> ``offload.v1.Value``.

Arrays travel as dtype + shape + raw C-order bytes and are rebuilt with ``np.frombuffer``: no
per-element fields, nothing Python-specific crosses the wire. Decoding validates every length
against the declared dtype and shape, and every bound in ``Limits``, before allocating the value
(protobuf has parsed the message by then: ``wire_problem`` bounds its elements before that).

Two encodings go only to a peer that said it reads them (``pb.Codec``, negotiated per item):
``packed`` (a list of ints or floats, or rows of them, as one packed field: 4-5x cheaper to
encode than Value by Value) and a whole ``Value`` compressed with zstd or LZ4 (optional
packages: ``pip install 'offload[compression]'``). A compressed value declares its size, which
is checked against ``Limits.max_message_bytes`` before anything is decompressed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import Any, TypeAlias, cast

import numpy as np
from google.protobuf.message import DecodeError

from ._config import Limits
from .exceptions import CodecError
from .v1 import offload_pb2 as pb

try:
    import zstandard
except ImportError:  # optional: offload[compression]
    zstandard = None  # type: ignore[assignment]
try:
    import lz4.block as lz4_block  # type: ignore[import-untyped]
except ImportError:  # optional: offload[compression]
    lz4_block = None

# Byte-order-explicit NumPy type strings accepted from the wire; object and string dtypes are not.
_KINDS = ["b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8", "c8", "c16"]
ALLOWED_DTYPES = frozenset(
    p + k for k in _KINDS for p in (("|",) if k in ("b1", "i1", "u1") else ("<", ">"))
)
_INT64 = (-(2**63), 2**63 - 1)
_INTP_MAX = int(np.iinfo(np.intp).max)
_SUPPORTED = "None, bool, int, float, str, bytes, numpy arrays and scalars, list, tuple, dict[str]"


class _Invalid(Exception):
    """A bad value somewhere inside; each container on the way out adds where it was.

    Paths are only built when something is wrong: formatting one per element made encoding a
    32-point trail cost 3x more than the protobuf calls themselves.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text  # ": reason" or ".field: reason"
        self.where: list[str] = []  # innermost first


def _error(exc: _Invalid) -> CodecError:
    return CodecError("args" + "".join(reversed(exc.where)) + exc.text)


def encode(value: Any, limits: Limits = Limits(), *, packed: bool = False) -> pb.Value:
    """Encode a task's output (any nesting of the supported types) as a wire ``Value``;
    ``packed``: lists of ints or floats as ``packed_list`` (only for a peer that reads it)."""
    out = pb.Value()
    encode_into(out, value, limits, packed=packed)
    return out


def encode_into(
    out: pb.Value, value: Any, limits: Limits = Limits(), *, packed: bool = False
) -> None:
    """Encode ``value`` into an existing message field (saves a copy of large arrays)."""
    try:
        _encode_into(out, value, limits, 0, packed)
    except _Invalid as exc:
        raise _error(exc) from None


def encode_result(
    out: pb.Value, value: Any, limits: Limits = Limits(), *, packed: bool = False
) -> str | None:
    """Encode an item's result into ``out``, or say why it cannot travel.

    The server calls it, and so does the device for a result it made itself (client-only, all
    tasks here, an item run here while the server was away): whatever the split, a result that
    could not be sent back fails its item with the same error.
    """
    try:
        encode_into(out, value, limits, packed=packed)
    except CodecError as exc:
        return f"the result cannot be sent back: {exc}"
    return None


def _encode_into(out: pb.Value, value: Any, limits: Limits, depth: int, packed: bool) -> None:
    if depth > limits.max_depth:
        raise _Invalid(f": nested deeper than {limits.max_depth} levels (Limits.max_depth)")
    # The common leaves first, by exact type; subclasses (bool, np.float64) take the chain below.
    kind = type(value)
    if kind is float:
        out.float_value = value
    elif kind is int and _INT64[0] <= value <= _INT64[1]:
        out.int_value = value
    # NumPy first (np.float64 subclasses float), and bool before int (bool subclasses int).
    elif value is None:
        out.none.SetInParent()
    elif isinstance(value, (np.ndarray, np.generic)):
        _encode_array(out.array, value, limits)
    elif isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise _Invalid(f": int {value} does not fit in 64 bits; send it as a str")
        out.int_value = value
    elif isinstance(value, float):
        out.float_value = value
    elif isinstance(value, str):
        out.str_value = value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        out.bytes_value = bytes(value)
    elif isinstance(value, (list, tuple)):
        if len(value) > limits.max_elements:
            raise _Invalid(
                f": {len(value)} elements, more than {limits.max_elements} (Limits.max_elements)"
            )
        if packed and type(value) is list and value and _pack(out, value, limits):
            return
        seq = out.tuple_value if isinstance(value, tuple) else out.list_value
        seq.SetInParent()
        add = seq.items.add
        for i, item in enumerate(value):
            try:
                _encode_into(add(), item, limits, depth + 1, packed)
            except _Invalid as exc:
                exc.where.append(f"[{i}]")
                raise
    elif isinstance(value, dict):
        if len(value) > limits.max_elements:
            raise _Invalid(
                f": {len(value)} entries, more than {limits.max_elements} (Limits.max_elements)"
            )
        entries = out.map_value
        entries.SetInParent()
        add_entry = entries.entries.add
        for key, item in value.items():
            if not isinstance(key, str):
                raise _Invalid(f": map key {key!r} is not a str; only str keys travel")
            entry = add_entry()
            entry.key = key
            try:
                _encode_into(entry.value, item, limits, depth + 1, packed)
            except _Invalid as exc:
                exc.where.append(f"[{key!r}]")
                raise
    else:
        raise _Invalid(f": cannot send a {type(value).__name__}; supported: {_SUPPORTED}")


def _pack(out: pb.Value, value: list[Any], limits: Limits) -> bool:
    """Encode a non-empty list of ints or of floats, or of equal rows of them, as one packed
    field; False (``out`` untouched) if it is not one: exact types only (a bool, a NumPy scalar
    or an int beyond 64 bits keeps its own Value, so it decodes as what it was)."""
    first = value[0]
    width = 0
    flat: list[Any] = value
    if type(first) is list:
        width = len(first)
        if not 0 < width <= limits.max_elements:
            return False
        if not all(type(row) is list and len(row) == width for row in value):
            return False
        flat = list(chain.from_iterable(value))
        first = first[0]
    kind = type(first)
    if kind is not int and kind is not float:
        return False
    if not all(type(x) is kind for x in flat):
        return False
    packed = out.packed_list
    try:
        (packed.ints if kind is int else packed.floats).extend(flat)
    except ValueError:  # an int beyond 64 bits: the Value path says so
        out.ClearField("packed_list")
        return False
    packed.row_length = width
    return True


def _encode_array(out: pb.NDArray, value: np.ndarray | np.generic, limits: Limits) -> None:
    array = np.asarray(value)
    dtype = array.dtype.str
    if dtype not in ALLOWED_DTYPES:
        raise _Invalid(
            f": arrays of dtype {array.dtype} cannot travel; use a numeric or bool dtype"
        )
    if array.ndim > limits.max_dims:
        raise _Invalid(f": {array.ndim} dimensions, more than {limits.max_dims}")
    out.dtype = dtype
    out.shape.extend(array.shape)
    # protobuf takes only bytes: tobytes() is the one C-order copy (also for non-contiguous
    # views); the message then copies it once more into its own memory.
    out.data = array.tobytes()
    out.scalar = isinstance(value, np.generic)


def check_size(data: bytes, limits: Limits, what: str) -> None:
    """Refuse a serialised message over ``Limits.max_message_bytes`` before gRPC does, naming
    the option (the bytes, not the message: ``ByteSize()`` would serialise it once more)."""
    check_message_size(len(data), limits, what)


def check_message_size(size: int, limits: Limits, what: str) -> None:
    """``check_size`` for a message ``size`` bytes long (before it is compressed: the receiver
    refuses a compressed value declaring more)."""
    if size > limits.max_message_bytes:
        raise CodecError(
            f"{what} is {size} bytes, more than --max-message-bytes {limits.max_message_bytes}: "
            "raise it on the client and the server (Limits.max_message_bytes)"
        )


def decode(value: pb.Value, limits: Limits = Limits()) -> Any:
    """Decode a wire ``Value``; raises ``CodecError`` naming the offending field."""
    try:
        return _decode(expand(value, limits), limits, 0)
    except _Invalid as exc:
        raise _error(exc) from None


# --- compression at the cut ------------------------------------------------------------------

Codec: TypeAlias = pb.Codec.ValueType
CODEC_NAMES: dict[Codec, str] = {
    pb.CODEC_PACKED: "packed",
    pb.CODEC_ZSTD: "zstd",
    pb.CODEC_LZ4: "lz4",
}
_MIN_SIZE = 2048  # smaller values are sent as they are: compressing them saves too little
_SAMPLE = 4096  # bytes per sampled slice, and 4 slices, to tell whether compressing pays
MIN_RATIO = 1.25  # a sampled ratio below it (JPEG, already compressed data): sent as it is
_ZSTD_LEVEL = 1


def _zstd_compress(data: bytes) -> bytes:
    assert zstandard is not None
    # One compressor per call: zstandard's are not thread-safe, and making one costs ~2 us.
    return bytes(zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(data))


def _lz4_compress(data: bytes) -> bytes:
    assert lz4_block is not None
    return bytes(lz4_block.compress(data, store_size=False))


_COMPRESS: dict[Codec, Callable[[bytes], bytes]] = {}
if zstandard is not None:
    _COMPRESS[pb.CODEC_ZSTD] = _zstd_compress
if lz4_block is not None:
    _COMPRESS[pb.CODEC_LZ4] = _lz4_compress
# What this process reads: packed lists always, each compression whose package is installed.
READS: tuple[Codec, ...] = (pb.CODEC_PACKED, *sorted(_COMPRESS))


def compressions(compression: str) -> tuple[Codec, ...]:
    """The codecs ``--compression`` allows, best first (``auto``: those installed)."""
    if compression == "none":
        return ()
    if compression == "auto":
        return tuple(c for c in (pb.CODEC_ZSTD, pb.CODEC_LZ4) if c in _COMPRESS)
    return (pb.CODEC_ZSTD if compression == "zstd" else pb.CODEC_LZ4,)


@dataclass(frozen=True)
class Compressed:
    """What compressing one value did: its serialised size, its size on the wire, the CPU."""

    codec: Codec
    raw_bytes: int
    wire_bytes: int
    seconds: float

    @property
    def ratio(self) -> float:
        return self.raw_bytes / max(self.wire_bytes, 1)


def compress_value(out: pb.Value, codec: Codec) -> Compressed | None:
    """Replace ``out`` by its compressed form with ``codec`` if that pays: it is large enough
    and a sample of it shrinks by ``MIN_RATIO`` (JPEG bytes do not). None: left as it was."""
    began = time.thread_time()
    raw = out.SerializeToString()
    size = len(raw)
    compress = _COMPRESS[codec]
    if size < _MIN_SIZE:
        return None
    if size > 8 * _SAMPLE:  # smaller ones are compressed whole: the test would cost as much
        step = (size - _SAMPLE) // 3
        sample = b"".join(raw[i * step : i * step + _SAMPLE] for i in range(4))
        if len(sample) < MIN_RATIO * len(compress(sample)):
            return None
    data = compress(raw)
    if size < MIN_RATIO * len(data):
        return None
    out.Clear()
    out.compressed.codec = codec
    out.compressed.size = size
    out.compressed.data = data
    return Compressed(codec, size, out.ByteSize(), time.thread_time() - began)


COST_SLICES, COST_SLICE = 8, 16 * 1024  # what the scheduler compresses of a large cut


def compression_cost(raw: bytes, codec: Codec) -> tuple[float, float]:
    """The ratio ``codec`` would achieve on ``raw`` (1 where the item would be sent as is) and
    the CPU seconds it would take: what the scheduler samples at each cut. A large cut is
    judged by ``COST_SLICES`` slices across it, its time scaled to its size: every cut whole,
    with every codec, cost the device ~19 ms each 10th item at K=6 on the clip (a third of its
    work); the slices read the ratio within ~10 % (a little low) and the time within ~10 %."""
    size = len(raw)
    if size < _MIN_SIZE:
        return 1.0, 0.0
    sample = raw
    if size > 2 * COST_SLICES * COST_SLICE:
        step = (size - COST_SLICE) // (COST_SLICES - 1)
        sample = b"".join(raw[i * step : i * step + COST_SLICE] for i in range(COST_SLICES))
    began = time.thread_time()
    ratio = len(sample) / max(len(_COMPRESS[codec](sample)), 1)
    seconds = (time.thread_time() - began) * size / len(sample)
    return (ratio if ratio >= MIN_RATIO else 1.0), seconds


def expand(value: pb.Value, limits: Limits = Limits()) -> pb.Value:
    """``value``, decompressed if it is compressed; its declared size is checked first."""
    if value.WhichOneof("kind") != "compressed":
        return value
    try:
        return _expand(value.compressed, limits)
    except _Invalid as exc:
        raise _error(exc) from None


def _expand(packed: pb.Compressed, limits: Limits) -> pb.Value:
    size = packed.size
    if size > limits.max_message_bytes:
        raise _Invalid(
            f".compressed.size: {size} bytes, more than --max-message-bytes "
            f"{limits.max_message_bytes} (Limits.max_message_bytes): refused before "
            "decompressing; raise it on both sides if such values are meant to travel"
        )
    data = packed.data
    codec = packed.codec
    try:
        if codec == pb.CODEC_ZSTD and zstandard is not None:
            # A frame stating its own size is decompressed to that size, whatever the bound:
            # it must state the declared one.
            stated = zstandard.frame_content_size(data)
            if stated not in (size, -1):
                raise _Invalid(f".compressed: the frame holds {stated} bytes, not {size}")
            raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
        elif codec == pb.CODEC_LZ4 and lz4_block is not None:
            raw = lz4_block.decompress(data, uncompressed_size=size)
        else:
            name = CODEC_NAMES.get(codec, str(codec))
            raise _Invalid(f".compressed.codec: {name} cannot be read here (reads: {_reads()})")
    except _Invalid:
        raise
    except Exception as exc:  # the libraries' own errors: corrupt data, too small a buffer
        raise _Invalid(f".compressed.data: cannot be decompressed: {exc}") from None
    if len(raw) != size:
        raise _Invalid(f".compressed.data: {len(raw)} bytes decompressed, not the {size} declared")
    problem = wire_problem(raw, None, limits)  # before parsing, as for the message itself
    if problem is not None:
        raise _Invalid(f".compressed: {problem}")
    inner = pb.Value()
    try:
        inner.ParseFromString(raw)
    except DecodeError as exc:
        raise _Invalid(f".compressed.data: not a Value: {exc}") from None
    if inner.WhichOneof("kind") == "compressed":
        raise _Invalid(".compressed: holds another compressed value; compress once")
    return inner


def _reads() -> str:
    return ", ".join(CODEC_NAMES[c] for c in READS)


def _decode(value: pb.Value, limits: Limits, depth: int) -> Any:
    if depth > limits.max_depth:
        raise _Invalid(f": nested deeper than {limits.max_depth} levels (Limits.max_depth)")
    kind = value.WhichOneof("kind")
    if kind is None or kind == "none":
        return None
    if kind == "packed_list":
        return _unpack(value.packed_list, limits)
    if kind == "compressed":
        raise _Invalid(": a compressed value inside another value; only a whole one travels")
    if kind == "array":
        return _decode_array(value.array, limits)
    if kind in ("list_value", "tuple_value"):
        items = value.list_value.items if kind == "list_value" else value.tuple_value.items
        if len(items) > limits.max_elements:
            raise _Invalid(f": {len(items)} elements, more than {limits.max_elements}")
        decoded = []
        for i, item in enumerate(items):
            try:
                decoded.append(_decode(item, limits, depth + 1))
            except _Invalid as exc:
                exc.where.append(f"[{i}]")
                raise
        return tuple(decoded) if kind == "tuple_value" else decoded
    if kind == "map_value":
        entries = value.map_value.entries
        if len(entries) > limits.max_elements:
            raise _Invalid(f": {len(entries)} entries, more than {limits.max_elements}")
        mapping: dict[str, Any] = {}
        for entry in entries:
            try:
                mapping[entry.key] = _decode(entry.value, limits, depth + 1)
            except _Invalid as exc:
                exc.where.append(f"[{entry.key!r}]")
                raise
        return mapping
    return getattr(value, kind)


def _unpack(packed: pb.PackedList, limits: Limits) -> list[Any]:
    if packed.ints and packed.floats:
        raise _Invalid(".packed_list: both ints and floats; a packed list holds one kind")
    values: list[Any] = list(packed.ints or packed.floats)
    width = packed.row_length
    if not width:
        if len(values) > limits.max_elements:
            raise _Invalid(f": {len(values)} elements, more than {limits.max_elements}")
        return values
    if len(values) % width:
        raise _Invalid(f".packed_list: {len(values)} values do not make rows of {width}")
    if max(width, len(values) // width) > limits.max_elements:
        raise _Invalid(f".packed_list: rows of {width}, more than {limits.max_elements}")
    return [values[i : i + width] for i in range(0, len(values), width)]


def _decode_array(array: pb.NDArray, limits: Limits) -> Any:
    if array.dtype not in ALLOWED_DTYPES:
        raise _Invalid(
            f".dtype: {array.dtype!r} is not an allowed dtype; allowed: "
            + ", ".join(sorted(ALLOWED_DTYPES))
        )
    if len(array.shape) > limits.max_dims:
        raise _Invalid(f".shape: {len(array.shape)} dimensions, more than {limits.max_dims}")
    dtype = np.dtype(array.dtype)
    shape = tuple(array.shape)
    # An empty array may declare any shape; bound each dimension so NumPy never overflows.
    for axis, size in enumerate(shape):
        if size > limits.max_message_bytes:
            raise _Invalid(
                f".shape[{axis}]: {size} is larger than any message "
                f"(Limits.max_message_bytes {limits.max_message_bytes})"
            )
    # Empty, its other dimensions must still multiply to a size NumPy can index.
    if math.prod(size for size in shape if size) * dtype.itemsize > _INTP_MAX:
        raise _Invalid(f".shape: {list(shape)} is larger than NumPy can index, even empty")
    # Every read of ``array.data`` copies the payload out of the message: read it once.
    data = array.data
    # Python ints cannot overflow: compare the declared size with the data before allocating.
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(data):
        raise _Invalid(
            f".data: {len(data)} bytes, but dtype {array.dtype} x shape {list(shape)} "
            f"needs {expected}"
        )
    if array.scalar:
        if shape:
            raise _Invalid(f".shape: a scalar has no shape, got {list(shape)}")
        return np.frombuffer(data, dtype=dtype)[0]
    # Tasks may draw into their input in place (the seed did): give them a writable array,
    # which costs one copy of the (immutable) bytes protobuf handed us.
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


# --- counting elements on the wire, before protobuf parses a message -------------------------

_TOP, _VALUE, _LIST, _MAP, _ENTRY, _PACKED = range(6)
# (message, field number) -> the kind of the submessage that field holds, where elements are.
_CHILD = {
    (_VALUE, 8): _LIST,  # list_value
    (_VALUE, 9): _LIST,  # tuple_value
    (_VALUE, 10): _MAP,  # map_value
    (_LIST, 1): _VALUE,  # items
    (_MAP, 1): _ENTRY,  # entries
    (_ENTRY, 2): _VALUE,  # value
    (_VALUE, 12): _PACKED,  # packed_list
}
_HIGH_BYTES = bytes(range(0x80, 0x100))  # a varint's bytes but its last
_FIELDS_PER_ELEMENT = 4  # a map entry: its tag, key, value and the value's kind


def _varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint too long")


def wire_problem(data: bytes | memoryview, value_field: int | None, limits: Limits) -> str | None:
    """Why a serialised message (a ``TaskState`` whose ``Value`` is field ``value_field``, or a
    ``Value`` itself if None) holds more elements than ``Limits.max_total_elements``, counted on
    the wire (a packed list's values too); None if it does not.

    Parsing allocates an object per element (~75 bytes for 2 on the wire), so the total is
    counted first. Every element (a list or tuple item, a map entry) starts with the byte 0x0A,
    so its count bounds theirs at C speed; only a message with more such bytes is walked, skipping
    bytes and arrays by their length and stopping at the limit, so the walk is bounded too. A
    large message is walked first for a few fields: counting a frame's bytes costs 0.3 ms, its
    walk (a handful of fields, the array skipped by its length) a few µs. A message the walk
    finds malformed is left to the parser, which refuses it as well.
    """
    if len(data) > _PROBE_BYTES:
        found = _walk(data, value_field, limits, _PROBE_FIELDS)
        if found is not _UNFINISHED:
            return cast("str | None", found)
    limit = limits.max_total_elements
    data = data if isinstance(data, bytes) else bytes(data)  # a view is copied here only
    # A packed list holds up to one element per byte, without a 0x0A each.
    if data.count(b"\n") <= limit and (len(data) <= limit or b"b" not in data):
        return None
    return cast("str | None", _walk(data, value_field, limits, None))


_PROBE_BYTES = 64 * 1024  # counting these bytes costs about what walking _PROBE_FIELDS does
_PROBE_FIELDS = 64
_UNFINISHED = object()  # the walk reached its field budget


def _walk(
    data: bytes | memoryview, value_field: int | None, limits: Limits, max_fields: int | None
) -> object:
    """``wire_problem``'s walk: a problem or None; with ``max_fields``, ``_UNFINISHED`` if the
    message has more fields."""
    limit = limits.max_total_elements
    cap = _FIELDS_PER_ELEMENT * limit + 1024 if max_fields is None else max_fields
    elements = fields = 0
    stack = [(_VALUE if value_field is None else _TOP, len(data))]  # (message kind, its end)
    pos = 0
    try:
        while stack:
            kind, end = stack[-1]
            if pos >= end:
                stack.pop()
                continue
            key, pos = _varint(data, pos)
            fields += 1
            if fields > cap:
                if max_fields is not None:
                    return _UNFINISHED
                return f"more than {fields - 1} fields (Limits.max_total_elements {limit})"
            number, wire = key >> 3, key & 7
            if wire == 0:
                _, pos = _varint(data, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                length, pos = _varint(data, pos)
                if kind == _TOP:
                    child = _VALUE if number == value_field else None
                else:
                    child = _CHILD.get((kind, number))
                if kind == _PACKED and number in (1, 2):  # ints (varints), floats (8 bytes)
                    chunk = bytes(data[pos : pos + length])
                    elements += (
                        length // 8 if number == 2 else len(chunk.translate(None, _HIGH_BYTES))
                    )
                    if elements > limit:
                        return f"more than {limit} elements in all (Limits.max_total_elements)"
                    pos += length
                    continue
                if child is None:
                    pos += length
                    continue
                if kind in (_LIST, _MAP):
                    elements += 1
                    if elements > limit:
                        return (
                            f"more than {limit} elements in all (lists, tuples and maps; "
                            "Limits.max_total_elements)"
                        )
                if len(stack) > 2 * limits.max_depth + 4:
                    return f"values nested deeper than {limits.max_depth} levels (Limits.max_depth)"
                stack.append((child, pos + length))
            else:  # groups: proto3 has none, and offload's messages never hold one
                return f"a group (wire type {wire}) at byte {pos}, which no offload message holds"
    except (IndexError, ValueError):
        return None  # malformed: the parser says how
    return None
