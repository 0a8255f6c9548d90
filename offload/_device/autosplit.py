"""Automatic mode: which split each item runs at, asking the policy once a control period.

Told the time by its caller (no clock here), so it runs as well under a test's script as under
the capture loop. What it says goes through logging only, never to the terminal directly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .._codec import CODEC_NAMES, Codec, compression_cost, compressions, encode
from .._config import ClientConfig, Limits
from .._logging import quote
from .._pipeline import Pipeline
from ..exceptions import ConfigError
from .scheduler import Decision, SplitPolicy
from .telemetry import Telemetry

log = logging.getLogger("offload.client")

SIZE_SAMPLE_EVERY = 10  # items between measurements of every cut's size


def check_auto(pipeline: Pipeline, config: ClientConfig) -> None:
    """Refuse automatic mode with a starting split that does not use the server."""
    n = len(pipeline.tasks)
    if config.fps is None:
        return
    if config.local_tasks is not None and not 1 <= config.local_tasks <= n - 1:
        raise ConfigError(
            f"--fps needs a starting split that uses the server: --local-tasks 1..{n - 1} "
            f"(got {config.local_tasks}). Tasks of {pipeline.name}: {pipeline.describe()}"
        )


def starting_split(pipeline: Pipeline, config: ClientConfig) -> int:
    """``--local-tasks``; in automatic mode without it, N-1: the most work on the device."""
    n = len(pipeline.tasks)
    if config.local_tasks is not None:
        return config.local_tasks
    return n - 1 if config.fps is not None else n


class AutoSplit:
    """Asks ``policy`` for the split when a period is over, and keeps what it chose and why.

    ``now`` is any monotonic clock in seconds (the client gives ``time.perf_counter()``); the
    first call starts the first period and the clock of ``history`` and ``periods``.
    """

    def __init__(
        self,
        policy: SplitPolicy,
        telemetry: Telemetry,
        config: ClientConfig,
        split: int,
        on_linger: Callable[[float], None] | None = None,
    ) -> None:
        assert config.fps is not None, "automatic mode needs a target (--fps)"
        self.policy = policy
        self.telemetry = telemetry
        self.target = config.fps
        self.control_period = config.control_period
        self.split = split  # tasks run on the device for the next item
        # The codecs the policy may choose among (besides none): --compression auto, all those
        # installed; a named one, that one alone; none, none.
        self.codecs: tuple[Codec, ...] = compressions(config.compression)
        self.codec: Codec | None = self.codecs[0] if self.codecs else None  # until it chooses
        # The linger (seconds) in use; the policy chooses it unless --linger-ms was given, and
        # ``on_linger`` (the transport) is told each new one.
        self.chooses_linger = config.linger_ms is None
        self.linger = (config.linger_ms or 0.0) / 1000
        self.on_linger = on_linger
        self._batch = (
            min(config.batch_items, config.window),
            min(config.batch_bytes, config.limits.max_message_bytes),
        )
        self.history: list[dict[str, Any]] = []  # each change of split, and why
        self.reason = ""  # why the latest decision chose the split and codec in use
        self.periods: list[dict[str, Any]] = []  # each decision's period, as measured
        self._origin: float | None = None
        self._period_start = 0.0
        # A probe holds its split until its items have finished (their answers carry the server
        # times and link samples it is for), or two control periods at most.
        self._hold: tuple[int, float] | None = None  # (finished items, deadline)
        self._settled = True  # the period now running ran at one split and codec throughout
        # The first item captured after the latest change of split or codec: until every item
        # before it has finished (a window of them may be queued in a slow link), what finishes
        # in a period is partly theirs, and no period is settled.
        self._changed_at = 0
        self._infeasible_streak = 0
        self._said_infeasible = False

    def split_for(self, item: int, now: float) -> int:
        """The split to run ``item`` at, captured at ``now``: a new one if a decision is due."""
        if self._origin is None:
            self._origin = self._period_start = now
        if self._hold is not None:
            due = self.telemetry.finished_items >= self._hold[0] or now >= self._hold[1]
        else:
            due = now - self._period_start >= self.control_period
        if due:
            decision = self._decide(now)
            before = (self.split, self.codec)
            self.apply(decision, now)
            changed = (self.split, self.codec) != before
            if changed:
                self._changed_at = item
            self._settled = not changed and self.telemetry.finished_items >= self._changed_at
            self._period_start = now
            self._hold = (
                (item + decision.hold_items, now + 2 * self.control_period)
                if decision.hold_items is not None
                else None
            )
        return self.split

    def size_sampler(self, item: int, limits: Limits) -> Callable[[int, Any], None] | None:
        """What notes the size of every cut ``item`` makes, if it measures them (now and then,
        and throughout a probe); None if it does not."""
        if item % SIZE_SAMPLE_EVERY and self._hold is None:
            return None

        def sample(index: int, value: Any) -> None:
            cut = index + 1
            if cut < self.split:
                # The cut in use is measured exactly when sent; the others cost one encode.
                raw = encode(value, limits).SerializeToString()
                self.telemetry.cut_size(cut, len(raw))
                self.sample_codecs(cut, raw)

        return sample

    def sample_codecs(self, cut: int, raw: bytes, but: Codec | None = None) -> None:
        """Note what each codec (``but`` the one just measured for real) would do at ``cut``."""
        for codec in self.codecs:
            if codec != but:
                ratio, seconds = compression_cost(raw, codec)
                self.telemetry.compression(
                    cut, CODEC_NAMES[codec], len(raw), round(len(raw) / ratio), seconds
                )

    def _decide(self, now: float) -> Decision:
        measurements = replace(
            self.telemetry.snapshot(self.split, now - self._period_start, self._settled),
            batch_items=self._batch[0],
            batch_bytes=self._batch[1],
            linger=None if self.chooses_linger else self.linger,
            codec=self._codec_name(),
        )
        decision = self.policy.decide(measurements)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("event=measurements measurements=%s", quote(measurements))
            for p in decision.predictions:
                log.debug(
                    "event=prediction split=%d rate=%.2f bottleneck=%s rates=%s",
                    p.split,
                    p.throughput,
                    p.bottleneck,
                    quote(p.rates),
                )
        self.periods.append(
            {
                "seconds": self._seconds(now),
                "split": self.split,
                "codec": self._codec_name(),
                "linger_ms": self._linger_ms(),
                "throughput_per_second": round(measurements.throughput, 3),
                "settled": self._settled,
                "device_cpu_percent": measurements.device_cpu_percent,
                "device_memory_percent": round(measurements.device_memory_percent, 2),
                # Items the device's workers were measured to run at once (None: not yet).
                "device_parallelism": None
                if math.isnan(measurements.device_parallelism)
                else round(measurements.device_parallelism, 2),
            }
        )
        return decision

    def apply(self, decision: Decision, now: float) -> None:
        """Take ``decision``: its split, its codec, its linger, and what it says of the target."""
        self.reason = decision.reason
        changed = False  # the codec or the linger, for the history
        if decision.codec is not None:
            codec = next((c for c in self.codecs if CODEC_NAMES[c] == decision.codec), None)
            if codec != self.codec:
                log.info(
                    "event=codec old=%s new=%s split=%d reason=%s",
                    self._codec_name(),
                    decision.codec,
                    decision.split,
                    quote(decision.reason),
                )
                self.codec = codec
                changed = True
        if self.chooses_linger and decision.linger is not None and decision.linger != self.linger:
            log.info(
                "event=linger old_ms=%g new_ms=%g split=%d reason=%s",
                self._linger_ms(),
                decision.linger * 1000,
                decision.split,
                quote(decision.reason),
            )
            self.linger = decision.linger
            if self.on_linger is not None:
                self.on_linger(self.linger)
            changed = True
        if changed and decision.split == self.split:
            self._note(now, decision)
        # Said once, and only when two decisions in a row agree: one noisy period is no verdict.
        # Withdrawn, once, when a decision expects the target met again.
        self._infeasible_streak = self._infeasible_streak + 1 if decision.infeasible else 0
        said = self._said_infeasible
        if self._infeasible_streak >= 2 and not said:
            self._said_infeasible = True
            self._say_target("target-unreachable", "no split meets the target", decision)
        elif said and not decision.infeasible and not math.isnan(decision.rate):  # (no probe)
            self._said_infeasible = False
            met = "met again" if decision.measured else "expected to be met again"
            self._say_target("target-met", f"target {met} at K={decision.split}", decision)
        if decision.split == self.split:
            return
        n = self.telemetry.tasks
        if not 1 <= decision.split <= n - 1:
            raise ConfigError(
                f"the split policy chose {decision.split}; automatic mode keeps it in "
                f"1..{n - 1} (task 0 on the device, the last on the server)"
            )
        log.info(
            "event=split old=%d new=%d reason=%s",
            self.split,
            decision.split,
            quote(decision.reason),
        )
        self._note(now, decision)
        self.split = decision.split

    def _note(self, now: float, decision: Decision) -> None:
        """A change in the history: of the split, the codec or the linger, and why."""
        self.history.append(
            {
                "seconds": self._seconds(now),
                "from": self.split,
                "to": decision.split,
                "codec": self._codec_name(),
                "linger_ms": self._linger_ms(),
                "reason": decision.reason,
            }
        )

    def _linger_ms(self) -> float:
        return round(self.linger * 1000, 3)

    def _codec_name(self) -> str:
        return "none" if self.codec is None else CODEC_NAMES[self.codec]

    def _seconds(self, now: float) -> float:
        return round(now - (self._origin if self._origin is not None else now), 3)

    def _say_target(self, event: str, message: str, decision: Decision) -> None:
        log.warning(
            "event=%s target=%g split=%d rate=%s basis=%s msg=%s reason=%s",
            event,
            self.target,
            decision.split,
            f"{decision.rate:.1f}",
            "measured" if decision.measured else "predicted",
            quote(message),
            quote(decision.reason),
        )

    def report(self) -> dict[str, Any]:
        """The report's ``scheduler`` section."""
        return {
            "target_per_second": self.target,
            "control_period_seconds": self.control_period,
            "final_split": self.split,
            "final_codec": self._codec_name(),
            "final_linger_ms": self._linger_ms(),
            "final_reason": self.reason,
            "history": self.history,
            "periods": self.periods,
        }
