"""Property-based fuzzing of the codec and of a live server: garbage in, a clear refusal out.

Nothing may crash, hang or answer with a code outside the expected set, and the server must
still be SERVING (and serving correctly) afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offload import (
    CodecError,
    Limits,
    RunningServer,
    ServerConfig,
    decode,
    encode,
    load_pipeline,
    serve,
)
from offload._codec import ALLOWED_DTYPES, compress_value
from offload._device.report import to_json
from offload.v1 import offload_pb2 as pb

from ..helpers import COUNTER, assert_same, state

METHOD = "/offload.v1.Offload/ExecuteRemaining"
LIMITS = Limits(max_message_bytes=64 * 1024)
# What a server may answer to garbage: a refusal naming the problem, never INTERNAL or UNKNOWN
# (a crash), UNIMPLEMENTED or DEADLINE_EXCEEDED (a hang).
EXPECTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)

# --- the codec ---------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
arrays = st.builds(
    lambda dtype, shape, seed: (
        np.random.default_rng(seed)
        .integers(0, 255, size=int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=np.uint8)
        .view(dtype)
        .reshape(shape)
    ),
    st.sampled_from(sorted(d for d in ALLOWED_DTYPES if d[1] != "c")),
    st.lists(st.integers(0, 4), max_size=3),
    st.integers(0, 2**32 - 1),
)


def containers(inner: st.SearchStrategy[Any], size: int) -> st.SearchStrategy[Any]:
    """Lists, tuples and str-keyed dicts of ``inner``: the codec's containers."""
    return (
        st.lists(inner, max_size=size)
        | st.lists(inner, max_size=size).map(tuple)
        | st.dictionaries(st.text(max_size=8), inner, max_size=size)
    )


values = st.recursive(
    scalars | arrays,
    lambda inner: containers(inner, 4),
    max_leaves=12,
)


@FUZZ
@given(values)
def test_any_supported_value_round_trips_exactly(value: Any) -> None:
    wire = encode(value).SerializeToString()
    assert_same(value, decode(pb.Value.FromString(wire)))


numeric_lists = (
    st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=6)
    | st.lists(st.floats(allow_nan=False), min_size=1, max_size=6)
    | st.integers(1, 3).flatmap(
        lambda width: st.lists(
            st.lists(st.integers(-(2**63), 2**63 - 1), min_size=width, max_size=width)
            | st.lists(st.floats(allow_nan=False), min_size=width, max_size=width),
            min_size=1,
            max_size=4,
        )
    )
)


@FUZZ
@given(
    st.recursive(
        scalars | arrays | numeric_lists, lambda inner: containers(inner, 4), max_leaves=12
    )
)
def test_any_value_round_trips_exactly_packed_and_compressed(value: Any) -> None:
    for codec in (None, pb.CODEC_ZSTD, pb.CODEC_LZ4):
        wire = encode(value, packed=True)
        if codec is not None:
            compress_value(wire, codec)
        assert_same(value, decode(pb.Value.FromString(wire.SerializeToString())))


every_array = st.builds(
    lambda dtype, shape, seed: (
        np.random.default_rng(seed)
        .integers(0, 255, size=int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=np.uint8)
        .view(dtype)
        .reshape(shape)
    ),
    st.sampled_from(sorted(ALLOWED_DTYPES)),  # complex included, NaN bit patterns too
    st.lists(st.integers(0, 3), max_size=3),
    st.integers(0, 2**32 - 1),
)
every_value = st.recursive(
    scalars
    | st.floats()
    | every_array
    | every_array.filter(lambda a: a.size > 0).map(lambda a: a.reshape(-1)[0]),  # NumPy scalars
    lambda inner: containers(inner, 3),
    max_leaves=8,
)


@FUZZ
@given(every_value)
def test_a_result_is_written_to_output_alike_whether_or_not_it_travelled(value: Any) -> None:
    def line(result: Any) -> str:
        return json.dumps(to_json(result), separators=(",", ":"))

    assert line(value) == line(decode(pb.Value.FromString(encode(value).SerializeToString())))


@settings(FUZZ, max_examples=400)
@given(st.binary(max_size=512))
def test_garbage_bytes_are_refused_cleanly_by_the_codec(data: bytes) -> None:
    try:
        value = pb.Value.FromString(data)
    except DecodeError:
        return
    try:
        decode(value, LIMITS)
    except CodecError:
        pass


