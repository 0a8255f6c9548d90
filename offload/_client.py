"""The device side: capture, run the local tasks, stream the rest, match answers to items.

The capture loop runs in the caller's thread; one thread reads answers. A credit window bounds
the items in flight: when it is full the capture loop waits (back-pressure), so a slow server
or link slows capture down instead of filling memory.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from ._codec import decode, encode, encode_into
from ._config import ClientConfig
from ._pipeline import ItemContext, Pipeline, Status, run_tasks
from ._report import Recorder
from ._scheduler import Decision, ModelPolicy, SplitPolicy
from ._telemetry import Telemetry
from ._transport import Stream, Transport
from .exceptions import ConfigError, OffloadError, ServerError
from .v1 import offload_pb2 as pb

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
    if config.fps <= 0:
        raise ConfigError(f"--fps {config.fps}: the target must be a positive items/s rate")
    if config.local_tasks is not None and not 1 <= config.local_tasks <= n - 1:
        raise ConfigError(
            f"--fps needs a starting split that uses the server: --local-tasks 1..{n - 1} "
            f"(got {config.local_tasks}). Tasks of {pipeline.name}: {pipeline.describe()}"
        )
    if config.control_period <= 0:
        raise ConfigError(f"--control-period {config.control_period}: must be positive")


def starting_split(pipeline: Pipeline, config: ClientConfig) -> int:
    """``--local-tasks``; in automatic mode without it, N-1: the most work on the device."""
    n = len(pipeline.tasks)
    if config.local_tasks is not None:
        return config.local_tasks
    return n - 1 if config.fps is not None else n


@dataclass
class _InFlight:
    capture_perf: float
    sent: float
    size: int
    args: Any  # the item's state at the cut, kept until its answer arrives


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
        if config.window < 1:
            raise ConfigError(f"--window {config.window}: at least 1 item must be in flight")
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
        self.run_id = uuid.uuid4().hex
        self.recorder = Recorder(pipeline, output)
        self._stop = stop or threading.Event()
        self._credits = threading.Semaphore(config.window)
        self._in_flight: dict[int, _InFlight] = {}
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._stream_error: ServerError | None = None
        self._answers_done = threading.Event()

    @property
    def split(self) -> int:
        """Tasks run on the device for the next item."""
        return self._split

    def stop(self) -> None:
        """Stop capturing; items already captured still finish (safe from a signal handler)."""
        self._stop.set()

    def run(self) -> dict[str, Any]:
        """Capture and process until the source ends, ``frames`` is reached or ``stop()``."""
        stream = self.transport.open_stream() if self.transport else None
        if stream is not None:
            threading.Thread(
                target=self._read_answers, args=(stream,), name="offload-answers", daemon=True
            ).start()
        try:
            self._capture_loop(stream)
        finally:
            if stream is not None:
                stream.close()
                self._wait_for_answers(stream)
        return self.report()

    @property
    def error(self) -> ServerError | None:
        """Why the stream to the server failed, if it did (the report also says)."""
        return self._stream_error

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
            error=str(self._stream_error) if self._stream_error else None,
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

    def _capture_loop(self, stream: Stream | None) -> None:
        n = len(self.pipeline.tasks)
        item = 0
        period_start = time.perf_counter()
        next_decision_item: int | None = None
        settled = True
        while not self._stop.is_set() and self._stream_error is None:
            if self.config.frames is not None and item >= self.config.frames:
                break
            if self.policy is not None:
                now = time.perf_counter()
                if next_decision_item is not None:
                    due = item >= next_decision_item
                else:
                    due = now - period_start >= self.config.control_period
                if due:
                    decision = self._decide(now - period_start, settled)
                    settled = decision.split == self._split
                    self._apply(decision, now)
                    period_start = now
                    next_decision_item = (
                        item + decision.hold_items if decision.hold_items is not None else None
                    )
            split = self.split
            capture_time = time.time()
            began = time.perf_counter()
            context = ItemContext(self.config.device_id, self.run_id, item, capture_time, False)
            sample = self.policy is not None and (
                item % SIZE_SAMPLE_EVERY == 0 or next_decision_item is not None
            )
            outcome = run_tasks(
                self.pipeline,
                0,
                split,
                None,
                context,
                slowdown=self.config.slowdown,
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
                assert stream is not None and split < n
                self._send(stream, item, split, outcome.value, capture_time, began)
            else:
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
            log.debug("event=measurements %s", measurements)
            for p in decision.predictions:
                log.debug(
                    "event=prediction split=%d rate=%.2f bottleneck=%s rates=%s",
                    p.split,
                    p.throughput,
                    p.bottleneck,
                    p.rates,
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
        if decision.infeasible and not self._said_infeasible:
            self._said_infeasible = True
            log.warning("event=target-unreachable %s", decision.reason)
            print(f"offload: {decision.reason}", file=sys.stderr)
        if decision.split != self._split:
            n = len(self.pipeline.tasks)
            if not 1 <= decision.split <= n - 1:
                raise ConfigError(
                    f"the split policy chose {decision.split}; automatic mode keeps it in "
                    f"1..{n - 1} (task 0 on the device, the last on the server)"
                )
            log.info(
                "event=split old=%d new=%d reason=%r", self._split, decision.split, decision.reason
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

    def _send(
        self, stream: Stream, item: int, split: int, args: Any, capture_time: float, began: float
    ) -> None:
        # Back-pressure: wait for a credit, but notice a stop or a failed stream meanwhile.
        while not self._credits.acquire(timeout=0.1):
            if self._stream_error is not None:
                return
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
        except OffloadError as exc:
            self._credits.release()
            now = time.perf_counter()
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
        with self._lock:
            # Sent under the lock: the answer thread must not see the item before its size.
            pending = self._in_flight[item] = _InFlight(began, time.perf_counter(), 0, args)
            pending.size = stream.send(state)
        self.recorder.bytes_sent += pending.size
        if self.policy is not None:
            self.telemetry.cut_size(split, pending.size)

    def _read_answers(self, stream: Stream) -> None:
        try:
            for answer, size in stream.results():
                now = time.perf_counter()
                with self._lock:
                    pending = self._in_flight.pop(answer.item, None)
                if pending is None:
                    log.warning("event=unexpected-answer item=%d", answer.item)
                    continue
                self._credits.release()
                self.recorder.bytes_received += size
                timings = [(t.task, t.seconds) for t in answer.task_times]
                self.recorder.server_times(timings, answer.server_cpu_seconds)
                self.telemetry.answer(
                    answer.item,
                    pending.size,
                    pending.sent,
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
                    latency=now - pending.capture_perf,
                    at=now,
                )
                with self._lock:
                    if not self._in_flight:
                        self._drained.notify_all()
        except ServerError as exc:
            self._stream_error = exc
        except OffloadError as exc:
            self._stream_error = ServerError(f"bad answer from the server: {exc}")
        finally:
            self._answers_done.set()
            with self._lock:
                self._drained.notify_all()

    def _wait_for_answers(self, stream: Stream, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._in_flight and not self._answers_done.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._drained.wait(remaining)
            lost = sorted(self._in_flight)
            self._in_flight.clear()
        if lost:
            stream.cancel()
            reason = str(self._stream_error) if self._stream_error else "no answer in time"
            for item in lost:
                now = time.perf_counter()
                self.recorder.finished(
                    item,
                    "failed",
                    None,
                    task=self.split,
                    error=f"unanswered: {reason}",
                    latency=0.0,
                    at=now,
                )


def run_client(
    pipeline: Pipeline,
    config: ClientConfig,
    transport: Transport | None = None,
    output: IO[str] | None = None,
    on_start: Callable[[Client], None] | None = None,
) -> dict[str, Any]:
    """Run a client to the end and return its report."""
    client = Client(pipeline, config, transport, output)
    if on_start is not None:
        on_start(client)
    return client.run()
