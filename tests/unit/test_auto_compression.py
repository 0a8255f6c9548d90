"""``--compression auto`` at a fixed split (offload/_device/compression.py) on scripted
measurements: what it predicts, it measures; between measured codecs, the measurements rule."""

from __future__ import annotations

import math

from offload._device.compression import FIRST_DECISION_ITEMS, FRESH_PERIODS, AutoCompression
from offload._device.scheduler import CodecCost, Measurements
from offload._device.telemetry import Telemetry

NAN = math.nan


class Scripted(Telemetry):
    """Every period measures ``rates[codec in use]`` items/s of 40 kB frames that zstd shrinks
    250x; ``bandwidth`` as the packet pairs measured it."""

    def __init__(self, rates: dict[str, float], bandwidth: float) -> None:
        super().__init__(3, 8, 1, frozenset(), ("zstd",))
        self.rates = rates
        self.bandwidth = bandwidth
        self.codec = "zstd"
        self.done = 0

    @property
    def finished_items(self) -> int:
        return self.done

    def snapshot(self, split: int, period_seconds: float, settled: bool) -> Measurements:
        return Measurements(
            split=split,
            device_seconds=(0.001, NAN, NAN),
            server_seconds=(NAN, 0.003, 0.0001),
            cut_bytes=(NAN, 40_000, NAN),
            bandwidth=self.bandwidth,
            rtt=0.001,
            window=8,
            throughput=self.rates[self.codec],
            codecs=(CodecCost("zstd", (NAN, 250.0, NAN), (NAN, 0.0002, NAN)),),
        )


FALSE = 80_000  # B/s: 2 frames a second plain, 500 compressed; a busy server spacing arrivals


def run(
    rates: dict[str, float], periods: int, bandwidth: float = FALSE
) -> tuple[AutoCompression, list[str]]:
    """One item captured a second, all finished by the next; the codec of every period."""
    telemetry = Scripted(rates, bandwidth)
    auto = AutoCompression(telemetry, 1, period=1.0)
    used = []
    for second in range(periods + 1):
        auto.codec_for(second, float(second))
        telemetry.codec = auto.name
        used.append(auto.name)
        telemetry.done = second + 1 + FIRST_DECISION_ITEMS * (second > 0)
    return auto, used


def test_compression_auto_keeps_none_where_it_measures_as_fast_whatever_the_model_says() -> None:
    auto, used = run({"zstd": 300.0, "none": 290.0}, 20)
    assert used[-1] == "none", auto.changes
    assert [c["codec"] for c in auto.changes] == ["none"]  # measured, never sent back


def test_compression_auto_goes_back_to_the_codec_that_measured_faster() -> None:
    auto, used = run({"zstd": 100.0, "none": 6.0}, 20)
    assert [c["codec"] for c in auto.changes] == ["none", "zstd"], auto.changes
    assert "measured 6.0/s without compression, 100.0/s with zstd" in auto.changes[-1]["reason"]
    assert used[-5:] == ["zstd"] * 5


def test_a_codecs_measured_rate_is_measured_again_once_it_is_old() -> None:
    auto, _ = run({"zstd": 100.0, "none": 6.0}, FRESH_PERIODS + 10)
    assert [c["codec"] for c in auto.changes] == ["none", "zstd", "none", "zstd"], auto.changes
