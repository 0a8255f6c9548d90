"""What the device measures for the scheduler: task times that are not fooled by cold calls."""

from __future__ import annotations

import math

import pytest

from offload._telemetry import WARMUP_ITEMS, Telemetry


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
