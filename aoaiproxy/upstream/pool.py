"""
Idle upstream connections, kept for reuse per (scheme, host, port).

At most C{max_idle} are kept per upstream (a cap on idle ones, not on concurrency), the most
recently used is reused first, and one that has been idle for C{idle_timeout} seconds is
closed: below the idle timeout of Azure's front ends, so that a reused connection is rarely
stale.  One timer serves the whole pool.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall

from aoaiproxy.upstream.protocol import HTTP11Connection

Key = tuple[str, str, int]


class Pool:
    def __init__(self, reactor: Any, max_idle: int, idle_timeout: float) -> None:
        self._reactor = reactor
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._idle: dict[Key, list[HTTP11Connection]] = {}
        self._sweeper: IDelayedCall | None = None
        self._closed = False

    def take(self, key: Key) -> HTTP11Connection | None:
        """An idle connection to C{key}, now no longer idle, or None."""
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.reusable:
                return conn
            # Closing already (it was aborted for bytes sent out of turn), its
            # connectionLost still to come: never hand it out.
        return None

    def put(self, key: Key, conn: HTTP11Connection) -> None:
        """Keep C{conn} (idle, connected) for reuse, or close it if enough are kept."""
        idle = self._idle.get(key)
        if idle is None:
            idle = self._idle[key] = []
        if len(idle) >= self._max_idle or self._closed:
            conn.close()
            return
        conn.idle_since = self._reactor.seconds()
        idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self._reactor.callLater(self._idle_timeout, self._sweep)

    def lost(self, key: Key, conn: HTTP11Connection) -> None:
        """C{conn} closed: forget it if it was idle."""
        idle = self._idle.get(key)
        if idle and conn in idle:
            idle.remove(conn)
            if not idle:
                del self._idle[key]

    def _sweep(self) -> None:
        """Close the connections idle for too long; come back when the next one will be."""
        self._sweeper = None
        cutoff = self._reactor.seconds() - self._idle_timeout
        next_due: float | None = None
        for key, idle in list(self._idle.items()):
            # Oldest first: take() pops from the end.
            while idle and idle[0].idle_since <= cutoff:
                idle.pop(0).close()
            if not idle:
                del self._idle[key]
            elif next_due is None or idle[0].idle_since < next_due:
                next_due = idle[0].idle_since
        if next_due is not None:
            self._sweeper = self._reactor.callLater(next_due - cutoff, self._sweep)

    def close(self) -> Deferred[None]:
        """Close every idle connection, and keep none from now on; fires once they are closed."""
        self._closed = True
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        conns = [conn for idle in self._idle.values() for conn in idle]
        self._idle.clear()
        return gatherResults([conn.close() for conn in conns]).addCallback(lambda _: None)
