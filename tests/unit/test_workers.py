"""Device workers: tasks [1, K) for several items at once, results in item order, stateful tasks
one item at a time in item order, a failing worker ends the run, the report shows them."""

from __future__ import annotations

import io
import json
import threading
from typing import Any

import pytest

from offload import Client, ClientConfig, LinkConfig, load_pipeline, stateful
from offload._device import workers as workers_module
from offload._device.ledger import Ledger
from offload._device.report import format_summary
from offload._pipeline import Outcome
from offload.exceptions import OffloadError, PipelineError
from offload.testing import InProcessTransport, RemoteExecutor

from ..helpers import install

TIMEOUT = 30.0  # a generous bound on a wait that is over at once when the code is right


def source(count: int) -> Any:
    numbers = iter(range(count))

    def capture() -> tuple[bool, int | None]:
        n = next(numbers, None)
        return n is not None, n

    return capture


def finish(n: int) -> tuple[bool, dict[str, int]]:
    return True, {"n": n}


def run(tasks: list[Any], workers: int, **options: Any) -> tuple[list[dict[str, Any]], Client]:
    name = install(f"tests_workers_{id(tasks)}", tasks=tasks)
    out = io.StringIO()
    client = Client(
        load_pipeline(name),
        ClientConfig(pipeline=name, device_workers=workers, **options),
        None,
        out,
    )
    client.run()
    return [json.loads(line) for line in out.getvalue().splitlines()], client


def test_two_workers_run_a_task_for_two_items_at_once() -> None:
    both = threading.Barrier(2, timeout=TIMEOUT)  # passes only when two items are in it together

    def meet(n: int) -> tuple[bool, int]:
        both.wait()
        return True, n

    lines, _ = run([source(6), meet, finish], workers=2)
    assert [line["status"] for line in lines] == ["completed"] * 6


def test_capture_reads_one_item_ahead_while_every_worker_is_busy_and_no_more() -> None:
    numbers = iter(range(6))
    third = threading.Event()
    held: list[int] = []  # items on the device as each is captured (it among them)

    def capture() -> tuple[bool, int | None]:
        n = next(numbers, None)
        held.append(client.workers.held if client.workers is not None else 0)
        if n == 2:
            third.set()
        return n is not None, n

    def until_the_third_is_captured(n: int) -> tuple[bool, int]:
        assert third.wait(TIMEOUT), "capture waited for a worker: nothing was read ahead"
        return True, n

    name = install("tests_workers_ahead", tasks=[capture, until_the_third_is_captured, finish])
    out = io.StringIO()
    client = Client(load_pipeline(name), ClientConfig(pipeline=name, device_workers=2), None, out)
    client.run()
    assert [json.loads(line)["status"] for line in out.getvalue().splitlines()] == ["completed"] * 6
    assert max(held) == 3  # 2 on the workers and 1 captured ahead, never a fourth


def test_results_stay_in_item_order_when_a_later_item_finishes_first() -> None:
    later_done = threading.Event()
    seen: list[int] = []

    def slow_first(n: int) -> tuple[bool, int]:
        if n == 0:
            assert later_done.wait(TIMEOUT), "item 1 never ran while item 0 waited"
        if n == 1:
            later_done.set()
        return True, n

    def aggregate(n: int) -> tuple[bool, dict[str, Any]]:
        seen.append(n)
        return True, {"n": n, "seen": list(seen)}

    lines, _ = run([source(4), slow_first, aggregate], workers=2)
    assert [line["item"] for line in lines] == [0, 1, 2, 3]
    # The last task aggregates in item order, as one worker would: item 1 waited for item 0.
    assert [line["result"]["seen"] for line in lines] == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]


def test_a_stateful_task_runs_for_one_item_at_a_time_in_item_order() -> None:
    later_past_task_1 = threading.Event()
    calls: list[int] = []
    inside = {"now": 0, "most": 0}

    def slow_first(n: int) -> tuple[bool, int]:
        if n == 0:  # item 1 reaches the stateful task first; it must wait for item 0
            assert later_past_task_1.wait(TIMEOUT)
        if n == 1:
            later_past_task_1.set()
        return True, n

    @stateful
    def running_total(n: int) -> tuple[bool, int]:
        inside["now"] += 1
        inside["most"] = max(inside["most"], inside["now"])
        calls.append(n)
        inside["now"] -= 1
        return True, n

    lines, _ = run([source(8), slow_first, running_total, finish], workers=4)
    assert calls == list(range(8))
    assert inside["most"] == 1
    assert [line["status"] for line in lines] == ["completed"] * 8


