"""What the device measures for the scheduler: task times, cut sizes, the link, throughput.

Fed by the capture loop and the answer thread; ``snapshot`` turns it into the plain numbers of
``Measurements`` for the policy.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable

import psutil

from .scheduler import UNKNOWN, CodecCost, Measurements
from .workers import WorkerStats

ALPHA = 0.2  # EWMA weight of a new sample: ~5 recent items dominate, noise is damped
MAX_DRIFT = 4.0
WARMUP_ITEMS = 2  # the first items pay for imports, caches and opening the camera: not typical
_LINK_SAMPLES = 32
_TRANSIT_SAMPLES = 256  # items over which the least transit time is the link's baseline
# The workers were the device's bottleneck in a period when capture waited this share of it for
# a free worker, and handing items over (the link's window) took less than it.
SATURATED = 0.2


class _Ewma:
    """Smoothed per-task seconds, and the reference task's value when each was last measured.

    A task measured long ago on one side is rescaled by how much the always-measured reference
    task (task 0 on the device, the last task on the server) has changed since: when the device
    slows down, so do our estimates for tasks it is not running right now.
    """

    def __init__(self, n: int, reference: int) -> None:
        self.value = [UNKNOWN] * n
        self.ref_at = [UNKNOWN] * n
        self.samples = [0] * n  # samples averaged in so far
        self.cold = [True] * n
        self.reference = reference

    def add(self, task: int, seconds: float) -> None:
        if self.cold[task]:
            self.cold[task] = False
            if task != self.reference:
                # A task's first call here is cold (imports, first-use setup such as the JPEG
                # encoder's tables): with few samples, as in a probe, it would dominate the
                # average. The reference task is always running: its first sample is kept.
                return
        self.samples[task] += 1
        # The plain mean until there are 1/ALPHA samples, then exponential smoothing.
        weight = max(ALPHA, 1 / self.samples[task])
        old = self.value[task]
        self.value[task] = seconds if math.isnan(old) else old + weight * (seconds - old)
        self.ref_at[task] = self.value[self.reference]

    def estimates(self) -> tuple[float, ...]:
        ref_now = self.value[self.reference]
        out = []
        for value, ref_then in zip(self.value, self.ref_at, strict=True):
            drift = ref_now / ref_then if ref_then > 0 and not math.isnan(ref_now) else 1.0
            # Bounded: one noisy reference sample must not rescale everything tenfold.
            out.append(value * min(MAX_DRIFT, max(1 / MAX_DRIFT, drift)))
        return tuple(out)


def _smooth(values: list[float], index: int, sample: float) -> None:
    old = values[index]
    values[index] = sample if math.isnan(old) else old + ALPHA * (sample - old)


class Telemetry:
    def __init__(
        self,
        tasks: int,
        window: int,
        workers: int = 1,
        serial: frozenset[int] = frozenset(),
        codecs: tuple[str, ...] = (),
    ) -> None:
        self.tasks = tasks
        self.window = window
        self.workers = workers
        self.serial = tuple(sorted(serial))
        self._workers: Callable[[], WorkerStats] | None = None
        self._worker_stats = WorkerStats()
        self._parallelism = UNKNOWN
        self._lock = threading.Lock()
        # Per codec the device may use: ratio and compression seconds per cut, smoothed.
        self._codecs = {name: ([UNKNOWN] * (tasks + 1), [UNKNOWN] * (tasks + 1)) for name in codecs}
        self._saved = [0] * (tasks + 1)  # bytes the codec in use removed from the latest item
        self._device = _Ewma(tasks, reference=0)
        self._server = _Ewma(tasks, reference=tasks - 1)
        self._cuts = [UNKNOWN] * (tasks + 1)
        self._bandwidth: deque[float] = deque(maxlen=_LINK_SAMPLES)
        self._rtt: deque[float] = deque(maxlen=_LINK_SAMPLES)
        # Server arrival minus device send time: a constant clock offset plus the time in transit.
        self._transit: deque[float] = deque(maxlen=_TRANSIT_SAMPLES)
        self._previous: tuple[int, float, float] | None = None  # item, sent, server arrival
        # The latest message's bytes so far (a batch's items share their arrival time), and
        # whether it made a bandwidth sample (the latest), over which gap.
        self._message_bytes = 0
        self._message_sampled = False
        self._message_gap = 0.0
        self._completed = 0
        self._finished = 0
        self._period_finished = 0
        self._process = psutil.Process()
        psutil.cpu_percent(None)  # the first call only starts the measurement

    def watch(self, workers: Callable[[], WorkerStats] | None) -> None:
        """Read the device workers' counters at each snapshot (None: one worker)."""
        self._workers = workers

    def _learn_parallelism(self, period_seconds: float) -> None:  # holds the lock
        """Items the workers ran at once, on average, over a period in which they were the
        device's bottleneck: their busy seconds per second (Little's law). With task times
        measured on the workers as they run together (contention for the cores and the GIL is
        in them), parallelism / (time per item) is the device's measured rate, not N times the
        rate of one worker. Turns at a stateful task and an idle worker lower it."""
        if self._workers is None or period_seconds <= 0:
            return
        now, before = self._workers(), self._worker_stats
        self._worker_stats = now
        waited = (now.slot_wait_seconds - before.slot_wait_seconds) / period_seconds
        handing = (now.hand_over_seconds - before.hand_over_seconds) / period_seconds
        if now.items - before.items < self.workers or waited < SATURATED or handing >= SATURATED:
            return
        busy = (now.busy_seconds - before.busy_seconds) / period_seconds
        sample = min(float(self.workers), max(1.0, busy))
        old = self._parallelism
        self._parallelism = sample if math.isnan(old) else old + 0.5 * (sample - old)

    def device_times(self, item: int, timings: list[tuple[int, float]]) -> None:
        if item < WARMUP_ITEMS:
            return
        with self._lock:
            for task, seconds in timings:
                self._device.add(task, seconds)

    def cut_size(self, cut: int, size: int) -> None:
        """An item cut after task ``cut - 1`` takes ``size`` bytes on the wire (before any
        compression: what the codec in use removed from the item is added back)."""
        with self._lock:
            _smooth(self._cuts, cut, size + self._saved[cut])
            self._saved[cut] = 0

    def compression(self, cut: int, codec: str, raw: int, wire: int, seconds: float) -> None:
        """Compressing an item cut after task ``cut - 1`` with ``codec`` took ``seconds`` and
        made ``raw`` serialised bytes ``wire``."""
        with self._lock:
            costs = self._codecs.get(codec)
            if costs is None:
                return
            _smooth(costs[0], cut, raw / max(wire, 1))
            _smooth(costs[1], cut, seconds)

    def compressed(self, cut: int, saved: int) -> None:
        """The item about to be sent at ``cut`` is ``saved`` bytes smaller for its codec."""
        with self._lock:
            self._saved[cut] = saved

    def answer(
        self,
        item: int,
        size_up: int,
        sent: float,
        received: float,
        server_arrival: float,
        server_seconds: float,
        timings: list[tuple[int, float]],
    ) -> None:
        """An answer to an item of ``size_up`` bytes sent at ``sent`` and answered at ``received``
        (device clock); ``server_arrival`` is on the server's clock, comparable only to itself."""
        with self._lock:
            if item >= WARMUP_ITEMS:
                for task, seconds in timings:
                    self._server.add(task, seconds)
            previous, self._previous = self._previous, (item, sent, server_arrival)
            if server_arrival > 0:
                self._transit.append(server_arrival - sent)
            follows = previous is not None and previous[0] == item - 1 and server_arrival > 0
            if follows and previous is not None and server_arrival == previous[2]:
                # In the same message (a batch) as the item before: the link carried their bytes
                # together, so the message's sample, if it made one, counts them all.
                self._message_bytes += size_up
                if self._message_sampled:
                    self._bandwidth[-1] = self._message_bytes / self._message_gap
            elif follows and previous is not None:
                self._message_bytes, self._message_sampled = size_up, False
                send_gap = sent - previous[1]
                arrival_gap = server_arrival - previous[2]
                # Packet-pair dispersion: when an item was sent while the one before it was still
                # queued in the link (in transit longer than the least transit seen, by more than
                # the gap between the two sends), the link spaced their arrivals by this item's
                # transmission time. Pairs the link never queued only measure how fast the device
                # sent, plus scheduling jitter: they would read an idle link as a saturated one.
                spread = arrival_gap > send_gap and arrival_gap > 0  # cheap: checked first
                if spread and previous[2] - previous[1] - min(self._transit) > send_gap:
                    self._bandwidth.append(size_up / arrival_gap)
                    self._message_sampled, self._message_gap = True, arrival_gap
            else:
                self._message_bytes, self._message_sampled = size_up, False
            bandwidth = self._bandwidth_estimate()
            transmit = size_up / bandwidth if bandwidth else 0.0
            self._rtt.append(max(0.0, received - sent - server_seconds - transmit))

    def _bandwidth_estimate(self) -> float | None:
        if not self._bandwidth:
            return None
        # A high percentile: congestion and scheduling noise only ever make gaps longer.
        ordered = sorted(self._bandwidth)
        return ordered[min(len(ordered) - 1, int(0.8 * len(ordered)))]

    def finished(self, completed: bool) -> None:
        with self._lock:
            self._finished += 1
            self._period_finished += 1
            if completed:
                self._completed += 1

    @property
    def finished_items(self) -> int:
        """Items finished so far: answered, completed or filtered on the device, or failed."""
        return self._finished

    def snapshot(self, split: int, period_seconds: float, settled: bool) -> Measurements:
        """Measurements for the policy; starts a new period.

        ``throughput`` is the rate of completed items the split sustains: items finished in the
        period times the share of all items so far that completed.
        """
        with self._lock:
            fraction = self._completed / self._finished if self._finished else 1.0
            # Items finished per period, times the long-run share that completes: how many of a
            # period's items a filter drops depends on the data (a ball out of view for a few
            # frames), not on the split, and must not read as the split being slow.
            finished = self._period_finished / period_seconds if period_seconds > 0 else 0.0
            throughput = finished * fraction
            self._period_finished = 0
            self._learn_parallelism(period_seconds)
            return Measurements(
                split=split,
                device_seconds=self._device.estimates(),
                server_seconds=self._server.estimates(),
                cut_bytes=tuple(self._cuts),
                bandwidth=self._bandwidth_estimate(),
                rtt=min(self._rtt) if self._rtt else 0.0,
                window=self.window,
                throughput=throughput,
                completed_fraction=max(fraction, 0.01),
                settled=settled,
                device_cpu_percent=psutil.cpu_percent(None),
                device_memory_percent=self._process.memory_percent(),
                device_workers=self.workers,
                device_parallelism=self._parallelism,
                serial_tasks=self.serial,
                codecs=tuple(
                    CodecCost(name, tuple(ratio), tuple(seconds))
                    for name, (ratio, seconds) in self._codecs.items()
                ),
            )
