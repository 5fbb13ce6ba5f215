"""
Many timeouts on one timer.

A timeout armed and cancelled per request or per connection (C{reactor.callLater}, then
C{cancel} once it is done, as nearly every one is) costs a L{DelayedCall} (a Python object,
ordered in the reactor's heap by a Python C{__lt__}), and its cancellation (the reactor
rebuilds its heap with that same C{__lt__} once enough are cancelled), for a timer that
almost never fires.  L{Deadlines} keeps one entry per item, in a dict and in a heap of
C{(due time, sequence, entry)} tuples (ordered by C's tuple and float comparisons), and one
L{DelayedCall} for the soonest of them: adding an item is a dict store and a C{heappush};
removing it is a dict removal, and its entry lets go of the item (the entry itself is
dropped when it comes up, or when the heap is rebuilt because it holds more dropped entries
than live ones).  The timer is armed again only when it fires, or when an item is due sooner
than any other.

Each item still expires at its own due time, as with a timer of its own: the one timer is
always armed for the soonest due time, and when it fires every item due by then expires, in
the order of their due times.
"""

from __future__ import annotations

from heapq import heapify, heappop, heappush
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = ["Deadlines", "Expiring"]

_log = Logger()

_NEVER = float("inf")

#: The heap is rebuilt (from the live items alone) once it holds more than twice as many
#: entries as there are live items, and more than this many.
_COMPACT_ABOVE = 64


class Expiring(Protocol):
    """What L{Deadlines} holds: something told when its time is up."""

    def expired(self) -> None: ...


class Deadlines:
    """
    Due times of L{Expiring} items, on one timer of C{reactor}.  L{add} an item with its
    delay; L{remove} it once it is done; an item still there at its due time is removed and
    its C{expired} is called.  Items are told apart by identity (their hash), never compared,
    and never kept once removed.
    """

    __slots__ = ("_at", "_call", "_entries", "_heap", "_reactor", "_sequence")

    def __init__(self, reactor: IReactorTime) -> None:
        self._reactor = reactor
        #: Each item's entry: C{[due time, item]}, whose item is None once it is removed, added
        #: again (a new entry), or expired.
        self._entries: dict[Expiring, list[Any]] = {}
        #: C{(due time, sequence, entry)}, for live entries and dropped ones; the sequence
        #: number orders equal due times, so that entries are never compared.
        self._heap: list[tuple[float, int, list[Any]]] = []
        self._sequence = 0
        #: The one timer, armed for C{_at}, or None.
        self._call: IDelayedCall | None = None
        self._at = _NEVER

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, item: Expiring) -> bool:
        """Whether C{item} is there (added, and not yet removed nor expired)."""
        return item in self._entries

    def due(self, item: Expiring) -> float | None:
        """When C{item} expires (the reactor's time), or None if it is not there."""
        entry = self._entries.get(item)
        return None if entry is None else entry[0]  # type: ignore[no-any-return]

    def add(self, item: Expiring, delay: float) -> None:
        """
        Call C{item.expired()} in C{delay} seconds, unless it is removed first (an item added
        again is due at its new time).
        """
        due = self._reactor.seconds() + delay
        entries = self._entries
        old = entries.get(item)
        if old is not None:
            old[1] = None
        entry = entries[item] = [due, item]
        heap = self._heap
        self._sequence += 1
        heappush(heap, (due, self._sequence, entry))
        if len(heap) > _COMPACT_ABOVE and len(heap) > 2 * len(entries):
            self._compact()
        if due < self._at:
            self._arm(due)

    def remove(self, item: Expiring) -> None:
        """Forget C{item} (done in time); nothing if it is not there."""
        entries = self._entries
        entry = entries.pop(item, None)
        if entry is not None:
            entry[1] = None
            if not entries:
                self._heap.clear()

    def clear(self) -> None:
        """Forget every item, and stop the timer."""
        for entry in self._entries.values():
            entry[1] = None
        self._entries.clear()
        self._heap.clear()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call, self._at = None, _NEVER

    def _compact(self) -> None:
        """Rebuild the heap from the live entries alone."""
        heap = [(entry[0], n, entry) for n, entry in enumerate(self._entries.values())]
        heapify(heap)
        self._heap = heap
        self._sequence = len(heap)

    def _arm(self, due: float) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._at = due
        self._call = self._reactor.callLater(max(0.0, due - self._reactor.seconds()), self._fire)

    def _fire(self) -> None:
        # Everything due by the time the timer was armed for is due now, even if the clock
        # reads a hair earlier (it was armed for C{at - now} seconds from C{now}).
        now = max(self._reactor.seconds(), self._at)
        self._call, self._at = None, _NEVER
        entries = self._entries
        heap = self._heap
        expired: list[Expiring] = []
        while heap and heap[0][0] <= now:
            entry = heappop(heap)[2]
            item = entry[1]
            if item is not None:
                entry[1] = None
                del entries[item]
                expired.append(item)
        # The timer is armed for the soonest live entry: dropped ones are let go of.
        while heap and heap[0][2][1] is None:
            heappop(heap)
        if heap:
            self._arm(heap[0][0])
        for item in expired:
            try:
                item.expired()
            except Exception:
                _log.failure("a timeout's handler failed")
