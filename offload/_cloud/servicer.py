"""The gRPC face of the executor: a stream's read-ahead, the stream limit, the idle reaper and
the drain on shutdown."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn

import grpc
from google.protobuf.message import DecodeError

from .. import _batch
from .._codec import READS, wire_problem
from .._logging import RefusalLog, quote
from .._security import REFUSAL_LOG_INTERVAL, peer_device_id
from .._wire import (
    BATCH_METHOD_NAME,
    METHOD_NAME,
    NOT_RUN_TRAILER,
    SERVICE_NAME,
    TOO_LARGE,
    reads_header,
    status_code,
)
from ..v1 import offload_pb2 as pb
from .executor import MAX_ID_CHARS, RemoteExecutor, RequestRejected

log = logging.getLogger("offload.server")


class _Watch:
    """One open stream, as the idle reaper sees it."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self.context = context
        self.opened = self.last_activity = time.monotonic()
        # No item yet: the stream holds a thread but not one of `workers` (a stream of headers
        # alone must not keep devices out).
        self.waiting = True
        self.busy = False  # running an item: not idle, however long the tasks take
        self.dropped = False
        self.held = 0  # bytes read and not yet answered (under ReadBudget's lock)
        self.closed = False


class ReadBudget:
    """The bytes of items read and not yet answered, per stream and over all streams.

    A stream reads its next message only while it holds less than ``per_stream`` bytes and the
    server less than ``total``; then TCP pushes back. A stream that holds nothing may always read
    one, so that honest devices keep being served (an item at a time) while others hold the
    budget. So a stream holds at most ``per_stream`` plus one message (up to twice
    ``--max-message-bytes``), and the server ``total`` plus one message per stream.
    """

    def __init__(self, per_stream: int, total: int) -> None:
        self.per_stream = per_stream
        self.total = total
        self.held = 0
        self.peak = 0  # the most ever held
        self.waiting = 0  # streams waiting for room now
        self._room = threading.Condition()

    def wait_for_room(self, stream: _Watch) -> bool:
        """Wait until ``stream`` may read its next message; False once the stream has ended."""
        with self._room:
            while not stream.closed and stream.context.is_active():
                if stream.held == 0 or (stream.held < self.per_stream and self.held < self.total):
                    return True
                self.waiting += 1
                self._room.wait(0.25)
                self.waiting -= 1
            return False

    def take(self, stream: _Watch, size: int) -> None:
        with self._room:
            if not stream.closed:
                stream.held += size
                self.held += size
                self.peak = max(self.peak, self.held)

    def give(self, stream: _Watch, size: int) -> None:
        with self._room:
            size = min(size, stream.held)
            stream.held -= size
            self.held -= size
            self._room.notify_all()

    def close(self, stream: _Watch) -> None:
        """The stream ended: what it still holds (read, never run) is given back."""
        with self._room:
            stream.closed = True
            self.held -= stream.held
            stream.held = 0
            self._room.notify_all()


_READ_AHEAD = 16  # items read ahead of the one running, whatever their bytes (ReadBudget)
_END = object()
TASK_STATE_ARGS = pb.TaskState.DESCRIPTOR.fields_by_name["args"].number
# Threads beyond `workers`: health checks, and refusing streams beyond `workers`, still get one.
SPARE_THREADS = 4
SHUTTING_DOWN = (
    "the server is shutting down: reconnect (to another server, or to this one once it is "
    "back) and resend the items it has not answered"
)


def _end_drained(context: grpc.ServicerContext) -> NoReturn:
    """End a stream of a draining server, to be resent elsewhere: every item it has not
    answered is unrun (the trailer tells the device those sends do not count)."""
    context.set_trailing_metadata((NOT_RUN_TRAILER,))
    context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
    raise AssertionError("unreachable")  # pragma: no cover - abort raises


