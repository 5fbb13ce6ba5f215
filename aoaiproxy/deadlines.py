"""
Many timeouts on one timer.

A timeout armed and cancelled per request (C{reactor.callLater}, then C{cancel} once the
request is answered, as nearly every one is) costs a L{DelayedCall}, its place in the
reactor's heap and its cancellation, for a timer that almost never fires.  L{Deadlines} keeps
the due times of many items in a dict and one L{DelayedCall} for the soonest of them: adding
and removing an item is a dict operation, and the timer is armed again only when it fires
(about once per timeout while requests keep coming), or when an item is due sooner than any
other.

Each item still expires at its own due time, as with a timer of its own: the one timer is
always armed for the soonest due time, and when it fires every item due by then expires.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = ["Deadlines", "Expiring"]

_log = Logger()

_NEVER = float("inf")


class Expiring(Protocol):
    """What L{Deadlines} holds: something told when its time is up."""

    def expired(self) -> None: ...


class Deadlines:
    """
    Due times of L{Expiring} items, on one timer of C{reactor}.  L{add} an item with its
    delay; L{remove} it once it is done; an item still there at its due time is removed and
    its C{expired} is called.
    """

    __slots__ = ("_at", "_call", "_due", "_in_order", "_last", "_reactor")

    def __init__(self, reactor: IReactorTime) -> None:
        self._reactor = reactor
        self._due: dict[Expiring, float] = {}
        #: The one timer, armed for C{_at}, or None.
        self._call: IDelayedCall | None = None
        self._at = _NEVER
        #: Whether the items were added in the order of their due times (the usual case: one
        #: delay for all), so that the soonest is the first, and those due are a prefix.
        self._in_order = True
        self._last = -_NEVER

    def __len__(self) -> int:
        return len(self._due)

    def add(self, item: Expiring, delay: float) -> None:
        """
        Call C{item.expired()} in C{delay} seconds, unless it is removed first (an item added
        again is due at its new time).
        """
        due = self._reactor.seconds() + delay
        due_times = self._due
        if item in due_times:
            del due_times[item]  # to the end, in the order of additions
        due_times[item] = due
        if due < self._last:
            self._in_order = False
        else:
            self._last = due
        if due < self._at:
            self._arm(due)

    def remove(self, item: Expiring) -> None:
        """Forget C{item} (done in time); nothing if it is not there."""
        due_times = self._due
        due_times.pop(item, None)
        if not due_times:
            self._in_order, self._last = True, -_NEVER

    def clear(self) -> None:
        """Forget every item, and stop the timer."""
        self._due.clear()
        self._in_order, self._last = True, -_NEVER
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call, self._at = None, _NEVER

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
        due_times = self._due
        expired: list[Expiring] = []
        soonest = _NEVER
        if self._in_order:
            for item, due in due_times.items():
                if due > now:
                    soonest = due
                    break
                expired.append(item)
        else:
            for item, due in due_times.items():
                if due <= now:
                    expired.append(item)
                elif due < soonest:
                    soonest = due
        for item in expired:
            del due_times[item]
        if not due_times:
            self._in_order, self._last = True, -_NEVER
        else:
            self._arm(soonest)
        for item in expired:
            try:
                item.expired()
            except Exception:
                _log.failure("a timeout's handler failed")
