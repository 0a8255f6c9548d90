"""The value codec: Python / NumPy values <-> ``offload.v1.Value``.

Arrays travel as dtype + shape + raw C-order bytes and are rebuilt with ``np.frombuffer``: no
per-element fields, nothing Python-specific crosses the wire. Decoding validates every length
against the declared dtype and shape, and every bound in ``Limits``, before allocating the value
(protobuf has parsed the message by then: ``wire_problem`` bounds its elements before that).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._config import Limits
from .exceptions import CodecError
from .v1 import offload_pb2 as pb

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


def encode(value: Any, limits: Limits = Limits()) -> pb.Value:
    """Encode a task's output (any nesting of the supported types) as a wire ``Value``."""
    out = pb.Value()
    encode_into(out, value, limits)
    return out


def encode_into(out: pb.Value, value: Any, limits: Limits = Limits()) -> None:
    """Encode ``value`` into an existing message field (saves a copy of large arrays)."""
    try:
        _encode_into(out, value, limits, 0)
    except _Invalid as exc:
        raise _error(exc) from None


def encode_result(out: pb.Value, value: Any, limits: Limits = Limits()) -> str | None:
    """Encode an item's result into ``out``, or say why it cannot travel.

    The server calls it, and so does the device for a result it made itself (client-only, all
    tasks here, an item run here while the server was away): whatever the split, a result that
    could not be sent back fails its item with the same error.
    """
    try:
        encode_into(out, value, limits)
    except CodecError as exc:
        return f"the result cannot be sent back: {exc}"
    return None


def _encode_into(out: pb.Value, value: Any, limits: Limits, depth: int) -> None:
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
        seq = out.tuple_value if isinstance(value, tuple) else out.list_value
        seq.SetInParent()
        add = seq.items.add
        for i, item in enumerate(value):
            try:
                _encode_into(add(), item, limits, depth + 1)
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
                _encode_into(entry.value, item, limits, depth + 1)
            except _Invalid as exc:
                exc.where.append(f"[{key!r}]")
                raise
    else:
        raise _Invalid(f": cannot send a {type(value).__name__}; supported: {_SUPPORTED}")


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
    size = len(data)
    if size > limits.max_message_bytes:
        raise CodecError(
            f"{what} is {size} bytes, more than --max-message-bytes {limits.max_message_bytes}: "
            "raise it on the client and the server (Limits.max_message_bytes)"
        )


def decode(value: pb.Value, limits: Limits = Limits()) -> Any:
    """Decode a wire ``Value``; raises ``CodecError`` naming the offending field."""
    try:
        return _decode(value, limits, 0)
    except _Invalid as exc:
        raise _error(exc) from None


def _decode(value: pb.Value, limits: Limits, depth: int) -> Any:
    if depth > limits.max_depth:
        raise _Invalid(f": nested deeper than {limits.max_depth} levels (Limits.max_depth)")
    kind = value.WhichOneof("kind")
    if kind is None or kind == "none":
        return None
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

_TOP, _VALUE, _LIST, _MAP, _ENTRY = range(5)
# (message, field number) -> the kind of the submessage that field holds, where elements are.
_CHILD = {
    (_VALUE, 8): _LIST,  # list_value
    (_VALUE, 9): _LIST,  # tuple_value
    (_VALUE, 10): _MAP,  # map_value
    (_LIST, 1): _VALUE,  # items
    (_MAP, 1): _ENTRY,  # entries
    (_ENTRY, 2): _VALUE,  # value
}
_FIELDS_PER_ELEMENT = 4  # a map entry: its tag, key, value and the value's kind


def _varint(data: bytes, pos: int) -> tuple[int, int]:
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


def wire_problem(data: bytes, value_field: int, limits: Limits) -> str | None:
    """Why a serialised message (a ``TaskState`` whose ``Value`` is field ``value_field``) holds
    more elements than ``Limits.max_total_elements``, counted on the wire; None if it does not.

    Parsing allocates an object per element (~75 bytes for 2 on the wire), so the total is
    counted first. Every element (a list or tuple item, a map entry) starts with the byte 0x0A,
    so its count bounds theirs at C speed; only a message with more such bytes is walked, skipping
    bytes and arrays by their length and stopping at the limit, so the walk is bounded too. A
    message the walk finds malformed is left to the parser, which refuses it as well.
    """
    limit = limits.max_total_elements
    if data.count(b"\n") <= limit:
        return None
    elements = fields = 0
    stack = [(_TOP, len(data))]  # (message kind, where it ends)
    pos = 0
    try:
        while stack:
            kind, end = stack[-1]
            if pos >= end:
                stack.pop()
                continue
            key, pos = _varint(data, pos)
            fields += 1
            if fields > _FIELDS_PER_ELEMENT * limit + 1024:
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