def _read_ahead(
    requests: Iterator[bytes],
    watch: _Watch,
    budget: ReadBudget,
    draining: threading.Event,
) -> Iterator[tuple[bytes, float]]:
    """Yield items with the time each finished arriving, read by a thread of its own.

    Reading while the previous item runs stamps arrival times that reflect the link rather
    than the server's pace, which is what lets the device measure its link's bandwidth. What
    is read counts against ``budget`` until the answering side gives it back.
    Waiting for an item while the server drains ends the stream UNAVAILABLE.
    """
    context = watch.context
    inbox: queue.Queue[object] = queue.Queue(maxsize=_READ_AHEAD)

    def wake() -> None:  # a cancelled stream frees its thread now, not at the next poll
        try:
            inbox.put_nowait(_END)
        except queue.Full:
            pass  # the answering side is not waiting

    context.add_callback(wake)

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
            while budget.wait_for_room(watch):
                state = next(requests, None)
                if state is None:
                    break
                budget.take(watch, len(state))
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
                _end_drained(context)
            continue
        if entry is _END:
            return
        if isinstance(entry, Exception):
            raise entry
        yield entry  # type: ignore[misc]


ANSWER_HOLD = 0.010  # seconds an answer may wait for the rest of its batch's items
MAX_HELD_ANSWERS = 64  # answers made and not yet sent, per stream (and max_bytes of them)


@dataclass
class _Peer:
    """Who a stream is from, as its log lines name it, and how many items it sent."""

    address: str
    proven: str | None  # the device its certificate names
    device: str | None = None
    items: int = 0


