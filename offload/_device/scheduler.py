"""Choosing the split: a pure policy, measurements in, decision out (no I/O, no clocks).

The model (Neurosurgeon-like, re-decided continuously like Odessa): items are pipelined, so the
throughput of split K is bounded by the slowest of

* the device:  1 / (sum of device times of tasks [0, K)); with N device workers, task 0 runs on
  its own thread and tasks [1, K) for P items at once, P the parallelism measured (1 until
  measured, at most N), and each stateful task for one item at a time:
  1 / max(time of task 0, (sum of times of tasks [1, K)) / P, time of each stateful task),
* the link:    bandwidth / (bytes an item carries when cut after task K-1),
* the server:  workers / (sum of server times of tasks [K, N)),
* the window:  W / (time one item holds a credit: RTT + transmission + server time + linger).

The policy picks the **largest** K (most work on the device, least cloud cost) whose predicted
throughput of completed items meets the target with a margin, in either direction, with
hysteresis so it does not flap. Replace it with any object that has ``decide``.

Compression at the cut is part of the choice: each codec the device may use has a measured
ratio and device CPU cost per cut (``CodecCost``); at each K the model takes the cheapest codec
(least CPU, none first) that meets the target, else the one predicted fastest. A compressed
item costs the device its compression and carries ``cut / ratio`` bytes.

So is the batch, unless the user fixed ``--linger-ms``: with the split and codec chosen, the
policy lingers as long as the window allows at the target (``choose_linger``), up to a latency
cap, so that messages carry several items and the cloud's CPU per item falls; lingering holds
an item's credit longer and changes no other bound.
"""

from __future__ import annotations

import math
from collections.abc import Container
from dataclasses import dataclass, field, replace
from typing import Protocol

UNKNOWN = math.nan


@dataclass(frozen=True)
class CodecCost:
    """One codec at every cut: ``ratio[k]`` (serialised / compressed bytes) and ``seconds[k]``
    (device CPU to compress) for an item cut after task k-1; NaN where never measured."""

    name: str
    ratio: tuple[float, ...]
    seconds: tuple[float, ...]


NO_CODEC = "none"


@dataclass(frozen=True)
class Measurements:
    """Everything a policy may use, as plain numbers. Times are seconds, sizes bytes."""

    split: int  # K in use now
    device_seconds: tuple[float, ...]  # per task; NaN when never measured
    server_seconds: tuple[float, ...]  # per task; NaN when never measured
    cut_bytes: tuple[float, ...]  # [k]: bytes per item cut after task k-1 (k = 1..N-1); NaN unknown
    bandwidth: float | None  # bytes/s device -> server; None: never seen the link saturate
    rtt: float  # round trip without transmission
    window: int  # items allowed in flight
    throughput: float  # completed items per second over the last period (NaN: no data)
    completed_fraction: float = 1.0  # completed / finished items: the rest were filtered
    settled: bool = True  # the whole last period ran at ``split``
    server_workers: int = 1  # items of one device stream the server runs at once
    device_cpu_percent: float = UNKNOWN
    device_memory_percent: float = UNKNOWN
    device_workers: int = 1  # items the device runs tasks [1, K) for at once (--device-workers)
    # Items the workers were measured to run at once while they were the bottleneck (NaN: not
    # yet measured, taken as 1): contention for the cores is in the task times measured there.
    device_parallelism: float = UNKNOWN
    serial_tasks: tuple[int, ...] = ()  # tasks run for one item at a time (@stateful, the last)
    codecs: tuple[CodecCost, ...] = ()  # the codecs the device may use besides none
    batch_items: int = 1  # items one message may carry (--batch-items, at most the window)
    batch_bytes: float = math.inf  # bytes one message of several items may carry
    # Seconds a message waits for more items (--linger-ms); None: the policy chooses it.
    linger: float | None = 0.0
    codec: str = NO_CODEC  # compression at the cut in use at ``split``: what ``throughput`` ran

    @property
    def tasks(self) -> int:
        return len(self.device_seconds)


@dataclass(frozen=True)
class Prediction:
    split: int
    throughput: float  # completed items per second
    bottleneck: str  # device, link, server or window
    rates: dict[str, float] = field(default_factory=dict)  # items per second per resource
    codec: str = NO_CODEC  # compression at the cut this prediction assumes


