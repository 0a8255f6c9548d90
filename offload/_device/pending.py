"""The link's pending table: which item to send, run here or drop next; no threads, no clock.

``Link`` holds the lock and the threads and asks this table for every decision; times are
arguments (the link passes ``perf_counter``), so each policy is a plain call in a unit test.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ItemState(StrEnum):
    """Where a pending item is (a str, so ``state == "sent"`` reads as before)."""

    QUEUED = "queued"  # waiting for a credit, a stream, or the end of its resend grace
    SENT = "sent"  # on a stream, unanswered
    LOCAL = "local"  # its remaining tasks running on this device


@dataclass
class Pending:
    """An item cut at the split, from capture until it ends."""

    item: int
    next_task: int
    data: bytes  # the encoded TaskState: sent, resent, or decoded to run locally
    began: float  # perf_counter at capture, for latency
    state: ItemState = ItemState.QUEUED
    sends: int = 0
    sent_at: float = 0.0
    not_before: float = 0.0  # back from a broken stream: wait until then for a resend
    stored: bool = False  # in the durable buffer (--buffer-dir) until it ends


class PendingTable:
    """The items handed to the link and not yet ended, in item order; each ends once."""

    def __init__(
        self,
        window: int,
        buffer: int,
        when_full: str,
        max_sends: int,
        buffer_bytes: int = 64 << 20,
        hold_at: int | None = None,
    ) -> None:
        self.window = window
        self.buffer = buffer  # queued items while offline, beyond which ``when_full`` decides
        self.buffer_bytes = buffer_bytes  # ... and their encoded bytes (one item always fits)
        self.when_full = when_full  # block | drop-oldest | reject-new
        self.max_sends = max_sends
        # Outage mode hold-last: the last task's index. Offline, an item runs here up to it,
        # then waits for the server; None: run-all (the item runs to its end here).
        self.hold_at = hold_at
        # After a refusal, a stream carries one item until it is answered: a full server refuses
        # it having received one item, not a window of them.
        self.probing = False
        self._items: dict[int, Pending] = {}  # items arrive in order, so this is item order

    def __len__(self) -> int:
        return len(self._items)

    def values(self) -> list[Pending]:
        return list(self._items.values())

    def counts(self) -> dict[ItemState, int]:
        """How many items are in each state."""
        counts = dict.fromkeys(ItemState, 0)
        for p in self._items.values():
            counts[p.state] += 1
        return counts

    # --- taking items in ----------------------------------------------------------------------

    def add(self, pending: Pending) -> None:
        self._items[pending.item] = pending

    @property
    def credit(self) -> int:
        return 1 if self.probing else self.window

    def credit_free(self) -> bool:
        """Whether a new item may join while a stream is up (every pending item holds a credit)."""
        return len(self._items) < self.credit

    def has_queued(self) -> bool:
        return any(p.state is ItemState.QUEUED for p in self._items.values())

    def has_room(self, new: Pending | None = None) -> bool:
        """Whether the offline buffer takes one more queued item (``new``, for its bytes)."""
        queued = [p for p in self._items.values() if p.state is ItemState.QUEUED]
        if len(queued) >= self.buffer:
            return False
        size = sum(len(p.data) for p in queued) + (len(new.data) if new is not None else 0)
        return not queued or size <= self.buffer_bytes

    def victim(self, new: Pending) -> Pending | None:
        """With the offline buffer full, the item to drop per ``when_full``; None: block."""
        if self.when_full == "drop-oldest":
            return next(p for p in self._items.values() if p.state is ItemState.QUEUED)
        if self.when_full == "reject-new":
            return new
        return None

    # --- what to do next ----------------------------------------------------------------------

    def next_to_send(self) -> Pending | None:
        """The first queued item in item order, if a credit is free (a stream being up)."""
        in_flight = 0
        first: Pending | None = None
        for p in self._items.values():
            if p.state is ItemState.SENT:
                in_flight += 1
            elif p.state is ItemState.QUEUED and first is None and p.sends < self.max_sends:
                first = p
        return first if in_flight < self.credit else None

    def next_to_run(self, up: bool, now: float) -> Pending | None:
        """The item to run on this device: one sent ``max_sends`` times, or any while offline."""
        for p in self._items.values():
            if p.state is not ItemState.QUEUED:
                continue
            if p.sends >= self.max_sends:
                return p  # the server never answers it: finish it here
            if self.hold_at is not None and p.next_task >= self.hold_at:
                continue  # held: only the server runs the last task
            if not up and p.not_before <= now:
                return p
            # An item back from a broken stream waits out its resend grace, but nothing behind
            # it does: new items run here at once (lines are written in item order anyway).
        return None

    def oldest_sent(self) -> Pending | None:
        """The sent item unanswered longest (for the item timeout)."""
        sent = [p for p in self._items.values() if p.state is ItemState.SENT]
        return min(sent, key=lambda p: p.sent_at) if sent else None

    # --- changes of state ---------------------------------------------------------------------

    def mark_sent(self, pending: Pending, now: float) -> bool:
        """Record a send at ``now``; True if it is a resend."""
        pending.state = ItemState.SENT
        pending.sends += 1
        pending.sent_at = now
        return pending.sends > 1

    def mark_running_here(self, pending: Pending) -> None:
        pending.state = ItemState.LOCAL

    def held(self, pending: Pending) -> None:
        """``pending`` ran here up to the last task (``hold_at``): it waits for the server."""
        pending.state = ItemState.QUEUED

    def requeue(self, grace_end: float, not_run: bool = False) -> int:
        """A stream broke: its sent items wait for a resend until ``grace_end``; how many.
        ``not_run``: the server said it ran none of them, so that send does not count."""
        unanswered = 0
        for p in self._items.values():
            if p.state is ItemState.SENT:
                p.state = ItemState.QUEUED
                p.not_before = grace_end
                p.sends -= not_run
                unanswered += 1
        return unanswered

    # --- ends (each item ends once) -----------------------------------------------------------

    def answered(self, item: int) -> Pending | None:
        """The item an answer ends, taken off; None for a late answer (ended, or running here)."""
        pending = self._items.get(item)
        if pending is None or pending.state is ItemState.LOCAL:
            return None
        del self._items[item]
        return pending

    def ran_here(self, pending: Pending) -> None:
        self._items.pop(pending.item, None)

    def drop(self, pending: Pending) -> None:
        del self._items[pending.item]

    def orphans(self) -> list[Pending]:
        """Every item not ended, taken off (the run stops)."""
        orphans = list(self._items.values())
        self._items.clear()
        return orphans
