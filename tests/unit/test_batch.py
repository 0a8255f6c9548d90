"""Batches on the wire (offload/_batch.py): joined from and split into their items' encodings."""

from __future__ import annotations

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
