"""The cloud's work on an item: validate it, de-duplicate it, run its remaining tasks, answer.

``RemoteExecutor`` holds no gRPC: it turns a ``TaskState`` into an ``ItemResult`` (or raises
``RequestRejected``), so the gRPC servicer and ``offload.testing``'s in-process transport share
it. Observers (metrics) subscribe to each answer with ``add_listener``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from .. import _batch
from .._codec import READS, compress_value, compressions, decode, encode_result, expand
from .._config import ServerConfig
from .._pipeline import ItemContext, Outcome, Pipeline, Status, arity_error, run_tasks
from .._state import Changes, State
from .._state import using as using_state
from .._wire import WIRE_STATUS
from ..exceptions import CodecError
from ..v1 import offload_pb2 as pb
from .state import Store, StoreUnavailable, Verdict, open_store

log = logging.getLogger("offload.server")

MAX_ATTEMPTS = 8  # runs of the last task for one item when other replicas keep winning the race
# A task's error text is kept whole up to this many characters: one that echoes its input
# would otherwise make every answer (and every remembered answer) as large as that input.
MAX_ERROR_CHARS = 4096
# A device and a run id are keys of state kept for 10 000 runs and devices, and logged.
MAX_ID_CHARS = 256
# Appended to a remembered answer's encoding, this sets its ``duplicate`` (a later field wins).
DUPLICATE = pb.ItemResult(duplicate=True).SerializeToString()


class RequestRejected(Exception):
    """An item the server will not run; ends the stream with ``code``, a gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _RunAnswers:
    """The answers recently given to one device run, to replay (not re-run) a resent item."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.lock = threading.Lock()
        # Serialised: a parsed answer costs several times its wire size in memory.
        self.answers: OrderedDict[int, bytes] = OrderedDict()
        self.size = 0  # bytes of ``answers``
        self.highest = -1
        # Answers and bytes counted against ServerConfig.dedup_total and dedup_bytes (under
        # _runs_lock).
        self.counted = 0
        self.counted_bytes = 0


class RemoteExecutor:
    """Runs the remaining tasks of items for many devices; thread-safe."""

    def __init__(
        self, pipeline: Pipeline, config: ServerConfig = ServerConfig(), store: Store | None = None
    ) -> None:
        self.pipeline = pipeline
        self.config = config
        self.store = store if store is not None else open_store(config)
        self._runs: OrderedDict[tuple[str, str], _RunAnswers] = OrderedDict()
        self._runs_lock = threading.Lock()
        self._remembered = 0  # answers kept over all runs
        self._remembered_bytes = 0  # their serialised size
        self._listeners: list[Callable[[pb.TaskState, pb.ItemResult], None]] = []
        self._compressions = compressions(config.compression)

    def add_listener(self, listener: Callable[[pb.TaskState, pb.ItemResult], None]) -> None:
        """Call ``listener(state, answer)`` for every answer given (a refused item has none)."""
        self._listeners.append(listener)

    def _account(self, key: tuple[str, str], run: _RunAnswers, delta: int, size: int) -> None:
        """Count a run's answers and bytes; past ``dedup_total`` or ``dedup_bytes``, forget the
        least recently used runs."""
        config = self.config
        with self._runs_lock:
            if self._runs.get(key) is not run:
                return  # forgotten meanwhile
            run.counted += delta
            run.counted_bytes += size
            self._remembered += delta
            self._remembered_bytes += size
            while (
                self._remembered > config.dedup_total or self._remembered_bytes > config.dedup_bytes
            ) and len(self._runs) > 1:
                oldest_key = next(iter(self._runs))
                if oldest_key == key:
                    break
                self._forget(self._runs.pop(oldest_key))

    def _forget(self, run: _RunAnswers) -> None:
        self._remembered -= run.counted
        self._remembered_bytes -= run.counted_bytes

    @property
    def remembered_answers(self) -> int:
        return self._remembered

    @property
    def remembered_bytes(self) -> int:
        """The serialised size of every remembered answer: at most ``dedup_bytes``."""
        return self._remembered_bytes

    def _answers_for(self, device_id: str, run_id: str) -> _RunAnswers:
        key = (device_id, run_id)
        with self._runs_lock:
            answers = self._runs.get(key)
            if answers is None:
                answers = self._runs[key] = _RunAnswers(self.config.dedup_items)
                while len(self._runs) > self.config.max_runs:
                    self._forget(self._runs.popitem(last=False)[1])
            else:
                self._runs.move_to_end(key)
            return answers

    def validate(self, state: pb.TaskState) -> None:
        """Reject an item that this server cannot run, naming the field that is wrong."""
        p = self.pipeline
        if state.pipeline != p.name or state.fingerprint != p.fingerprint:
            raise RequestRejected(
                "FAILED_PRECONDITION",
                f"pipeline mismatch: the item is for {state.pipeline!r} (fingerprint "
                f"{state.fingerprint!r}) but this server runs {p.name!r} (fingerprint "
                f"{p.fingerprint!r}); start both sides with the same --pipeline and version",
            )
        last = len(p.tasks) - 1
        if not 1 <= state.next_task <= last:
            raise RequestRejected(
                "INVALID_ARGUMENT",
                f"next_task {state.next_task} is outside [1, {last}]: the device runs task 0 and "
                f"the server at least the last task of {p.name} ({p.describe()})",
            )
        if not state.device_id:
            raise RequestRejected("INVALID_ARGUMENT", "device_id is empty")
        for name in ("device_id", "run_id"):
            size = len(getattr(state, name))
            if size > MAX_ID_CHARS:
                raise RequestRejected(
                    "INVALID_ARGUMENT",
                    f"{name} is {size} characters: give at most {MAX_ID_CHARS}",
                )

    def execute(self, state: pb.TaskState) -> pb.ItemResult:
        """The answer to one item; raises ``RequestRejected`` for an item it will not run."""
        return self.execute_encoded(state)[0]

    def execute_encoded(self, state: pb.TaskState) -> tuple[pb.ItemResult, bytes]:
        """The answer and its encoding, made once: remembered, and sent as it is."""
        result, data = self._answer(state)
        for listener in self._listeners:
            listener(state, result)
        return result, data

    def _answer(self, state: pb.TaskState) -> tuple[pb.ItemResult, bytes]:
        self.validate(state)
        answers = self._answers_for(state.device_id, state.run_id)
        # Holding the run's lock while running keeps one device run's items in order even if it
        # has two streams open (a reconnect racing the old stream).
        with answers.lock:
            replay = answers.answers.get(state.item)
            if replay is not None:
                result = pb.ItemResult.FromString(replay)
                result.duplicate = True
                return result, replay + DUPLICATE
            # The store remembers answers beyond this process's (Redis: every replica's).
            if state.item <= answers.highest and not self.store.remembers_answers:
                return self._forgotten(state)
            result, kept = self._run(state)
            answers.answers[state.item] = kept
            answers.highest = max(answers.highest, state.item)
            delta, size = 1, len(kept)
            # One run alone may not exceed the byte budget either: its oldest answers go first
            # (the newest too, if it alone is larger; a resend of it is then refused as such).
            while answers.answers and (
                len(answers.answers) > answers.capacity
                or answers.size + size > self.config.dedup_bytes
            ):
                delta -= 1
                size -= len(answers.answers.popitem(last=False)[1])
            answers.size += size
        self._account((state.device_id, state.run_id), answers, delta, size)
        return result, kept

    def _run(self, state: pb.TaskState) -> tuple[pb.ItemResult, bytes]:
        """Run the item's remaining tasks and commit its answer (and state) through the store."""
        cpu_began = time.thread_time()
        try:
            return self._run_and_commit(state, cpu_began)
        except StoreUnavailable as exc:
            raise RequestRejected("UNAVAILABLE", str(exc)) from None

    def _run_and_commit(self, state: pb.TaskState, cpu_began: float) -> tuple[pb.ItemResult, bytes]:
        last = len(self.pipeline.tasks) - 1
        try:
            wire_args = expand(state.args, self.config.limits)  # its size checked first
            # Checked on the wire value, before decoding (allocating) its arrays; the same
            # message as run_tasks gives on the device, so a result does not depend on where
            # it ran.
            misfit = arity_error(self.pipeline, state.next_task, wire_arg_count(wire_args))
            args = decode(wire_args, self.config.limits) if misfit is None else None
        except CodecError as exc:
            raise RequestRejected("INVALID_ARGUMENT", f"item {state.item}: {exc}") from None
        if misfit is not None:
            result = pb.ItemResult(
                item=state.item,
                status=pb.ItemResult.FAILED,
                task=state.next_task,
                error=misfit,
                accepts=READS,
            )
            return self._record(state, result, self._encoded(state, result, cpu_began))
        context = ItemContext(
            state.device_id, state.run_id, state.item, state.capture_time, on_server=True
        )
        before = run_tasks(self.pipeline, state.next_task, last, args, context)
        if before.status is not Status.CONTINUE:
            return self._record(state, *self._result(state, before, before.task_seconds, cpu_began))
        # The last task runs on the device's state; a commit that finds the state changed by
        # another item (another replica) runs it again on the state that won.
        for _attempt in range(MAX_ATTEMPTS):
            item_state = self.store.state(state.device_id)
            with using_state(item_state):
                outcome = run_tasks(self.pipeline, last, last + 1, before.value, context)
            result, encoded = self._result(
                state, outcome, before.task_seconds + outcome.task_seconds, cpu_began
            )
            changes = Changes()
            if result.status != pb.ItemResult.FAILED and item_state.used:
                try:
                    changes = item_state.changes(self.config.state_max_bytes)
                except CodecError as exc:
                    result.ClearField("output")
                    result.status = pb.ItemResult.FAILED
                    result.task = last
                    result.error = f"the state cannot be kept: {exc}"
                    encoded = result.SerializeToString()
            committed = self._commit(
                state, result, encoded, item_state if item_state.used else None, changes
            )
            if committed is not None:
                return committed
        raise RequestRejected(
            "UNAVAILABLE",
            f"item {state.item}: the state of device {state.device_id!r} changed under each of "
            f"{MAX_ATTEMPTS} attempts (other replicas run its items too): resend it",
        )

    def _record(
        self, state: pb.TaskState, result: pb.ItemResult, encoded: bytes
    ) -> tuple[pb.ItemResult, bytes]:
        """Commit an answer that read no state (so is never stale)."""
        committed = self._commit(state, result, encoded, None, Changes())
        assert committed is not None
        return committed

    def _commit(
        self,
        state: pb.TaskState,
        result: pb.ItemResult,
        encoded: bytes,
        read: State | None,
        changes: Changes,
    ) -> tuple[pb.ItemResult, bytes] | None:
        """The answer to give once committed (a replayed one if another replica answered
        first), or None if the state changed since it was read."""
        outcome = self.store.commit(
            state.device_id, state.run_id, state.item, read, changes, encoded
        )
        if outcome.verdict is Verdict.COMMITTED:
            return result, encoded
        if outcome.verdict is Verdict.REPLAY:
            replayed = pb.ItemResult.FromString(outcome.answer)
            replayed.duplicate = True
            return replayed, outcome.answer + DUPLICATE
        if outcome.verdict is Verdict.FORGOTTEN:
            return self._forgotten(state)
        return None

    def _forgotten(self, state: pb.TaskState) -> tuple[pb.ItemResult, bytes]:
        where = (
            f"the store {self.store.name} keeps {self.config.state_answers} per run for "
            f"--state-ttl {self.config.state_ttl:g}s"
            if self.store.remembers_answers
            else f"ServerConfig.dedup_items={self.config.dedup_items}, "
            f"dedup_total={self.config.dedup_total}, dedup_bytes={self.config.dedup_bytes}"
        )
        forgotten = pb.ItemResult(
            item=state.item,
            status=pb.ItemResult.FAILED,
            task=state.next_task,
            error=f"item {state.item} was already processed and its answer is no longer "
            f"remembered ({where})",
            duplicate=True,
        )
        return forgotten, forgotten.SerializeToString()

    def _result(
        self,
        state: pb.TaskState,
        outcome: Outcome,
        task_seconds: list[tuple[int, float]],
        cpu_began: float,
    ) -> tuple[pb.ItemResult, bytes]:
        result = pb.ItemResult(item=state.item, status=WIRE_STATUS[outcome.status])
        result.accepts.extend(READS)
        if outcome.status is Status.COMPLETED:
            # Packed and compressed only for a device that said it reads them.
            accepts = state.accepts
            packed = pb.CODEC_PACKED in accepts
            error = encode_result(result.output, outcome.value, self.config.limits, packed=packed)
            if error is not None:
                result.status = pb.ItemResult.FAILED
                result.task = len(self.pipeline.tasks) - 1
                result.error = error
        else:
            result.task = outcome.task
            result.error = truncate_error(outcome.error)
        result.task_times.extend(pb.TaskTime(task=i, seconds=s) for i, s in task_seconds)
        return result, self._encoded(state, result, cpu_began)

    def _encoded(self, state: pb.TaskState, result: pb.ItemResult, cpu_began: float) -> bytes:
        """The answer's encoding, made once (protobuf's ByteSize encodes too), with its CPU time;
        one too large to send becomes a failure that says so."""
        encoded = result.SerializeToString()
        limit = self.config.limits.max_message_bytes
        # Its size before compression: that is what the device decompresses and checks.
        if len(encoded) > limit:
            result.ClearField("output")
            result.status = pb.ItemResult.FAILED
            result.task = len(self.pipeline.tasks) - 1
            result.error = (
                f"the result is {len(encoded)} bytes, more than the server's --max-message-bytes "
                f"{limit}: raise it on the server and on the clients (Limits.max_message_bytes)"
            )
            encoded = result.SerializeToString()
        elif result.status == pb.ItemResult.COMPLETED:
            codec = next((c for c in self._compressions if c in state.accepts), None)
            if codec is not None and compress_value(result.output, codec) is not None:
                encoded = result.SerializeToString()
        result.server_cpu_seconds = time.thread_time() - cpu_began
        return _batch.with_cpu(encoded, result.server_cpu_seconds)


def truncate_error(text: str) -> str:
    """``text`` cut to ``MAX_ERROR_CHARS``, saying how much was cut."""
    if len(text) <= MAX_ERROR_CHARS:
        return text
    cut = len(text) - MAX_ERROR_CHARS
    return f"{text[:MAX_ERROR_CHARS]}... ({cut} more characters cut by the server)"


def wire_arg_count(args: pb.Value) -> int:
    """How many positional arguments a wire value gives the next task (see ``call_task``)."""
    kind = args.WhichOneof("kind")
    if kind is None or kind == "none":
        return 0
    if kind == "tuple_value":
        return len(args.tuple_value.items)
    return 1
