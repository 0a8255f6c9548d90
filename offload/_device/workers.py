"""Device workers: tasks [1, K) for up to N items at once, handed over in item order.

The capture loop (the caller's thread) runs task 0 and gives the item to a worker thread, which
runs the item's tasks up to the split and encodes it; items are then handed over (to the link,
or ended here) in item order, each as soon as it and every earlier item are done, so the server
aggregates them in the order one worker would have sent them and results do not depend on N.

Threads, not processes: OpenCV and NumPy release the GIL in their calls, an item needs no copy
between processes, and tasks share the module state they expect (docs/performance.md has the
measurements of both). A pure-Python task gains nothing from more workers.

A serial task (``Pipeline.serial_tasks``: marked ``@stateful``, and the last) runs for one item
at a time, in item order: an item waits for its turn there until every earlier item has run the
task or ended before it. An item holds a slot from before its capture until it is handed over.
The client gives N + 1 slots (``ClientConfig.device_items``): capture (task 0, the serial stage)
reads the next item while N are on the workers instead of waiting for one to be handed over. It
takes N off the link's window and buffer, so a run holds no more items than with one worker.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .._pipeline import ItemContext, Outcome, Pace, Pipeline, Status, run_tasks
from ..exceptions import OffloadError


@dataclass
class Job:
    """An item captured (task 0 ran), to run tasks [1, split) on a worker."""

    item: int
    split: int
    args: Any  # task 0's output
    context: ItemContext
    began: float  # perf_counter at capture
    on_output: Callable[[int, Any], None] | None = None  # the scheduler's cut-size sampler


@dataclass
class WorkerStats:
    """Seconds and counts since the start, for the telemetry and the report."""

    busy_seconds: float = 0.0  # workers running tasks (not waiting for a turn or a hand-over)
    items: int = 0  # items whose tasks [1, split) ran
    slot_wait_seconds: float = 0.0  # the capture loop waiting for a free worker
    hand_over_seconds: float = 0.0  # handing over (the link's window full: back-pressure)


class Turns:
    """Item order at the serial tasks: item i runs task t once every item before it passed t."""

    def __init__(self, tasks: Iterable[int]) -> None:
        self._changed = threading.Condition()
        self._next = dict.fromkeys(tasks, 0)
        self._passed: dict[int, set[int]] = {t: set() for t in self._next}

    def wait(self, task: int, item: int, closed: Callable[[], bool]) -> bool:
        """Wait for ``item``'s turn at ``task``; False if ``closed()`` came first."""
        with self._changed:
            while self._next[task] != item:
                if closed():
                    return False
                self._changed.wait(0.1)
        return True

    def passed(self, task: int, item: int) -> None:
        """``item`` ran ``task``, or will not run it here: the next item's turn may come."""
        with self._changed:
            passed = self._passed[task]
            passed.add(item)
            while self._next[task] in passed:
                passed.remove(self._next[task])
                self._next[task] += 1
            self._changed.notify_all()


def cores() -> int:
    """CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def limit_library_threads(threads: int | None = 1) -> int | None:
    """Cap OpenCV's own thread pool, if the pipeline uses OpenCV; returns the cap it had."""
    cv2 = sys.modules.get("cv2")
    if cv2 is None or threads is None:
        return None
    before: int = cv2.getNumThreads()
    cv2.setNumThreads(threads)
    return before


