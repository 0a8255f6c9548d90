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
from google.protobuf.message import DecodeError

from ._codec import decode, encode_result
from ._config import ServerConfig
from ._logging import quote
from ._pipeline import ItemContext, Pipeline, Status, arity_error, run_tasks
from ._security import peer_device_id
from .exceptions import CodecError
from .v1 import offload_pb2 as pb

log = logging.getLogger("offload.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Offload"].full_name  # "offload.v1.Offload"

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
        # Serialised: a parsed answer costs several times its wire size in memory.
        self.answers: OrderedDict[int, bytes] = OrderedDict()
        self.highest = -1
        self.counted = 0  # answers counted against ServerConfig.dedup_total (under _runs_lock)


class RemoteExecutor:
    """Runs the remaining tasks of items for many devices; thread-safe."""

    def __init__(self, pipeline: Pipeline, config: ServerConfig = ServerConfig()) -> None:
        self.pipeline = pipeline
        self.config = config
        self._runs: OrderedDict[tuple[str, str], _RunAnswers] = OrderedDict()
        self._runs_lock = threading.Lock()
        self._remembered = 0  # answers kept over all runs

    def _account(self, key: tuple[str, str], run: _RunAnswers, delta: int) -> None:
        """Count a run's answers; past ``dedup_total``, forget the least recently used runs."""
        with self._runs_lock:
            if self._runs.get(key) is not run:
                return  # forgotten meanwhile
            run.counted += delta
            self._remembered += delta
            while self._remembered > self.config.dedup_total and len(self._runs) > 1:
                oldest_key = next(iter(self._runs))
                if oldest_key == key:
                    break
                self._remembered -= self._runs.pop(oldest_key).counted

    @property
    def remembered_answers(self) -> int:
        return self._remembered

    def _answers_for(self, device_id: str, run_id: str) -> _RunAnswers:
        key = (device_id, run_id)
        with self._runs_lock:
            answers = self._runs.get(key)
            if answers is None:
                answers = self._runs[key] = _RunAnswers(self.config.dedup_items)
                while len(self._runs) > self.config.max_runs:
                    self._remembered -= self._runs.popitem(last=False)[1].counted
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
                result = pb.ItemResult.FromString(replay)
                result.duplicate = True
                return result
            if state.item <= answers.highest:
                return pb.ItemResult(
                    item=state.item,
                    status=pb.ItemResult.FAILED,
                    task=state.next_task,
                    error=f"item {state.item} was already processed and its answer is no "
                    f"longer remembered (ServerConfig.dedup_items={answers.capacity}, "
                    f"dedup_total={self.config.dedup_total})",
                    duplicate=True,
                )
            result = self._run(state)
            answers.answers[state.item] = result.SerializeToString()
            answers.highest = state.item
            delta = 1
            while len(answers.answers) > answers.capacity:
                answers.answers.popitem(last=False)
                delta -= 1
        self._account((state.device_id, state.run_id), answers, delta)
        return result

    def _run(self, state: pb.TaskState) -> pb.ItemResult:
        cpu_began = time.thread_time()
        # Checked on the wire value, before decoding (allocating) its arrays; the same message
        # as run_tasks gives on the device, so a result does not depend on where it ran.
        misfit = arity_error(self.pipeline, state.next_task, wire_arg_count(state.args))
        if misfit is not None:
            return pb.ItemResult(
                item=state.item, status=pb.ItemResult.FAILED, task=state.next_task, error=misfit
            )
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
            error = encode_result(result.output, outcome.value, self.config.limits)
            if error is not None:
                result.status = pb.ItemResult.FAILED
                result.task = len(self.pipeline.tasks) - 1
                result.error = error
        else:
            result.task = outcome.task
            result.error = outcome.error
        result.task_times.extend(pb.TaskTime(task=i, seconds=s) for i, s in outcome.task_seconds)
        result.server_cpu_seconds = time.thread_time() - cpu_began
        limit = self.config.limits.max_message_bytes
        if result.ByteSize() > limit:
            size = result.ByteSize()
            result.ClearField("output")
            result.status = pb.ItemResult.FAILED
            result.task = len(self.pipeline.tasks) - 1
            result.error = (
                f"the result is {size} bytes, more than the server's --max-message-bytes {limit}: "
                "raise it on the server and on the clients (Limits.max_message_bytes)"
            )
        return result