class _Answers:
    """A batch stream's answers, made on a thread of its own, sent a message at a time.

    The answers of one message go together; none waits more than ``ANSWER_HOLD`` for the rest
    of its message (an item's work may take any time, and the device counts a stall from its
    latest answer). A message of answers is at most as large as the batch it answers (the
    device sends what it can receive) or one answer. The thread waits while
    ``MAX_HELD_ANSWERS`` answers or ``max_bytes`` are unsent, so a device that does not read
    its answers holds no more. One-item streams do not start it (``__iter__`` does).
    """

    def __init__(
        self, answers: Iterator[tuple[bytes, float, int, bool]], watch: _Watch, max_bytes: int
    ) -> None:
        self._source = answers
        self._watch = watch
        self._max_bytes = max_bytes
        self._ready = threading.Condition()
        self._held: list[tuple[bytes, float, int]] = []  # answer, arrived, its batch's size
        self._bytes = 0
        self._whole = 0  # held answers whose batch is answered whole
        self._ended = False
        self._closed = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        try:
            for answer, arrived, size, last in self._source:
                with self._ready:
                    while not self._closed and (
                        len(self._held) >= MAX_HELD_ANSWERS or self._bytes >= self._max_bytes
                    ):
                        self._ready.wait(0.25)
                    if self._closed:
                        return
                    self._held.append((answer, arrived, size))
                    self._bytes += len(answer)
                    if last:
                        self._whole = len(self._held)
                        self._ready.notify_all()
        except BaseException as exc:  # handed to gRPC's thread: it ends the stream with it
            self._error = exc
        finally:
            with self._ready:
                self._ended = True
                self._ready.notify_all()

    def __iter__(self) -> Iterator[bytes]:
        self._thread = threading.Thread(target=self._run, name="offload-run", daemon=True)
        self._thread.start()
        context = self._watch.context
        while True:
            with self._ready:
                while not self._held and not self._ended:
                    if not self._ready.wait(0.25) and not context.is_active():
                        return
                if not self._held:
                    if self._error is not None:
                        raise self._error
                    return
                due = time.monotonic() + ANSWER_HOLD
                while not self._whole and not self._ended:
                    if not self._ready.wait(max(0.0, due - time.monotonic())):
                        break
                taken, cap, total = 0, self._held[0][2], 0
                for answer, _, _ in self._held:
                    total += _batch.framing(len(answer)) + len(answer) + _batch.STAMPS
                    if taken and total > cap:
                        break
                    taken += 1
                sent, self._held = self._held[:taken], self._held[taken:]
                self._bytes -= sum(len(answer) for answer, _, _ in sent)
                self._whole = max(0, self._whole - taken)
                self._ready.notify_all()
            now = time.monotonic()
            yield _batch.join(_batch.stamped(a, arrived, now - arrived) for a, arrived, _ in sent)
            self._watch.last_activity = time.monotonic()

    def close(self) -> None:
        """Stop making answers; wait for the item running, if any."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        if self._thread is not None:
            self._thread.join()


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
        self._working = 0  # streams that have sent an item: at most `workers`
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._draining = threading.Event()
        self._refusals = RefusalLog(REFUSAL_LOG_INTERVAL)
        config = executor.config
        self.read_budget = ReadBudget(config.read_ahead_bytes, config.read_ahead_total_bytes)
        self._reaper = threading.Thread(target=self._reap, name="offload-reaper", daemon=True)
        self._reaper.start()

    def handler(self) -> grpc.GenericRpcHandler:
        # Bytes each way: requests are parsed here, answers encoded once by the executor.
        methods = {
            METHOD_NAME: grpc.stream_stream_rpc_method_handler(self.ExecuteRemaining),
            BATCH_METHOD_NAME: grpc.stream_stream_rpc_method_handler(self.ExecuteBatches),
        }
        return grpc.method_handlers_generic_handler(SERVICE_NAME, methods)

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
    ) -> Iterator[bytes]:
        """One item per message each way (bytes each way: the servicer parses, the executor
        encodes each answer once)."""
        return self._serve(request_iterator, context, batched=False)

    def ExecuteBatches(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """``ExecuteRemaining`` with several items per message each way (``_batch.py``)."""
        return self._serve(request_iterator, context, batched=True)

    def _serve(
        self, requests: Iterator[bytes], context: grpc.ServicerContext, batched: bool
    ) -> Iterator[bytes]:
        """Both RPCs: each item of a message is parsed, checked, admitted and run as it would be
        alone; a batch's bytes are given back to the read budget item by item. One item per
        message: each answer goes as soon as it is ready. Batches: items run on a thread of
        their own and the answers of one message go together (``_Answers``)."""
        watch = _Watch(context)
        self._admit_waiting(watch)
        context.send_initial_metadata(reads_header(READS))
        peer = _Peer(context.peer(), peer_device_id(context))
        answers = self._answers(requests, watch, peer, batched)
        limit = self.executor.config.limits.max_message_bytes
        batches = _Answers(answers, watch, limit) if batched else None
        try:
            if batches is not None:
                yield from batches
            else:
                for answer, arrived, _, _ in answers:
                    yield _batch.stamped(answer, arrived, time.monotonic() - arrived)
                    watch.last_activity = time.monotonic()
        finally:
            if batches is not None:
                batches.close()  # the running item ends first: the stream's worker is held
            self.read_budget.close(watch)
            with self._lock:
                del self._watches[id(watch)]
                self._working -= not watch.waiting
            if peer.device is not None:
                log.info(
                    "event=disconnect device=%s peer=%s items=%d",
                    quote(peer.device),
                    quote(peer.address),
                    peer.items,
                )

    def _answers(
        self, requests: Iterator[bytes], watch: _Watch, peer: _Peer, batched: bool
    ) -> Iterator[tuple[bytes, float, int, bool]]:
        """Each item's encoded answer, the time its message arrived, the message's size, and
        whether it was the message's last item."""
        context = watch.context
        for data, arrived in _read_ahead(requests, watch, self.read_budget, self._draining):
            held = len(data)
            items = self._split(data, peer.items, context, peer.address) if batched else (data,)
            for item in items:
                watch.busy = True
                state = self._parse(item, peer.items, context, peer.address, batched)
                if watch.waiting:
                    self._admit_working(watch, peer.proven or state.device_id[:MAX_ID_CHARS])
                peer.device = self._claim(state, peer.proven, peer.device, peer.address)
                answer = self._execute(state, context, peer.address)
                watch.busy = False
                size = _batch.framing(len(item)) + len(item) if batched else held
                self.read_budget.give(watch, size)
                held -= size
                peer.items += 1
                yield answer, arrived, len(data), held <= 0
                if self._draining.is_set():  # after the answer: it was run
                    _end_drained(context)
            self.read_budget.give(watch, held)  # a batch's unknown fields

    def _admit_waiting(self, watch: _Watch) -> None:
        """Admit a new stream as waiting for its first item; with ``workers`` waiting already,
        the one that has waited longest is ended (a device sends its first item at once)."""
        with self._lock:
            waiting = [w for w in self._watches.values() if w.waiting and not w.dropped]
            evict = None
            if len(waiting) >= self._stream_limit:
                evict = min(waiting, key=lambda w: w.opened)
                evict.dropped = True
            self._watches[id(watch)] = watch
        if evict is not None:
            log.warning(
                "event=idle-drop peer=%s idle_s=%.1f reason=%s",
                quote(evict.context.peer()),
                time.monotonic() - evict.opened,
                quote("no item yet, and a newer stream waits for its first"),
            )
            evict.context.cancel()

    def _admit_working(self, watch: _Watch, device: str) -> None:
        """A stream's first item: it takes one of ``workers``, or is refused (naming the device)."""
        with self._lock:
            full = self._working >= self._stream_limit
            if not full:
                self._working += 1
                watch.waiting = False
            working = self._working
        if full:
            self._refuse_full(watch.context, device, working)

    def _split(
        self, data: bytes, index: int, context: grpc.ServicerContext, peer: str
    ) -> Iterator[memoryview]:
        """The items of a TaskBatch, one at a time (a batch holds one item in memory beside
        its message); a batch of several counts whole against the message limit (a batch of one
        is its item, checked as such)."""
        items = _batch.split(data)
        limit = self.executor.config.limits.max_message_bytes
        try:
            if len(data) > limit:
                first = next(items, None)
                if next(items, None) is not None:
                    self._reject(
                        context,
                        peer,
                        "RESOURCE_EXHAUSTED",
                        f"a batch of several items after item {index} is {len(data)} bytes, "
                        f"{TOO_LARGE[1]} {limit}: send fewer items per message (--batch-bytes), "
                        "or raise it on the server and on the client",
                    )
                if first is not None:
                    yield first
                return
            yield from items
        except _batch.BatchError as exc:
            self._reject(
                context,
                peer,
                "INVALID_ARGUMENT",
                f"a batch after item {index} is not an offload.v1.TaskBatch: {exc}",
            )

    def _reject(
        self, context: grpc.ServicerContext, peer: str, code: str, message: str
    ) -> NoReturn:
        log.warning("event=reject peer=%s code=%s reason=%s", quote(peer), code, quote(message))
        context.abort(status_code(code), message)
        raise AssertionError("unreachable")  # pragma: no cover - abort raises

    def _claim(self, state: pb.TaskState, proven: str | None, device: str | None, peer: str) -> str:
        """The stream's device: the certificate's over the message's claim; logged once."""
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
        return device

    def _execute(self, state: pb.TaskState, context: grpc.ServicerContext, peer: str) -> bytes:
        """The encoded answer to ``state``; a refused item ends the stream."""
        try:
            return self.executor.execute_encoded(state)[1]
        except RequestRejected as exc:
            log.warning(
                "event=reject device=%s peer=%s code=%s reason=%s",
                quote(state.device_id[:MAX_ID_CHARS]),
                quote(peer),
                exc.code,
                quote(exc),
            )
            if exc.code == "UNAVAILABLE":  # retry later: nothing unanswered was run
                context.set_trailing_metadata((NOT_RUN_TRAILER,))
            context.abort(status_code(exc.code), str(exc))
            raise  # pragma: no cover - abort raises

    def _refuse_full(
        self, context: grpc.ServicerContext, device: str | None, open_streams: int
    ) -> None:
        """End a stream beyond ``workers`` with RESOURCE_EXHAUSTED, and log it (rate-limited)."""
        limit = self._stream_limit
        message = (
            f"the server is full: it serves {limit} device stream{'s' * (limit != 1)} at a time "
            f"(--workers {limit}) and has {open_streams} open; retry later, or raise the "
            "server's --workers or add servers"
        )
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
        self,
        data: bytes | memoryview,
        index: int,
        context: grpc.ServicerContext,
        peer: str,
        batched: bool = False,
    ) -> pb.TaskState:
        """An item checked before parsing: its size, then its elements (``wire_problem``)."""
        what = f"{'item' if batched else 'message'} {index} of the stream"
        limits = self.executor.config.limits
        if len(data) > limits.max_message_bytes:
            # gRPC lets messages up to twice the limit through (server_options) so that the
            # refusal can say which option to raise; its own text does not.
            self._reject(
                context,
                peer,
                "RESOURCE_EXHAUSTED",
                f"{what} is {len(data)} bytes, {TOO_LARGE[1]} {limits.max_message_bytes}: "
                "raise it on the server and on the client",
            )
        problem = wire_problem(data, TASK_STATE_ARGS, limits)
        if problem is not None:
            self._reject(
                context, peer, "INVALID_ARGUMENT", f"{what} has {problem}: refused before parsing"
            )
        try:
            return pb.TaskState.FromString(data)  # type: ignore[arg-type]  # any buffer parses
        except DecodeError as exc:
            self._reject(
                context, peer, "INVALID_ARGUMENT", f"{what} is not an offload.v1.TaskState: {exc}"
            )

    @property
    def active_streams(self) -> int:
        with self._lock:
            return len(self._watches)