@dataclass(frozen=True)
class Decision:
    split: int
    reason: str  # quotes the figures it used, each saying whether it was measured or predicted
    predictions: tuple[Prediction, ...] = ()
    infeasible: bool = False  # no split is expected to meet the target
    hold_items: int | None = None  # decide once this many items at it finished, not per period
    rate: float = math.nan  # completed items/s the policy expects at ``split`` (NaN: no figure)
    measured: bool = False  # ``rate`` was measured at ``split`` (recently), not predicted
    codec: str | None = None  # compression at the cut; None: the policy does not choose it
    linger: float | None = None  # seconds a message waits for more; None: not chosen here


class SplitPolicy(Protocol):
    """What the client asks every control period. Must be pure: no I/O, no sleeping."""

    def decide(self, m: Measurements) -> Decision: ...


def predict(m: Measurements, k: int, codec: CodecCost | None = None) -> Prediction:
    """Predicted throughput of completed items at split ``k`` (tasks [0, k) on the device),
    sending its cut compressed with ``codec`` (None: as it is)."""
    device = _device_seconds(m, k)
    server = sum(m.server_seconds[k:])
    cut = m.cut_bytes[k] if k < m.tasks else 0.0
    if codec is not None and k < m.tasks:
        device += codec.seconds[k]
        cut /= codec.ratio[k]
    transmit = cut / m.bandwidth if m.bandwidth else 0.0
    rates = {
        "device": 1 / device if device > 0 else math.inf,
        "link": 1 / transmit if transmit > 0 else math.inf,
        "server": m.server_workers / server if server > 0 else math.inf,
        "window": m.window / (m.rtt + transmit + server + (m.linger or 0.0))
        if k < m.tasks
        else math.inf,
    }
    bottleneck = min(rates, key=lambda name: rates[name])
    name = codec.name if codec is not None else NO_CODEC
    return Prediction(k, rates[bottleneck] * m.completed_fraction, bottleneck, rates, name)


def predict_cheapest(m: Measurements, k: int, target: float) -> Prediction:
    """At split ``k``: the prediction with the cheapest codec (none, then by CPU) that meets
    ``target``, else the fastest; codecs never measured at this cut are no choice."""
    plain = predict(m, k)
    if k >= m.tasks:
        return plain
    known = [c for c in m.codecs if not math.isnan(c.ratio[k] + c.seconds[k])]
    options = [plain] + [predict(m, k, c) for c in sorted(known, key=lambda c: c.seconds[k])]
    meeting = [p for p in options if p.throughput >= target]
    if meeting:
        return meeting[0]
    return max(options, key=lambda p: (round(p.throughput, 6), -options.index(p)))


LINGER_CAP = 0.025  # seconds: the most latency lingering may add to an item
# The lingers tried below the cap: a ladder, so that the rtt's noise does not move it each period.
LINGER_STEPS = (0.010, 0.005, 0.002, 0.001)


