"""The client's live progress line: on a terminal only, with the split read at every refresh."""

from __future__ import annotations

import io
import re
import threading
from dataclasses import dataclass, field

from offload import load_pipeline
from offload._device.progress import ProgressLine, live_progress
from offload._device.report import Recorder
from offload._device.workers import DeviceWorkers
from offload._pipeline import REAL_TIME


@dataclass
class FakeClient:
    recorder: Recorder = field(
        default_factory=lambda: Recorder(load_pipeline("tests.apps.counter"))
    )
    split: int = 1
    workers: DeviceWorkers | None = None


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_line_counts_items_rate_and_the_current_split() -> None:
    client = FakeClient()
    progress = ProgressLine(client, io.StringIO(), rate_window=3.0)
    assert progress.line(now=100.0).endswith("0.0 items/s  split 1")
    client.recorder.completed, client.recorder.filtered, client.recorder.failed = 18, 1, 1
    client.split = 2  # the scheduler moved the split: the next refresh shows it
    line = progress.line(now=102.0)
    assert line == ("offload: 20 done (18 completed, 1 filtered, 1 failed)  10.0 items/s  split 2")
    # The rate covers the last few seconds only: old samples are dropped.
    client.recorder.completed = 48
    assert "10.0 items/s" in progress.line(now=105.0)  # (50 - 20) / (105 - 102)


def test_the_line_shows_how_many_device_workers_hold_an_item() -> None:
    pipeline = load_pipeline("tests.apps.counter")
    workers = DeviceWorkers(3, pipeline, REAL_TIME, lambda job, value: b"", lambda *args: None)
    client = FakeClient(workers=workers)
    assert client.workers is not None and client.workers.acquire(threading.Event())
    line = ProgressLine(client, io.StringIO()).line(now=1.0)
    assert line.endswith("split 1  3 workers 1/3 busy")


def test_the_item_captured_ahead_is_not_shown_as_a_busy_worker() -> None:
    pipeline = load_pipeline("tests.apps.counter")
    workers = DeviceWorkers(2, pipeline, REAL_TIME, lambda job, value: b"", lambda *a: None, 1)
    client = FakeClient(workers=workers)
    assert all(workers.acquire(threading.Event()) for _ in range(3))  # 2 running, 1 ahead
    line = ProgressLine(client, io.StringIO()).line(now=1.0)
    assert line.endswith("split 1  2 workers 2/2 busy")


def test_nothing_is_drawn_unless_the_stream_is_a_terminal() -> None:
    piped = io.StringIO()
    with live_progress(FakeClient(), piped) as progress:
        assert progress is None
    assert piped.getvalue() == ""
    terminal = Terminal()
    client = FakeClient()
    with live_progress(client, terminal) as progress:
        assert progress is not None
        client.recorder.completed = 7
    # The final counts stay on screen, on a line of their own.
    final = terminal.getvalue().rsplit("\r", 1)[-1]
    assert re.fullmatch(
        r"offload: 7 done \(7 completed, 0 filtered, 0 failed\)  [\d.]+ items/s  split 1\x1b\[K\n",
        final,
    ), final
