"""Several items per message (ExecuteBatches): batched each way, bounded, answered per item,
exactly once, and a device that meets an older server falls back to one item per message."""

from __future__ import annotations

import io
import statistics
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from offload import Client, ClientConfig, Limits, RunningServer, _batch, load_pipeline, serve
from offload._cloud.executor import RemoteExecutor
from offload._cloud.servicer import OffloadServicer
from offload._config import ServerConfig
from offload._device.transport import Batching, GrpcTransport
from offload._wire import BATCH_METHOD, BATCH_METHOD_NAME, METHOD_NAME, SERVICE_NAME
from offload.v1 import offload_pb2 as pb
from tests.apps import tally

from ..helpers import COUNTER, run_split, state, wait_until
from .test_attacks import ECHOING, echoing_state, many_lists, raw_state
from .test_codec import _kinds, _wire_states
from .test_fuzz import EXPECTED, FUZZ, LIMITS, task_states

VIBRATION = "tests.apps.vibration"  # 40 items, the same on every run
PACED = "tests.apps.paced"  # an item every 4 ms


class _Server:
    """A real gRPC server around offload's servicer that notes how many items each batch held;
    ``batches=False`` registers only ExecuteRemaining, as a server from before batching."""

    def __init__(self, batches: bool = True, pipeline: str = VIBRATION) -> None:
        self.pipeline = load_pipeline(pipeline)
        self.servicer = OffloadServicer(RemoteExecutor(self.pipeline, ServerConfig()))
        self.batches: list[int] = []  # items per TaskBatch received
        methods = {
            METHOD_NAME: grpc.stream_stream_rpc_method_handler(self.servicer.ExecuteRemaining)
        }
        if batches:
            methods[BATCH_METHOD_NAME] = grpc.stream_stream_rpc_method_handler(self._counted)
        self.server = grpc.server(futures.ThreadPoolExecutor(8))
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, methods),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _counted(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        def noted() -> Iterator[bytes]:
            for data in requests:
                self.batches.append(len(list(_batch.split(data))))
                yield data

        return self.servicer.ExecuteBatches(noted(), context)

    def stop(self) -> None:
        self.server.stop(None)
        self.servicer.close()


@pytest.fixture
def batch_server() -> Iterator[Callable[..., _Server]]:
    started: list[_Server] = []

    def start(batches: bool = True, pipeline: str = VIBRATION) -> _Server:
        started.append(_Server(batches, pipeline))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def test_items_that_wait_for_credit_go_together_and_are_answered_one_by_one(
    batch_server: Callable[..., _Server],
) -> None:
    # A window of 4 and a linger longer than any run: each message waits until the window's
    # 4 items are in it, whatever the machine's speed, and the next 4 wait for their answers.
    server = batch_server()
    reference, _ = run_split(server.pipeline, None, source="")
    lines, _ = run_split(
        server.pipeline, 1, server.port, source="", window=4, batch_items=8, linger_ms=60_000
    )
    assert lines == reference
    assert server.batches == [4] * 10


def test_a_message_holds_no_more_than_batch_bytes(batch_server: Callable[..., _Server]) -> None:
    # Each item is larger than --batch-bytes: one per message, and no lingering for a second.
    server = batch_server()
    lines, _ = run_split(
        server.pipeline, 1, server.port, source="", window=4, batch_bytes=10, linger_ms=60_000
    )
    assert len(lines) == 40
    assert server.batches == [1] * 40


def test_a_device_falls_back_to_one_item_per_message_against_an_older_server(
    batch_server: Callable[..., _Server],
) -> None:
    server = batch_server(batches=False)
    reference, _ = run_split(server.pipeline, None, source="")
    transport = GrpcTransport(
        f"127.0.0.1:{server.port}", [], 10.0, batching=Batching(items=8, max_bytes=1 << 20)
    )
    config = ClientConfig(pipeline=VIBRATION, local_tasks=1, device_id="test-device")
    out = io.StringIO()
    server.pipeline.set_source("")
    try:
        report = Client(server.pipeline, config, transport, out).run()
    finally:
        transport.close()
    assert out.getvalue().splitlines() == reference
    assert not transport.batches  # found out once; later streams use ExecuteRemaining at once
    assert report["link"]["disconnects"] == 0 and report["link"]["ran_locally"] == 0


def test_automatic_mode_with_room_in_the_window_lingers_so_messages_carry_several_items(
    batch_server: Callable[..., _Server],
) -> None:
    # A sensor yields an item every 4 ms (slower on a slow machine): sent as they come, each
    # message holds one. Automatic mode with a target the device meets, measured first, has room
    # in the window on loopback: it lingers 25 ms, so messages carry several items.
    server = batch_server(pipeline=PACED)
    _, alone = run_split(load_pipeline(PACED), None, frames=50)
    rate = alone["throughput_per_second"]
    lines, report = run_split(
        server.pipeline, 2, server.port, frames=int(4 * rate), fps=rate / 3, control_period=0.5
    )
    assert len(lines) == int(4 * rate)
    scheduler = report["scheduler"]
    assert scheduler["final_linger_ms"] == 25.0, scheduler
    assert "linger 25 ms: the window has room" in scheduler["final_reason"]
    assert any(h["linger_ms"] == 25.0 for h in scheduler["history"]), scheduler["history"]
    later = server.batches[len(server.batches) // 2 :]  # after the first decisions
    assert statistics.mean(later) >= 2, server.batches


def _call(port: int, batches: list[list[pb.TaskState]]) -> list[pb.ItemResult]:
    """The answers to these batches, in order."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return _call_on(channel, batches)


def _call_on(channel: grpc.Channel, batches: list[list[pb.TaskState]]) -> list[pb.ItemResult]:
    method = channel.stream_stream(BATCH_METHOD)
    requests = (_batch.join(s.SerializeToString() for s in batch) for batch in batches)
    return [
        answer
        for data in method(requests, timeout=30)
        for answer in pb.ResultBatch.FromString(data).results
    ]


def test_a_resent_item_in_a_batch_gets_its_first_answer_replayed(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(COUNTER)
    answers = _call(server.port, [[state(0, 1), state(1, 2)], [state(1, 2), state(2, 3)]])
    assert [(r.item, r.duplicate) for r in answers] == [
        (0, False),
        (1, False),
        (1, True),
        (2, False),
    ]
    assert answers[2].output == answers[1].output
    # Every answer is stamped with its own arrival and time on the server.
    assert all(r.server_receive_time > 0 and r.server_seconds > 0 for r in answers)


def test_the_answers_of_a_batch_go_together(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(COUNTER)
    batch = [state(i, i) for i in range(8)]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.stream_stream(BATCH_METHOD)
        data = _batch.join(s.SerializeToString() for s in batch)
        messages = [pb.ResultBatch.FromString(m) for m in call(iter([data]), timeout=30)]
    assert [r.item for m in messages for r in m.results] == list(range(8))
    # Microseconds of work each: together, unless the machine stalls one for ANSWER_HOLD.
    assert len(messages) < len(batch)


def test_an_answer_does_not_wait_for_a_slow_item_of_its_batch(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server("tests.apps.tally")
    pipeline = load_pipeline("tests.apps.tally")
    batch = [state(i, i, pipeline=pipeline.name, fingerprint=pipeline.fingerprint) for i in (1, 2)]
    done = threading.Event()

    def requests() -> Iterator[bytes]:
        yield _batch.join(s.SerializeToString() for s in batch)
        done.wait(60)

    released = threading.Event()

    def release() -> None:  # were the first answer held for the second, it would come now
        released.set()
        tally.reset()

    tally.hang_on_server(2)
    safety = threading.Timer(20, release)
    safety.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = channel.stream_stream(BATCH_METHOD)(requests(), timeout=60)
            first = pb.ResultBatch.FromString(next(call))
            assert [r.item for r in first.results] == [1] and not released.is_set()
            release()
            second = pb.ResultBatch.FromString(next(call))
            assert [r.item for r in second.results] == [2]
            done.set()
    finally:
        safety.cancel()
        done.set()
        tally.reset()


def test_a_batch_of_several_items_counts_whole_against_the_message_limit(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(COUNTER, limits=Limits(max_message_bytes=4096))
    big = [state(i, "x" * 1500) for i in range(3)]  # each fits; together they do not
    with pytest.raises(grpc.RpcError) as caught:
        _call(server.port, [big])
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--batch-bytes" in (caught.value.details() or "")
    assert len(_call(server.port, [big[:2]])) == 2


def test_a_message_that_is_no_batch_is_refused_naming_the_problem(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(COUNTER)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        method = channel.stream_stream(BATCH_METHOD)
        with pytest.raises(grpc.RpcError) as caught:
            list(method(iter([b"\x0a\xff\x01abc"]), timeout=10))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not an offload.v1.TaskBatch" in (caught.value.details() or "")


def test_batches_are_metered_like_single_items(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(COUNTER, metrics_port=0)
    states = [state(i, i + 1, device="pi-1") for i in range(4)]
    answers = _call(server.port, [states[:3], states[3:]])
    assert server.metrics is not None
    value = server.metrics.registry.get_sample_value
    assert value("offload_items_total", {"device": "pi-1", "status": "completed"}) == 4
    sent = sum(len(_batch.join(s.SerializeToString() for s in b)) for b in [states[:3], states[3:]])
    assert value("offload_received_bytes_total") == sent
    # One answer per message: its bytes and the batch framing (a tag and a length).
    sizes = [a.ByteSize() for a in answers]
    assert value("offload_sent_bytes_total") == sum(_batch.framing(n) + n for n in sizes)
    assert value("offload_item_cpu_seconds_count") == 4


# --- issue 18's bounds and the codec's negotiation hold per item inside a batch ---------------


def test_an_item_of_millions_of_elements_in_a_batch_is_refused_before_it_is_parsed(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(ECHOING)
    attack = raw_state(many_lists(40, 99_999), item=1)  # 16 MB: 4 million elements
    batch = _batch.join([echoing_state(b"ok", 0).SerializeToString(), attack])
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.stream_stream(BATCH_METHOD)
        answers: list[pb.ItemResult] = []
        with pytest.raises(grpc.RpcError) as err:
            for data in call(iter([batch]), timeout=60):
                answers.extend(pb.ResultBatch.FromString(data).results)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details() or ""
    assert "item 1 of the stream has more than 100000 elements in all" in details
    assert "refused before parsing" in details
    assert [(a.item, a.status) for a in answers] == [(0, pb.ItemResult.COMPLETED)]


def test_a_batch_is_given_back_to_the_read_budget_once_answered(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(ECHOING)
    budget = server.servicer.read_budget
    release = threading.Event()
    batch = [echoing_state(b"x" * 1000, i).SerializeToString() for i in range(4)]

    def requests() -> Iterator[bytes]:
        yield _batch.join(batch) + _UNKNOWN_FIELD  # unknown fields count too
        release.wait(30)

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.stream_stream(BATCH_METHOD)(requests(), timeout=30)
        try:
            answered = 0
            for data in call:
                answered += len(pb.ResultBatch.FromString(data).results)
                if answered == len(batch):
                    break
            # The stream is still open: what it held is back, to the byte.
            assert wait_until(lambda: budget.held == 0, 10), budget.held
            assert budget.peak >= len(_batch.join(batch))
        finally:
            release.set()
            call.cancel()


_UNKNOWN_FIELD = b"\x12\x03abc"  # field 2, 3 bytes: skipped, as protobuf does


def test_each_item_of_a_batch_is_answered_in_the_encodings_its_device_reads(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server("tests.apps.mask")
    old, packed = _wire_states([]), _wire_states([pb.CODEC_PACKED])
    for s in packed:
        s.run_id = "r2"
    answers = _call(server.port, [[old[0], packed[0], old[1], packed[1]]])
    assert [a.status for a in answers] == [pb.ItemResult.COMPLETED] * 4
    assert [("packed_list" in _kinds(a.output)) for a in answers] == [False, True, False, True]
    assert all("list_value" in _kinds(a.output) for a in answers[::2])


@pytest.fixture(scope="module")
def batch_call() -> Iterator[Any]:
    """ExecuteBatches on one server for every example, bytes each way."""
    pipeline = load_pipeline(COUNTER)
    server = serve(
        ServerConfig(pipeline=pipeline.name, host="127.0.0.1", port=0, limits=LIMITS), pipeline
    )
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel.stream_stream(BATCH_METHOD)
    server.stop(grace=1.0)


@FUZZ
@given(st.lists(task_states, min_size=1, max_size=4), st.data())
def test_bit_flipped_batches_are_answered_or_refused_naming_the_problem(
    batch_call: Any, states: list[pb.TaskState], data: st.DataObject
) -> None:
    wire = bytearray(_batch.join(s.SerializeToString() for s in states))
    for _flip in range(data.draw(st.integers(0, 16))):
        bit = data.draw(st.integers(0, len(wire) * 8 - 1))
        wire[bit // 8] ^= 1 << (bit % 8)
    try:
        for answer in batch_call(iter([bytes(wire)]), timeout=10):
            pb.ResultBatch.FromString(answer)  # whatever the server answers is well-formed
    except grpc.RpcError as exc:
        assert exc.code() in EXPECTED, (exc.code(), exc.details())
        assert exc.details(), "a refusal must say why"


def test_a_stream_that_sent_an_empty_batch_and_went_silent_is_dropped_as_idle(
    start_server: Callable[..., RunningServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = start_server(COUNTER, stream_idle_seconds=0.5)
    release = threading.Event()

    def empty_then_silent() -> Iterator[bytes]:
        yield b""  # a TaskBatch of no items: no work, so nothing keeps the stream busy
        release.wait(30)

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.stream_stream(BATCH_METHOD)(empty_then_silent(), timeout=30)
        try:
            assert wait_until(lambda: "event=idle-drop" in caplog.text, 10)
            with pytest.raises(grpc.RpcError) as err:
                list(call)
            assert err.value.code() == grpc.StatusCode.CANCELLED
        finally:
            release.set()
