"""Values that cannot travel, and every type's JSON output, alike at every split: client-only,
all tasks here, split 1 against a server on loopback, and split 1 with the server away."""

from __future__ import annotations

import io
import json
import sys
import types
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
import zstandard

from offload import (
    Client,
    ClientConfig,
    GrpcTransport,
    Limits,
    Pipeline,
    RunningServer,
    current_item,
    decode,
    encode,
    load_pipeline,
)
from offload.v1 import offload_pb2 as pb

from ..helpers import COUNTER, free_port, run_split, state

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


def every_way(pipeline: Pipeline, port: int, frames: int) -> dict[str, list[str]]:
    """The output lines of client-only, all tasks here, split 1, and split 1 with no server."""
    runs = {
        "client-only": run_split(pipeline, None, frames=frames)[0],
        "K=N": run_split(pipeline, 2, frames=frames)[0],
        "split": run_split(pipeline, 1, port, frames=frames)[0],
    }
    away = GrpcTransport.from_config(ClientConfig(connect_timeout=0.05), f"127.0.0.1:{free_port()}")
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


def _huge_empty() -> pb.Value:
    """An empty array whose other dimensions multiply past what NumPy can index: no data."""
    value = encode(np.zeros((0, 1), np.uint8))
    del value.array.shape[:]
    value.array.shape.extend([0, 2**24, 2**24, 2**24])
    return value


