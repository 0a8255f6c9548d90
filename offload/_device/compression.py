"""``--compression auto`` at a fixed split: the codec re-chosen each control period.

A codec pays only where the link is the bottleneck; elsewhere (loopback, a LAN) it costs the
device CPU for nothing. The model (``scheduler.fastest_codec``) says which, but its bandwidth
comes from packet pairs, which a busy server (its reader waiting for the GIL) can fake: so each
codec's prediction is checked by a period measured with it, and a choice between measured codecs
follows the measurements (each over a period that starts once the items sent the old way have
finished). It starts with the best installed codec: a slow link is where it matters, and the
first window the most expensive thing to send plain there. Measurements older than
``FRESH_PERIODS`` are measured again (the link may have changed). Told the time by its caller,
like ``AutoSplit``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from .._codec import CODEC_NAMES, Codec, compressions
from .._logging import quote
from .scheduler import CODEC_MARGIN, NO_CODEC, Measurements, fastest_codec
from .telemetry import Telemetry

log = logging.getLogger("offload.client")

# The first decision comes once this many items have finished, if before the period: their
# answers carry the link's samples, and a short run on a fast link should not pay for a codec
# it does not need.
FIRST_DECISION_ITEMS = 24
FRESH_PERIODS = 150  # periods a codec's measured rate is trusted for (5 minutes by default)


class AutoCompression:
    """The codecs wanted for the next item at ``split``; the changes, and why, for the report."""

    def __init__(self, telemetry: Telemetry, split: int, period: float) -> None:
        """``--compression auto`` with a codec installed (else there is nothing to choose)."""
        self.telemetry = telemetry
        self.split = split
        self.period = period
        self.codecs = {CODEC_NAMES[c]: c for c in compressions("auto")}
        # Wanted for the next item, best first (the first the server reads is used).
        self.wanted: tuple[Codec, ...] = tuple(self.codecs.values())
        self.changes: list[dict[str, Any]] = []
        self._measured: dict[str, tuple[float, int]] = {}  # codec: (items/s, period)
        self._periods = 0
        self._origin: float | None = None
        self._period_start = 0.0
        self._settling: int | None = None  # after a change: finished items to wait for

    @property
    def name(self) -> str:
        return CODEC_NAMES[self.wanted[0]] if self.wanted else NO_CODEC

    def codec_for(self, item: int, now: float) -> tuple[Codec, ...]:
        """The codecs wanted for ``item``, captured at ``now``: new ones if a decision is due."""
        if self._origin is None:
            self._origin = self._period_start = now
            return self.wanted
        if self._settling is not None:  # until the items sent the old way have finished
            if self.telemetry.finished_items < self._settling:
                return self.wanted
            self._settling = None
            self.telemetry.snapshot(self.split, now - self._period_start, False)
            self._period_start = now  # the period measured starts now
            return self.wanted
        first = not self._periods and self.telemetry.finished_items >= FIRST_DECISION_ITEMS
        if not first and now - self._period_start < self.period:
            return self.wanted
        m = self.telemetry.snapshot(self.split, now - self._period_start, True)
        self._period_start = now
        self._periods += 1
        if not math.isnan(m.throughput):
            self._measured[self.name] = (m.throughput, self._periods)
        codec, reason = self._choose(m)
        if codec != self.name:
            log.info("event=codec old=%s new=%s reason=%s", self.name, codec, quote(reason))
            at = round(now - self._origin, 3)
            self.changes.append({"seconds": at, "codec": codec, "reason": reason})
            chosen = self.codecs.get(codec)
            self.wanted = () if chosen is None else (chosen,)
            self._settling = item  # the items captured before this one
        return self.wanted

    def _choose(self, m: Measurements) -> tuple[str, str]:
        fresh = {
            name: rate
            for name, (rate, period) in self._measured.items()
            if self._periods - period < FRESH_PERIODS
        }
        codecs = [name for name in fresh if name != NO_CODEC]
        if NO_CODEC in fresh and codecs:
            best = max(codecs, key=lambda name: fresh[name])
            plain, packed = fresh[NO_CODEC], fresh[best]
            said = f"measured {plain:.1f}/s without compression, {packed:.1f}/s with {best}"
            return (NO_CODEC if plain >= packed * (1 - CODEC_MARGIN) else best), said
        if self.name != NO_CODEC:
            return NO_CODEC, (
                f"a period without compression, to measure it against "
                f"{fresh.get(self.name, m.throughput):.1f}/s with {self.name}"
            )
        predicted = fastest_codec(m, self.split)
        if math.isnan(predicted.throughput):
            return self.name, ""
        return predicted.codec, (
            f"predicted {predicted.throughput:.1f}/s with {predicted.codec} "
            f"({predicted.bottleneck}-bound); measured {m.throughput:.1f}/s without"
        )