def test_items_filtered_before_a_stateful_task_do_not_hold_up_its_turns() -> None:
    @stateful
    def count(n: int) -> tuple[bool, int]:
        return True, n

    def odd_only(n: int) -> tuple[bool, int] | bool:
        return (True, n) if n % 2 else False

    lines, _ = run([source(9), odd_only, count, finish], workers=3)
    assert [line["status"] for line in lines] == ["filtered", "completed"] * 4 + ["filtered"]


def test_a_failing_worker_ends_the_run_with_one_line_naming_it() -> None:
    class Broken(Ledger):
        def worker_times(self, item: int, timings: list[tuple[int, float]]) -> None:
            raise RuntimeError("broken\nrecorder")

    class BrokenClient(Client):
        ledger_class = Broken

    name = install("tests_workers_broken", tasks=[source(100), lambda n: (True, n), finish])
    client = BrokenClient(
        load_pipeline(name), ClientConfig(pipeline=name, device_workers=2), None, io.StringIO()
    )
    with pytest.raises(OffloadError, match=r"worker thread failed: RuntimeError: broken recorder$"):
        client.run()


def test_opencv_gets_each_workers_share_of_the_cores_never_more_than_it_had(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cv2 = pytest.importorskip("cv2")
    monkeypatch.setattr(workers_module, "cores", lambda: 4)
    before = cv2.getNumThreads()  # OpenCV's default: one per CPU
    seen: list[int] = []

    def note(n: int) -> tuple[bool, int]:
        seen.append(cv2.getNumThreads())
        return True, n

    cv2.setNumThreads(8)
    try:
        run([source(2), note, finish], workers=2)
        assert seen == [2, 2]  # 4 cores, 2 workers: 2 OpenCV threads each, not 1
        assert cv2.getNumThreads() == 8
        cv2.setNumThreads(1)  # capped by the user (or a build without threads): kept
        run([source(2), note, finish], workers=2)
        assert seen == [2, 2, 1, 1]
    finally:
        cv2.setNumThreads(before)


def test_the_report_and_summary_show_the_workers_and_how_busy_the_device_was() -> None:
    _, client = run([source(20), lambda n: (True, n), finish], workers=2)
    report = client.report()
    device = report["device"]
    assert device["workers"] == 2
    assert device["workers_busy_percent"] is not None and device["workers_busy_percent"] >= 0
    assert device["cpu_seconds"] >= 0 and device["cpu_ms_per_item"] >= 0  # (10 ms ticks)
    assert "  device     2 workers, " in format_summary(report)
    _, single = run([source(5), lambda n: (True, n), finish], workers=1)
    assert single.report()["device"]["workers_busy_percent"] is None


def test_stateful_marks_a_task_and_the_pipeline_serialises_it_and_the_last() -> None:
    @stateful
    def tracker(n: int) -> tuple[bool, int]:
        return True, n

    name = install("tests_workers_marks", tasks=[source(1), tracker, lambda n: (True, n), finish])
    assert load_pipeline(name).serial_tasks == {1, 3}
    with pytest.raises(PipelineError, match="cannot mark len as stateful: it takes no attribute"):
        stateful(len)


def test_an_outcome_from_the_workers_keeps_every_tasks_time() -> None:
    seen: list[Outcome] = []

    class Times(Client):
        def _hand_over(self, job: Any, outcome: Outcome, data: Any) -> None:
            seen.append(outcome)
            super()._hand_over(job, outcome, data)

    @stateful
    def middle(n: int) -> tuple[bool, int]:
        return True, n

    name = install("tests_workers_times", tasks=[source(3), lambda n: (True, n), middle, finish])
    Times(load_pipeline(name), ClientConfig(pipeline=name, device_workers=2), None).run()
    assert [[t for t, _ in o.task_seconds] for o in seen] == [[1, 2, 3]] * 3


def test_items_on_the_workers_count_against_the_window_and_the_buffer() -> None:
    name = install("tests_workers_bound", tasks=[source(1), lambda n: (True, n), finish])
    pipeline = load_pipeline(name)
    config = ClientConfig(
        pipeline=name, local_tasks=1, window=8, link=LinkConfig(buffer=32), device_workers=3
    )
    client = Client(pipeline, config, InProcessTransport(RemoteExecutor(pipeline)))
    assert client.link is not None and client.workers is not None
    # 3 items on the workers, 1 captured ahead and 5 in flight: 9 at most, as with one worker
    # (8 in flight, 1 being captured); 29 offline, as 32 + 1.
    assert (client.workers.n, client.link._pending.window, client.link.config.buffer) == (3, 5, 29)
    assert client.run()["items"]["completed"] == 1
