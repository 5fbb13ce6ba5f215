"""The control endpoint of a fake Azure: C{/_fake/...} on its own port, JSON in and out.

It lets a test that runs the fake in another process (C{python -m aoaiproxy.testing}) do what
a test in the same process does through L{aoaiproxy.testing.FakeAzure}'s methods.  Requests to
it are not recorded and no behaviour applies to them.  Errors are 400 (or 404, 405) with
C{{"error": {"message": ...}}}.

  - C{GET /_fake}: the instance's state: C{name}, C{request_count}, C{open_connections},
    C{hanging_requests}, C{held_streams}, C{behaviours}, C{settings}.
  - C{GET /_fake/requests}: C{{"count": N, "requests": [...]}}, every recorded request as
    L{RecordedRequest.to_json} (body in base64; C{RecordedRequest.from_json} reads it back);
    C{DELETE /_fake/requests} forgets them and restarts the count.
  - C{POST /_fake/behaviour}: a behaviour object, or a list of them, put in force (keys: see
    L{aoaiproxy.testing.faults}); C{GET} lists those in force with the counts they have left;
    C{DELETE /_fake/behaviour} ends them all (C{?deployment=NAME}: those for NAME).
  - C{POST /_fake/settings}: any of C{stream-chunks}, C{stream-interval}, C{big-stream-bytes},
    C{filter-frames}, C{api-key}, C{require-token} (needs a token endpoint), C{token-audience},
    C{ratelimit-remaining} (C{[requests, tokens]} sent as C{x-ratelimit-remaining-*} on
    successful answers, or null), C{hold} (true: hold streams before their last chunk; false:
    release them); C{GET} returns them all.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .faults import Behaviour
from .replies import Reply, json_reply
from .server import HTTPRequest, parse_uri

if TYPE_CHECKING:
    from .azure import FakeAzure

JSONObject = dict[str, Any]

PREFIX = b"/_fake"


def error(status: int, message: str) -> Reply:
    return json_reply(status, {"error": {"message": message}})


def read_json(request: HTTPRequest) -> Any:
    """The request's body as JSON; ValueError if it is not."""
    request.content.seek(0)
    raw = request.content.read()
    try:
        return json.loads(raw or b"null")
    except ValueError:
        raise ValueError("the body must be JSON") from None


_METHODS = {
    "/_fake": ("GET",),
    "/_fake/requests": ("GET", "DELETE"),
    "/_fake/behaviour": ("GET", "POST", "DELETE"),
    "/_fake/settings": ("GET", "POST"),
}


def handle(fake: FakeAzure, request: HTTPRequest) -> Reply:
    """The control endpoint's answer to ``request``."""
    path, query = parse_uri(request.uri.decode("latin-1"))
    route = path.rstrip("/")
    method = request.method.decode("latin-1")
    if route not in _METHODS:
        return error(404, f"no control endpoint {path}")
    if method not in _METHODS[route]:
        return error(405, f"{path} takes {', '.join(_METHODS[route])}")
    try:
        if route == "/_fake":
            return json_reply(200, state(fake))
        if route == "/_fake/requests":
            if method == "DELETE":
                fake.clear_requests()
            return json_reply(200, requests(fake))
        if route == "/_fake/behaviour":
            if method == "POST":
                add_behaviours(fake, read_json(request))
            elif method == "DELETE":
                fake.clear_behaviours(query.get("deployment", [None])[0])
            return json_reply(200, behaviours(fake))
        if method == "POST":
            configure(fake, read_json(request))
        return json_reply(200, settings(fake))
    except ValueError as e:
        return error(400, str(e))


def state(fake: FakeAzure) -> JSONObject:
    return {
        "name": fake.name,
        "request_count": fake.request_count,
        "open_connections": fake.open_connections,
        "hanging_requests": fake.hanging_requests,
        "held_streams": fake.held_streams,
        **behaviours(fake),
        "settings": settings(fake),
    }


def requests(fake: FakeAzure) -> JSONObject:
    return {"count": fake.request_count, "requests": [rec.to_json() for rec in fake.requests]}


def behaviours(fake: FakeAzure) -> JSONObject:
    return {"behaviours": [b.to_json() for b in fake.behaviours]}


def add_behaviours(fake: FakeAzure, body: Any) -> None:
    """Put in force the behaviour (or list of them) in ``body``: all of them, or none."""
    items = body if isinstance(body, list) else [body]
    if not all(isinstance(item, dict) for item in items):
        raise ValueError('a behaviour is a JSON object, e.g. {"kind": "429", "retry-after-ms": 1500}')
    parsed = [Behaviour.from_params(item) for item in items]  # all or none
    for behaviour in parsed:
        fake.add_behaviour(behaviour)


def settings(fake: FakeAzure) -> JSONObject:
    remaining = fake.ratelimit_remaining
    return {
        "stream-chunks": fake.stream_chunks,
        "stream-interval": fake.stream_interval,
        "big-stream-bytes": fake.big_stream_bytes,
        "filter-frames": fake.filter_frames,
        "api-key": fake.api_key is not None,  # whether one is set, never the key
        "require-token": fake.require_token,
        "token-audience": fake.token_audience,
        "ratelimit-remaining": None if remaining is None else list(remaining),
        "hold": fake.holding,
    }


def _check(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise ValueError(f"{key} must be {what}")


def _whole(value: Any, key: str) -> int:
    _check(isinstance(value, int) and not isinstance(value, bool) and value >= 0, key, "a whole number >= 0")
    return int(value)


def _seconds(value: Any, key: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")
    _check(ok, key, "a number of seconds >= 0")
    return float(value)


def _flag(value: Any, key: str) -> bool:
    _check(isinstance(value, bool), key, "true or false")
    return bool(value)


def _text(value: Any, key: str) -> str | None:
    _check(value is None or isinstance(value, str), key, "a string or null")
    return value if value is None else str(value)


def _size(value: Any, key: str) -> int | None:
    return None if value is None else _whole(value, key)


def _pair(value: Any, key: str) -> tuple[int, int] | None:
    if value is None:
        return None
    _check(isinstance(value, list) and len(value) == 2, key, "[requests, tokens] or null")
    return _whole(value[0], key), _whole(value[1], key)


# setting -> (its parser, the FakeAzure attribute it sets)
_SETTINGS: dict[str, tuple[Callable[[Any, str], Any], str]] = {
    "stream-chunks": (_whole, "stream_chunks"),
    "stream-interval": (_seconds, "stream_interval"),
    "big-stream-bytes": (_size, "big_stream_bytes"),
    "filter-frames": (_flag, "filter_frames"),
    "api-key": (_text, "api_key"),
    "require-token": (_flag, "require_token"),
    "token-audience": (_text, "token_audience"),
    "ratelimit-remaining": (_pair, "ratelimit_remaining"),
    "hold": (_flag, "holding"),
}


def configure(fake: FakeAzure, body: Any) -> None:
    """Apply the settings in ``body``: all of them, or none if one is wrong."""
    if not isinstance(body, dict):
        raise ValueError("settings are a JSON object")
    body = {str(key).replace("_", "-"): value for key, value in body.items()}
    unknown = sorted(set(body) - set(_SETTINGS))
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(unknown)}")
    values = {key: _SETTINGS[key][0](value, key) for key, value in body.items()}
    if values.get("require-token") and fake.identity is None:
        raise ValueError("require-token needs a token endpoint (--identity-port)")
    for key, value in values.items():
        setattr(fake, _SETTINGS[key][1], value)
