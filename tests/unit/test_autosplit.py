"""Automatic mode's control, driven by a scripted policy with the times passed in."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from offload import Client, ClientConfig, ConfigError, ModelPolicy, load_pipeline
from offload._device.autosplit import SIZE_SAMPLE_EVERY, AutoSplit
from offload._device.scheduler import Decision, Measurements
from offload._device.telemetry import Telemetry
from offload.v1 import offload_pb2 as pb

TASKS = 6
PERIOD = 1.0


class Script:
    """A policy that answers with the next of its decisions, and notes what it was shown."""

    def __init__(self, decisions: Iterable[Decision]) -> None:
        self.decisions = list(decisions)
        self.seen: list[Measurements] = []

    def decide(self, m: Measurements) -> Decision:
        self.seen.append(m)
        return self.decisions.pop(0)


def auto(
    *decisions: Decision,
    split: int = 2,
    on_linger: Callable[[float], None] | None = None,
    **options: Any,
) -> tuple[AutoSplit, Script, Telemetry]:
    script = Script(decisions)
    telemetry = Telemetry(TASKS, window=4)
    config = ClientConfig(pipeline="tests.apps.stages", fps=10.0, control_period=PERIOD, **options)
    return AutoSplit(script, telemetry, config, split, on_linger), script, telemetry


def test_the_split_changes_when_the_policy_says_and_only_once_a_period() -> None:
    control, script, _ = auto(Decision(2, "stay"), Decision(4, "split 2 -> 4: faster"))
    assert control.split_for(0, 10.0) == 2  # the first item starts the first period
    assert control.split_for(1, 10.9) == 2 and not script.seen
    assert control.split_for(2, 11.0) == 2  # a period: asked, and told to stay
    assert control.split_for(3, 11.5) == 2 and len(script.seen) == 1
    assert control.split_for(4, 12.0) == 4
    assert control.split == 4 and len(script.seen) == 2
    assert control.history == [
        {
            "seconds": 2.0,
            "from": 2,
            "to": 4,
            "codec": "zstd",
            "linger_ms": 0.0,
            "reason": "split 2 -> 4: faster",
        }
    ]
    assert [(p["seconds"], p["split"], p["settled"]) for p in control.periods] == [
        (1.0, 2, True),
        (2.0, 2, True),
    ]
    assert [m.split for m in script.seen] == [2, 2]
    report = control.report()
    assert report["final_split"] == 4 and report["history"] == control.history


def test_the_period_after_a_change_is_not_settled() -> None:
    control, script, telemetry = auto(Decision(3, "to 3"), Decision(3, "stay"), Decision(3, "stay"))
    for item, now in enumerate((0.0, 1.0, 2.0, 3.0)):
        control.split_for(item, now)
        telemetry.finished(True)  # each item is done before the next
    assert [m.settled for m in script.seen] == [True, False, True]


def test_no_period_is_settled_while_items_sent_before_a_change_are_still_finishing() -> None:
    # A slow link holds a window of items sent at the old split (or codec): what finishes in
    # the periods after a change is partly theirs, and must not be taken as the new one's rate.
    stay = Decision(2, "stay", codec="zstd")
    control, script, telemetry = auto(
        Decision(2, "lz4 now", codec="lz4"), *[replace(stay, codec="lz4")] * 5
    )
    control.split_for(0, 0.0)
    control.split_for(8, 1.0)  # items 0-7 went with zstd, and none has finished yet
    for item in range(9, 12):
        telemetry.finished(True)
        control.split_for(item, float(item - 7))
    telemetry.finished(True)
    for _ in range(5):
        telemetry.finished(True)  # items 4-8: everything sent with zstd is done
    control.split_for(12, 5.0)
    control.split_for(13, 6.0)
    assert [m.settled for m in script.seen] == [True, False, False, False, False, True]
    assert [m.codec for m in script.seen] == ["zstd", "lz4", "lz4", "lz4", "lz4", "lz4"]


def test_a_probe_holds_until_its_items_have_finished() -> None:
    probe = Decision(1, "probe: server times unknown", hold_items=3)
    control, script, telemetry = auto(probe, Decision(2, "back"))
    control.split_for(0, 0.0)
    assert control.split_for(5, 1.0) == 1  # the probe, decided at item 5: items 5, 6, 7
    for _ in range(7):
        telemetry.finished(True)
    # A period has passed but the probe's items have not all finished: no new decision.
    assert control.split_for(6, 2.5) == 1 and len(script.seen) == 1
    telemetry.finished(True)  # the eighth item: 5 + 3 finished in all
    assert control.split_for(7, 2.6) == 2 and len(script.seen) == 2


def test_a_probe_holds_two_periods_at_most() -> None:
    probe = Decision(1, "probe: server times unknown", hold_items=3)
    control, script, _ = auto(probe, Decision(2, "back"))
    control.split_for(0, 0.0)
    control.split_for(1, 1.0)
    assert control.split_for(2, 2.99) == 1 and len(script.seen) == 1  # nothing finished yet
    assert control.split_for(3, 3.0) == 2 and len(script.seen) == 2


def test_every_cut_is_measured_now_and_then_and_throughout_a_probe() -> None:
    control, _, telemetry = auto(Decision(3, "probe", hold_items=50), split=4)
    limits = ClientConfig().limits
    assert control.size_sampler(1, limits) is None
    sample = control.size_sampler(SIZE_SAMPLE_EVERY, limits)
    assert sample is not None
    sample(0, b"x" * 100)  # the cut after task 0 (K=1), not the one in use (K=4)
    sample(3, b"x" * 100)  # the cut in use: measured when sent, not here
    cuts = telemetry.snapshot(4, 1.0, True).cut_bytes
    assert cuts[1] > 100 and math.isnan(cuts[4])
    control.split_for(0, 0.0)
    control.split_for(1, 1.0)  # the probe begins
    assert control.size_sampler(11, limits) is not None


def test_a_policy_that_chooses_a_split_without_the_server_is_refused() -> None:
    control, _, _ = auto(Decision(TASKS, "all here"))
    control.split_for(0, 0.0)
    with pytest.raises(ConfigError, match=f"the split policy chose {TASKS}.*1..{TASKS - 1}"):
        control.split_for(1, 1.0)


def test_the_unreachable_target_is_said_once_and_withdrawn_once(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    short = Decision(1, "no split meets the target", infeasible=True, rate=6.4, measured=True)
    probe = Decision(3, "probe", hold_items=1)  # no figure: neither a verdict nor a withdrawal
    met = Decision(2, "K=2 measured 18.2/s meets the target", rate=18.2, measured=True)
    decisions = (short, short, short, probe, short, short, met, met, short, short)
    control, _, _ = auto(*decisions)
    caplog.set_level(logging.INFO, logger="offload.client")
    for item, now in enumerate(float(t) for t in range(len(decisions) + 1)):
        control.split_for(item, 2 * now)  # two periods apart: past any probe's hold
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert [w.split()[0] for w in warnings] == [
        "event=target-unreachable",
        "event=target-met",
        "event=target-unreachable",
    ], warnings
    assert "target=10 " in warnings[0] and "rate=6.4 basis=measured" in warnings[0]
    assert 'msg="target met again at K=2"' in warnings[1]
    assert capsys.readouterr() == ("", "")  # logged only, never printed


def test_a_policy_without_a_target_is_refused_rather_than_ignored() -> None:
    pipeline = load_pipeline("tests.apps.counter")
    with pytest.raises(ConfigError, match=r"only in automatic mode: set the target"):
        Client(pipeline, ClientConfig(pipeline=pipeline.name), policy=ModelPolicy(10.0))


def test_the_codec_the_policy_chooses_is_used_from_the_next_item_and_said_in_the_history() -> None:
    control, _, _ = auto(Decision(2, "lz4 suffices", codec="lz4"), Decision(3, "up", codec="none"))
    assert control.codec == pb.CODEC_ZSTD  # --compression auto: the best installed, until told
    control.split_for(0, 10.0)
    control.split_for(1, 11.0)
    assert (control.split, control.codec) == (2, pb.CODEC_LZ4)
    control.split_for(2, 12.0)
    assert control.split == 3 and control.codec is None
    assert [(h["to"], h["codec"], h["reason"]) for h in control.history] == [
        (2, "lz4", "lz4 suffices"),
        (3, "none", "up"),
    ]
    assert control.report()["final_codec"] == "none"
    assert control.report()["final_reason"] == "up"  # why it ended there, for the summary


def test_each_codec_is_sampled_at_every_cut_for_the_policy() -> None:
    telemetry = Telemetry(TASKS, window=4, codecs=("zstd", "lz4"))
    config = ClientConfig(pipeline="tests.apps.stages", fps=10.0, control_period=PERIOD)
    control = AutoSplit(ModelPolicy(10.0), telemetry, config, 5)
    sample = control.size_sampler(0, config.limits)
    assert sample is not None
    sample(0, np.zeros(50_000, np.uint8))  # the cut after task 0: 50 kB of zeros
    sample(1, b"tiny")
    codecs = {c.name: c for c in telemetry.snapshot(5, 1.0, True).codecs}
    assert codecs["zstd"].ratio[1] > 100 and codecs["lz4"].ratio[1] > 100
    assert codecs["zstd"].seconds[1] > 0
    assert codecs["zstd"].ratio[2] == 1.0  # too small to compress: sent as it is
    assert math.isnan(codecs["zstd"].ratio[3])


def test_a_compressed_cut_counts_its_bytes_before_compression() -> None:
    telemetry = Telemetry(TASKS, window=4)
    telemetry.compressed(2, 9000)
    telemetry.cut_size(2, 1000)  # on the wire
    telemetry.cut_size(3, 1000)
    assert telemetry.snapshot(2, 1.0, True).cut_bytes[2:4] == (10_000, 1000)


def test_the_linger_the_policy_chooses_goes_to_the_transport_and_into_the_history() -> None:
    told: list[float] = []
    control, script, _ = auto(
        Decision(2, "linger 25 ms: room", linger=0.025),
        Decision(2, "still room", linger=0.025),
        Decision(3, "up; linger 0: the window is the bottleneck", linger=0.0),
        on_linger=told.append,
        window=4,
    )
    for item, now in enumerate((0.0, 1.0, 2.0, 3.0)):
        control.split_for(item, now)
    assert told == [0.025, 0.0]  # said when it changes, not every period
    seen = script.seen[0]
    assert (seen.linger, seen.batch_items, seen.batch_bytes) == (None, 4, 1 << 20)  # the window
    assert [(h["from"], h["to"], h["linger_ms"], h["reason"]) for h in control.history] == [
        (2, 2, 25.0, "linger 25 ms: room"),
        (2, 3, 0.0, "up; linger 0: the window is the bottleneck"),
    ]
    assert [p["linger_ms"] for p in control.periods] == [0.0, 25.0, 25.0]
    assert control.report()["final_linger_ms"] == 0.0


def test_a_linger_the_user_gave_is_kept_whatever_the_policy_says() -> None:
    told: list[float] = []
    control, script, _ = auto(
        Decision(2, "linger 25 ms", linger=0.025), on_linger=told.append, linger_ms=5.0
    )
    control.split_for(0, 0.0)
    control.split_for(1, 1.0)
    assert script.seen[0].linger == 0.005  # the policy is told it is fixed, and at what
    assert told == [] and control.history == [] and control.report()["final_linger_ms"] == 5.0
