"""
L{Deadlines}: many timeouts on one timer expire each at its own due time, exactly as a
timer per item would (a property test against C{callLater} per item), with one
L{DelayedCall} at most on the clock.
"""

from __future__ import annotations

import weakref
from unittest.mock import patch

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from aoaiproxy import deadlines as deadlines_module
from aoaiproxy.deadlines import Deadlines

PROPERTIES = settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


class Item:
    def __init__(self, name: str, log: list[tuple[float, str]], clock: Clock) -> None:
        self.name, self._log, self._clock = name, log, clock

    def expired(self) -> None:
        self._log.append((self._clock.seconds(), self.name))


def test_each_item_expires_at_its_own_due_time() -> None:
    clock = Clock()
    log: list[tuple[float, str]] = []
    deadlines = Deadlines(clock)
    a, b, c = (Item(n, log, clock) for n in "abc")
    deadlines.add(a, 10)
    clock.advance(3)
    deadlines.add(b, 10)
    deadlines.add(c, 10)
    deadlines.remove(c)  # done in time
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(6.5)
    assert log == []
    clock.advance(0.5)
    assert log == [(10, "a")]
    clock.advance(2.9)
    assert log == [(10, "a")]
    clock.advance(0.1)
    assert log == [(10, "a"), (13, "b")]
    assert len(deadlines) == 0
    assert clock.getDelayedCalls() == []


def test_an_item_due_sooner_than_the_others_moves_the_timer() -> None:
    clock = Clock()
    log: list[tuple[float, str]] = []
    deadlines = Deadlines(clock)
    deadlines.add(Item("late", log, clock), 600)
    deadlines.add(Item("soon", log, clock), 5)
    [call] = clock.getDelayedCalls()
    assert call.getTime() == 5
    clock.advance(5)
    assert log == [(5, "soon")]
    clock.advance(595)
    assert log == [(5, "soon"), (600, "late")]


def test_the_timer_is_not_armed_per_item() -> None:
    """Items added and removed (answered in time) leave the one timer as it was."""
    clock = Clock()
    log: list[tuple[float, str]] = []
    deadlines = Deadlines(clock)
    deadlines.add(Item("first", log, clock), 600)
    [call] = clock.getDelayedCalls()
    for n in range(100):
        item = Item(str(n), log, clock)
        deadlines.add(item, 600)
        clock.advance(0.01)
        deadlines.remove(item)
        assert clock.getDelayedCalls() == [call]
    clock.advance(600)
    assert [name for _, name in log] == ["first"]


def test_a_failing_handler_does_not_keep_the_others_from_expiring() -> None:
    clock = Clock()
    log: list[tuple[float, str]] = []
    deadlines = Deadlines(clock)

    class Broken:
        def expired(self) -> None:
            raise RuntimeError("bug")

    deadlines.add(Broken(), 1)
    deadlines.add(Item("after", log, clock), 1)
    clock.advance(1)
    assert log == [(1, "after")]


def test_a_handler_may_add_and_remove_items() -> None:
    clock = Clock()
    log: list[tuple[float, str]] = []
    deadlines = Deadlines(clock)
    later = Item("later", log, clock)
    again = Item("again", log, clock)

    class Rearms:
        def expired(self) -> None:
            log.append((clock.seconds(), "rearms"))
            deadlines.remove(later)
            deadlines.add(again, 2)

    deadlines.add(Rearms(), 1)
    deadlines.add(later, 2)
    clock.advance(1)
    clock.advance(1)
    clock.advance(1)
    assert log == [(1, "rearms"), (3, "again")]


# Operations: add item i with a delay, remove item i, or let time pass.
operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 5), st.sampled_from([0, 0.5, 1, 2.5, 10, 30])),
        st.tuples(st.just("remove"), st.integers(0, 5), st.just(0)),
        st.tuples(st.just("advance"), st.just(0), st.sampled_from([0, 0.25, 0.5, 1, 2.5, 7, 30])),
    ),
    max_size=40,
)


