"""
L{ProxyReactor}: Twisted's epoll reactor, dispatching each event without the legacy log
context, and L{install}, which C{twistd aoaiproxy} calls unless C{--reactor} chose another.

Twisted's epoll reactor hands every ready descriptor to its C{doRead}/C{doWrite} through
C{twisted.python.log.callWithLogger}, which asks the descriptor's C{logPrefix()} and copies the
legacy log context (two dictionaries keyed by interfaces) so that a legacy C{log.msg} made
while the event is handled is stamped with that prefix as its "system".  Measured with
callgrind on C{twistd aoaiproxy} (``bench/README.md``): it was ~122,000 of ~898,000
instructions per CONNECT tunnel set up and closed (seven events), and ~16,000 of ~57,000 per
relayed stream chunk (one event).

L{ProxyReactor} calls the same C{_doReadOrWrite} directly.  What it gives up: a legacy log
line written while an event is handled -- Twisted's "Unhandled Error" when a protocol's
C{dataReceived} raises, say -- shows C{[-]} instead of the connection's prefix (its traceback
still names the code).  An exception that escapes the event's handling (from a
C{connectionLost}) is logged with the descriptor's prefix, as Twisted does, and the other
events of the same poll are still handled.  Our own log lines (new-style loggers, the
access log) never used that context.
"""

from __future__ import annotations

import errno
import sys
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.python import log

__all__ = ["ProxyReactor", "install"]


class ProxyReactor(EPollReactor):
    """The epoll reactor, without the legacy log context around each event (the module's
    docstring)."""

    def doPoll(self, timeout: float | None) -> None:
        """Poll for events and handle them, as L{EPollReactor.doPoll} does."""
        if timeout is None:
            timeout = -1  # wait until an event
        selectables: dict[int, Any] = self._selectables
        try:
            # As Twisted does: at most one event per descriptor tracked.
            events = self._poller.poll(timeout, len(selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        handle = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:  # removed by an earlier event of this poll
                continue
            try:
                handle(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                # What log.callWithLogger does with an exception that escapes the handling.
                log.err(system=_prefix(selectable))

    doIteration = doPoll


def _prefix(selectable: Any) -> str:
    try:
        return str(selectable.logPrefix())
    except BaseException:
        return "(buggy logPrefix method)"


def install() -> bool:
    """
    Install a L{ProxyReactor} as the global reactor, unless one is installed already (twistd's
    C{--reactor} option, or an import of C{twisted.internet.reactor}): then keep that one.
    Returns whether it installed one.  (Importing this module fails where there is no
    epoll.)
    """
    if "twisted.internet.reactor" in sys.modules:
        return False
    reactor = ProxyReactor()
    from twisted.internet.main import installReactor

    installReactor(reactor)
    return True
