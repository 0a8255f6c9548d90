"""The device's link to the server: carries items cut at the split, and survives faults.

Every item handed to the link is *pending* until exactly one of these ends it:

* the server's answer, on whichever stream it arrives (a resent item's replayed answer counts
  once; a late answer for an item already ended elsewhere is ignored);
* the device running the item's remaining tasks itself, because the server is away (outage
  mode run-all; with hold-last it runs all but the last and the item waits for a server, held,
  in the durable buffer too if there is one: it ends only by an answer, or ``failed`` after
  ``max_sends`` sends without one);
* a full offline buffer dropping it (``when_full`` drop-oldest / reject-new: counted, reported);
* a fatal refusal (wrong token, other pipeline): the run stops, and the item is reported
  ``not_run`` with the reason (so is one handed over after it, and each one left by ``abort``).

Threads: the capturing thread sends an item itself when the stream is up and nothing waits
ahead of it (the common case: no hand-over to another thread); a supervisor connects (gRPC's
channel does the exponential backoff) and resets a stream whose oldest item has waited longer
than ``item_timeout``; a pump sends queued items (resends, a backlog) in item order within the
credit window; one reader per stream matches answers; a local worker runs the remaining tasks
of queued items while no stream is up. Each waits on its own condition (one shared condition
woke all of them for every item: ~35 context switches per item on the device, now ~20, most of
them gRPC's own). When a stream breaks, its unanswered items go back to the queue: they are
resent after a reconnect (the server de-duplicates by device, run and item) or, if no reconnect
comes within ``resend_grace``, run on the device; items captured meanwhile run on the device
at once. A server that refuses the stream as full (``RESOURCE_EXHAUSTED``) is a setback like a
stall: the device stays away with the same backoff, and the next stream carries one item until
it is answered.

The threads share one lock and ask the pending table (``pending.py``: no threads, no clock) for
every decision over the items: the buffer's victim, the next to send or to run here, requeueing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .._config import LinkConfig
from .._logging import quote
from .._wire import too_large
from ..exceptions import OffloadError, ServerError
from ..v1 import offload_pb2 as pb
from .buffer import DurableBuffer
from .pending import ItemState, Pending, PendingTable
from .transport import Stream, Transport

# Pending lives in the pending table's module; the client and tests import it from here.
__all__ = ["FATAL_CODES", "Link", "LinkOwner", "LinkStats", "Pending", "is_fatal", "is_full"]

log = logging.getLogger("offload.client")

# Refusals that a retry cannot fix: the run stops and says why.
FATAL_CODES = frozenset(
    {"UNAUTHENTICATED", "PERMISSION_DENIED", "FAILED_PRECONDITION", "INVALID_ARGUMENT"}
    | {"UNIMPLEMENTED", "OUT_OF_RANGE"}
)

# The first stream's headers say what the server reads within a round trip; an older server says
# it with its first answer only, so the first items wait this long at most, then go plain.
READS_WAIT = 1.0


def is_fatal(error: ServerError) -> bool:
    if error.code == "RESOURCE_EXHAUSTED":  # too many streams is transient; too large is not
        return too_large(str(error))
    return error.code in FATAL_CODES


def is_full(error: ServerError | None) -> bool:
    """The server refused the stream because it serves as many as it can (transient)."""
    return error is not None and error.code == "RESOURCE_EXHAUSTED" and not is_fatal(error)


class LinkOwner(Protocol):
    """What the client does when an item ends (called from the link's threads)."""

    def answered(self, pending: Pending, answer: pb.ItemResult, size: int) -> None: ...

    def sent(self, pending: Pending, size: int) -> None: ...

    def run_locally(self, pending: Pending) -> None: ...

    def hold(self, pending: Pending) -> bool:
        """Outage mode hold-last: run the item's tasks here up to the last one and re-encode it
        (``pending.data``, ``next_task``) to wait for the server; False if it ended here."""
        ...

    def lost(self, pending: Pending, status: str, reason: str) -> None:
        """``status`` is "dropped" (full buffer), "not_run" (a fatal refusal, an abort) or
        "failed" (hold-last: sent ``max_sends`` times, never answered)."""
        ...


@dataclass
class LinkStats:
    connects: int = 0
    disconnects: int = 0
    resent: int = 0  # sends beyond an item's first
    ran_locally: int = 0  # items whose remaining tasks ran here because the server was away
    dropped: int = 0
    item_timeouts: int = 0
    refused: int = 0  # streams the server refused because it was full (RESOURCE_EXHAUSTED)
    late_answers: int = 0  # answers for items that had already ended (ignored)
    held: int = 0  # items run here up to the last task, to wait for the server (hold-last)
    events: list[str] = field(default_factory=list)  # the first few connects / faults


class Link:
    def __init__(
        self,
        transport: Transport,
        config: LinkConfig,
        window: int,
        owner: LinkOwner,
        hold_at: int | None = None,
        store: DurableBuffer | None = None,
        run_id: str = "",
    ) -> None:
        """``hold_at``: outage mode hold-last, the last task's index; ``store`` keeps the items
        held while the server is away (``run_id``'s rows), so that a restart resends them."""
        self.transport = transport
        self.config = config
        self.owner = owner
        self.stats = LinkStats()
        # Every decision over the items (window, buffer, what next, requeue) is the table's.
        self._pending = PendingTable(
            window, config.buffer, config.when_full, config.max_sends, config.buffer_bytes, hold_at
        )
        self._store = store
        self._run_id = run_id
        self._lock = threading.Lock()
        # One lock, a condition per kind of waiter: ``_space`` (submit and finish: an item
        # ended), ``_sendable`` (the pump: something queued can go), ``_changed`` (the
        # supervisor and the local worker: the stream came or went, closing, an offline item).
        self._space = threading.Condition(self._lock)
        self._sendable = threading.Condition(self._lock)
        self._changed = threading.Condition(self._lock)
        self._stream: Stream | None = None
        self._generation = 0
        self._readers: list[threading.Thread] = []
        self._error: ServerError | None = None
        self._closing = False
        self._threads: list[threading.Thread] = []
        # After a stream stalls (an item timed out) or the server refuses it as full, stay away
        # from the server a while before trying it again, doubling on each setback in a row: a
        # server that accepts streams but never answers must not cost every item a full
        # item_timeout, nor may a full one be asked again at once (a refused stream costs its
        # items' bytes, and each refusal a reconnect).
        self._stalls = 0
        self._last_answer = 0.0  # perf_counter of the current stream's latest answer
        self._offline_until = 0.0
        self._stalled_generation = -1
        self._up_since: float | None = None  # perf_counter when the current stream opened
        self._up_seconds = 0.0  # streams' time up, all streams so far
        self._up_at_end: bool | None = None  # whether a stream was up when the run ended
        self._answering = 0  # answers taken off pending whose owner.answered has not returned
        self._finishing = False
        self._said_unreachable: str | None = None  # the reason last said, during this outage
        # The encodings (pb.Codec) the server of the current stream reads, from its first
        # answer; none until then, so that an older server is never sent one.
        self.server_reads: frozenset[int] = frozenset()
        self._reads_known = False

    # --- the client's side --------------------------------------------------------------------

    @property
    def error(self) -> ServerError | None:
        """A fatal refusal, if one ended the link."""
        return self._error

    def start(self, wait: float = 0.0) -> bool:
        """Start the link's threads; True if the server was reached (waiting up to ``wait``)."""
        reached = self.transport.ready(wait)
        if reached:
            self._open()
            with self._lock:  # the first items compressed too: the server's headers say how
                self._changed.wait_for(lambda: self._reads_known, READS_WAIT)
        else:
            self._say_unreachable()
        for target, name in (
            (self._supervise, "offload-link"),
            (self._pump, "offload-send"),
            (self._work_locally, "offload-local"),
        ):
            thread = threading.Thread(target=self._guarded(target, name), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return reached

    def adopt(self, items: list[Pending]) -> None:
        """Take the items an earlier run left in the durable buffer, before ``start``: they are
        queued for the server in item order (its bounds held them once already)."""
        with self._lock:
            for pending in items:
                self._pending.add(pending)

    def submit(self, pending: Pending) -> bool:
        """Hand over an item; blocks for a credit, or per ``when_full`` while offline.

        Returns False if the item was not taken (the link failed, or reject-new dropped it:
        either way the owner has been told).
        """
        victim: Pending | None = None
        with self._lock:
            while self._error is None:
                if self._stream is not None:
                    if self._pending.credit_free():
                        if not self._pending.has_queued():
                            # Nothing ahead of it: send from this thread, no hand-over.
                            self._pending.add(pending)
                            self._send(pending, self._stream)
                            return True
                        break
                elif self._pending.has_room(pending):
                    break
                else:
                    victim = self._pending.victim(pending)
                    if victim is not None:
                        break
                self._space.wait(0.1)
            error = self._error
            if error is None:
                if victim is not None:
                    self.stats.dropped += 1
                    if victim is not pending:
                        self._pending.drop(victim)
                        self._unstore(victim)
                if victim is not pending:
                    self._pending.add(pending)
                    if self._stream is None:
                        self._keep(pending)
                if self._stream is not None:
                    self._sendable.notify()
                else:
                    self._changed.notify_all()  # the local worker may run it
        if error is not None:
            self.owner.lost(pending, "not_run", f"not sent: {error}")
            return False
        if victim is not None:
            self.owner.lost(
                victim,
                "dropped",
                f"the server was away and the offline buffer ({self.config.buffer} items) was "
                f"full: when_full={self.config.when_full}",
            )
        return victim is not pending

    def finish(self) -> None:
        """Wait until every pending item has ended, then close the stream and stop."""
        with self._lock:
            self._finishing = True
            # Until each item has ended, and the owner has been told of each answer.
            while (self._pending and self._error is None) or self._answering:
                self._space.wait(0.2)
            orphans = self._pending.orphans()  # none unless a fatal refusal stopped the run
            stream = self._close()
        for pending in orphans:
            self.owner.lost(pending, "not_run", f"unanswered: {self._error}")
        if stream is not None:
            stream.close()  # the server ends the stream; the reader sees its end
        for thread in [*self._threads, *self._readers]:
            thread.join(5.0)

    def abort(self, reason: str) -> None:
        """Stop at once (a second Ctrl-C): each item not ended is reported not_run, ``reason``.

        (One running here may still end; the owner keeps whichever end comes first.)
        """
        with self._lock:
            orphans = self._pending.orphans()
            stream = self._close()
        if stream is not None:
            stream.cancel()
        for pending in orphans:
            self.owner.lost(pending, "not_run", reason)

    def report(self) -> dict[str, Any]:
        with self._lock:
            s = self.stats
            up = self._up_seconds
            if self._up_since is not None:
                up += time.perf_counter() - self._up_since
            # Whether a stream was up when the run ended (before the link closed it), or is up
            # now while the run goes on; and how long streams were up in all.
            up_at_end = self._stream is not None if self._up_at_end is None else self._up_at_end
            return {
                "up_at_end": up_at_end,
                "up_seconds": round(up, 3),
                "connects": s.connects,
                "disconnects": s.disconnects,
                "resent": s.resent,
                "ran_locally": s.ran_locally,
                "dropped": s.dropped,
                "item_timeouts": s.item_timeouts,
                "refused": s.refused,
                "late_answers": s.late_answers,
                "held": s.held,
                "outage": self.config.outage,
                "buffer": self.config.buffer,
                "buffer_bytes": self.config.buffer_bytes,
                "when_full": self.config.when_full,
                "events": list(s.events),
            }

    # --- the link's threads -------------------------------------------------------------------

    def _close(self) -> Stream | None:  # holds the lock: the run ends, the link stops
        if self._up_at_end is None:
            self._up_at_end = self._stream is not None
        stream, self._stream = self._stream, None
        self._went_down()
        self._closing = True
        self._wake_all()
        return stream

    def _went_down(self) -> None:  # holds the lock
        if self._up_since is not None:
            self._up_seconds += time.perf_counter() - self._up_since
            self._up_since = None

    def _wake_all(self) -> None:  # holds the lock; for rare events (stream up/down, closing)
        self._space.notify_all()
        self._sendable.notify_all()
        self._changed.notify_all()

    def _pause(self) -> float:  # holds the lock; seconds to stay away after a setback
        return min(self.config.reconnect_backoff_max, 2.0 ** (self._stalls - 1))

    def _send(self, pending: Pending, stream: Stream) -> None:  # holds the lock
        if self._pending.mark_sent(pending, time.perf_counter()):
            self.stats.resent += 1
        # Under the lock, so a stream that breaks now requeues this item too.
        self.owner.sent(pending, stream.send_bytes(pending.data))

    def _keep(self, pending: Pending) -> None:  # holds the lock; it waits for the server
        if self._store is not None:
            self._store.put(self._run_id, pending.item, pending.next_task, pending.data)
            pending.stored = True

    def _unstore(self, pending: Pending) -> None:  # holds the lock; it ended
        if pending.stored and self._store is not None:
            self._store.delete(self._run_id, pending.item)
            pending.stored = False

    def _event(self, text: str) -> None:
        if len(self.stats.events) < 20:
            self.stats.events.append(text)

    def _open(self) -> None:
        stream = self.transport.open_stream()
        with self._lock:
            if self._closing:
                stream.cancel()
                return
            self._generation += 1
            generation = self._generation
            self._stream = stream
            self.server_reads = frozenset()
            self._reads_known = False
            self._last_answer = self._up_since = time.perf_counter()
            self.stats.connects += 1
            # (A probe is said if refused.)
            if self.stats.connects > 1 and not self._pending.probing:
                self._event(f"reconnected to {getattr(self.transport, 'target', 'the server')}")
                log.warning(
                    "event=reconnected target=%s", quote(getattr(self.transport, "target", "?"))
                )
            self._wake_all()
        reader = threading.Thread(
            target=self._read, args=(stream, generation), name="offload-answers", daemon=True
        )
        self._readers = [r for r in self._readers if r.is_alive()] + [reader]
        reader.start()

    def _say_unreachable(self) -> None:
        """Once per outage, and again only if the reason changes."""
        reason = str(getattr(self.transport, "failure", None) or "no answer")
        if reason != self._said_unreachable:
            self._said_unreachable = reason
            log.warning(
                "event=unreachable target=%s reason=%s msg=%s",
                quote(getattr(self.transport, "target", "?")),
                quote(reason),
                quote("running every task on this device meanwhile, and reconnecting with backoff"),
            )

    def _supervise(self) -> None:
        while True:
            with self._lock:
                if self._closing or self._error is not None:
                    return
                if self._stream is not None:
                    self._check_item_timeout()
                    self._changed.wait(0.25)
                    continue
                if time.perf_counter() < self._offline_until:
                    self._changed.wait(0.25)
                    continue
            # gRPC's channel retries the connection with exponential backoff meanwhile.
            if self.transport.ready(0.5):
                self._said_unreachable = None
                self._open()
            elif not self._closing:
                self._say_unreachable()

    def _check_item_timeout(self) -> None:  # holds the lock
        oldest = self._pending.oldest_sent()
        if self._stream is None or oldest is None:
            return
        now = time.perf_counter()
        # Waiting counts from the later of its send and the stream's latest answer: items queue
        # behind each other at a slow server, which is progress, not a stall.
        waited = now - max(oldest.sent_at, self._last_answer)
        if waited > self.config.item_timeout:
            self.stats.item_timeouts += 1
            self._stalls += 1
            self._stalled_generation = self._generation
            self._offline_until = now + self._pause()
            message = (
                f"item {oldest.item} unanswered, and no answer at all, for "
                f"{self.config.item_timeout:g} s (--item-timeout): resetting the stream"
            )
            self._event(message)
            log.warning("event=item-timeout item=%d msg=%s", oldest.item, quote(message))
            self._stream.cancel()  # the reader sees CANCELLED and requeues what is unanswered

    def _pump(self) -> None:
        while True:
            with self._lock:
                while True:
                    if self._closing or self._error is not None:
                        return
                    up = self._stream is not None
                    chosen = self._pending.next_to_send() if up else None
                    if chosen is not None:
                        break
                    self._sendable.wait(0.25)
                assert self._stream is not None
                self._send(chosen, self._stream)

    def _work_locally(self) -> None:
        while True:
            with self._lock:
                while True:
                    if self._closing or self._error is not None:
                        return
                    up = self._stream is not None
                    chosen = self._pending.next_to_run(up, time.perf_counter())
                    if chosen is not None:
                        break
                    # Polls too: a requeued item becomes runnable when its grace ends.
                    self._changed.wait(0.05)
                self._pending.mark_running_here(chosen)
            kept = False
            try:
                if self._pending.hold_at is None:
                    self.owner.run_locally(chosen)
                elif chosen.sends < self.config.max_sends:
                    kept = self.owner.hold(chosen)
                else:  # its last task runs only on the server, which never answers it
                    self.owner.lost(
                        chosen,
                        "failed",
                        f"sent {chosen.sends} times and never answered: with --outage "
                        "hold-last its last task runs only on the server",
                    )
            finally:
                with self._lock:
                    if kept:
                        self._pending.held(chosen)
                        self.stats.held += 1
                        self._keep(chosen)
                        if self._stream is not None:
                            self._sendable.notify()
                    else:
                        self._pending.ran_here(chosen)
                        self._unstore(chosen)
                        if self._pending.hold_at is None:
                            self.stats.ran_locally += 1
                    self._space.notify_all()

    def _guarded(self, target: Callable[[], None], name: str) -> Callable[[], None]:
        """``target``, which ends the run with an error if it raises: a dead thread of the link
        would leave its items pending, and the run waiting for them, forever."""

        def run() -> None:
            try:
                target()
            except Exception as exc:
                self._fail(_failure(f"the device's {name} thread failed", exc))

        return run

    def _fail(self, error: ServerError) -> None:
        """End the run: a failure on this device that no retry can fix."""
        with self._lock:
            if self._error is None:
                self._error = error
                self._event(f"failed: {error}")
                log.error("event=link-failed msg=%s", quote(str(error)))
            stream, self._stream = self._stream, None
            self._went_down()
            self._wake_all()
        if stream is not None:
            stream.cancel()

    def _learn_reads(self, reads: frozenset[int], generation: int) -> None:
        with self._lock:
            if generation == self._generation:
                self.server_reads = reads
                self._reads_known = True
                self._changed.notify_all()

    def _read(self, stream: Stream, generation: int) -> None:
        error: ServerError | None = None
        said = stream.reads()  # (once the stream's headers are in)
        learned = said is not None
        self._learn_reads(said or frozenset(), generation)
        try:
            for answer, size in stream.results():
                if not learned:
                    learned = True
                    self._learn_reads(frozenset(answer.accepts), generation)
                with self._lock:
                    pending = self._pending.answered(answer.item)
                    if pending is None:
                        self.stats.late_answers += 1
                        continue
                    self._unstore(pending)
                    self._answering += 1
                    self._stalls = 0
                    if self._pending.probing:
                        self._pending.probing = False
                        log.info("event=accepted refused=%d", self.stats.refused)
                    self._last_answer = time.perf_counter()
                    self._space.notify_all()
                    if self._pending.has_queued():
                        self._sendable.notify()
                try:
                    self.owner.answered(pending, answer, size)
                finally:
                    with self._lock:
                        self._answering -= 1
                        if self._finishing:
                            self._space.notify_all()
        except ServerError as exc:
            error = exc
        except OffloadError as exc:  # an answer that cannot be decoded
            error = ServerError(f"bad answer from the server: {exc}", "INVALID_ARGUMENT")
        except Exception as exc:  # handling an answer failed here (a bug, NumPy...): no retry
            self._fail(_failure("the device failed handling the server's answers", exc))
            stream.cancel()
            return
        self._broken(stream, generation, error)

    def _broken(self, stream: Stream, generation: int, error: ServerError | None) -> None:
        with self._lock:
            if generation != self._generation or self._stream is None:
                return  # an older stream, or finish() closed this one
            self._stream = None
            self._went_down()
            if error is not None and is_fatal(error):
                self._error = error
                self._event(f"refused: {error}")
                self._wake_all()
                return
            now = time.perf_counter()
            full = is_full(error)
            if full:
                self.stats.refused += 1
                self._stalls += 1
                self._offline_until = now + self._pause()
                said, self._pending.probing = self._pending.probing, True
            else:
                self.stats.disconnects += 1
            # Items of a stalled stream have waited item_timeout already, and a full server
            # refused its stream before running any: no grace, they run here at once.
            stalled = full or generation == self._stalled_generation
            grace_end = now + (0.0 if stalled else self.config.resend_grace)
            unanswered = self._pending.requeue(grace_end, error is not None and error.not_run)
            if self._store is not None:
                for item in self._pending.values():
                    if item.state is ItemState.QUEUED and not item.stored:
                        self._keep(item)
            reason = str(error) if error is not None else "the server ended the stream"
            target = quote(getattr(self.transport, "target", "the server"))
            if not full:
                self._event(f"disconnected ({unanswered} unanswered): {reason}")
                log.warning(
                    "event=disconnected target=%s unanswered=%d reason=%s msg=%s",
                    target,
                    unanswered,
                    quote(reason),
                    quote(
                        "resending after a reconnect, or running here after "
                        f"{self.config.resend_grace:g} s"
                    ),
                )
            elif not said:  # said once per run of refusals (an answer ends it), not per attempt
                self._event(f"refused as full: {reason}")
                log.warning(
                    "event=server-full target=%s reason=%s msg=%s",
                    target,
                    quote(reason),
                    quote(
                        f"running items here meanwhile; asking again in {self._pause():g} s, "
                        f"backing off to {self.config.reconnect_backoff_max:g} s"
                    ),
                )
            else:
                log.info("event=refused target=%s retry_in=%g", target, self._pause())
            self._wake_all()
        stream.cancel()


def _failure(what: str, exc: Exception) -> ServerError:
    detail = " ".join(str(exc).split()) or "no message"
    return ServerError(f"{what}: {type(exc).__name__}: {detail}", "INTERNAL")
