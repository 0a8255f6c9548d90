"""The link's pending table, decision by decision: plain calls, times passed in, no threads."""

from __future__ import annotations

import pytest

from offload._device.pending import ItemState, Pending, PendingTable


def table(
    window: int = 2, buffer: int = 3, when_full: str = "block", max_sends: int = 3
) -> PendingTable:
    return PendingTable(window, buffer, when_full, max_sends)


def item(n: int) -> Pending:
    return Pending(item=n, next_task=1, data=b"x%d" % n, began=0.0)


def filled(t: PendingTable, *items: int) -> list[Pending]:
    added = [item(n) for n in items]
    for p in added:
        t.add(p)
    return added


def test_states_read_as_the_strings_they_were() -> None:
    assert item(0).state == "queued"  # tests and logs compare states with strings
    assert item(0).state is ItemState.QUEUED


# --- the offline buffer -----------------------------------------------------------------------


def test_buffer_has_room_until_buffer_items_are_queued() -> None:
    t = table(buffer=2)
    filled(t, 0)
    assert t.has_room()
    filled(t, 1)
    assert not t.has_room()


def test_buffer_has_room_until_its_queued_items_would_pass_buffer_bytes() -> None:
    t = PendingTable(8, 100, "block", 3, buffer_bytes=10)
    big = Pending(item=9, next_task=1, data=b"y" * 11, began=0.0)
    assert t.has_room(big)  # an empty buffer takes any one item, however large
    filled(t, 0, 1)  # 4 bytes
    assert t.has_room(Pending(item=2, next_task=1, data=b"z" * 6, began=0.0))
    assert not t.has_room(Pending(item=2, next_task=1, data=b"z" * 7, began=0.0))


def test_hold_last_runs_a_queued_item_here_only_up_to_the_last_task() -> None:
    t = PendingTable(2, 8, "block", 3, hold_at=2)
    early, held = filled(t, 0, 1)
    held.next_task = 2  # ran here up to the last task: it waits for the server
    assert t.next_to_run(up=False, now=0.0) is early
    t.mark_running_here(early)
    assert t.next_to_run(up=False, now=0.0) is None
    held.sends = 3  # the server never answered it: the link ends it (failed), not here
    assert t.next_to_run(up=True, now=0.0) is held


def test_sent_and_running_items_take_no_room_in_the_buffer() -> None:
    t = table(buffer=1)
    a, b = filled(t, 0, 1)
    t.mark_sent(a, 1.0)
    t.mark_running_here(b)
    assert t.has_room()


def test_drop_oldest_picks_the_oldest_queued_item() -> None:
    t = table(buffer=2, when_full="drop-oldest")
    a, b, _ = filled(t, 0, 1, 2)
    t.mark_sent(a, 1.0)  # on the stream: not a victim
    assert t.victim(item(3)) is b
    t.drop(b)
    assert [p.item for p in t.values()] == [0, 2]


def test_reject_new_refuses_the_new_item() -> None:
    t = table(buffer=1, when_full="reject-new")
    filled(t, 0)
    new = item(1)
    assert t.victim(new) is new
    assert [p.item for p in t.values()] == [0]


def test_block_drops_nothing() -> None:
    t = table(buffer=1, when_full="block")
    filled(t, 0)
    assert t.victim(item(1)) is None


# --- the credit window ------------------------------------------------------------------------


def test_every_pending_item_holds_a_credit_for_a_new_one() -> None:
    t = table(window=2)
    a, b = filled(t, 0, 1)
    assert not t.credit_free()
    t.mark_running_here(b)
    assert not t.credit_free()
    assert t.answered(a.item) is a
    assert t.credit_free()


def test_the_window_bounds_sends() -> None:
    t = table(window=2)
    a, b, c = filled(t, 0, 1, 2)
    for now, expected in ((1.0, a), (2.0, b)):
        chosen = t.next_to_send()
        assert chosen is expected
        t.mark_sent(chosen, now)
    assert t.next_to_send() is None  # two in flight: c waits for a credit
    t.answered(a.item)
    assert t.next_to_send() is c


def test_sends_go_in_item_order() -> None:
    t = table(window=10)
    filled(t, 3, 4, 5)
    order = []
    while (chosen := t.next_to_send()) is not None:
        t.mark_sent(chosen, 1.0)
        order.append(chosen.item)
    assert order == [3, 4, 5]


def test_a_probe_after_a_refusal_carries_one_item() -> None:
    t = table(window=4)
    t.probing = True
    a, _ = filled(t, 0, 1)
    assert t.credit == 1
    t.mark_sent(a, 1.0)
    assert t.next_to_send() is None
    t.probing = False
    assert t.next_to_send() is not None


def test_a_resend_is_told_apart_from_a_first_send() -> None:
    t = table()
    (a,) = filled(t, 0)
    assert t.mark_sent(a, 1.0) is False
    assert (a.state, a.sends, a.sent_at) == (ItemState.SENT, 1, 1.0)
    t.requeue(grace_end=2.0)
    assert t.mark_sent(a, 3.0) is True
    assert (a.sends, a.sent_at) == (2, 3.0)


