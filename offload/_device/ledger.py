"""How items end, once each: the ends feed the telemetry, the recorder and the output.

The ``Ledger`` is the link's owner (``LinkOwner``): the link's threads call it as items are
sent, answered, run here while the server is away, or lost; the capture loop calls it for
items that end on the device.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from .._codec import check_size, decode, encode_into, encode_result
from .._config import ClientConfig
from .._pipeline import ItemContext, Outcome, Pace, Pipeline, Status, run_tasks
from .._wire import status_name
from ..exceptions import OffloadError
from ..v1 import offload_pb2 as pb
from .emulation import SlowDevice
from .link import Pending
from .report import Recorder, to_json
from .telemetry import Telemetry


class Ledger:
    """Records each item's end once (a second end is ignored); thread-safe as the recorder is.

    ``clock`` gives the latency's end (``time.perf_counter``, or a test's).
    """

    def __init__(
        self,
        pipeline: Pipeline,
        config: ClientConfig,
        run_id: str,
        telemetry: Telemetry,
        recorder: Recorder,
        device: SlowDevice,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.pipeline = pipeline
        self.config = config
        self.run_id = run_id
        self.telemetry = telemetry
        self.recorder = recorder
        self.device = device  # shared with the capture loop: its sleep debt lasts the run
        self.clock = clock

    # --- from the capture loop -----------------------------------------------------------------

    def captured(self, item: int, began: float, timings: list[tuple[int, float]]) -> None:
        """``item``, captured at ``began``, ran its first tasks here in ``timings``."""
        self.recorder.captured_item(began)
        self.recorder.device_times(timings)
        self.telemetry.device_times(item, timings)

    def worker_times(self, item: int, timings: list[tuple[int, float]]) -> None:
        """``item`` ran more tasks here, on a device worker, in ``timings``."""
        self.recorder.device_times(timings)
        self.telemetry.device_times(item, timings)

    def ended_here(self, item: int, outcome: Outcome, began: float) -> bool:
        """``item`` ended on the device (completed, filtered or failed) before the split."""
        outcome = self._as_if_sent(outcome)
        return self._end(
            item, outcome.status.value, outcome.value, outcome.task, outcome.error, began
        )

    def failed(self, item: int, task: int, error: str, began: float) -> bool:
        """``item`` failed at ``task`` here, for ``error`` (it could not be sent, say)."""
        return self._end(item, Status.FAILED.value, None, task, error, began)

    # --- from the link's threads (LinkOwner) ---------------------------------------------------

    def sent(self, pending: Pending, size: int) -> None:
        self.recorder.bytes_sent += size
        self.telemetry.cut_size(pending.next_task, size)

    def answered(self, pending: Pending, answer: pb.ItemResult, size: int) -> None:
        now = self.clock()
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
        status = status_name(answer.status)
        result = None
        # The result is only ever written out: decoding it otherwise is wasted device CPU.
        if status == Status.COMPLETED.value and self.recorder.output is not None:
            result = decode(answer.output, self.config.limits)
        self._end(answer.item, status, result, answer.task, answer.error, pending.began, now)

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
        value = outcome.value if outcome.status is Status.COMPLETED else None
        self._end(
            state.item, outcome.status.value, value, outcome.task, outcome.error, pending.began
        )

    def hold(self, pending: Pending) -> bool:
        """The server is away, outage mode hold-last: run the item's tasks here up to the last
        and keep it, re-encoded at that cut, for the server; False if it ended here."""
        outcome = advance(self.pipeline, self.config, pending, self.device)
        self.recorder.device_times(outcome.task_seconds)
        self.telemetry.device_times(pending.item, outcome.task_seconds)
        if outcome.status is Status.CONTINUE:
            return True
        outcome = self._as_if_sent(outcome)
        value = outcome.value if outcome.status is Status.COMPLETED else None
        self._end(
            pending.item, outcome.status.value, value, outcome.task, outcome.error, pending.began
        )
        return False

    def lost(self, pending: Pending, status: str, reason: str) -> None:
        began = pending.began if status != "not_run" else None  # not_run: it never ended
        self._end(pending.item, status, None, pending.next_task, reason, began)

    def _end(
        self,
        item: int,
        status: str,
        result: Any,
        task: int,
        error: str,
        began: float | None,
        now: float | None = None,
    ) -> bool:
        """Record the end; False (and nothing fed) if ``item`` had ended already. ``began`` is
        None for an item never run to an end: it has no latency, nor does it lengthen the run."""
        now = self.clock() if now is None else now
        if not self.recorder.finished(
            item,
            status,
            result,
            task=task,
            error=error,
            latency=None if began is None else now - began,
            at=None if began is None else now,
        ):
            return False
        self.telemetry.finished(status == Status.COMPLETED.value)
        return True

    def _as_if_sent(self, outcome: Outcome) -> Outcome:
        """A result made here is refused as the server would refuse it: the same values fail
        the same items, with the same error, whatever the split."""
        if outcome.status is Status.COMPLETED:
            error = encode_result(pb.Value(), outcome.value, self.config.limits)
            if error is not None:
                last = len(self.pipeline.tasks) - 1
                return Outcome(Status.FAILED, None, last, error, outcome.task_seconds)
        return outcome


def advance(pipeline: Pipeline, config: ClientConfig, pending: Pending, device: Pace) -> Outcome:
    """Run ``pending``'s tasks here up to the pipeline's last one; if it goes on, its data and
    next task become the state at that cut (the item waits for the server to run the last)."""
    state = pb.TaskState.FromString(pending.data)
    last = len(pipeline.tasks) - 1
    context = ItemContext(config.device_id, state.run_id, state.item, state.capture_time, False)
    args = decode(state.args, config.limits)
    outcome = run_tasks(pipeline, state.next_task, last, args, context, pace=device)
    if outcome.status is Status.CONTINUE:
        state.next_task = last
        state.ClearField("args")
        try:
            encode_into(state.args, outcome.value, config.limits)
            data = state.SerializeToString()
            check_size(data, config.limits, f"item {state.item}")
        except OffloadError as exc:
            error = f"cannot send: {exc}"
            return Outcome(Status.FAILED, None, last - 1, error, outcome.task_seconds)
        pending.data = data
        pending.next_task = last
    return outcome


class Recovered:
    """The owner of items an earlier run left in the durable buffer (``--buffer-dir``): they are
    resent under that run's id, and each one's end is a JSON line in ``output`` (the earlier run's
    own ``--output`` went with it): ``{"run_id", "item", "status", "result" | "task", "error"}``.
    """

    def __init__(
        self, pipeline: Pipeline, config: ClientConfig, output: IO[str], device: Pace
    ) -> None:
        self.pipeline = pipeline
        self.config = config
        self.output = output
        self.device = device
        self.ended = 0
        self._lock = threading.Lock()

    def _line(self, pending: Pending, record: dict[str, Any]) -> None:
        run_id = pb.TaskState.FromString(pending.data).run_id
        line = json.dumps({"run_id": run_id, "item": pending.item, **record}, separators=(",", ":"))
        with self._lock:
            self.output.write(line + "\n")
            self.output.flush()
            self.ended += 1

    def sent(self, pending: Pending, size: int) -> None:
        pass

    def answered(self, pending: Pending, answer: pb.ItemResult, size: int) -> None:
        status = status_name(answer.status)
        if status == Status.COMPLETED.value:
            result = to_json(decode(answer.output, self.config.limits))
            self._line(pending, {"status": status, "result": result})
        else:
            self._line(pending, {"status": status, "task": answer.task, "error": answer.error})

    def hold(self, pending: Pending) -> bool:
        outcome = advance(self.pipeline, self.config, pending, self.device)
        if outcome.status is Status.CONTINUE:
            return True
        record: dict[str, Any] = {"status": outcome.status.value, "task": outcome.task}
        self._line(pending, {**record, "error": outcome.error})
        return False

    def run_locally(self, pending: Pending) -> None:  # never: recovered items are held
        self.lost(pending, "failed", "an item recovered from --buffer-dir runs on the server")

    def lost(self, pending: Pending, status: str, reason: str) -> None:
        if status != "not_run":  # not_run: it stays in the buffer, for the next start
            self._line(pending, {"status": status, "task": pending.next_task, "error": reason})