@PROPERTIES
@given(operations)
@example([("add", 0, 1), ("add", 1, 2.5), ("add", 0, 10), ("advance", 0, 2.5)])  # a re-added item
def test_the_same_expiries_as_a_timer_per_item(ops: list[tuple[str, int, float]]) -> None:
    """
    Against a reference (a C{callLater} per item, cancelled on removal; adding an item
    already there moves its due time): the same items expire, at the same times, with never
    more than one timer on the clock.
    """
    _check_against_reference(ops)


@PROPERTIES
@given(operations)
def test_the_same_expiries_when_the_heap_is_rebuilt_at_every_step(ops: list[tuple[str, int, float]]) -> None:
    """As above, with the heap rebuilt from the live items whenever it holds a dropped entry."""
    with patch.object(deadlines_module, "_COMPACT_ABOVE", 0):
        _check_against_reference(ops)


def _check_against_reference(ops: list[tuple[str, int, float]]) -> None:
    clock, reference_clock = Clock(), Clock()
    log: list[tuple[float, str]] = []
    expected: list[tuple[float, str]] = []
    deadlines = Deadlines(clock)
    items = [Item(str(i), log, clock) for i in range(6)]
    timers: dict[int, object] = {}

    def reference_expire(i: int) -> None:
        del timers[i]
        expected.append((reference_clock.seconds(), str(i)))

    for op, i, amount in ops:
        if op == "add":
            deadlines.add(items[i], amount)
            old = timers.pop(i, None)
            if old is not None:
                old.cancel()  # type: ignore[attr-defined]
            timers[i] = reference_clock.callLater(amount, reference_expire, i)
        elif op == "remove":
            deadlines.remove(items[i])
            old = timers.pop(i, None)
            if old is not None:
                old.cancel()  # type: ignore[attr-defined]
        else:
            clock.advance(amount)
            reference_clock.advance(amount)
            # Several due at one instant: the order among them is not pinned.
            assert sorted(log) == sorted(expected)
        assert len(clock.getDelayedCalls()) <= 1
    clock.advance(100)
    reference_clock.advance(100)
    assert sorted(log) == sorted(expected)
    assert len(deadlines) == 0


def test_items_removed_are_not_kept_and_their_entries_do_not_pile_up() -> None:
    """
    Items removed (done in time), added again or expired are let go of at once, although
    their entries in the heap are dropped later; and those entries do not pile up while
    items come and go beside a long-lived one.
    """
    clock = Clock()
    log: list[tuple[float, str]] = []
    deadlines = Deadlines(clock)
    deadlines.add(Item("long-lived", log, clock), 600)
    freed = []
    for n in range(10_000):
        item = Item(str(n), log, clock)
        deadlines.add(item, 10)
        if n % 3 == 0:
            deadlines.add(item, 20)  # added again: due at its new time
        deadlines.remove(item)
        freed.append(weakref.ref(item))
        del item
        # (A private read: how many entries the heap holds, live or dropped.)
        assert len(deadlines._heap) <= 2 * len(deadlines) + deadlines_module._COMPACT_ABOVE
    assert [ref for ref in freed if ref() is not None] == []
    expiring = Item("expiring", log, clock)
    deadlines.add(expiring, 1)
    clock.advance(1)
    expired = weakref.ref(expiring)
    del expiring
    assert expired() is None
    assert log == [(1, "expiring")] and len(deadlines) == 1


def test_what_an_item_is_due_and_whether_it_is_there() -> None:
    clock = Clock()
    log: list[tuple[float, str]] = []
    deadlines = Deadlines(clock)
    item = Item("a", log, clock)
    assert item not in deadlines and deadlines.due(item) is None
    clock.advance(2)
    deadlines.add(item, 10)
    assert item in deadlines and deadlines.due(item) == 12
    deadlines.add(item, 3)  # added again: due at its new time
    assert deadlines.due(item) == 5
    clock.advance(3)
    assert item not in deadlines and deadlines.due(item) is None  # expired
    deadlines.add(item, 1)
    deadlines.remove(item)
    assert item not in deadlines and deadlines.due(item) is None
