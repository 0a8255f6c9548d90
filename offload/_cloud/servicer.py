"""The gRPC face of the executor: a stream's read-ahead, the stream limit, the idle reaper and
the drain on shutdown."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator

import grpc
from google.protobuf.message import DecodeError

from .._logging import quote
from .._security import peer_device_id
from .._wire import METHOD_NAME, SERVICE_NAME, TOO_LARGE, status_code
from ..v1 import offload_pb2 as pb
from .executor import MAX_ID_CHARS, RemoteExecutor, RequestRejected

log = logging.getLogger("offload.server")


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
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {METHOD_NAME: method})

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
                            quote(state.device_id[:MAX_ID_CHARS]),
                            quote(proven),
                            quote(peer),
                        )
                    state.device_id = proven  # the certificate, not the message, names the device
                if device is None:
                    device = state.device_id[:MAX_ID_CHARS]  # longer: refused, named in short
                    log.info("event=connect device=%s peer=%s", quote(device), quote(peer))
                try:
                    result = self.executor.execute(state)
                except RequestRejected as exc:
                    log.warning(
                        "event=reject device=%s peer=%s code=%s reason=%s",
                        quote(state.device_id[:MAX_ID_CHARS]),
                        quote(peer),
                        exc.code,
                        quote(exc),
                    )
                    context.abort(status_code(exc.code), str(exc))
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
                f"message {index} of the stream is {len(data)} bytes, {TOO_LARGE[1]} {limit}: "
                "raise it on the server and on the client"
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