def choose_linger(
    m: Measurements,
    p: Prediction,
    target: float,
    margin: float,
    cap: float = LINGER_CAP,
    pace: float = math.nan,
) -> tuple[float, str]:
    """The linger (seconds) for split ``p.split`` with ``p.codec``, and why.

    At ``target`` items/s a message gathers about 1 + linger * target items, so the longest
    linger helps most: up to ``cap`` or the time to fill a message at the target, whichever is
    shorter, as long as the window bound W / (credit time + linger) still meets the target with
    ``margin``; 0 when the window is the split's bottleneck. A target missed for want of another
    resource keeps the linger: the window, lingering, still allows more than the target, so
    dropping it would gain nothing but cloud CPU. ``pace``, the rate expected there (the device
    runs as fast as it can, not at the target), only says how many items a message carries.
    """
    if m.batch_items <= 1:
        return 0.0, "linger 0: one item per message (--batch-items 1)"
    if p.bottleneck == "window":
        return 0.0, "linger 0: the window is the bottleneck"
    size = m.cut_bytes[p.split] if p.split < m.tasks else math.nan
    codec = next((c for c in m.codecs if c.name == p.codec), None)
    if codec is not None:
        size /= codec.ratio[p.split]
    fits = m.batch_items if not size > 0 else int(min(m.batch_items, m.batch_bytes // size))
    if fits <= 1:
        return 0.0, f"linger 0: a message holds one item of {size / 1000:.0f} kB"
    longest = min(cap, (fits - 1) / target)
    need = target * (1 + margin)
    # The window bound is W / hold without lingering; with it, W / (hold + linger).
    hold = m.window / p.rates["window"] if p.rates.get("window", math.inf) < math.inf else 0.0
    room = m.window * m.completed_fraction / need - hold
    chosen = max((s for s in (longest, *LINGER_STEPS) if s <= min(longest, room)), default=0.0)
    if chosen <= 0:
        return 0.0, f"linger 0: the window has no room for it at {target:g}/s"
    rate = pace if pace > 0 else target
    items = min(fits, 1 + chosen * rate)
    return chosen, (
        f"linger {chosen * 1000:g} ms: the window has room at {target:g}/s "
        f"(about {items:.1f} items a message at {rate:.1f}/s)"
    )


def _device_seconds(m: Measurements, k: int) -> float:
    """Device seconds per item at split ``k``: one worker runs them in turn; several run task 0
    on the capture thread while tasks [1, k) run for P items at once (see the module doc)."""
    if m.device_workers <= 1 or any(math.isnan(t) for t in m.device_seconds[:k]):
        return sum(m.device_seconds[:k])  # (NaN if one is unknown)
    parallel = 1.0 if math.isnan(m.device_parallelism) else m.device_parallelism
    parallel = min(float(m.device_workers), max(1.0, parallel))
    serial = [m.device_seconds[t] for t in m.serial_tasks if 1 <= t < k]
    return max([m.device_seconds[0], sum(m.device_seconds[1:k]) / parallel, *serial])


def _with_carried_bandwidth(m: Measurements, observed: float | None) -> Measurements:
    """Raise a bandwidth estimate below what the link was seen to carry at the split in use.

    Packet-pair dispersion under-reads a link whose sender waits on flow control; the bytes
    items actually carried are a floor. No estimate at all stays none (the link never limited).
    """
    if m.bandwidth is None or observed is None or not 1 <= m.split < m.tasks:
        return m
    cut = m.cut_bytes[m.split]  # as serialised: compressed, the items carried fewer bytes
    in_use = next((c for c in m.codecs if c.name == m.codec), None)
    if in_use is not None:
        cut /= in_use.ratio[m.split]  # (NaN if never measured: then no floor)
    if math.isnan(cut) or m.completed_fraction <= 0:
        return m
    carried = observed / m.completed_fraction * cut  # filtered items travel too
    return replace(m, bandwidth=carried) if carried > m.bandwidth else m


def _unknown(values: tuple[float, ...], indices: range) -> list[int]:
    return [i for i in indices if math.isnan(values[i])]


class _Rates:
    """One decision's figures per split: measured where seen recently, else the model's
    prediction scaled by the efficiency learned for its bottleneck."""

    def __init__(
        self,
        m: Measurements,
        observed: float | None,
        predictions: tuple[Prediction, ...],
        recent: dict[int, float],
        efficiency: dict[str, float],
        target: float,
        margin: float,
    ) -> None:
        self.m = m
        self.observed = observed  # smoothed throughput at ``m.split`` (None: not settled)
        self.predictions = predictions
        self.by_split = {p.split: p for p in predictions}
        self.recent = recent  # split -> throughput measured there within the policy's memory
        self.efficiency = efficiency
        self.target = target
        self.margin = margin
        self.target_text = f"the {target:g}/s target"

    def measured(self, k: int) -> float | None:
        if k == self.m.split and self.observed is not None:
            return self.observed
        return self.recent.get(k)

    def expected(self, k: int) -> float:
        seen = self.measured(k)
        if seen is not None:
            return seen
        p = self.by_split[k]
        return p.throughput * self.efficiency.get(p.bottleneck, 1.0)

    def figure(self, k: int) -> str:
        codec = self.by_split[k].codec if k in self.by_split else NO_CODEC
        with_codec = f" with {codec}" if codec != NO_CODEC else ""
        if self.measured(k) is not None:
            return f"K={k}{with_codec} measured {self.expected(k):.1f}/s"
        return (
            f"K={k}{with_codec} predicted {self.expected(k):.1f}/s "
            f"({self.by_split[k].bottleneck}-bound)"
        )

    def head(self, new: int) -> str:
        return f"split {self.m.split} -> {new}" if new != self.m.split else f"split {new}"

    def margin_for(self, k: int) -> float:
        """The margin covers the model's error; a measured rate needs only half of it, against
        noise."""
        return self.margin / 2 if self.measured(k) is not None else self.margin

    def meets_target(self, k: int) -> bool:
        if k == self.m.split and self.observed is not None:
            # Hysteresis: a split is entered with a margin but kept while its measured
            # rate (smoothed over the stay) meets the target itself.
            return self.observed >= self.target
        return self.expected(k) >= self.target * (1 + self.margin_for(k))

    def decision(self, split: int, reason: str, infeasible: bool = False) -> Decision:
        rate = self.expected(split) if split in self.by_split else math.nan
        measured = self.measured(split) is not None
        chosen = self.by_split.get(split)
        codec = chosen.codec if chosen is not None and self.m.codecs else None
        return Decision(
            split, reason, self.predictions, infeasible, rate=rate, measured=measured, codec=codec
        )


def _predictions(m: Measurements, first: int, last: int, target: float) -> tuple[Prediction, ...]:
    """Splits the policy has not measured enough to predict (see ``_probe``) are no choice.
    Each with the cheapest codec that meets ``target`` (with the policy's margin)."""
    return tuple(
        p
        for k in range(first, last + 1)
        if not math.isnan((p := predict_cheapest(m, k, target)).throughput)
    )


def _choose(r: _Rates) -> tuple[int, str, bool]:
    """The split to aim for, why, and whether no split is expected to meet the target."""
    meets = [k for k in r.by_split if r.meets_target(k)]
    if meets:
        choice = max(meets)
        reason = f"{r.head(choice)}: {r.figure(choice)} meets {r.target_text}"
        if choice + 1 in r.by_split:
            reason += f"; {r.figure(choice + 1)}"
        return choice, reason, False
    # Nothing meets the target: run where throughput is best (ties: more local).
    split, observed = r.m.split, r.observed
    choice = best = max(r.by_split, key=lambda k: (round(r.expected(k), 6), k))
    if observed is not None and choice != split and split in r.by_split:
        # Leave a measured split only for one predicted better by more than the
        # model's error, or a wrong guess costs throughput the run cannot afford.
        if r.expected(choice) < observed * (1 + r.margin_for(choice)):
            choice = split
    reason = f"{r.head(choice)}: no split meets {r.target_text}; "
    if choice == best:
        reason += f"the best is {r.figure(best)}"
    else:
        reason += f"staying at {r.figure(choice)}: {r.figure(best)} is within its error"
    return choice, reason, True


def _one_more(r: _Rates, choice: int, reason: str, tried: Container[int]) -> tuple[int, str]:
    """Staying at a split that meets the target, try one more task on the device when the model
    puts it inside its own error margin: only a measurement can tell. Once per run (``tried``
    holds every split measured); confirmed like any move, and a miss there is remembered and
    undone."""
    split, up = r.m.split, r.m.split + 1
    if (
        choice != split
        or r.observed is None
        or up not in r.by_split
        or up in tried
        or r.expected(up) < r.target
    ):
        return choice, reason
    return up, (
        f"split {split} -> {up}: trying {r.figure(up)}, within the model's margin of "
        f"{r.target_text}; {r.figure(split)}"
    )


class ModelPolicy:
    """Largest split predicted to meet ``target`` items/s with ``margin``; see the module doc.

    Hysteresis: a target clearly missed (by more than half the margin) is acted on at once
    (towards a split expected to do better); any other move needs ``confirm`` consecutive
    decisions agreeing, and a split measured to meet the target within half the margin is kept.
    Measured beats predicted: throughput observed at a split (smoothed over the periods spent
    there) replaces the model's figure for that split for ``memory`` decisions, so the policy
    neither returns on the model's word to a split it has just seen fall short, nor calls a split
    it has just seen meet the target unable to. How far off the model
    is gets learned per bottleneck (observed / predicted at the split in use) and applied only to
    splits limited by the same resource: an error in the link estimate says nothing about the
    device. Items the link has carried prove a bandwidth: an estimate below it is raised.
    """

    def __init__(
        self,
        target: float,
        margin: float = 0.10,
        confirm: int = 2,
        probe_items: int = 6,
        memory: int = 10,
        linger_cap: float = LINGER_CAP,
    ) -> None:
        if target <= 0:
            raise ValueError(f"target throughput must be positive, got {target}")
        self.target = target
        self.margin = margin
        self.confirm = confirm
        self.probe_items = probe_items
        self.linger_cap = linger_cap
        # Observed / predicted at the split in use, smoothed, per bottleneck resource.
        self.efficiency: dict[str, float] = {}
        self._proposal: int | None = None
        self._proposals = 0
        self._probed: set[int] = set()
        self._after_probe = False
        self.memory = memory
        self._decisions = 0
        # split -> (smoothed /s, decision no., the codec it ran with)
        self._observed: dict[int, tuple[float, int, str]] = {}

    def decide(self, m: Measurements) -> Decision:
        first, last = 1, m.tasks - 1  # task 0 stays on the device, the last task on the server
        probe = self._probe(m, first, last)
        if probe is not None:
            return probe
        self._decisions += 1
        observed = self._observe(m)
        m = _with_carried_bandwidth(m, observed)
        # The target with the margin: the codec must meet what the split must.
        predictions = _predictions(m, first, last, self.target * (1 + self.margin))
        if not predictions:
            return Decision(m.split, f"stay at {m.split}: no split can be predicted yet")
        current = next((p for p in predictions if p.split == m.split), None)
        if current is not None and current.codec != m.codec:
            observed = None  # measured with another codec: it says nothing of this one
        self._learn(current, observed)
        r = _Rates(
            m,
            observed,
            predictions,
            self._recent(predictions),
            self.efficiency,
            self.target,
            self.margin,
        )
        choice, reason, infeasible = _choose(r)
        if not infeasible:
            choice, reason = _one_more(r, choice, reason, self._observed)
        return self._with_linger(r, self._confirm(r, choice, reason, infeasible))

    def _with_linger(self, r: _Rates, decision: Decision) -> Decision:
        """The linger for the split decided on, when the user left it to the policy."""
        chosen = r.by_split.get(decision.split)
        if r.m.linger is not None or chosen is None:
            return decision
        pace = r.expected(decision.split)
        linger, why = choose_linger(r.m, chosen, self.target, self.margin, self.linger_cap, pace)
        return replace(decision, reason=f"{decision.reason}; {why}", linger=linger)

    def _learn(self, current: Prediction | None, observed: float | None) -> None:
        """The model misses fixed costs (encoding, Python overhead): learn how far off it is
        for the resource limiting the split we can observe."""
        if current is None or observed is None or current.throughput <= 0:
            return
        ratio = min(1.5, max(0.3, observed / current.throughput))
        before = self.efficiency.get(current.bottleneck, 1.0)
        self.efficiency[current.bottleneck] = 0.5 * before + 0.5 * ratio

    def _recent(self, predictions: tuple[Prediction, ...]) -> dict[int, float]:
        """Throughput measured at each split within the last ``memory`` decisions, with the
        codec the predictions take there (another codec's rate says nothing of it)."""
        codecs = {p.split: p.codec for p in predictions}
        return {
            k: rate
            for k, (rate, when, codec) in self._observed.items()
            if self._decisions - when <= self.memory and codecs.get(k) == codec
        }

    def _confirm(self, r: _Rates, choice: int, reason: str, infeasible: bool) -> Decision:
        """Hysteresis: move at once after a probe or to fix a clear miss, keep a split still
        meeting the target, and otherwise move only once ``confirm`` decisions agree."""
        split = r.m.split
        if self._after_probe:  # the probe split was never a choice: leave it without ado
            self._after_probe = False
            self._proposal, self._proposals = None, 0
            return r.decision(choice, reason, infeasible)
        if choice == split:
            self._proposal, self._proposals = None, 0
            return r.decision(split, reason, infeasible)
        # A clear miss is fixed at once; a marginal one (noise?) must persist like any move.
        missing = r.observed is not None and r.observed < self.target * (1 - self.margin / 2)
        if missing and r.expected(choice) > r.expected(split):
            self._proposal, self._proposals = None, 0
            return r.decision(choice, reason, infeasible)
        if choice < split and split in r.by_split and r.meets_target(split):
            return r.decision(
                split, f"stay at {split}: {r.figure(split)} still meets {r.target_text}"
            )
        self._proposals = self._proposals + 1 if self._proposal == choice else 1
        self._proposal = choice
        if self._proposals < self.confirm:
            return r.decision(
                split,
                f"stay at {split}: {choice} proposed ({self._proposals}/{self.confirm}); {reason}",
                infeasible,
            )
        self._proposal, self._proposals = None, 0
        return r.decision(choice, reason, infeasible)

    def _observe(self, m: Measurements) -> float | None:
        """Smooth the throughput measured over consecutive settled periods at one split."""
        if not m.settled or not m.throughput > 0:
            return None
        seen = self._observed.get(m.split)
        value = m.throughput
        # Smooth noise within one stay, but a jump of over 30% is a change: follow it at once.
        # (2 s periods of an emulated device swing by 25% with the machine under it.)
        if seen is not None and seen[1] == self._decisions - 1 and seen[2] == m.codec:
            if abs(m.throughput - seen[0]) <= 0.3 * seen[0]:
                value = 0.5 * seen[0] + 0.5 * m.throughput
        self._observed[m.split] = (value, self._decisions, m.codec)
        return value

    def _probe(self, m: Measurements, first: int, last: int) -> Decision | None:
        """Measure what the model needs once: device times of the tasks the server runs and
        server times of the tasks the device runs, by running a few items at the far splits. The
        server times are probed only once a split below the most local one may be needed."""
        missing_device = _unknown(m.device_seconds, range(0, last))
        missing_cuts = _unknown(m.cut_bytes, range(first, last + 1))
        if (missing_device or missing_cuts) and last not in self._probed:
            self._probed.add(last)
            self._after_probe = True
            what = f"device times of tasks {missing_device}" if missing_device else "cut sizes"
            return Decision(last, f"probe: {what} unknown", hold_items=self.probe_items)
        missing_server = _unknown(m.server_seconds, range(first, last + 1))
        if missing_server and first not in self._probed and not self._last_suffices(m, last):
            self._probed.add(first)
            self._after_probe = True
            return Decision(
                first,
                f"probe: server times of tasks {missing_server} unknown",
                hold_items=self.probe_items,
            )
        return None

    def _last_suffices(self, m: Measurements, last: int) -> bool:
        """Whether the most local split is expected to meet the target with the margin.

        Then which lower split would also meet it is moot, and the probe that measures their
        server times (items sent as raw as they come: the heaviest load on link and cloud) waits
        until it is not.
        """
        if m.split == last and m.settled and 0 < m.throughput < self.target:
            return False
        p = predict(m, last)
        expected = p.throughput * self.efficiency.get(p.bottleneck, 1.0)
        return expected >= self.target * (1 + self.margin)


CODEC_MARGIN = 0.10  # a codec must be predicted this much faster than none to be worth its CPU


def fastest_codec(m: Measurements, k: int) -> Prediction:
    """At a fixed split ``k`` (no target): the codec predicted fastest, and none unless a codec
    is predicted faster by ``CODEC_MARGIN``. Where the link is not the bottleneck (loopback, a
    LAN: no bandwidth measured) compressing only adds device CPU, so none wins there."""
    plain = predict(m, k)
    if k >= m.tasks:
        return plain
    known = [c for c in m.codecs if not math.isnan(c.ratio[k] + c.seconds[k])]
    best = max((predict(m, k, c) for c in known), key=lambda p: p.throughput, default=None)
    if best is not None and best.throughput > plain.throughput * (1 + CODEC_MARGIN):
        return best
    return plain
