"""The fleet as the dashboard shows it: an observer of the executor, O(1) per answer, bounded.

``FleetBoard.observe`` listens to the executor (``RemoteExecutor.add_listener``) and keeps, per
device, counters and per-second sums over the last ``WINDOW_SECONDS``; ``snapshot()`` turns them
into the JSON the page and ``/api/fleet`` show. It keeps at most ``max_devices`` devices (the
least recently seen is forgotten first) and views of at most ``MAX_VIEW_BYTES`` each and
``max_view_bytes`` in all (the least recently published go first). Latency is measured from the
item's ``capture_time`` (the device's wall clock, on the wire) to the answer (the server's wall
clock), so it includes any skew between the two clocks.
"""

from __future__ import annotations

import threading
import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from .._pipeline import Pipeline
from .._views import take_view
from ..v1 import offload_pb2 as pb

WINDOW_SECONDS = 300  # history kept: "over the last minutes" and the plot
NOW_SECONDS = 5  # "items/s now" is the mean over the last complete seconds
CONNECTED_SECONDS = 10.0  # a device answered within this is shown connected
MAX_DEVICES = 256
MAX_VIEWS_BYTES = 16 * 1024 * 1024
MAX_ID_CHARS = 128  # longer device and run ids are kept shortened (such devices share a row)
LATENCIES = 256  # latest capture->answer latencies kept per device, for p50/p95
SIZE_SAMPLE = 16  # an item's wire size is measured on one answer in this many
_EWMA = 0.05  # weight of the latest item in the per-task cost and per-cut size means


class _Series:
    """Per-second sums of a few quantities over the last ``window`` seconds, with running
    totals, so that adding is O(1) amortised and reading a window total is O(1)."""

    def __init__(self, quantities: int, window: int = WINDOW_SECONDS) -> None:
        self.window = window
        self.slots = [array("d", bytes(8 * window)) for _ in range(quantities)]
        self.totals = [0.0] * quantities
        self.head: int | None = None  # the latest second a slot holds

    def advance(self, second: int) -> None:
        if self.head is None:
            self.head = second
            return
        if second <= self.head:
            return
        for s in range(self.head + 1, min(second, self.head + self.window) + 1):
            slot = s % self.window
            for q, slots in enumerate(self.slots):
                self.totals[q] -= slots[slot]
                slots[slot] = 0.0
        self.head = second

    def add(self, second: int, *values: float) -> None:
        self.advance(second)
        assert self.head is not None
        if second <= self.head - self.window:
            return  # older than the window
        slot = second % self.window
        for q, value in enumerate(values):
            self.slots[q][slot] += value
            self.totals[q] += value

    def rate(self, quantity: int, now: int, seconds: int, since: int) -> float | None:
        """Mean a second over the last ``seconds`` complete seconds before ``now``, counting
        none before ``since`` (None before one has passed); ``advance(now)`` first."""
        span = min(seconds, self.window - 1, now - since)
        if span <= 0:
            return None
        slots = self.slots[quantity]
        if span == self.window - 1:  # the whole window: the running total less this second
            return (self.totals[quantity] - slots[now % self.window]) / span
        return sum(slots[s % self.window] for s in range(now - span, now)) / span

    def history(self, quantity: int, now: int, since: int) -> list[float]:
        """One value per second from ``since`` (or the window's start), up to before ``now``."""
        slots = self.slots[quantity]
        return [slots[s % self.window] for s in range(max(since, now - self.window + 1), now)]


class _Device:
    def __init__(self, device_id: str, run_id: str, now: float) -> None:
        self.id = device_id
        self.run_id = run_id
        self.since = now  # start of the current connected spell
        self.first_seen = now
        self.last_seen = now
        self.split = 0
        self.completed = 0
        self.filtered = 0
        self.failed = 0
        self.series = _Series(3)  # completed, answered (not replayed), CPU seconds
        self.latencies: deque[float] = deque(maxlen=LATENCIES)
        self.view_version = 0


def _shortened(name: str) -> str:
    return name if len(name) <= MAX_ID_CHARS else name[: MAX_ID_CHARS - 1] + "…"