def wire_arg_count(args: pb.Value) -> int:
    """How many positional arguments a wire value gives the next task (see ``call_task``)."""
    kind = args.WhichOneof("kind")
    if kind is None or kind == "none":
        return 0
    if kind == "tuple_value":
        return len(args.tuple_value.items)
    return 1


class _Watch:
    """One open stream, as the idle reaper sees it."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self.context = context
        self.last_activity = time.monotonic()
        self.busy = False  # running an item: not idle, however long the tasks take
        self.dropped = False


_READ_AHEAD = 16  # items read and stamped ahead of the one running; then TCP pushes back
_END = object()
# Threads beyond `workers`: health checks, and refusing streams beyond `workers`, still get one.
SPARE_THREADS = 4
# How long a refused stream may take to send its first item, which names the device for the log.
_NAME_WAIT = 1.0
_REFUSAL_LOG_INTERVAL = 10.0  # a device refused again within this is counted, not logged
SHUTTING_DOWN = (
    "the server is shutting down: reconnect (to another server, or to this one once it is "
    "back) and resend the items it has not answered"
)


def _read_ahead(
    requests: Iterator[bytes], context: grpc.ServicerContext, draining: threading.Event
) -> Iterator[tuple[bytes, float]]:
    """Yield items with the time each finished arriving, read by a thread of its own.

    Reading while the previous item runs stamps arrival times that reflect the link rather
    than the server's pace, which is what lets the device measure its link's bandwidth.
    Waiting for an item while the server drains ends the stream UNAVAILABLE.
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
            if draining.is_set():
                context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            continue
        if entry is _END:
            return
        if isinstance(entry, Exception):
            raise entry
        yield entry  # type: ignore[misc]


def _first_message(requests: Iterator[bytes], wait: float) -> bytes | None:
    """The stream's first message if it arrives within ``wait`` seconds, else None."""
    box: queue.Queue[bytes | None] = queue.Queue(maxsize=1)

    def read() -> None:
        try:
            box.put(next(requests, None))
        except Exception:  # the stream ended or broke: nothing to name it by
            box.put(None)

    threading.Thread(target=read, name="offload-refused", daemon=True).start()
    try:
        return box.get(timeout=wait)
    except queue.Empty:
        return None


def _device_of(data: bytes | None) -> str | None:
    """The device id a stream's first message claims, if it is a TaskState that names one."""
    if data is None:
        return None
    try:
        return pb.TaskState.FromString(data).device_id or None
    except DecodeError:
        return None


