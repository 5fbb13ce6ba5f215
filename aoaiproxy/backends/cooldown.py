"""
Cooldowns and circuits: when a backend, or one deployment on it, is taken out and for how long.

Pure: every function takes the time (C{now}, seconds since the epoch, as C{reactor.seconds()}
gives it) and keeps no clock of its own.

- L{retry_delay} reads the delay Azure names in a 429's headers: C{retry-after-ms}, then
  C{x-ms-retry-after-ms}, then C{retry-after} (delta seconds, fractions allowed, or an HTTP
  date); the first one that parses wins.  L{cooldown_for} turns it into the time the deployment
  returns: that delay, else L{DEFAULT_COOLDOWN}, never more than the C{max_cooldown}.
- L{Cooldowns} holds those times per (backend, deployment); a further 429 can only lengthen one.
- L{Circuit} is one backend's circuit breaker.  Failed connections, timeouts and 5xx count;
  L{CIRCUIT_THRESHOLD} in a row open it for L{CIRCUIT_BASE} seconds, doubling (up to
  C{max_cooldown}) each time the probe fails.  When the time is up exactly one request is let
  through as the probe; the others still find the backend unavailable until the probe's outcome
  is known.  Any other outcome (a response that is not a 5xx, 429 included: the backend is up)
  closes the circuit and resets the count.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from datetime import timezone
from email.utils import parsedate_to_datetime

import attrs
from twisted.web.http_headers import Headers

#: A response's headers: Twisted's L{Headers}, or (name, value) pairs.
ResponseHeaders = Headers | Iterable[tuple[bytes, bytes]]

__all__ = [
    "CIRCUIT_BASE",
    "CIRCUIT_THRESHOLD",
    "DEFAULT_COOLDOWN",
    "PROBE_LEASE",
    "Circuit",
    "Cooldowns",
    "ResponseHeaders",
    "cooldown_for",
    "header_pairs",
    "retry_delay",
    "seconds_until",
]

#: Seconds a deployment cools after a 429 that names no delay.
DEFAULT_COOLDOWN = 10.0
#: Failures in a row (connection failure, timeout, 5xx) that open a backend's circuit.
CIRCUIT_THRESHOLD = 3
#: Seconds a circuit stays open the first time; doubled each time its probe fails.
CIRCUIT_BASE = 5.0
#: Seconds after which a probe whose outcome never came is forgotten and another is let through.
PROBE_LEASE = 300.0

#: The retry headers, in the order they are believed: the millisecond ones are the precise ones.
_MS_HEADERS = (b"retry-after-ms", b"x-ms-retry-after-ms")
_NUMBER = re.compile(r"^[0-9]{1,15}(?:\.[0-9]{1,9})?$")


def _number(value: bytes) -> float | None:
    """A non-negative decimal number (no sign, exponent, underscore, inf or nan), else None."""
    text = value.decode("latin-1").strip()
    return float(text) if _NUMBER.match(text) else None


def _http_date(value: bytes, now: float) -> float | None:
    """The seconds from C{now} until an HTTP date (0 if it has passed), else None."""
    try:
        when = parsedate_to_datetime(value.decode("latin-1").strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # HTTP dates are GMT, the asctime form says so by omission
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now)


def header_pairs(headers: ResponseHeaders) -> Iterable[tuple[bytes, bytes]]:
    """C{headers} as (name, value) pairs: raw pairs as they are, a C{Headers} one per value."""
    if isinstance(headers, Headers):
        return [(name, value) for name, values in headers.getAllRawHeaders() for value in values]
    return headers


def retry_delay(headers: ResponseHeaders, now: float) -> float | None:
    """
    The delay, in seconds, that a response's retry headers ask for, or None when none of them is
    present and valid.  Header names are matched case-insensitively; a value that does not
    parse is ignored as if absent.
    """
    found: dict[bytes, bytes] = {}
    for name, value in header_pairs(headers):
        found.setdefault(name.lower(), value)
    for name in _MS_HEADERS:
        if name in found and (ms := _number(found[name])) is not None:
            return ms / 1000.0
    if b"retry-after" in found:
        value = found[b"retry-after"]
        seconds = _number(value)
        return seconds if seconds is not None else _http_date(value, now)
    return None


def cooldown_for(headers: ResponseHeaders, now: float, max_cooldown: float) -> float:
    """The time a deployment that answered 429 with these headers may be used again."""
    delay = retry_delay(headers, now)
    if delay is None:
        delay = DEFAULT_COOLDOWN
    return now + min(delay, max_cooldown)


@attrs.define
class Cooldowns:
    """
    When each cooling key (a backend's name and a deployment) may be used again.  Keys whose time
    has passed are dropped as new ones arrive, so the table stays as small as what is cooling.
    """

    _until: dict[tuple[str, str], float] = attrs.field(factory=dict)

    def until(self, key: tuple[str, str]) -> float:
        """The time C{key} returns; 0 when it is not cooling."""
        return self._until.get(key, 0.0)

    def cool(self, key: tuple[str, str], until: float, now: float) -> float:
        """Cool C{key} until C{until}, unless it already cools longer; returns its time."""
        for old in [k for k, t in self._until.items() if t <= now]:
            del self._until[old]
        kept = max(self._until.get(key, 0.0), until)
        if kept > now:
            self._until[key] = kept
        return kept

    def keep_only(self, names: set[str]) -> None:
        """Forget the keys of backends not in C{names}."""
        for key in [k for k in self._until if k[0] not in names]:
            del self._until[key]


@attrs.define
class Circuit:
    """One backend's circuit breaker.  See the module docstring for the rules."""

    #: Failures in a row since the last success.
    failures: int = 0
    #: While open (or half-open): when it may be probed.  None when closed.
    open_until: float | None = None
    #: How long the next opening lasts.
    backoff: float = CIRCUIT_BASE
    #: When the probe now out was let through, or None.
    probe_since: float | None = None

    def _probing(self, now: float) -> bool:
        return self.probe_since is not None and now < self.probe_since + PROBE_LEASE

    def available(self, now: float) -> bool:
        """Whether a request may go to this backend now (closed, or half-open with no probe out)."""
        if self.open_until is None:
            return True
        return now >= self.open_until and not self._probing(now)

    def available_at(self, now: float) -> float:
        """When this backend may next take a request (C{now} when it may now, or a probe is out)."""
        if self.open_until is None or self._probing(now):
            return now
        return max(now, self.open_until)

    def is_open(self) -> bool:
        return self.open_until is not None

    def take(self, now: float) -> bool:
        """
        A request is about to be sent.  Returns whether it is the probe (the circuit was
        half-open); the caller reports its outcome with C{probe=True}.
        """
        if self.open_until is None:
            return False
        self.probe_since = now
        return True

    def succeeded(self) -> None:
        """The backend answered (anything but a 5xx): close the circuit, reset the count."""
        self.failures = 0
        self.open_until = None
        self.backoff = CIRCUIT_BASE
        self.probe_since = None

    def failed(self, now: float, max_cooldown: float, probe: bool) -> None:
        """A failed connection, a timeout or a 5xx."""
        if self.open_until is None:
            self.failures += 1
            if self.failures >= CIRCUIT_THRESHOLD:
                self.open_until = now + min(self.backoff, max_cooldown)
        elif probe:
            # The probe failed: out again, for twice as long.
            self.backoff = min(self.backoff * 2, max_cooldown)
            self.open_until = now + self.backoff
            self.probe_since = None
        # A failure of a request sent before the circuit opened changes nothing.

    def abandoned(self, probe: bool) -> None:
        """A request ended with no outcome (the client went away): a probe may go again."""
        if probe:
            self.probe_since = None


def seconds_until(when: float, now: float) -> int:
    """Whole seconds from C{now} until C{when}, rounded up, at least 1 (for C{Retry-After})."""
    return max(1, math.ceil(when - now))
