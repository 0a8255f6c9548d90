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
from dataclasses import dataclass
from typing import IO, Any

from ._codec import check_size, decode, encode_into
from ._config import ClientConfig
from ._pipeline import ItemContext, Pipeline, Status, run_tasks
from ._report import Recorder
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


@dataclass
class _InFlight:
    capture_perf: float
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
        self._credits = threading.Semaphore(config.window)
        self._in_flight: dict[int, _InFlight] = {}
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._stream_error: ServerError | None = None
        self._answers_done = threading.Event()

    @property
    def split(self) -> int:
        """Tasks run on the device for the next item."""
        return self.config.local_tasks or len(self.pipeline.tasks)

    def stop(self) -> None:
        """Stop capturing; items already captured still finish (safe from a signal handler)."""
        self._stop.set()

    def run(self) -> dict[str, Any]:
        """Capture and process until the source ends, ``frames`` is reached or ``stop()``."""
        stream = self.transport.open_stream() if self.transport else None
        reader = None
        if stream is not None:
            reader = threading.Thread(
                target=self._read_answers, args=(stream,), name="offload-answers", daemon=True
            )
            reader.start()
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
        return self.recorder.summary(
            device_id=self.config.device_id,
            run_id=self.run_id,
            mode="client-only" if self.config.local_tasks is None else f"split {self.split}",
            local_tasks=self.split,
            server=getattr(self.transport, "target", None),
            window=self.config.window,
            error=str(self._stream_error) if self._stream_error else None,
        )

    def _capture_loop(self, stream: Stream | None) -> None:
        n = len(self.pipeline.tasks)
        item = 0
        while not self._stop.is_set() and self._stream_error is None:
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
                assert stream is not None and split < n
                self._send(stream, item, split, outcome.value, capture_time, began)
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
            check_size(state, self.config.limits, f"item {item}")
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
            self._in_flight[item] = _InFlight(began, args)
        self.recorder.bytes_sent += stream.send(state)

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