class _RefusalLog:
    """Which refusals to log: a device's first, then at most one per ``interval`` with the
    number refused meanwhile, so that a device retrying in a loop cannot flood the log."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, int]] = {}  # device: (last logged, refused since)

    def count(self, device: str) -> int:
        """Count a refusal; the refusals to report now (this one included), or 0 for none."""
        now = time.monotonic()
        with self._lock:
            if len(self._seen) > 10_000:  # forget devices quiet for an interval
                self._seen = {
                    d: seen for d, seen in self._seen.items() if now - seen[0] < self.interval
                }
            logged, since = self._seen.get(device, (-self.interval, 0))
            if now - logged < self.interval:
                self._seen[device] = (logged, since + 1)
                return 0
            self._seen[device] = (now, 0)
            return since + 1


class OffloadServicer:
    """The gRPC face of ``RemoteExecutor``.

    Requests arrive as raw bytes and are parsed here, so that garbage is answered with
    INVALID_ARGUMENT naming the problem instead of gRPC's generic deserialisation failure.
    """

    def __init__(self, executor: RemoteExecutor) -> None:
        self.executor = executor
        self._idle_limit = executor.config.stream_idle_seconds
        self._stream_limit = executor.config.workers
        self._watches: dict[int, _Watch] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._draining = threading.Event()
        self._refusals = _RefusalLog(_REFUSAL_LOG_INTERVAL)
        self._reaper = threading.Thread(target=self._reap, name="offload-reaper", daemon=True)
        self._reaper.start()

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.stream_stream_rpc_method_handler(
            self.ExecuteRemaining,
            request_deserializer=None,
            response_serializer=pb.ItemResult.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {"ExecuteRemaining": method})

    def close(self) -> None:
        self._closed.set()

    def drain(self) -> None:
        """Shutting down: idle streams end now, busy ones after the item they are running.

        Either way a stream ends UNAVAILABLE (not CANCELLED, which a client takes for its own
        doing), which tells a client to resend what is unanswered elsewhere (or later) rather
        than wait for the grace period to run out.
        """
        self._draining.set()

    def _reap(self) -> None:
        interval = min(1.0, self._idle_limit / 4)
        while not self._closed.wait(interval):
            now = time.monotonic()
            with self._lock:
                idle = [
                    w
                    for w in self._watches.values()
                    if not w.busy and not w.dropped and now - w.last_activity > self._idle_limit
                ]
            for watch in idle:
                watch.dropped = True
                log.warning(
                    "event=idle-drop peer=%s idle_s=%.1f limit_s=%.1f",
                    quote(watch.context.peer()),
                    now - watch.last_activity,
                    self._idle_limit,
                )
                # Cancelling unblocks the stream's thread whether it waits to read or to write.
                watch.context.cancel()

    def ExecuteRemaining(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[pb.ItemResult]:
        peer = context.peer()
        proven = peer_device_id(context)
        device = None
        count = 0
        watch = _Watch(context)
        with self._lock:
            open_streams = len(self._watches)
            full = open_streams >= self._stream_limit
            if not full:
                self._watches[id(watch)] = watch
        if full:
            self._refuse_full(request_iterator, context, proven, open_streams)
        try:
            for data, arrived in _read_ahead(request_iterator, context, self._draining):
                watch.busy = True
                state = self._parse(data, count, context, peer)
                if proven is not None and state.device_id != proven:
                    if device is None:
                        log.warning(
                            "event=device-id-override claimed=%s certificate=%s peer=%s",
                            quote(state.device_id),
                            quote(proven),
                            quote(peer),
                        )
                    state.device_id = proven  # the certificate, not the message, names the device
                if device is None:
                    device = state.device_id
                    log.info("event=connect device=%s peer=%s", quote(device), quote(peer))
                try:
                    result = self.executor.execute(state)
                except RequestRejected as exc:
                    log.warning(
                        "event=reject device=%s peer=%s code=%s reason=%s",
                        quote(state.device_id),
                        quote(peer),
                        exc.code.name,
                        quote(exc),
                    )
                    context.abort(exc.code, str(exc))
                result.server_receive_time = arrived
                result.server_seconds = time.monotonic() - arrived
                watch.busy = False
                yield result
                watch.last_activity = time.monotonic()
                count += 1
                if self._draining.is_set():
                    context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        finally:
            with self._lock:
                del self._watches[id(watch)]
            if device is not None:
                log.info(
                    "event=disconnect device=%s peer=%s items=%d", quote(device), quote(peer), count
                )

    def _refuse_full(
        self,
        requests: Iterator[bytes],
        context: grpc.ServicerContext,
        proven: str | None,
        open_streams: int,
    ) -> None:
        """End a stream beyond ``workers`` with RESOURCE_EXHAUSTED, and log it (rate-limited)."""
        limit = self._stream_limit
        message = (
            f"the server is full: it serves {limit} device stream{'s' * (limit != 1)} at a time "
            f"(--workers {limit}) and has {open_streams} open; retry later, or raise the "
            "server's --workers or add servers"
        )
        device = proven or _device_of(_first_message(requests, _NAME_WAIT))
        refused = self._refusals.count(device or context.peer())
        if refused:
            log.warning(
                "event=reject device=%s peer=%s code=RESOURCE_EXHAUSTED workers=%d refused=%d "
                "reason=%s",
                quote(device or "?"),
                quote(context.peer()),
                limit,
                refused,
                quote(message),
            )
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    def _parse(
        self, data: bytes, index: int, context: grpc.ServicerContext, peer: str
    ) -> pb.TaskState:
        limit = self.executor.config.limits.max_message_bytes
        if len(data) > limit:
            # gRPC lets messages up to twice the limit through (server_options) so that the
            # refusal can say which option to raise; its own text does not.
            message = (
                f"message {index} of the stream is {len(data)} bytes, more than this server's "
                f"--max-message-bytes {limit}: raise it on the server and on the client"
            )
            log.warning(
                "event=reject peer=%s code=RESOURCE_EXHAUSTED reason=%s",
                quote(peer),
                quote(message),
            )
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        try:
            return pb.TaskState.FromString(data)
        except DecodeError as exc:
            message = f"message {index} of the stream is not an offload.v1.TaskState: {exc}"
            log.warning(
                "event=reject peer=%s code=INVALID_ARGUMENT reason=%s", quote(peer), quote(message)
            )
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
            raise  # pragma: no cover - abort raises

    @property
    def active_streams(self) -> int:
        with self._lock:
            return len(self._watches)
