"""
Capacity (SPEC §15): open streams bounded by file descriptors, and listen backlogs that queue
bursts instead of refusing them.

- Each open stream (or tunnel) holds two descriptors, the client's and the upstream's, so the
  default C{--max-connections} is L{connections_for} the open-file limit: C{(limit - 100) // 2},
  the 100 kept for listeners, log files, key files and the like.  The limit is the one the
  daemon runs with: L{raise_open_file_limit} raises its soft limit to the hard one at start-up
  (a worker inherits it), and L{open_file_limit} is that hard limit.
- L{with_backlog} gives a listener description a backlog of L{BACKLOG} (Twisted's endpoints
  default to 50) unless it names one.
- L{settle_collector}, once the daemon serves: what start-up built is left out of every later
  cyclic collection.
"""

from __future__ import annotations

import gc
import re
import resource
from collections.abc import Callable

__all__ = [
    "BACKLOG",
    "RESERVED_DESCRIPTORS",
    "connections_for",
    "open_file_limit",
    "raise_open_file_limit",
    "settle_collector",
    "with_backlog",
]

#: Descriptors kept back from client connections: listeners, logs, key files, DNS, the pipes
#: to workers.
RESERVED_DESCRIPTORS = 100

#: The listen backlog of every listener the daemon binds (systemd's socket unit sets its own).
BACKLOG = 1024

#: When the hard limit is unlimited (not on Linux, where it is at most C{fs.nr_open}), the
#: soft limit is raised to this.
UNLIMITED_TARGET = 65536

#: Endpoint types whose string takes C{backlog=} (C{ssl:} passes it to the TCP port under it).
_BACKLOG_TYPES = frozenset({"tcp", "tcp6", "ssl", "unix"})
_HAS_BACKLOG = re.compile(r"(?<!\\):backlog=")

Limits = tuple[int, int]


def connections_for(open_files: int) -> int:
    """
    The most client connections C{open_files} descriptors carry, each with an upstream
    descriptor beside it: C{(open_files - 100) // 2}, at least 1.  20,000 gives 9,950.
    """
    return max(1, (open_files - RESERVED_DESCRIPTORS) // 2)


def _target(limits: Limits) -> int:
    soft, hard = limits
    if hard == resource.RLIM_INFINITY:
        return max(soft, UNLIMITED_TARGET) if soft != resource.RLIM_INFINITY else UNLIMITED_TARGET
    return hard


def open_file_limit(getrlimit: Callable[[int], Limits] = resource.getrlimit) -> int:
    """The open-file limit the daemon runs with: the hard limit, which the soft one is raised to."""
    return _target(getrlimit(resource.RLIMIT_NOFILE))


def raise_open_file_limit(
    getrlimit: Callable[[int], Limits] = resource.getrlimit,
    setrlimit: Callable[[int, Limits], None] = resource.setrlimit,
) -> tuple[int, int]:
    """
    Raise this process's soft open-file limit to its hard limit (L{open_file_limit}).  Returns
    the soft limit before and after; never raises (a refusal leaves the limit as it was).
    """
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    target = _target((soft, hard))
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            return soft, soft
        return soft, target
    return soft, soft


def with_backlog(description: str, backlog: int = BACKLOG) -> str:
    """
    C{description} (a server endpoint string) with C{backlog=} added when its type takes one
    and it names none; anything else (C{systemd:}, whose socket unit sets C{Backlog=}) unchanged.
    """
    kind = description.split(":", 1)[0]
    if kind not in _BACKLOG_TYPES or _HAS_BACKLOG.search(description):
        return description
    return f"{description}:backlog={backlog}"


def settle_collector(
    collect: Callable[[], object] = gc.collect,
    freeze: Callable[[], None] = gc.freeze,
) -> None:
    """
    Once the daemon serves: collect start-up's garbage, then freeze what is left (modules,
    the configuration, the listeners: it lives as long as the process), so that no later
    collection of the oldest generation walks it again.  The thresholds stay CPython's: a
    young generation collected ten times less often (7,000) saved ~2 % of the CPU per request
    but let the cycles of closed connections pile up (+5 MB at the peak of 100 clients
    reconnecting as fast as they can, tests/e2e/test_hostile_e2e.py).
    """
    collect()
    freeze()