def share_library_threads(workers: int) -> int | None:
    """Give OpenCV each worker's share of the cores: cores // N threads, at least 1 and never
    more than it had (a device or a user that capped it keeps the cap); the cap it had.

    The workers already use the cores; a larger pool would make them fight over them (as on
    the server, ServerConfig.task_threads). On 2 cores with 2 workers: one thread each.
    """
    cv2 = sys.modules.get("cv2")
    had: int = cv2.getNumThreads() if cv2 is not None else 1
    return limit_library_threads(max(1, min(had, cores() // workers)))


class DeviceWorkers:
    """``n`` threads running items' tasks [1, split); ``hand_over(job, outcome, data)`` is
    called in item order, one item at a time. ``encode(job, value)`` runs on the worker for an
    item cut at the split: the bytes to send, or an error to fail the item with. Up to
    ``n + ahead`` items are taken (``acquire``) at once."""

    def __init__(
        self,
        n: int,
        pipeline: Pipeline,
        pace: Pace,
        encode: Callable[[Job, Any], bytes | str],
        hand_over: Callable[[Job, Outcome, bytes | str | None], None],
        ahead: int = 0,
    ) -> None:
        self.n = n
        self.pipeline = pipeline
        self.pace = pace
        self._encode = encode
        self._hand_over = hand_over
        self.stats = WorkerStats()
        self._serial = sorted(pipeline.serial_tasks)
        self._turns = Turns(self._serial)
        self._slots = threading.Semaphore(n + ahead)  # ``ahead``: captured while n run
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._held = 0  # items between a slot taken and their hand-over
        self._ready: dict[int, tuple[Job, Outcome, bytes | str | None]] = {}
        self._next = 0  # the item to hand over next
        self._handing = False
        self._closed = False
        self.error: OffloadError | None = None
        self._library_threads: int | None = None  # OpenCV's cap before the workers started
        self._threads = [
            threading.Thread(target=self._work, name=f"offload-worker-{i}", daemon=True)
            for i in range(n)
        ]

    def start(self) -> None:
        self._library_threads = share_library_threads(self.n)
        for thread in self._threads:
            thread.start()

    def acquire(self, stop: threading.Event) -> bool:
        """Wait for a free worker before capturing an item; False if the run stops first."""
        began = time.perf_counter()
        try:
            while not self._slots.acquire(timeout=0.1):
                if stop.is_set() or self.error is not None:
                    return False
            with self._lock:
                self._held += 1
            return True
        finally:
            waited = time.perf_counter() - began
            with self._lock:
                self.stats.slot_wait_seconds += waited

    def release(self) -> None:
        """Give back a slot taken for an item that was not captured (the stream ended)."""
        with self._lock:
            self._held -= 1
            self._idle.notify_all()
        self._slots.release()

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def drain(self) -> None:
        """Wait until every item taken has been handed over; raise a worker's failure."""
        with self._lock:
            while self._held and self.error is None:
                self._idle.wait(0.1)
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Stop: no more hand-overs; the threads end after their current item."""
        with self._lock:
            self._closed = True
            self._idle.notify_all()
        for _ in self._threads:
            self._jobs.put(None)
        limit_library_threads(self._library_threads)  # as it was: the process may run on

    @property
    def held(self) -> int:
        """Items on the device's workers now (running, waiting for a turn or a hand-over)."""
        return self._held

    def busy(self) -> WorkerStats:
        with self._lock:
            return WorkerStats(**vars(self.stats))

    # --- the worker threads -------------------------------------------------------------------

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                outcome, busy = self._run(job)
                data = (
                    self._encode(job, outcome.value) if outcome.status is Status.CONTINUE else None
                )
                with self._lock:
                    self.stats.busy_seconds += busy
                    self.stats.items += 1
                self._done(job, outcome, data)
            except Exception as exc:  # a bug here, not in a task (run_tasks catches those)
                detail = " ".join(str(exc).split()) or "no message"
                with self._lock:
                    if self.error is None:
                        self.error = OffloadError(
                            f"the device's worker thread failed: {type(exc).__name__}: {detail}"
                        )
                    self._idle.notify_all()
                return

    def _run(self, job: Job) -> tuple[Outcome, float]:
        """Tasks [1, split) of ``job``, taking turns at the serial ones; and the seconds spent
        running them (not waiting for a turn)."""
        timings: list[tuple[int, float]] = []
        value, busy, start = job.args, 0.0, 1
        ran: set[int] = set()
        serial = [t for t in self._serial if 1 <= t < job.split]
        outcome = Outcome(Status.CONTINUE, value)
        try:
            for stop in [*serial, job.split]:
                for first, last in ((start, stop), (stop, stop + 1)):
                    if first >= last or last > job.split:
                        continue
                    if first == stop:  # the serial task itself: wait for this item's turn
                        if not self._turns.wait(stop, job.item, lambda: self._closed):
                            return Outcome(Status.FAILED, None, stop, "the run stopped"), busy
                    began = time.perf_counter()
                    outcome = run_tasks(
                        self.pipeline, first, last, value, job.context, self.pace, job.on_output
                    )
                    busy += time.perf_counter() - began
                    if first == stop:
                        self._turns.passed(stop, job.item)
                        ran.add(stop)
                    timings += outcome.task_seconds
                    outcome.task_seconds = timings
                    if outcome.status not in (Status.CONTINUE, Status.COMPLETED):
                        return outcome, busy
                    value = outcome.value
                start = stop + 1
            return outcome, busy
        finally:
            for task in self._serial:  # not run here (ended before it, or after the split)
                if task not in ran:
                    self._turns.passed(task, job.item)

    def _done(self, job: Job, outcome: Outcome, data: bytes | str | None) -> None:
        """Hand over every item that is next in order; one thread at a time does."""
        with self._lock:
            self._ready[job.item] = (job, outcome, data)
            if self._handing:
                return  # the thread handing over now takes this one in its turn
            self._handing = True
        while True:
            with self._lock:
                ready = None if self._closed else self._ready.pop(self._next, None)
                if ready is None:
                    self._handing = False
                    return
                self._next += 1
            began = time.perf_counter()
            try:
                self._hand_over(*ready)
            finally:
                with self._lock:
                    self.stats.hand_over_seconds += time.perf_counter() - began
                    self._held -= 1
                    self._idle.notify_all()
                self._slots.release()
