"""How items end: each end recorded once, a late second end ignored, the telemetry fed."""

from __future__ import annotations

import io
import json

from offload import ClientConfig, encode, load_pipeline
from offload._device.emulation import SlowDevice
from offload._device.ledger import Ledger
from offload._device.link import Pending
from offload._device.report import Recorder
from offload._device.telemetry import Telemetry
from offload._pipeline import Outcome, Status
from offload.v1 import offload_pb2 as pb

PIPELINE = "tests.apps.echo"  # emit bytes, measure their length, record {"n": length}


class Clock:
    """A clock the test moves."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ledger() -> tuple[Ledger, io.StringIO, Clock]:
    pipeline = load_pipeline(PIPELINE)
    config = ClientConfig(pipeline=PIPELINE, local_tasks=1, device_id="unit")
    out = io.StringIO()
    clock = Clock()
    telemetry = Telemetry(len(pipeline), config.window)
    recorder = Recorder(pipeline, out)
    book = Ledger(pipeline, config, "run", telemetry, recorder, SlowDevice(1.0), clock)
    return book, out, clock


def pending(item: int, value: object = b"abc", began: float = 99.0) -> Pending:
    state = pb.TaskState(pipeline=PIPELINE, item=item, next_task=1)
    state.args.CopyFrom(encode(value))
    return Pending(item, 1, state.SerializeToString(), began, sent_at=99.5)


def answer(item: int, n: int) -> pb.ItemResult:
    result = pb.ItemResult(item=item, status=pb.ItemResult.COMPLETED, task=2)
    result.output.CopyFrom(encode({"n": n}))
    result.server_cpu_seconds = 0.25
    return result


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_an_answer_ends_its_item_once_and_a_late_second_answer_is_ignored() -> None:
    book, out, _ = ledger()
    book.captured(0, 99.0, [(0, 0.01)])
    book.answered(pending(0), answer(0, 3), size=40)
    book.answered(pending(0), answer(0, 4), size=40)  # late: the item has ended
    r = book.recorder
    assert (r.completed, r.failed, r.finished_count) == (1, 0, 1)
    assert lines(out) == [{"item": 0, "status": "completed", "result": {"n": 3}}]
    assert book.telemetry.finished_items == 1
    assert r.latencies == [1.0]  # the clock's 100.0 less the capture at 99.0


def test_a_lost_item_is_not_ended_again_by_its_answer() -> None:
    book, out, _ = ledger()
    book.lost(pending(0), "dropped", "the offline buffer was full")
    book.answered(pending(0), answer(0, 3), size=40)
    assert (book.recorder.dropped, book.recorder.completed) == (1, 0)
    assert lines(out) == [
        {"item": 0, "status": "dropped", "task": 1, "error": "the offline buffer was full"}
    ]
    assert book.telemetry.finished_items == 1
    assert book.recorder.latencies == [1.0]


def test_an_item_not_run_has_no_latency_nor_lengthens_the_run() -> None:
    book, _, _ = ledger()
    book.lost(pending(0), "not_run", "the run was interrupted")
    assert book.recorder.not_run == 1
    assert book.recorder.latencies == [] and book.recorder.last_finish is None


def test_an_item_run_here_ends_as_the_server_would_have_ended_it() -> None:
    book, out, clock = ledger()
    clock.now = 101.0
    book.run_locally(pending(0, b"abcde"))
    assert lines(out) == [{"item": 0, "status": "completed", "result": {"n": 5}}]
    assert book.recorder.device_tasks.keys() == {1, 2}  # the tasks after the cut
    assert book.recorder.latencies == [2.0]
    assert book.telemetry.finished_items == 1
    book.run_locally(pending(0, b"abcde"))  # run twice (after an abort, say): ended once
    assert book.recorder.completed == 1 and book.telemetry.finished_items == 1


def test_items_that_end_on_the_device_end_in_order_once_each() -> None:
    book, out, _ = ledger()
    book.ended_here(1, Outcome(Status.FILTERED, None, 1, "", []), 99.0)
    assert out.getvalue() == ""  # held until item 0 has ended
    assert book.failed(0, 0, "cannot send: too large", 99.0)
    assert not book.failed(0, 0, "cannot send: too large", 99.0)
    assert [(line["item"], line["status"]) for line in lines(out)] == [
        (0, "failed"),
        (1, "filtered"),
    ]
    assert (book.recorder.failed, book.recorder.filtered) == (1, 1)
    assert book.telemetry.finished_items == 2
    assert book.telemetry.snapshot(1, 1.0, True).completed_fraction == 0.01  # none completed


def test_what_is_sent_and_answered_feeds_the_telemetry() -> None:
    book, _, _ = ledger()
    for item in range(3):  # past the warm-up items, whose times are not typical
        book.captured(item, 99.0, [(0, 0.01)])
        book.sent(pending(item), size=40)
        reply = answer(item, 3)
        reply.task_times.add(task=2, seconds=0.5)
        book.answered(pending(item), reply, size=30)
    m = book.telemetry.snapshot(1, 1.0, True)
    assert m.cut_bytes[1] == 40
    assert m.device_seconds[0] == 0.01 and m.server_seconds[2] == 0.5
    assert m.throughput == 3.0
    assert (book.recorder.bytes_sent, book.recorder.bytes_received) == (120, 90)
    assert book.recorder.server_cpu_seconds == 0.75