@settings(FUZZ, max_examples=400)  # cheap: no network
@given(
    st.sampled_from(sorted(ALLOWED_DTYPES)) | st.text(max_size=6),
    # Edge sizes (0 makes any other dimension legal for empty data) as well as random ones.
    st.lists(
        st.sampled_from([0, 1, 2, 2**31, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1),
        max_size=40,
    ),
    st.just(b"") | st.binary(max_size=64),
    st.booleans(),
)
def test_arbitrary_array_headers_decode_or_are_refused(
    dtype: str, shape: list[int], data: bytes, scalar: bool
) -> None:
    value = pb.Value()
    value.array.dtype = dtype
    value.array.shape.extend(shape)
    value.array.data = data
    value.array.scalar = scalar
    try:
        decoded = decode(value, LIMITS)
    except CodecError:
        return
    assert np.asarray(decoded).nbytes == len(data)


@FUZZ
@given(st.data())
def test_bit_flipped_values_decode_or_are_refused(data: st.DataObject) -> None:
    original = bytearray(encode(data.draw(values)).SerializeToString())
    if not original:
        return
    for _flip in range(data.draw(st.integers(1, 8))):
        bit = data.draw(st.integers(0, len(original) * 8 - 1))
        original[bit // 8] ^= 1 << (bit % 8)
    try:
        value = pb.Value.FromString(bytes(original))
    except DecodeError:
        return
    try:
        decode(value, LIMITS)
    except CodecError:
        pass


# --- the live server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[RunningServer]:
    pipeline = load_pipeline(COUNTER)
    server = serve(
        ServerConfig(pipeline=pipeline.name, host="127.0.0.1", port=0, limits=LIMITS), pipeline
    )
    yield server
    server.stop(grace=1.0)


@pytest.fixture(scope="module")
def raw_call(fuzz_server: RunningServer) -> Iterator[Any]:
    """The method with identity serialisers: whatever bytes we like go on the wire."""
    with grpc.insecure_channel(f"127.0.0.1:{fuzz_server.port}") as channel:
        yield channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)


def send_raw(raw_call: Any, messages: list[bytes]) -> grpc.StatusCode:
    try:
        for answer in raw_call(iter(messages), timeout=10):
            pb.ItemResult.FromString(answer)  # whatever the server answers is well-formed
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        assert code in EXPECTED, (code, exc.details())
        assert exc.details(), "a refusal must say why"
        return code
    return grpc.StatusCode.OK


@FUZZ
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=4))
def test_garbage_messages_on_the_method(raw_call: Any, messages: list[bytes]) -> None:
    send_raw(raw_call, messages)


task_states = st.builds(
    lambda item, next_task, value, device, run, pipeline: state(
        item, value, next_task=next_task, device=device, run_id=run, **pipeline
    ),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**32 - 1) | st.integers(0, 4),
    values,
    st.text(min_size=1, max_size=8),
    st.text(max_size=8),
    st.just({}) | st.builds(lambda p: {"pipeline": p}, st.text(max_size=20)),
)


@FUZZ
@given(st.lists(task_states, min_size=1, max_size=4))
def test_random_task_states(raw_call: Any, states: list[pb.TaskState]) -> None:
    send_raw(raw_call, [s.SerializeToString() for s in states])


@FUZZ
@given(st.data())
def test_bit_flipped_task_states(raw_call: Any, data: st.DataObject) -> None:
    wire = bytearray(data.draw(task_states).SerializeToString())
    for _flip in range(data.draw(st.integers(1, 16))):
        bit = data.draw(st.integers(0, len(wire) * 8 - 1))
        wire[bit // 8] ^= 1 << (bit % 8)
    send_raw(raw_call, [bytes(wire)])


def test_the_server_is_serving_and_correct_after_the_fuzzing(
    fuzz_server: RunningServer, raw_call: Any
) -> None:
    # Runs after the fuzz tests above (file order): the same server, still healthy.
    with grpc.insecure_channel(f"127.0.0.1:{fuzz_server.port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="offload.v1.Offload"), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    answers = [
        pb.ItemResult.FromString(a)
        for a in raw_call(
            iter([state(i, i + 1, run_id="after-fuzz").SerializeToString() for i in range(3)]),
            timeout=10,
        )
    ]
    assert [decode(a.output)["seen"] for a in answers] == [1, 2, 3]