def _exchange(port: int, messages: list[pb.TaskState]) -> list[pb.ItemResult]:
    """``messages`` on one stream to the server on ``port``, as any client would send them."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(
            "/offload.v1.Offload/ExecuteRemaining",
            request_serializer=pb.TaskState.SerializeToString,
            response_deserializer=pb.ItemResult.FromString,
        )
        return list(call(iter(messages), timeout=10))


def test_the_server_refuses_an_empty_array_with_huge_dimensions_as_invalid_argument(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(COUNTER)
    message = state(0, 1)
    message.args.CopyFrom(_huge_empty())
    with pytest.raises(grpc.RpcError) as err:
        _exchange(server.port, [message])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    details = err.value.details() or ""
    assert ".shape" in details and "larger than NumPy can index" in details
    assert "\n" not in details


class _HostileServicer:
    """Answers every item COMPLETED with an empty array of huge dimensions."""

    def __call__(self, requests: Iterator[pb.TaskState], _context: Any) -> Iterator[pb.ItemResult]:
        for request in requests:
            yield pb.ItemResult(
                item=request.item, status=pb.ItemResult.COMPLETED, output=_huge_empty()
            )


def test_the_device_refuses_an_answer_with_an_empty_array_of_huge_dimensions() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.stream_stream_rpc_method_handler(
        _HostileServicer(),
        request_deserializer=pb.TaskState.FromString,
        response_serializer=pb.ItemResult.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("offload.v1.Offload", {"ExecuteRemaining": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    pipeline = load_pipeline(COUNTER)
    config = ClientConfig(pipeline=COUNTER, local_tasks=1, frames=3)
    transport = GrpcTransport.from_config(config, f"127.0.0.1:{port}")
    output = io.StringIO()
    try:
        report = Client(pipeline, config, transport, output).run()
    finally:
        transport.close()
        server.stop(0)
    assert report["error"] is not None
    assert "INVALID_ARGUMENT" in report["error"] or "bad answer" in report["error"]
    assert ".shape" in report["error"] and "larger than NumPy can index" in report["error"]
    assert "\n" not in report["error"]


def _wire_states(accepts: list[int]) -> list[pb.TaskState]:
    pipeline = load_pipeline("tests.apps.mask")
    frame = np.zeros((200, 200), np.uint8)
    outline = [[1, 2], [3, 4]]
    states = []
    for item in range(3):
        message = pb.TaskState(
            pipeline=pipeline.name,
            fingerprint=pipeline.fingerprint,
            device_id="old-device",
            run_id="r1",
            item=item,
            next_task=2,
            accepts=accepts,  # type: ignore[arg-type]
        )
        message.args.CopyFrom(encode((frame > 0, outline)))
        states.append(message)
    return states


def _kinds(value: pb.Value) -> set[str]:
    kind = value.WhichOneof("kind") or "none"
    if kind == "map_value":
        return {kind}.union(*(_kinds(e.value) for e in value.map_value.entries))
    return {kind}


@pytest.mark.parametrize(
    ("accepts", "expected"),
    [
        ([], {"map_value", "int_value", "list_value", "array"}),
        ([pb.CODEC_PACKED], {"map_value", "int_value", "packed_list", "array"}),
        ([pb.CODEC_PACKED, pb.CODEC_LZ4], {"compressed"}),
    ],
    ids=["says-nothing", "packed", "packed-lz4"],
)
def test_a_device_is_answered_only_in_the_encodings_it_said_it_reads(
    start_server: Callable[..., RunningServer], accepts: list[int], expected: set[str]
) -> None:
    # A device that says nothing is today's Node.js client, or any client built before the
    # encodings: it is never handed a kind it would misread.
    server = start_server("tests.apps.mask")
    answers = _exchange(server.port, _wire_states(accepts))
    assert [a.status for a in answers] == [pb.ItemResult.COMPLETED] * 3
    for answer in answers:
        assert _kinds(answer.output) == expected
        assert set(answer.accepts) >= {pb.CODEC_PACKED, pb.CODEC_ZSTD, pb.CODEC_LZ4}
        assert decode(answer.output)["outline"] == [[1, 2], [3, 4]]


def test_the_server_refuses_a_compression_bomb_before_decompressing_it(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server("tests.apps.mask", limits=Limits(max_message_bytes=1024 * 1024))
    message = _wire_states([])[0]
    raw = encode((np.zeros((4096, 4096), np.uint8), [[1, 2]])).SerializeToString()
    message.args.CopyFrom(
        pb.Value(
            compressed=pb.Compressed(
                codec=pb.CODEC_ZSTD, size=len(raw), data=zstandard.ZstdCompressor().compress(raw)
            )
        )
    )
    with pytest.raises(grpc.RpcError) as err:
        _exchange(server.port, [message])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"compressed.size: {len(raw)} bytes, more than --max-message-bytes 1048576" in (
        err.value.details() or ""
    )


def test_a_device_compresses_its_first_items_too_as_the_servers_headers_say_what_it_reads(
    start_server: Callable[..., RunningServer],
) -> None:
    # Learnt from the first answer only, a window of items went plain: 8 raw frames on a slow
    # link, seconds of it.
    server = start_server("tests.apps.mask")
    frames = ClientConfig().window + 2
    _, report = run_split(
        load_pipeline("tests.apps.mask"), 1, server.port, frames=frames, compression="zstd"
    )
    assert report["error"] is None
    assert report["compression"]["codecs"]["zstd"]["items"] == frames


def _auto_run(
    server: RunningServer, target: str | None, frames: int, **options: Any
) -> dict[str, Any]:
    """The mask app at K=1 with ``--compression auto`` (its 40 kB frames shrink ~100x)."""
    pipeline = load_pipeline("tests.apps.mask")
    config = ClientConfig(
        pipeline=pipeline.name, local_tasks=1, frames=frames, device_id="auto", **options
    )
    transport = GrpcTransport.from_config(config, target or f"127.0.0.1:{server.port}")
    try:
        report = Client(pipeline, config, transport, io.StringIO()).run()
    finally:
        transport.close()
    assert report["error"] is None
    return report


def test_compression_auto_stops_compressing_where_the_link_keeps_up(
    start_server: Callable[..., RunningServer],
) -> None:
    # On loopback compressing only cost the device CPU: the clip's K=3 ran at 0.67x the pickle
    # socket, 3 ms more device CPU per item.
    from offload._device.compression import FIRST_DECISION_ITEMS  # noqa: PLC0415

    server = start_server("tests.apps.mask")
    frames = 4 * FIRST_DECISION_ITEMS
    report = _auto_run(server, None, frames)
    changes = report["compression"]["changes"]
    assert [c["codec"] for c in changes] == ["none"], changes
    compressed = report["compression"]["codecs"]["zstd"]["items"]
    assert compressed <= FIRST_DECISION_ITEMS + 2 * ClientConfig().window < frames


def test_compression_auto_keeps_compressing_where_the_link_is_the_bottleneck(
    start_server: Callable[..., RunningServer],
) -> None:
    from offload._device.compression import FIRST_DECISION_ITEMS  # noqa: PLC0415
    from offload._device.emulation import LinkEmulator, LinkSpec  # noqa: PLC0415

    server = start_server("tests.apps.mask")
    # 2 Mbit/s carries 6 plain 40 kB frames a second, on any machine: a period of 0.3 s sent
    # plain (if the compressed items never filled the link) is enough to measure it.
    link = LinkEmulator(f"127.0.0.1:{server.port}", LinkSpec.parse("2mbit,10ms"))
    try:
        report = _auto_run(server, link.target, 3 * FIRST_DECISION_ITEMS, control_period=0.3)
    finally:
        link.close()
    changes = report["compression"]["changes"]
    # One period plain, to measure it (6/s against hundreds), then compressed again for good.
    assert [c["codec"] for c in changes] == ["none", "zstd"], changes
    assert "measured" in changes[-1]["reason"]
    assert report["compression"]["codecs"]["zstd"]["items"] > FIRST_DECISION_ITEMS
