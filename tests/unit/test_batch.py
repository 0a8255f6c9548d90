"""Batches on the wire (offload/_batch.py): joined from and split into their items' encodings."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from offload import _batch
from offload.v1 import offload_pb2 as pb


def test_a_batch_splits_into_views_of_its_message_that_parse_as_its_items() -> None:
    frame = bytes(562_500)  # a frame's bytes are not copied to be parsed: a view of the message
    states = [pb.TaskState(item=i, device_id="d", args=pb.Value(bytes_value=frame)) for i in (1, 2)]
    data = _batch.join(s.SerializeToString() for s in states) + b"\x12\x01x"  # an unknown field
    items = list(_batch.split(data))
    assert all(isinstance(item, memoryview) and item.obj is data for item in items)
    assert [pb.TaskState.FromString(bytes(item)) for item in items] == states
    assert pb.TaskBatch.FromString(data).items[1] == states[1]  # protobuf reads it alike


class _Context:
    """A stream that stays open (what ``_Answers`` asks of gRPC's context)."""

    def is_active(self) -> bool:
        return True


def _held_while_unread(size: int, max_bytes: int, bound: int) -> tuple[int, int]:
    """Run ``_Answers`` over 1000 answers of ``size`` bytes whose device takes one message and
    then none, until it has ``bound`` held: the most answers and bytes it ever held."""
    from offload._cloud.servicer import _Answers, _Watch  # noqa: PLC0415

    most = {"answers": 0, "bytes": 0}
    pulled = threading.Semaphore(0)

    def source() -> Iterator[tuple[bytes, float, int, bool]]:
        for _ in range(1000):
            most["answers"] = max(most["answers"], len(answers._held))
            most["bytes"] = max(most["bytes"], answers._bytes)
            pulled.release()
            yield b"a" * size, 0.0, 1 << 30, True

    answers = _Answers(source(), _Watch(_Context()), max_bytes)
    stream = iter(answers)
    sent = len(list(_batch.split(next(stream))))
    # Those sent, the bound held, one in hand: then the thread runs no further item.
    for _ in range(sent + bound + 1):
        assert pulled.acquire(timeout=30)
    answers.close()
    assert not pulled.acquire(blocking=False), "an item ran past the bound"
    return most["answers"], most["bytes"]


def test_a_batch_stream_holds_at_most_64_unsent_answers_or_the_message_limit() -> None:
    from offload._cloud.servicer import MAX_HELD_ANSWERS  # noqa: PLC0415

    answers, _ = _held_while_unread(10, 1 << 30, MAX_HELD_ANSWERS)
    assert answers <= MAX_HELD_ANSWERS
    _, held = _held_while_unread(1000, 4000, 4)
    assert held <= 4000
