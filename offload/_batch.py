"""Batches on the wire without re-encoding their items.

A ``TaskBatch`` (``ResultBatch``) is its field 1 repeated: each item is a tag, a length and the
item's own encoding. So a batch is built by joining items already encoded (the device encodes an
item once, to count and to resend it; the server once, to remember and to send it) and split into
items' bytes that are parsed one at a time, each checked as a single message would be.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

from ._codec import _varint
from .v1 import offload_pb2 as pb

ITEMS_FIELD = pb.TaskBatch.DESCRIPTOR.fields_by_name["items"].number
RESULTS_FIELD = pb.ResultBatch.DESCRIPTOR.fields_by_name["results"].number
assert ITEMS_FIELD == RESULTS_FIELD == 1  # _TAG below
_TAG = b"\x0a"  # field 1, length-delimited
_LENGTH_DELIMITED = 2
_FIXED64 = 1
_RESULT_FIELDS = pb.ItemResult.DESCRIPTOR.fields_by_name
# Both one-byte tags (field numbers below 16): the server's two stamps, appended to an answer.
_TIMES = struct.Struct("<BdBd")
STAMPS = _TIMES.size  # bytes stamped() adds to an answer
_RECEIVE_TAG = _RESULT_FIELDS["server_receive_time"].number << 3 | _FIXED64
_SECONDS_TAG = _RESULT_FIELDS["server_seconds"].number << 3 | _FIXED64
_CPU = struct.Struct("<Bd")
_CPU_TAG = _RESULT_FIELDS["server_cpu_seconds"].number << 3 | _FIXED64


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def framing(size: int) -> int:
    """Bytes a batch adds to an item of ``size`` bytes."""
    return 1 + len(varint(size))


def join(items: Iterable[bytes]) -> bytes:
    """A ``TaskBatch`` or ``ResultBatch`` of these encoded items."""
    return b"".join(part for data in items for part in (_TAG, varint(len(data)), data))


def stamped(answer: bytes, receive_time: float, seconds: float) -> bytes:
    """An encoded ``ItemResult`` with ``server_receive_time`` and ``server_seconds`` set (a field
    appended to an encoding overrides an earlier one): the answer is not encoded again."""
    return answer + _TIMES.pack(_RECEIVE_TAG, receive_time, _SECONDS_TAG, seconds)


def with_cpu(answer: bytes, seconds: float) -> bytes:
    """An encoded ``ItemResult`` with ``server_cpu_seconds`` set, likewise."""
    return answer + _CPU.pack(_CPU_TAG, seconds)


class BatchError(ValueError):
    """A message that is not a batch."""


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    try:
        return _varint(data, at)
    except (IndexError, ValueError):
        raise BatchError(f"a truncated or overlong varint at byte {at}") from None


def split(data: bytes) -> Iterator[memoryview]:
    """The encoded items of a batch, in order, one at a time, as views of ``data`` (a 562 kB
    frame is not copied; protobuf parses a view); unknown fields are skipped, as protobuf does;
    raises ``BatchError`` where the framing breaks."""
    view = memoryview(data)
    at = 0
    while at < len(data):
        key, at = _read_varint(data, at)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, at = _read_varint(data, at)
            continue
        if wire_type in (1, 5):
            at += 8 if wire_type == 1 else 4
        elif wire_type == _LENGTH_DELIMITED:
            size, at = _read_varint(data, at)
            if at + size > len(data):
                raise BatchError(f"field {number} runs past the message's end")
            if number == ITEMS_FIELD:
                yield view[at : at + size]
            at += size
        else:
            raise BatchError(f"wire type {wire_type} of field {number} at byte {at}")
        if at > len(data):
            raise BatchError("the message ends inside a field")
