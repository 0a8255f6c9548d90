"""What the device measures for the scheduler: task times that are not fooled by cold calls."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from offload._device.telemetry import WARMUP_ITEMS, Telemetry
from offload._device.workers import WorkerStats


def device_seconds(telemetry: Telemetry) -> tuple[float, ...]:
    return telemetry.snapshot(split=1, period_seconds=1.0, settled=True).device_seconds


def test_a_tasks_first_call_is_not_taken_as_typical() -> None:
    telemetry = Telemetry(tasks=3, window=8)
    item = WARMUP_ITEMS
    # Task 1's first call pays for first-use setup (3x); its later calls are 10 ms.
    telemetry.device_times(item, [(0, 0.005), (1, 0.030)])
    assert math.isnan(device_seconds(telemetry)[1])
    for n in range(1, 4):
        telemetry.device_times(item + n, [(0, 0.005), (1, 0.010)])
    assert device_seconds(telemetry)[1] == pytest.approx(0.010)
    # The reference task (0) is always measured: its first sample counts.
    assert device_seconds(telemetry)[0] == pytest.approx(0.005)


def test_few_samples_are_averaged_plainly_then_smoothed() -> None:
    telemetry = Telemetry(tasks=2, window=8)
    samples = [0.010, 0.020, 0.030]
    for n, seconds in enumerate(samples):
        telemetry.device_times(WARMUP_ITEMS + n, [(0, seconds)])
    assert device_seconds(telemetry)[0] == pytest.approx(0.020)  # the mean, not 0.010-heavy
    for n in range(3, 60):
        telemetry.device_times(WARMUP_ITEMS + n, [(0, 0.040)])
    assert device_seconds(telemetry)[0] == pytest.approx(0.040, rel=1e-3)


def link_estimate(
    *,
    items: int,
    size: int,
    bandwidth: float,
    device_interval: float,
    window: int,
    rtt: float = 0.030,
    jitter: float = 0.0,
) -> float | None:
    """A device offering an item every ``device_interval`` s, at most ``window`` in flight, over
    a FIFO link of ``bandwidth`` bytes/s; the server's arrival stamps run 100 s ahead of the
    device's clock and are late by up to ``jitter`` s (a busy server thread). Returns the
    bandwidth the device's telemetry estimates."""
    telemetry = Telemetry(tasks=3, window=window)
    late = random.Random(7)
    link_free = 0.0
    answered_at: list[float] = []
    for item in range(items):
        sent = item * device_interval
        if item >= window:
            sent = max(sent, answered_at[item - window])
        start = max(sent + rtt / 2, link_free)
        link_free = start + size / bandwidth
        arrival = link_free + late.uniform(0, jitter)
        received = arrival + 0.002 + rtt / 2
        answered_at.append(received)
        telemetry.answer(item, size, sent, received, 100.0 + arrival, 0.002, [])
    return telemetry.snapshot(split=1, period_seconds=1.0, settled=True).bandwidth


def test_an_idle_link_is_not_read_as_a_saturated_one() -> None:
    # 560 kB items take 22 ms on a 25 MB/s link; the device sends one every 50 ms. Arrival
    # stamps late by up to 15 ms make many arrival gaps exceed their send gaps by 20 %: the
    # old estimator read the sending rate (~10 MB/s) as the link's.
    estimate = link_estimate(
        items=200, size=560_000, bandwidth=25e6, device_interval=0.050, window=4, jitter=0.015
    )
    assert estimate is None


def test_a_link_that_queues_items_is_measured() -> None:
    # A 2.5 MB/s link carries a 560 kB item in 224 ms; the device could send every 50 ms, so
    # items queue and the window's credits pace the sender at the link's rate.
    estimate = link_estimate(
        items=60, size=560_000, bandwidth=2.5e6, device_interval=0.050, window=4, jitter=0.005
    )
    assert estimate is not None
    assert estimate == pytest.approx(2.5e6, rel=0.05)


def test_a_link_that_carries_batches_is_measured_by_their_bytes() -> None:
    # Messages of 4 items of 140 kB on a 2.5 MB/s link: a message takes 224 ms, and its items
    # arrive together. The items of a message are one sample of 560 kB, not four of 140 kB
    # (which would read the link as four times slower than it is).
    telemetry = Telemetry(tasks=3, window=8)
    size, bandwidth, rtt, batch = 140_000, 2.5e6, 0.010, 4
    link_free = 0.0
    for message in range(30):
        first = message * batch
        sent = [max(0.0, (first + i) * 0.01) for i in range(batch)]
        link_free = max(sent[-1] + rtt / 2, link_free) + batch * size / bandwidth
        for i in range(batch):
            received = link_free + 0.002 + rtt / 2
            telemetry.answer(first + i, size, sent[i], received, 100.0 + link_free, 0.002, [])
    estimate = telemetry.snapshot(split=1, period_seconds=1.0, settled=True).bandwidth
    assert estimate == pytest.approx(bandwidth, rel=0.05)


def test_the_workers_parallelism_is_learned_only_while_they_are_the_bottleneck() -> None:
    stats = WorkerStats()
    telemetry = Telemetry(tasks=3, window=8, workers=2)
    telemetry.watch(lambda: dataclasses.replace(stats))  # a copy, as DeviceWorkers.busy gives

    def period(busy: float, slot_wait: float, hand_over: float) -> float:
        stats.busy_seconds += busy
        stats.slot_wait_seconds += slot_wait
        stats.hand_over_seconds += hand_over
        stats.items += 10
        return telemetry.snapshot(1, 1.0, True).device_parallelism

    assert math.isnan(period(busy=1.9, slot_wait=0.05, hand_over=0.0))  # capture was the limit
    assert math.isnan(period(busy=1.9, slot_wait=0.5, hand_over=0.5))  # the link's window was
    assert period(busy=1.6, slot_wait=0.5, hand_over=0.0) == pytest.approx(1.6)
    assert period(busy=1.9, slot_wait=0.5, hand_over=0.0) == pytest.approx(1.75)  # smoothed
    assert period(busy=2.4, slot_wait=0.5, hand_over=0.0) <= 2.0  # never more than the workers
