"""The server's side of ``ExecuteRemaining``: validate an item, run its remaining tasks, answer.

``RemoteExecutor`` holds no gRPC: it turns a ``TaskState`` into an ``ItemResult`` (or raises
``RequestRejected``), so the client's in-process transport and the gRPC servicer share it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator

import grpc

from ._codec import decode, encode_into
from ._config import ServerConfig
from ._logging import quote
from ._pipeline import ItemContext, Pipeline, Status, run_tasks
from .exceptions import CodecError
from .v1 import offload_pb2 as pb
from .v1 import offload_pb2_grpc as pb_grpc

log = logging.getLogger("offload.server")

_STATUS = {
    Status.COMPLETED: pb.ItemResult.COMPLETED,
    Status.FILTERED: pb.ItemResult.FILTERED,
    Status.FAILED: pb.ItemResult.FAILED,
}


class RequestRejected(Exception):
    """An item the server will not run; ends the stream with ``code``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class _RunAnswers:
    """The answers recently given to one device run, to replay (not re-run) a resent item."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.lock = threading.Lock()
        self.answers: OrderedDict[int, pb.ItemResult] = OrderedDict()
        self.highest = -1


class RemoteExecutor:
    """Runs the remaining tasks of items for many devices; thread-safe."""

    def __init__(self, pipeline: Pipeline, config: ServerConfig = ServerConfig()) -> None:
        self.pipeline = pipeline
        self.config = config
        self._runs: OrderedDict[tuple[str, str], _RunAnswers] = OrderedDict()
        self._runs_lock = threading.Lock()

    def _answers_for(self, device_id: str, run_id: str) -> _RunAnswers:
        key = (device_id, run_id)
        with self._runs_lock:
            answers = self._runs.get(key)
            if answers is None:
                answers = self._runs[key] = _RunAnswers(self.config.dedup_items)
                while len(self._runs) > self.config.max_runs:
                    self._runs.popitem(last=False)
            else:
                self._runs.move_to_end(key)
            return answers

    def validate(self, state: pb.TaskState) -> None:
        """Reject an item that this server cannot run, naming the field that is wrong."""
        p = self.pipeline
        if state.pipeline != p.name or state.fingerprint != p.fingerprint:
            raise RequestRejected(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"pipeline mismatch: the item is for {state.pipeline!r} (fingerprint "
                f"{state.fingerprint!r}) but this server runs {p.name!r} (fingerprint "
                f"{p.fingerprint!r}); start both sides with the same --pipeline and version",
            )
        last = len(p.tasks) - 1
        if not 1 <= state.next_task <= last:
            raise RequestRejected(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"next_task {state.next_task} is outside [1, {last}]: the device runs task 0 and "
                f"the server at least the last task of {p.name} ({p.describe()})",
            )
        if not state.device_id:
            raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, "device_id is empty")

    def execute(self, state: pb.TaskState) -> pb.ItemResult:
        self.validate(state)
        answers = self._answers_for(state.device_id, state.run_id)
        # Holding the run's lock while running keeps one device run's items in order even if it
        # has two streams open (a reconnect racing the old stream).
        with answers.lock:
            replay = answers.answers.get(state.item)
            if replay is not None:
                result = pb.ItemResult()
                result.CopyFrom(replay)
                result.duplicate = True
                return result
            if state.item <= answers.highest:
                return pb.ItemResult(
                    item=state.item,
                    status=pb.ItemResult.FAILED,
                    task=state.next_task,
                    error=f"item {state.item} was already processed and its answer is no "
                    f"longer remembered (ServerConfig.dedup_items={answers.capacity})",
                    duplicate=True,
                )
            result = self._run(state)
            answers.answers[state.item] = result
            answers.highest = state.item
            while len(answers.answers) > answers.capacity:
                answers.answers.popitem(last=False)
            return result

    def _run(self, state: pb.TaskState) -> pb.ItemResult:
        cpu_began = time.thread_time()
        try:
            args = decode(state.args, self.config.limits)
        except CodecError as exc:
            raise RequestRejected(
                grpc.StatusCode.INVALID_ARGUMENT, f"item {state.item}: {exc}"
            ) from None
        context = ItemContext(
            state.device_id, state.run_id, state.item, state.capture_time, on_server=True
        )
        outcome = run_tasks(self.pipeline, state.next_task, len(self.pipeline.tasks), args, context)
        result = pb.ItemResult(item=state.item, status=_STATUS[outcome.status])
        if outcome.status is Status.COMPLETED:
            try:
                encode_into(result.output, outcome.value, self.config.limits)
            except CodecError as exc:
                result.status = pb.ItemResult.FAILED
                result.task = len(self.pipeline.tasks) - 1
                result.error = f"the result cannot be sent back: {exc}"
        else:
            result.task = outcome.task
            result.error = outcome.error
        result.task_times.extend(pb.TaskTime(task=i, seconds=s) for i, s in outcome.task_seconds)
        result.server_cpu_seconds = time.thread_time() - cpu_began
        return result


_READ_AHEAD = 16  # items read and stamped ahead of the one running; then TCP pushes back
_END = object()


def _read_ahead(
    requests: Iterator[pb.TaskState], context: grpc.ServicerContext
) -> Iterator[tuple[pb.TaskState, float]]:
    """Yield items with the time each finished arriving, read by a thread of its own.

    Reading while the previous item runs stamps arrival times that reflect the link rather
    than the server's pace, which is what lets the device measure its link's bandwidth.
    """
    inbox: queue.Queue[object] = queue.Queue(maxsize=_READ_AHEAD)

    def offer(entry: object) -> bool:
        while context.is_active():
            try:
                inbox.put(entry, timeout=0.25)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for state in requests:
                if not offer((state, time.monotonic())):
                    return
        except Exception as exc:  # the stream broke: hand the error to the answering side
            offer(exc)
            return
        offer(_END)

    threading.Thread(target=read, name="offload-read", daemon=True).start()
    while True:
        try:
            entry = inbox.get(timeout=0.25)
        except queue.Empty:
            # A cancelled stream may end with nothing handed over: never outlive it.
            if not context.is_active():
                return
            continue
        if entry is _END:
            return
        if isinstance(entry, Exception):
            raise entry
        yield entry  # type: ignore[misc]


class OffloadServicer(pb_grpc.OffloadServicer):
    """The gRPC face of ``RemoteExecutor``."""

    def __init__(self, executor: RemoteExecutor) -> None:
        self.executor = executor
        self._streams = 0
        self._lock = threading.Lock()

    def ExecuteRemaining(
        self, request_iterator: Iterator[pb.TaskState], context: grpc.ServicerContext
    ) -> Iterator[pb.ItemResult]:
        peer = context.peer()
        device = None
        count = 0
        with self._lock:
            self._streams += 1
        try:
            for state, arrived in _read_ahead(request_iterator, context):
                if device is None:
                    device = state.device_id
                    log.info("event=connect device=%s peer=%s", quote(device), quote(peer))
                try:
                    result = self.executor.execute(state)
                    result.server_receive_time = arrived
                    result.server_seconds = time.monotonic() - arrived
                    yield result
                except RequestRejected as exc:
                    log.warning(
                        "event=reject device=%s peer=%s code=%s reason=%s",
                        quote(state.device_id),
                        quote(peer),
                        exc.code.name,
                        quote(exc),
                    )
                    context.abort(exc.code, str(exc))
                count += 1
        finally:
            with self._lock:
                self._streams -= 1
            if device is not None:
                log.info(
                    "event=disconnect device=%s peer=%s items=%d", quote(device), quote(peer), count
                )

    @property
    def active_streams(self) -> int:
        return self._streams