def test_oldest_sent_is_the_one_sent_first() -> None:
    t = table(window=3)
    a, b, _ = filled(t, 0, 1, 2)
    assert t.oldest_sent() is None
    t.mark_sent(b, 1.0)
    t.mark_sent(a, 2.0)  # a resend can be sent later than an item behind it
    assert t.oldest_sent() is b


# --- running here while the server is away ----------------------------------------------------


def test_nothing_runs_here_while_the_stream_is_up() -> None:
    t = table()
    filled(t, 0)
    assert t.next_to_run(up=True, now=10.0) is None
    assert t.next_to_run(up=False, now=10.0) is not None


def test_requeued_items_wait_for_their_grace_but_new_ones_run_here_at_once() -> None:
    t = table(window=2)
    a, b = filled(t, 0, 1)
    t.mark_sent(a, 1.0)
    t.mark_sent(b, 1.0)
    assert t.requeue(grace_end=6.0) == 2  # the stream broke at 1.0, resend_grace 5 s
    assert (a.state, a.not_before) == (ItemState.QUEUED, 6.0)
    (new,) = filled(t, 2)
    assert t.next_to_run(up=False, now=2.0) is new
    t.mark_running_here(new)
    assert t.next_to_run(up=False, now=2.0) is None  # a and b wait for a reconnect
    assert t.next_to_run(up=False, now=6.0) is a  # grace over: run them here, in order
    t.mark_running_here(a)
    assert t.next_to_run(up=False, now=6.0) is b


def test_requeued_items_are_resent_after_a_reconnect() -> None:
    t = table()
    (a,) = filled(t, 0)
    t.mark_sent(a, 1.0)
    t.requeue(grace_end=6.0)
    assert t.next_to_send() is a  # within the grace, the stream back: resend


def test_an_item_sent_max_sends_times_runs_here() -> None:
    t = table(max_sends=2)
    (a,) = filled(t, 0)
    for now in (1.0, 2.0):
        t.mark_sent(a, now)
        t.requeue(grace_end=now + 5)
    assert t.next_to_send() is None  # never a third send
    assert t.next_to_run(up=True, now=3.0) is a  # even with a stream up and within its grace


def test_a_send_the_server_said_it_did_not_run_does_not_count_towards_max_sends() -> None:
    t = table(max_sends=2)
    (a,) = filled(t, 0)
    for now in (1.0, 2.0, 3.0):
        t.mark_sent(a, now)
        t.requeue(grace_end=now + 5, not_run=True)  # the store was away: "resend it"
    assert t.next_to_send() is a
    assert t.next_to_run(up=True, now=4.0) is None


def test_requeue_leaves_queued_and_running_items_alone() -> None:
    t = table()
    a, b, c = filled(t, 0, 1, 2)
    t.mark_sent(a, 1.0)
    t.mark_running_here(c)
    assert t.requeue(grace_end=9.0) == 1
    assert (b.not_before, c.state) == (0.0, ItemState.LOCAL)


# --- ends -------------------------------------------------------------------------------------


def test_an_answer_ends_its_item_once() -> None:
    t = table()
    (a,) = filled(t, 0)
    t.mark_sent(a, 1.0)
    assert t.answered(0) is a
    assert t.answered(0) is None  # a resent item's replayed answer is late
    assert len(t) == 0


def test_an_answer_for_an_item_running_here_is_late() -> None:
    t = table()
    (a,) = filled(t, 0)
    t.mark_sent(a, 1.0)
    t.requeue(grace_end=1.0)
    t.mark_running_here(a)
    assert t.answered(0) is None
    assert t.values() == [a]  # it ends when it has run here
    t.ran_here(a)
    assert len(t) == 0
    t.ran_here(a)  # already gone: nothing happens
    assert t.answered(0) is None


def test_orphans_on_abort_are_every_item_not_ended_once() -> None:
    t = table(window=3)
    a, b, c = filled(t, 0, 1, 2)
    t.mark_sent(a, 1.0)
    t.mark_running_here(b)
    t.answered(a.item)
    assert t.orphans() == [b, c]
    assert t.orphans() == []
    assert t.answered(c.item) is None


def test_counts_by_state() -> None:
    t = table(window=3)
    a, b, _ = filled(t, 0, 1, 2)
    t.mark_sent(a, 1.0)
    t.mark_running_here(b)
    assert t.counts() == {ItemState.QUEUED: 1, ItemState.SENT: 1, ItemState.LOCAL: 1}


@pytest.mark.parametrize("when_full", ["block", "drop-oldest", "reject-new"])
def test_each_item_ends_once_however_it_ends(when_full: str) -> None:
    t = table(window=2, buffer=2, when_full=when_full)
    ended: list[int] = []
    a, b, _ = filled(t, 0, 1, 2)
    t.mark_sent(a, 1.0)
    t.mark_sent(b, 1.0)
    t.requeue(grace_end=2.0)  # the stream broke
    if (victim := t.victim(item(3))) is not None and victim.item != 3:
        t.drop(victim)
        ended.append(victim.item)
    while (chosen := t.next_to_run(up=False, now=2.0)) is not None:
        t.mark_running_here(chosen)
        t.ran_here(chosen)
        ended.append(chosen.item)
    for n in (0, 1, 2):
        if (answered := t.answered(n)) is not None:  # late answers on a new stream
            ended.append(answered.item)
    ended += [p.item for p in t.orphans()]
    assert sorted(ended) == [0, 1, 2]
