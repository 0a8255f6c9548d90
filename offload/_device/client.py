"""The device side: capture, run the local tasks, stream the rest, match answers to items.

The capture loop runs in the caller's thread. Items cut at the split go to the link
(``_link.py``), which owns the stream: a credit window bounds the items in flight, so a slow
server or link slows capture down instead of filling memory; the link also reconnects, resends
and runs items here while the server is away, and calls back here as each item ends.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from typing import IO, Any

from .._codec import check_size, decode, encode, encode_into, encode_result
from .._config import ClientConfig
from .._logging import quote
from .._pipeline import ItemContext, Outcome, Pipeline, Status, run_tasks
from ..exceptions import ConfigError, OffloadError, ServerError
from ..v1 import offload_pb2 as pb
from .emulation import SlowDevice
from .link import Link, Pending
from .report import Recorder
from .scheduler import Decision, ModelPolicy, SplitPolicy
from .telemetry import Telemetry
from .transport import Transport

log = logging.getLogger("offload.client")

_STATUS_NAMES = {
    pb.ItemResult.COMPLETED: "completed",
    pb.ItemResult.FILTERED: "filtered",
    pb.ItemResult.FAILED: "failed",
}


def check_split(pipeline: Pipeline, local_tasks: int | None) -> None:
    """Refuse a split outside [1, N], naming the valid range and the tasks."""
    n = len(pipeline.tasks)
    if local_tasks is not None and not 1 <= local_tasks <= n:
        raise ConfigError(
            f"--local-tasks {local_tasks} is out of range: use 1..{n - 1} to run tasks [0, K) on "
            f"the device and the rest on the server, {n} to run all on the device, or omit it for "
            f"client-only mode. Tasks of {pipeline.name}: {pipeline.describe()}"
        )


SIZE_SAMPLE_EVERY = 10  # items between measurements of every cut's size


def check_auto(pipeline: Pipeline, config: ClientConfig) -> None:
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


class Client:
    """Runs one device's stream of items. ``transport`` is None in client-only mode."""

    def __init__(
        self,
        pipeline: Pipeline,
        config: ClientConfig,
        transport: Transport | None = None,
        output: IO[str] | None = None,
        stop: threading.Event | None = None,
        policy: SplitPolicy | None = None,
    ) -> None:
        check_split(pipeline, config.local_tasks)
        check_auto(pipeline, config)
        n = len(pipeline.tasks)
        self._split = starting_split(pipeline, config)
        needs_server = self._split < n
        if needs_server and transport is None:
            raise ConfigError(f"split {self._split} needs a server: give a transport")
        self.pipeline = pipeline
        self.config = config
        self.transport = transport if needs_server else None
        self.policy: SplitPolicy | None = None
        if config.fps is not None:
            self.policy = policy or ModelPolicy(config.fps)
        self.telemetry = Telemetry(n, config.window)
        self.history: list[dict[str, Any]] = []
        self.periods: list[dict[str, Any]] = []
        self._said_infeasible = False
        self._infeasible_streak = 0
        self.run_id = uuid.uuid4().hex
        self.recorder = Recorder(pipeline, output)
        self._stop = stop or threading.Event()
        self.device = SlowDevice(config.slowdown)  # its sleep debt lasts the run
        # The link owns the stream: credits, resends, reconnects, the offline buffer.
        self.link = (
            Link(self.transport, config.link, config.window, self) if self.transport else None
        )

    @property
    def split(self) -> int:
        """Tasks run on the device for the next item."""
        return self._split

    def stop(self) -> None:
        """Stop capturing; items already captured still finish (safe from a signal handler)."""
        self._stop.set()

    def run(self) -> dict[str, Any]:
        """Capture and process until the source ends, ``frames`` is reached or ``stop()``."""
        if self.link is not None:
            self.link.start()  # it says so if the server does not answer yet
        try:
            self._capture_loop()
            self.device.pay(everything=True)  # the sleep the last items still owe
            if self.link is not None:
                self.link.finish()
        except BaseException as exc:  # a second Ctrl-C, or a bug: still account for every item
            why = (
                "the run was interrupted before this item finished"
                if isinstance(exc, KeyboardInterrupt)
                else f"the run stopped before this item finished: {type(exc).__name__}: {exc}"
            )
            if self.link is not None:
                self.link.abort(why)
            self.recorder.end_unfinished(why)
            raise
        # Nothing is left unless a LinkOwner call failed; an item never goes missing.
        self.recorder.end_unfinished("the run ended before this item finished")
        return self.report()

    @property
    def error(self) -> ServerError | None:
        """Why the server refused the stream, if it did (the report also says)."""
        return self.link.error if self.link is not None else None

    def report(self) -> dict[str, Any]:
        if self.policy is not None:
            mode = f"automatic, target {self.config.fps:g}/s, final split {self.split}"
        elif self.transport is None and self.config.local_tasks is None:
            mode = "client-only"
        else:
            mode = f"split {self.split}"
        report = self.recorder.summary(
            device_id=self.config.device_id,
            run_id=self.run_id,
            mode=mode,
            local_tasks=self.split,
            server=getattr(self.transport, "target", None),
            window=self.config.window,
            error=str(self.error) if self.error else None,
            link=self.link.report() if self.link is not None else None,
        )
        report["cloud"] = self._cloud_cost(report)
        if self.policy is not None:
            report["scheduler"] = {
                "target_per_second": self.config.fps,
                "control_period_seconds": self.config.control_period,
                "final_split": self.split,
                "history": self.history,
                "periods": self.periods,
            }
        return report

    def _cloud_cost(self, report: dict[str, Any]) -> dict[str, Any]:
        """Server CPU seconds per item, and what the final split saves against K = 1.

        The server reports CPU time per item; the cost of K = 1 is estimated by scaling it
        with the server's per-task wall times (all measured, after the scheduler's probe).
        """
        answers = self.recorder.answers
        if not answers:
            return {"server_cpu_seconds_per_item": 0.0, "saving_vs_all_remote_percent": None}
        per_item = report["server_cpu_seconds"] / answers
        server_ms = [t["server_mean_ms"] if t["server_runs"] else math.nan for t in report["tasks"]]
        at_final = sum(server_ms[self.split :])
        everything = sum(server_ms[1:])
        saving = None
        if not math.isnan(everything) and everything > 0 and not math.isnan(at_final):
            saving = round(100 * (1 - at_final / everything), 1)
        return {
            "server_cpu_seconds_per_item": round(per_item, 6),
            "saving_vs_all_remote_percent": saving,
        }

    def _capture_loop(self) -> None:
        n = len(self.pipeline.tasks)
        item = 0
        period_start = time.perf_counter()
        # A probe holds its split until its items have finished (their answers carry the server
        # times and link samples it is for), or two control periods at most.
        hold_until: tuple[int, float] | None = None  # (finished items, deadline)
        settled = True
        while not self._stop.is_set() and self.error is None:
            if self.config.frames is not None and item >= self.config.frames:
                break
            if self.policy is not None:
                now = time.perf_counter()
                if hold_until is not None:
                    due = self.telemetry.finished_items >= hold_until[0] or now >= hold_until[1]
                else:
                    due = now - period_start >= self.config.control_period
                if due:
                    decision = self._decide(now - period_start, settled)
                    settled = decision.split == self._split
                    self._apply(decision, now)
                    period_start = now
                    hold_until = (
                        (item + decision.hold_items, now + 2 * self.config.control_period)
                        if decision.hold_items is not None
                        else None
                    )
            split = self.split
            capture_time = time.time()
            began = time.perf_counter()
            context = ItemContext(self.config.device_id, self.run_id, item, capture_time, False)
            sample = self.policy is not None and (
                item % SIZE_SAMPLE_EVERY == 0 or hold_until is not None
            )
            outcome = run_tasks(
                self.pipeline,
                0,
                split,
                None,
                context,
                pace=self.device,
                on_output=self._sample_size if sample else None,
            )
            if outcome.task == 0 and outcome.status is Status.FILTERED:
                log.info("event=end-of-stream items=%d", item)
                break
            if outcome.task == 0 and outcome.status is Status.FAILED:
                raise OffloadError(f"capture (task 0) failed: {outcome.error}")
            self.recorder.captured_item(began)
            self.recorder.device_times(outcome.task_seconds)
            self.telemetry.device_times(item, outcome.task_seconds)
            if outcome.status is Status.CONTINUE:
                assert split < n
                self._send(item, split, outcome.value, capture_time, began)
            else:
                outcome = self._as_if_sent(outcome)
                now = time.perf_counter()
                self.telemetry.finished(outcome.status is Status.COMPLETED)
                self.recorder.finished(
                    item,
                    outcome.status.value,
                    outcome.value,
                    task=outcome.task,
                    error=outcome.error,
                    latency=now - began,
                    at=now,
                )
            item += 1

    def _sample_size(self, index: int, value: Any) -> None:
        cut = index + 1
        if cut < self._split:
            # The cut in use is measured exactly when sent; the others cost one encode.
            self.telemetry.cut_size(cut, encode(value, self.config.limits).ByteSize())

    def _decide(self, period: float, settled: bool) -> Decision:
        assert self.policy is not None
        measurements = self.telemetry.snapshot(self._split, period, settled)
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
                "seconds": round(time.perf_counter() - (self.recorder.first_capture or 0), 3),
                "split": self._split,
                "throughput_per_second": round(measurements.throughput, 3),
                "settled": settled,
                "device_cpu_percent": measurements.device_cpu_percent,
                "device_memory_percent": round(measurements.device_memory_percent, 2),
            }
        )
        return decision

    def _apply(self, decision: Decision, now: float) -> None:
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
        if decision.split != self._split:
            n = len(self.pipeline.tasks)
            if not 1 <= decision.split <= n - 1:
                raise ConfigError(
                    f"the split policy chose {decision.split}; automatic mode keeps it in "
                    f"1..{n - 1} (task 0 on the device, the last on the server)"
                )
            log.info(
                "event=split old=%d new=%d reason=%s",
                self._split,
                decision.split,
                quote(decision.reason),
            )
            self.history.append(
                {
                    "seconds": round(now - (self.recorder.first_capture or now), 3),
                    "from": self._split,
                    "to": decision.split,
                    "reason": decision.reason,
                }
            )
            self._split = decision.split

    def _say_target(self, event: str, message: str, decision: Decision) -> None:
        log.warning(
            "event=%s target=%g split=%d rate=%s basis=%s msg=%s reason=%s",
            event,
            self.config.fps,
            decision.split,
            f"{decision.rate:.1f}",
            "measured" if decision.measured else "predicted",
            quote(message),
            quote(decision.reason),
        )

    def _send(self, item: int, split: int, args: Any, capture_time: float, began: float) -> None:
        assert self.link is not None
        state = pb.TaskState(
            pipeline=self.pipeline.name,
            fingerprint=self.pipeline.fingerprint,
            device_id=self.config.device_id,
            run_id=self.run_id,
            item=item,
            next_task=split,
            capture_time=capture_time,
        )
        try:
            encode_into(state.args, args, self.config.limits)
            data = state.SerializeToString()
            check_size(data, self.config.limits, f"item {item}")
        except OffloadError as exc:
            now = time.perf_counter()
            self.telemetry.finished(False)
            self.recorder.finished(
                item,
                "failed",
                None,
                task=split - 1,
                error=f"cannot send: {exc}",
                latency=now - began,
                at=now,
            )
            return
        self.link.submit(Pending(item, split, data, began))

    # --- how items end (called by the link's threads) -----------------------------------------

    def sent(self, pending: Pending, size: int) -> None:
        self.recorder.bytes_sent += size
        if self.policy is not None:
            self.telemetry.cut_size(pending.next_task, size)

    def answered(self, pending: Pending, answer: pb.ItemResult, size: int) -> None:
        now = time.perf_counter()
        self.recorder.bytes_received += size
        timings = [(t.task, t.seconds) for t in answer.task_times]
        self.recorder.server_times(timings, answer.server_cpu_seconds)
        self.telemetry.answer(
            answer.item,
            len(pending.data),
            pending.sent_at,
            now,
            answer.server_receive_time,
            answer.server_seconds,
            timings,
        )
        self.telemetry.finished(answer.status == pb.ItemResult.COMPLETED)
        result = None
        # The result is only ever written out: decoding it otherwise is wasted device CPU.
        if answer.status == pb.ItemResult.COMPLETED and self.recorder.output is not None:
            result = decode(answer.output, self.config.limits)
        self.recorder.finished(
            answer.item,
            _STATUS_NAMES.get(answer.status, "failed"),
            result,
            task=answer.task,
            error=answer.error,
            latency=now - pending.began,
            at=now,
        )

    def run_locally(self, pending: Pending) -> None:
        """The server is away: run the item's remaining tasks here, from its state at the cut."""
        state = pb.TaskState.FromString(pending.data)
        args = decode(state.args, self.config.limits)
        context = ItemContext(
            self.config.device_id, self.run_id, state.item, state.capture_time, False
        )
        outcome = run_tasks(
            self.pipeline,
            state.next_task,
            len(self.pipeline.tasks),
            args,
            context,
            pace=self.device,
        )
        outcome = self._as_if_sent(outcome)
        self.recorder.device_times(outcome.task_seconds)
        self.telemetry.device_times(state.item, outcome.task_seconds)
        self.telemetry.finished(outcome.status is Status.COMPLETED)
        now = time.perf_counter()
        self.recorder.finished(
            state.item,
            outcome.status.value,
            outcome.value if outcome.status is Status.COMPLETED else None,
            task=outcome.task,
            error=outcome.error,
            latency=now - pending.began,
            at=now,
        )

    def _as_if_sent(self, outcome: Outcome) -> Outcome:
        """A result made here is refused as the server would refuse it: the same values fail
        the same items, with the same error, whatever the split."""
        if outcome.status is Status.COMPLETED:
            error = encode_result(pb.Value(), outcome.value, self.config.limits)
            if error is not None:
                last = len(self.pipeline.tasks) - 1
                return Outcome(Status.FAILED, None, last, error, outcome.task_seconds)
        return outcome

    def lost(self, pending: Pending, status: str, reason: str) -> None:
        now = time.perf_counter()
        self.telemetry.finished(False)
        # A not_run item never reached an end: no latency, nor does it lengthen the run.
        ended = status != "not_run"
        self.recorder.finished(
            pending.item,
            status,
            None,
            task=pending.next_task,
            error=reason,
            latency=now - pending.began if ended else None,
            at=now if ended else None,
        )


def run_client(
    pipeline: Pipeline,
    config: ClientConfig,
    transport: Transport | None = None,
    output: IO[str] | None = None,
) -> dict[str, Any]:
    """Run a client to the end and return its report."""
    return Client(pipeline, config, transport, output).run()
