"""Behaviours: what a fake Azure does instead of answering normally (429, 5xx, hang, close).

A L{Behaviour} applies to the next C{count} requests (None: until cleared), for one deployment
or for all.  They are set in Python (L{aoaiproxy.testing.FakeAzure.add_behaviour} and friends),
on the command line (C{--behaviour KIND key=value ...}) and at run time through the control
endpoint (C{POST /_fake/behaviour} with JSON); the last two share L{Behaviour.from_params}, so
their keys are the same:

  - C{kind}: C{429}, C{500}, C{502}, C{503}, C{504} (any 5xx), C{hang} or C{close};
  - C{count}: how many requests (default: until cleared); C{deployment}: only requests for it
    (the C{/openai/deployments/NAME/} of the path, or the v1 API body's C{model});
  - 429 (and 5xx): C{retry-after-ms}, C{x-ms-retry-after-ms}, C{retry-after} (seconds or an HTTP
    date, sent as given), C{retry-after-date} (an HTTP date this many seconds after the answer);
  - C{header}: C{NAME:VALUE}, an extra header (a JSON object C{headers} in JSON);
  - hang and close: C{after-bytes}: absent, nothing is answered (close resets the connection);
    C{0}, the status and headers are sent first; C{N}, also the first N bytes of the body.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from email.utils import formatdate
from typing import Any

import attrs

from .records import RecordedRequest
from .replies import Reply, rate_limited, server_error

JSONObject = dict[str, Any]

__all__ = ["Behaviour"]

_RETRY_HEADERS = ("retry-after-ms", "x-ms-retry-after-ms", "retry-after")
_KEYS = {
    "kind",
    "count",
    "deployment",
    "header",
    "headers",
    "retry-after-date",
    "after-bytes",
    *_RETRY_HEADERS,
}


def _whole(value: object, key: str, minimum: int) -> int:
    try:
        number = int(str(value))
    except ValueError:
        raise ValueError(f"{key} must be a whole number, not {value!r}") from None
    if number < minimum:
        raise ValueError(f"{key} must be at least {minimum}, not {number}")
    return number


def _seconds(value: object, key: str) -> float:
    try:
        number = float(str(value))
    except ValueError:
        raise ValueError(f"{key} must be a number of seconds, not {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{key} must be a finite number of seconds, not {value!r}")
    return number


@attrs.frozen
class Behaviour:
    """What the fake does to a request instead of answering it normally.

    C{kind} is C{"429"}, a 5xx status as a string (C{"500"}, C{"503"}, ...), C{"hang"} or
    C{"close"}.  A 429 or 5xx is Azure's JSON error with C{headers} added (for a 429:
    C{retry-after-ms}, C{x-ms-retry-after-ms}, C{retry-after} as given, and with
    C{retry_after_date}, C{retry-after} set to the HTTP date that many seconds after the answer).
    C{hang} never answers and C{close} closes the connection: before anything is sent when
    C{after_bytes} is None (a TCP reset), else after the status, headers and that many bytes of
    the normal answer's body.
    """

    kind: str
    count: int | None = None
    deployment: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    retry_after_date: float | None = None
    after_bytes: int | None = None

    def __attrs_post_init__(self) -> None:
        if self.kind not in ("429", "hang", "close") and not (
            self.kind.isdigit() and 500 <= int(self.kind) <= 599
        ):
            raise ValueError(f"unknown behaviour {self.kind!r}: 429, 5xx, hang or close")
        if self.count is not None and self.count < 1:
            raise ValueError(f"count must be at least 1, not {self.count}")
        if self.after_bytes is not None and self.kind not in ("hang", "close"):
            raise ValueError("after-bytes applies to hang and close only")
        if self.after_bytes is not None and self.after_bytes < 0:
            raise ValueError(f"after-bytes must be at least 0, not {self.after_bytes}")

    def _retry_headers(self) -> list[tuple[str, str]]:
        return [(name, value) for name, value in self.headers if name.lower() in _RETRY_HEADERS]

    @property
    def status(self) -> int | None:
        """The status this behaviour answers with (None for hang and close)."""
        return int(self.kind) if self.kind.isdigit() else None

    def matches(self, deployment: str | None) -> bool:
        """Whether this behaviour applies to a request for ``deployment``."""
        return self.deployment is None or self.deployment == deployment

    def reply(self, rec: RecordedRequest, now: float) -> Reply:
        """The 429 or 5xx answer to ``rec`` at ``now`` (seconds since the epoch)."""
        headers = self.headers
        if self.retry_after_date is not None:
            date = formatdate(now + self.retry_after_date, usegmt=True)
            headers = (*headers, ("retry-after", date))
        if self.kind != "429":
            reply = server_error(int(self.kind))
            return attrs.evolve(reply, headers=(*reply.headers, *headers))
        return rate_limited(rec, self._message_seconds(), headers)

    def _message_seconds(self) -> float:
        """The seconds the 429's message names: from the first header that says, else 1."""
        if self.retry_after_date is not None:
            return self.retry_after_date
        for name, value in self._retry_headers():
            try:
                number = float(value)
            except ValueError:
                continue  # an HTTP date
            return number / 1000 if name.lower().endswith("-ms") else number
        return 1

    def to_json(self) -> JSONObject:
        """This behaviour in the control endpoint's JSON (the keys L{from_params} takes)."""
        out: JSONObject = {"kind": self.kind, "count": self.count, "deployment": self.deployment}
        out["headers"] = dict(self.headers)
        if self.retry_after_date is not None:
            out["retry-after-date"] = self.retry_after_date
        if self.after_bytes is not None:
            out["after-bytes"] = self.after_bytes
        return out

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Behaviour:
        """A behaviour from the control endpoint's JSON object or the command line's words
        (underscores and dashes alike in keys); ValueError says what is wrong."""
        params = {str(key).replace("_", "-").lower(): value for key, value in params.items()}
        unknown = sorted(set(params) - _KEYS)
        if unknown:
            raise ValueError(f"unknown behaviour keys: {', '.join(unknown)}")
        if "kind" not in params:
            raise ValueError("a behaviour needs a kind: 429, 5xx, hang or close")
        headers: list[tuple[str, str]] = []
        for name in _RETRY_HEADERS:
            if name in params:
                value = params[name]
                if name.endswith("-ms"):
                    value = _whole(value, name, 0)
                headers.append((name, str(value)))
        extra = params.get("headers") or {}
        if not isinstance(extra, Mapping):
            raise ValueError("headers must be an object of header names to values")
        headers += [(str(name), str(value)) for name, value in extra.items()]
        if "header" in params:
            for item in params["header"] if isinstance(params["header"], list) else [params["header"]]:
                name, colon, value = str(item).partition(":")
                if not colon or not name.strip():
                    raise ValueError(f"header must be NAME:VALUE, not {item!r}")
                headers.append((name.strip(), value.strip()))
        count = params.get("count")
        after = params.get("after-bytes")
        date = params.get("retry-after-date")
        deployment = params.get("deployment")
        return cls(
            kind=str(params["kind"]),
            count=None if count is None else _whole(count, "count", 1),
            deployment=None if deployment is None else str(deployment),
            headers=tuple(headers),
            retry_after_date=None if date is None else _seconds(date, "retry-after-date"),
            after_bytes=None if after is None else _whole(after, "after-bytes", 0),
        )

    @classmethod
    def from_words(cls, words: Sequence[str]) -> tuple[Behaviour, str | None]:
        """A behaviour from the command line's C{KIND key=value ...} and the C{region=NAME} it
        is for (None: every region)."""
        if not words:
            raise ValueError("--behaviour needs a kind: 429, 5xx, hang or close")
        params: dict[str, Any] = {"kind": words[0]}
        region = None
        for word in words[1:]:
            key, equals, value = word.partition("=")
            if not equals:
                raise ValueError(f"behaviour settings are key=value, not {word!r}")
            if key == "region":
                region = value
            elif key == "header":
                params.setdefault("header", []).append(value)
            else:
                params[key] = value
        return cls.from_params(params), region


@attrs.define
class ActiveBehaviour:
    """A behaviour in force on a fake, with how many requests it has left (None: no limit)."""

    behaviour: Behaviour
    left: int | None


class Behaviours:
    """The behaviours in force on one fake, first added first applied."""

    def __init__(self) -> None:
        self._active: list[ActiveBehaviour] = []

    def add(self, behaviour: Behaviour) -> None:
        self._active.append(ActiveBehaviour(behaviour, behaviour.count))

    def clear(self, deployment: str | None = None) -> None:
        """Clear every behaviour, or those set for ``deployment``."""
        self._active = [
            a for a in self._active if deployment is not None and a.behaviour.deployment != deployment
        ]

    def take(self, deployment: str | None) -> Behaviour | None:
        """The behaviour for a request for ``deployment`` (counting it), or None."""
        for active in self._active:
            if active.behaviour.matches(deployment):
                if active.left is not None:
                    active.left -= 1
                    if active.left == 0:
                        self._active.remove(active)
                return active.behaviour
        return None

    def current(self) -> list[Behaviour]:
        """The behaviours in force, each with the count it has left."""
        return [attrs.evolve(a.behaviour, count=a.left) for a in self._active]