def _percentile(ordered: list[float], fraction: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


class FleetBoard:
    """What the dashboard knows of the fleet; thread-safe, O(1) per answer."""

    def __init__(
        self,
        pipeline: Pipeline,
        max_devices: int = MAX_DEVICES,
        max_view_bytes: int = MAX_VIEWS_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_devices = max_devices
        self.max_view_bytes = max_view_bytes
        self.clock = clock
        self.tasks = [pipeline.task_name(i) for i in range(len(pipeline))]
        self.pipeline = pipeline.name
        self._lock = threading.Lock()
        self._devices: OrderedDict[str, _Device] = OrderedDict()  # least recently seen first
        self._views: OrderedDict[str, bytes] = OrderedDict()  # least recently published first
        self._view_bytes = 0
        self._fleet = _Series(3)
        # Means of each task's server seconds and of the item's wire bytes at each cut: what
        # "sending everything" (cutting after task 0) would cost, from what was measured.
        n = len(self.tasks)
        self._task_seconds = array("d", bytes(8 * n))
        self._task_known = [False] * n
        self._cut_bytes = array("d", bytes(8 * n))
        self._cut_known = [False] * n
        self._item_seconds = 0.0  # mean server task seconds of an item as the fleet splits now
        self._item_bytes = 0.0
        self._any = False
        self._cut_answers = array("q", bytes(8 * n))
        self._sized = False
        self._first_second: int | None = None  # the history starts at the first answer

    def observe(self, state: pb.TaskState, result: pb.ItemResult) -> None:
        """Count one answer (an executor listener); takes the view its tasks published."""
        view = take_view(state.device_id, state.run_id, state.item)
        now = self.clock()
        second = int(now)
        replayed = result.duplicate
        cpu = 0.0 if replayed else result.server_cpu_seconds
        completed = result.status == pb.ItemResult.COMPLETED
        # ByteSize() serialises the message (~0.2 ms for a frame): one item in SIZE_SAMPLE at
        # each cut (a race on the count only moves which item is sampled).
        cut = min(state.next_task, len(self.tasks) - 1)
        self._cut_answers[cut] += 1
        size = state.ByteSize() if self._cut_answers[cut] % SIZE_SAMPLE == 1 else None
        task_seconds = 0.0
        # Ids are as long as a message allows: a kept device holds at most MAX_ID_CHARS of each.
        key = _shortened(state.device_id)
        run_id = _shortened(state.run_id)
        with self._lock:
            if self._first_second is None:
                self._first_second = second
            device = self._devices.get(key)
            if device is None:
                device = self._devices[key] = _Device(key, run_id, now)
                while len(self._devices) > self.max_devices:
                    gone, _ = self._devices.popitem(last=False)
                    self._drop_view(gone)
            else:
                self._devices.move_to_end(key)
                if now - device.last_seen > CONNECTED_SECONDS or device.run_id != run_id:
                    device.since = now
            device.run_id = run_id
            device.last_seen = now
            device.split = state.next_task
            if completed:
                device.completed += 1
                device.latencies.append(now - state.capture_time)
            elif result.status == pb.ItemResult.FILTERED:
                device.filtered += 1
            else:
                device.failed += 1
            answered = 0.0 if replayed else 1.0
            device.series.add(second, float(completed), answered, cpu)
            self._fleet.add(second, float(completed), answered, cpu)
            if not replayed:
                for t in result.task_times:
                    if t.task < len(self.tasks):
                        self._task_seconds[t.task] = self._mean(
                            self._task_seconds[t.task], t.seconds, self._task_known[t.task]
                        )
                        self._task_known[t.task] = True
                        task_seconds += t.seconds
                if size is not None and cut == state.next_task:
                    self._cut_bytes[cut] = self._mean(
                        self._cut_bytes[cut], size, self._cut_known[cut]
                    )
                    self._cut_known[cut] = True
                if size is not None:
                    self._item_bytes = self._mean(self._item_bytes, size, self._sized)
                    self._sized = True
                self._item_seconds = self._mean(self._item_seconds, task_seconds, self._any)
                self._any = True
            if view is not None:
                self._drop_view(key)
                self._views[key] = view
                self._view_bytes += len(view)
                device.view_version += 1
                while self._view_bytes > self.max_view_bytes:
                    self._drop_view(next(iter(self._views)))

    @staticmethod
    def _mean(mean: float, value: float, known: bool) -> float:
        return mean + _EWMA * (value - mean) if known else value

    def _drop_view(self, device_id: str) -> None:
        view = self._views.pop(device_id, None)
        if view is not None:
            self._view_bytes -= len(view)

    def view(self, device_id: str) -> bytes | None:
        """The latest JPEG the pipeline published for a device."""
        with self._lock:
            return self._views.get(device_id)

    @property
    def view_bytes(self) -> int:
        return self._view_bytes

    def snapshot(self) -> dict[str, Any]:
        """The fleet as JSON-ready values (rates per second, times in seconds, Unix times)."""
        now = self.clock()
        second = int(now)
        rows: list[tuple[_Device, list[float], float | None, float | None, float, float]] = []
        with self._lock:  # copies only: sorting latencies happens outside the lock
            for d in self._devices.values():
                d.series.advance(second)
                first = int(d.first_seen)
                rows.append(
                    (
                        d,
                        list(d.latencies),
                        d.series.rate(0, second, NOW_SECONDS, first),
                        d.series.rate(0, second, WINDOW_SECONDS, first),
                        d.series.totals[2],
                        d.series.totals[1],
                    )
                )
            since = second if self._first_second is None else self._first_second
            self._fleet.advance(second)
            fleet_now = self._fleet.rate(0, second, NOW_SECONDS, since)
            fleet_cpu = _ratio(self._fleet.totals[2], self._fleet.totals[1])
            completed = self._fleet.history(0, second, since)
            answered = self._fleet.history(1, second, since)
            cpu = self._fleet.history(2, second, since)
            saving = self._saving()
        devices = []
        for d, latencies, rate_now, rate_window, cpu_sum, answers in rows:
            latencies.sort()
            connected = now - d.last_seen <= CONNECTED_SECONDS
            devices.append(
                {
                    "id": d.id,
                    "run_id": d.run_id,
                    "connected": connected,
                    "since": d.since if connected else d.last_seen,
                    "split": d.split,
                    "cloud_from": self.tasks[d.split] if d.split < len(self.tasks) else None,
                    "items_per_second": rate_now,
                    "items_per_second_window": rate_window,
                    "latency_p50": _percentile(latencies, 0.50),
                    "latency_p95": _percentile(latencies, 0.95),
                    "cloud_cpu_per_item": _ratio(cpu_sum, answers),
                    "completed": d.completed,
                    "filtered": d.filtered,
                    "failed": d.failed,
                    "last_seen": d.last_seen,
                    "view": d.view_version or None,
                }
            )
        devices.sort(key=lambda row: str(row["id"]))
        return {
            "time": now,
            "pipeline": self.pipeline,
            "tasks": self.tasks,
            "window_seconds": WINDOW_SECONDS,
            "max_devices": self.max_devices,
            "fleet": {
                "devices_active": sum(1 for row in devices if row["connected"]),
                "devices_kept": len(devices),
                "items_per_second": fleet_now,
                "cloud_cpu_per_item": fleet_cpu,
                **saving,
            },
            "history": {
                "end": second,
                "items_per_second": completed,
                "cloud_cpu_per_item": [
                    c / a if a else None for c, a in zip(cpu, answered, strict=True)
                ],
            },
            "devices": devices,
        }

    def _saving(self) -> dict[str, float | None]:
        """What the fleet's splits save against cutting every item after task 0 (under lock)."""
        server_tasks = range(1, len(self.tasks))
        everything = (
            sum(self._task_seconds[i] for i in server_tasks)
            if self._any and all(self._task_known[i] for i in server_tasks)
            else None
        )
        sent_all = self._cut_bytes[1] if len(self.tasks) > 1 and self._cut_known[1] else None
        return {
            "cloud_seconds_per_item": self._item_seconds if self._any else None,
            "cloud_seconds_per_item_all": everything,
            "bytes_per_item": self._item_bytes if self._sized else None,
            "bytes_per_item_all": sent_all,
        }
