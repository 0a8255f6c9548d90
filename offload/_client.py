"""The device side: capture, run the local tasks, stream the rest, match answers to items.

The capture loop runs in the caller's thread; one thread reads answers. A credit window bounds
the items in flight: when it is full the capture loop waits (back-pressure), so a slow server
or link slows capture down instead of filling memory.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import IO, Any

from ._codec import check_size, decode, encode_into
from ._config import ClientConfig
from ._link import Link, Pending
from ._pipeline import ItemContext, Pipeline, Status, run_tasks
from ._report import Recorder
from ._transport import Transport
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


class Client:
    """Runs one device's stream of items. ``transport`` is None in client-only mode."""

    def __init__(
        self,
        pipeline: Pipeline,
        config: ClientConfig,
        transport: Transport | None = None,
        output: IO[str] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        check_split(pipeline, config.local_tasks)
        if config.window < 1:
            raise ConfigError(f"--window {config.window}: at least 1 item must be in flight")
        needs_server = config.local_tasks is not None and config.local_tasks < len(pipeline.tasks)
        if needs_server and transport is None:
            raise ConfigError(f"split {config.local_tasks} needs a server: give a transport")
        self.pipeline = pipeline
        self.config = config
        self.transport = transport if needs_server else None
        self.run_id = uuid.uuid4().hex
        self.recorder = Recorder(pipeline, output)
        self._stop = stop or threading.Event()
        # The link owns the stream: credits, resends, reconnects, the offline buffer.
        self.link = (
            Link(self.transport, config.link, config.window, self) if self.transport else None
        )

    @property
    def split(self) -> int:
        """Tasks run on the device for the next item."""
        return self.config.local_tasks or len(self.pipeline.tasks)

    def stop(self) -> None:
        """Stop capturing; items already captured still finish (safe from a signal handler)."""
        self._stop.set()

    def run(self) -> dict[str, Any]:
        """Capture and process until the source ends, ``frames`` is reached or ``stop()``."""
        if self.link is not None and not self.link.start():
            log.warning(
                "event=offline target=%s: the server does not answer yet; running every task "
                "here until it does",
                getattr(self.transport, "target", "?"),
            )
        finished = False
        try:
            self._capture_loop()
            finished = True
        finally:
            if self.link is not None:
                if finished:
                    self.link.finish()
                else:
                    self.link.abort()
        return self.report()

    @property
    def error(self) -> ServerError | None:
        """Why the server refused the stream, if it did (the report also says)."""
        return self.link.error if self.link is not None else None

    def report(self) -> dict[str, Any]:
        return self.recorder.summary(
            device_id=self.config.device_id,
            run_id=self.run_id,
            mode="client-only" if self.config.local_tasks is None else f"split {self.split}",
            local_tasks=self.split,
            server=getattr(self.transport, "target", None),
            window=self.config.window,
            error=str(self.error) if self.error else None,
            link=self.link.report() if self.link is not None else None,
        )

    def _capture_loop(self) -> None:
        n = len(self.pipeline.tasks)
        item = 0
        while not self._stop.is_set() and self.error is None:
            if self.config.frames is not None and item >= self.config.frames:
                break
            split = self.split
            capture_time = time.time()
            began = time.perf_counter()
            context = ItemContext(self.config.device_id, self.run_id, item, capture_time, False)
            outcome = run_tasks(self.pipeline, 0, split, None, context)
            if outcome.task == 0 and outcome.status is Status.FILTERED:
                log.info("event=end-of-stream items=%d", item)
                break
            if outcome.task == 0 and outcome.status is Status.FAILED:
                raise OffloadError(f"capture (task 0) failed: {outcome.error}")
            self.recorder.captured_item(began)
            self.recorder.device_times(outcome.task_seconds)
            if outcome.status is Status.CONTINUE:
                assert split < n
                self._send(item, split, outcome.value, capture_time, began)
            else:
                now = time.perf_counter()
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
            check_size(state, self.config.limits, f"item {item}")
        except OffloadError as exc:
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
        self.link.submit(Pending(item, split, state.SerializeToString(), began))

    # --- how items end (called by the link's threads) -----------------------------------------

    def sent(self, pending: Pending, size: int) -> None:
        self.recorder.bytes_sent += size

    def answered(self, pending: Pending, answer: pb.ItemResult, size: int) -> None:
        now = time.perf_counter()
        self.recorder.bytes_received += size
        self.recorder.server_times(
            [(t.task, t.seconds) for t in answer.task_times], answer.server_cpu_seconds
        )
        result = None
        if answer.status == pb.ItemResult.COMPLETED:
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
        outcome = run_tasks(self.pipeline, state.next_task, len(self.pipeline.tasks), args, context)
        self.recorder.device_times(outcome.task_seconds)
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

    def lost(self, pending: Pending, status: str, reason: str) -> None:
        now = time.perf_counter()
        self.recorder.finished(
            pending.item,
            status,
            None,
            task=pending.next_task,
            error=reason,
            latency=now - pending.began,
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
