"""A live progress line on the client's terminal: items done, items/s, the current split.

    offload: 1200 done (1187 completed, 13 filtered, 0 failed)  29.8 items/s  split 3

Only when the stream is a terminal: a log file or a pipe gets nothing. The line is redrawn in
place a few times a second by a daemon thread that only reads the client's counters and its
``split`` property (which the scheduler may change at any item), so the capture loop pays
nothing for it. At the end the final counts stay on screen, above the summary.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Protocol, TextIO

from .report import Recorder
from .workers import DeviceWorkers

CLEAR_TO_END = "\x1b[K"


class _Watched(Protocol):
    recorder: Recorder
    workers: DeviceWorkers | None

    @property
    def split(self) -> int: ...


class ProgressLine:
    """Draws the progress of ``client`` on ``stream``; ``rate_window`` seconds set items/s."""

    def __init__(
        self,
        client: _Watched,
        stream: TextIO,
        interval: float = 0.25,
        rate_window: float = 3.0,
    ) -> None:
        self.client = client
        self.stream = stream
        self.interval = interval
        self.rate_window = rate_window
        self._samples: deque[tuple[float, int]] = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="offload-progress", daemon=True)

    def line(self, now: float | None = None) -> str:
        """The text of the line now; remembers the count to compute items/s."""
        now = time.monotonic() if now is None else now
        r = self.client.recorder
        completed, filtered, failed = r.completed, r.filtered, r.failed
        done = completed + filtered + failed
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[0][0] > self.rate_window:
            self._samples.popleft()
        t0, done0 = self._samples[0]
        rate = (done - done0) / (now - t0) if now > t0 else 0.0
        workers = self.client.workers
        busy = (  # not the item captured ahead
            ""
            if workers is None
            else f"  {workers.n} workers {min(workers.held, workers.n)}/{workers.n} busy"
        )
        return (
            f"offload: {done} done ({completed} completed, {filtered} filtered, {failed} failed)"
            f"  {rate:.1f} items/s  split {self.client.split}{busy}"
        )

    def _draw(self, end: str = "") -> None:
        self.stream.write(f"\r{self.line()}{CLEAR_TO_END}{end}")
        self.stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._draw()

    def start(self) -> None:
        self._draw()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._draw(end="\n")


@contextlib.contextmanager
def live_progress(client: _Watched, stream: TextIO) -> Iterator[ProgressLine | None]:
    """Show a progress line on ``stream`` while the block runs, if it is a terminal."""
    if not stream.isatty():
        yield None
        return
    progress = ProgressLine(client, stream)
    progress.start()
    try:
        yield progress
    finally:
        progress.stop()
