"""
Logging: one access-log line per request, the start-up lines, and (with C{--log-format json})
a log observer that writes every log event, twistd's own among them, as one JSON object per line.

Access lines carry the method, the path (never the query string: clients may put an
C{api-key} there) or the C{CONNECT} target, the model and deployment, the backend that
answered and the upstream requests sent (attempts), the status, the body bytes sent and the
duration, the tokens the response's usage reports (C{prompt_tokens}, C{completion_tokens})
and the name of the client key (C{client_name}, with C{--client-keys}).  They never carry a
header value, so never a key or a proxy password.

Where an access line is written, the request's metrics are recorded too (L{AccessLog} with a
L{aoaiproxy.metrics.Recorder}): one place, so that C{aoaiproxy_requests_total} counts exactly
the requests the log shows.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping
from typing import IO, Any
from urllib.parse import urlsplit

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, Request
from zope.interface import implementer

from aoaiproxy import rewrite
from aoaiproxy._twisted import request_line
from aoaiproxy.config import Config, LiveConfig, redact_url
from aoaiproxy.metrics import CLIENT_ANONYMOUS, NullMetrics, Recorder, request_route
from aoaiproxy.metrics import OTHER as ROUTE_OTHER

__all__ = [
    "AccessLog",
    "ClassicText",
    "access_fields",
    "format_text",
    "json_observer",
    "log_startup",
    "note",
    "text_observer",
]

#: Facts a request handler may note in C{request.log_info} that go into the access line.  Any
#: other key is ignored, so that nothing unexpected (a header, a key) reaches the log.
LOGGED_INFO = (
    "model",
    "deployment",
    "upstream_status",
    "backend",
    "attempts",
    "error",
    "prompt_tokens",
    "completion_tokens",
)

#: The status logged for a request whose client left before it was answered (as nginx does).
CLIENT_CLOSED = 499

#: The namespace of access-log events.
ACCESS_NAMESPACE = "aoaiproxy.access"

#: The format of access-log events: their line, rendered when an observer first asks for it.
ACCESS_FORMAT = "{access_line}"

_startup_log = Logger(namespace="aoaiproxy")


def note(request: Request, **info: Any) -> None:
    """Facts about a request for its access-log line (never a key): see L{LOGGED_INFO}."""
    notes: dict[str, Any] | None = getattr(request, "log_info", None)
    if notes is None:
        request.log_info = info  # type: ignore[attr-defined]
    else:
        notes.update(info)


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value


def request_target(request: Request) -> str:
    """
    What the access line shows as the request-target: the path of an origin-form request
    without its query, the C{host:port} of a C{CONNECT}, and C{scheme://host[:port]/path} of
    an absolute-form request (without user information and query).
    """
    if request.uri == Request.uri:  # the request line was never read
        return "-"
    uri = _text(request.uri)
    if request.method == b"CONNECT":
        return uri.rpartition("@")[2]
    if uri.startswith("/") or uri == "*":
        return uri.split("?", 1)[0]
    try:
        parts = urlsplit(uri)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<malformed>"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def access_fields(
    request: Request, started: float, now: float, *, aborted: bool = False, client_name: str | None = None
) -> dict[str, Any]:
    """
    The facts of one access line, as a JSON-able dict (never a key).  A request C{aborted}
    before any answer was sent shows status L{CLIENT_CLOSED}; one aborted later, the status
    that was sent.  C{client_name}: the name of the client key the request presented.
    """
    address = request.getClientAddress()
    client = getattr(address, "host", None) or (_text(getattr(address, "name", "")) or "-")
    info: Mapping[str, Any] = getattr(request, "log_info", None) or {}
    fields: dict[str, Any] = {
        "client": client,
        "method": _text(request.method) if request.method != Request.method else "-",
        "path": request_target(request),
        "status": CLIENT_CLOSED if aborted and not _answered(request) else request.code,
        "bytes": info.get("bytes", request.sentLength),
        "duration": round(max(now - started, 0.0), 6),
    }
    for key in LOGGED_INFO:
        if key in info:
            value = info[key]
            if value is not None and value != "":
                fields[key] = value if isinstance(value, (int, float)) else str(value)
    if client_name:
        fields["client_name"] = client_name
    if aborted:
        fields["aborted"] = True
    return fields


def _answered(request: Request) -> bool:
    """Whether an answer was sent: a response begun, or a CONNECT's 200 (its tunnel)."""
    return bool(request.startedWriting) or bool(getattr(request, "established", False))


#: The optional facts of a text line, in order, with the name each is shown under.
_TEXT_INFO = tuple(
    (key, "upstream" if key == "upstream_status" else key) for key in (*LOGGED_INFO, "client_name")
)


def format_text(fields: Mapping[str, Any]) -> str:
    """
    One text access line:
    C{127.0.0.1 "POST /v1/chat/completions" 200 bytes=1234 duration=0.812s model=gpt-4o
    deployment=prod-4o upstream=200 backend=east attempts=2 prompt_tokens=12 completion_tokens=5
    client_name=alice}.
    """
    parts = [
        f'{fields["client"]} "{fields["method"]} {fields["path"]}" {fields["status"]}'
        f" bytes={fields['bytes']} duration={fields['duration']:.3f}s"
    ]
    for key, name in _TEXT_INFO:
        if key not in fields:
            continue
        value = fields[key]
        if type(value) is int and key != "error":
            parts.append(f"{name}={value}")  # digits: neither a space nor a quote
            continue
        text = str(value)
        if key == "error" or " " in text or '"' in text:
            text = json.dumps(text)
        parts.append(f"{name}={text}")
    if fields.get("aborted"):
        parts.append("aborted")
    return " ".join(parts)


def _format_json(fields: Mapping[str, Any]) -> str:
    return json.dumps(fields, separators=(",", ":"))


class _Line:
    """An access line rendered only if an observer formats the event, and then only once."""

    __slots__ = ("_text", "fields", "render")

    def __init__(self, fields: Mapping[str, Any], render: Any) -> None:
        self.fields = fields
        self.render = render
        self._text: str | None = None

    @property
    def text(self) -> str:
        """The line."""
        if self._text is None:
            self._text = self.render(self.fields)
        return self._text

    def __format__(self, spec: str) -> str:
        return self.text


class AccessLog:
    """
    Writes one line per request: L{emit} when a request finishes (twisted.web's C{Site.log}
    hook) or its connection goes away unfinished (marked C{aborted}), L{refused_head} for one
    refused before its head or its body was read.  Each request is logged once, and its
    metrics recorded then (C{recorder}): L{Recorder.request_done} with the status the line
    shows, L{Recorder.tokens} when its usage was noted.
    """

    def __init__(self, live: LiveConfig, reactor: Any, recorder: Recorder | None = None) -> None:
        self._live = live
        self._reactor = reactor
        self._recorder: Recorder = recorder if recorder is not None else NullMetrics()
        # Without metrics (--metrics-listen off) a request's labels are not even worked out.
        self._recording = self._recorder.recording
        # The log format changes only on restart (a reload keeps it).
        self._render = _format_json if live.config.log_format == "json" else format_text
        #: Where access events go (a test may give it an observer).
        self.logger = Logger(namespace=ACCESS_NAMESPACE)

    def refused_head(self, channel: Any, status: int, *, sent: int = 0, error: str | None = None) -> None:
        """
        A request refused before its head (400, 408, 414, 431) or its body (413, 401, 407...)
        was read, with an answer of C{sent} body bytes and the C{error} code.
        """
        requests = getattr(channel, "requests", None) or []
        if requests:
            request = requests[-1]
            request.code = status
            notes: dict[str, Any] = getattr(request, "log_info", None) or {}
            notes.update(bytes=sent, error=error)
            request.log_info = notes
            self.emit(_with_request_line(request))
            return
        transport = getattr(channel, "transport", None)
        peer = transport.getPeer() if transport is not None else None
        fields: dict[str, Any] = {
            "client": getattr(peer, "host", None) or "-",
            "method": "-",
            "path": "-",
            "status": status,
            "bytes": sent,
            "duration": 0.0,
        }
        if error:
            fields["error"] = error
        self._write(fields)
        self._recorder.request_done(ROUTE_OTHER, "", "", status, 0.0, None)

    def emit(self, request: Request, *, aborted: bool = False) -> None:
        """Log C{request} (once; later calls for it do nothing)."""
        if getattr(request, "log_done", False):
            return
        request.log_done = True  # type: ignore[attr-defined]
        now = self._reactor.seconds()
        started: float = getattr(request, "log_started", now)
        # A CONNECT tunnel always ends with its connection: that is not an abort.
        aborted = aborted and not getattr(request, "established", False)
        config = self._live.config
        name = None
        if config.client_names:
            headers = [(n, v) for n, vs in request.requestHeaders.getAllRawHeaders() for v in vs]
            name = rewrite.client_name(config, headers)
        # A request with no known key (a CONNECT, /healthz, a 401) shows no name.
        shown = name if name != CLIENT_ANONYMOUS else None
        fields = access_fields(request, started, now, aborted=aborted, client_name=shown)
        self._write(fields)
        if self._recording:
            self._record(request, fields, started, name)

    def _record(self, request: Request, fields: Mapping[str, Any], started: float, name: str | None) -> None:
        """The request's metrics, from the facts of its access line."""
        info: Mapping[str, Any] = getattr(request, "log_info", None) or {}
        model = str(info.get("model") or "")
        backend = str(info.get("backend") or "")
        first_byte: float | None = getattr(request, "first_byte_at", None)
        self._recorder.request_done(
            request_route(request.method, request.uri),
            model,
            backend,
            fields["status"],
            fields["duration"],
            None if first_byte is None else max(first_byte - started, 0.0),
        )
        prompt = info.get("prompt_tokens")
        if prompt is not None:
            completion = info.get("completion_tokens") or 0
            self._recorder.tokens(model, backend, name or CLIENT_ANONYMOUS, prompt, completion)

    def _write(self, fields: dict[str, Any]) -> None:
        # The event self.logger.info(ACCESS_FORMAT, access_line=..., access=fields) would
        # publish, given to the logger's observer directly: Logger.emit's check of the level
        # (a walk over every LogLevel) is a sizeable part of a line's cost.
        logger = self.logger
        logger.observer(
            {
                "access_line": _Line(fields, self._render),
                "access": fields,
                "log_logger": logger,
                "log_level": LogLevel.info,
                "log_namespace": logger.namespace,
                "log_source": logger.source,
                "log_format": ACCESS_FORMAT,
                "log_time": time.time(),
            }
        )


def _with_request_line(request: Request) -> Request:
    """
    A request refused before the channel handed it its request line: take method and path
    from the channel, so the access line shows them.
    """
    channel = getattr(request, "channel", None)
    line = request_line(channel) if isinstance(channel, HTTPChannel) else None
    if request.uri == Request.uri and line is not None:
        request.method, request.uri = line
    return request


def log_startup(config: Config) -> None:
    """
    The start-up lines: what listens where, in which mode, to which upstream (never a user
    name or password in its URL, though configuration refuses them).
    """
    log = _startup_log
    from aoaiproxy import __version__ as version

    log.info(
        "aoaiproxy {version}: mode {mode}, upstream {endpoint}, api-version {api_version}",
        version=version,
        mode=config.mode,
        endpoint=redact_url(config.endpoint),
        api_version=config.api_version,
    )
    for description in config.listen:
        log.info("listening on {listener}", listener=description)
    if any(b.auth != "client" for b in config.backends):
        auth = f"server credential, {len(config.client_keys)} client key(s)"
        if not config.client_keys:
            auth = "server credential, open to anonymous clients (--allow-anonymous)"
    else:
        auth = "client keys passed upstream"
    log.info("authentication: {auth}", auth=auth)
    if config.forward_allow:
        log.info(
            "forward proxy: allowed {allow}; proxy authentication {users}",
            allow=", ".join(config.forward_allow),
            users=f"on ({len(config.forward_users)} user(s))" if config.forward_users else "off",
        )
    else:
        log.info("forward proxy: off")
    log.info(
        "config file {config_file}; drain timeout {drain:g}s; log format {fmt}",
        config_file=config.config_file or "none",
        drain=config.drain_timeout,
        fmt=config.log_format,
    )


@implementer(ILogObserver)
class JSONLinesObserver:
    """
    Writes each log event as one JSON object per line: C{time} (ISO 8601, UTC), C{level},
    C{logger}, C{message}; an access event has its fields instead of the message; a failure
    adds C{traceback}.
    """

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._second: float | None = None
        self._stamp = ""

    def _time(self, when: float) -> str:
        """C{when} in ISO 8601 (UTC, milliseconds); its date and time made once per second."""
        if not math.isfinite(when):
            return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when))
        second = math.floor(when)  # as time.gmtime rounds
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when))
            self._second = second
        return self._stamp + f".{int(when % 1 * 1000):03d}Z"

    def __call__(self, event: Mapping[str, Any]) -> None:
        record: dict[str, Any] = {
            "time": self._time(event.get("log_time") or time.time()),
            "level": getattr(event.get("log_level"), "name", "info"),
            "logger": event.get("log_namespace") or event.get("system") or "-",
        }
        access = event.get("access")
        if isinstance(access, Mapping):
            record.update(access)
        else:
            record["message"] = formatEvent(dict(event))
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            record["traceback"] = failure.getTraceback()
        try:
            self._out.write(json.dumps(record, default=str) + "\n")
            self._out.flush()
        except (OSError, ValueError):  # pragma: no cover - stdout gone
            pass


class ClassicText:
    """
    Formats a log event as twisted.logger's text observer does
    (C{twisted.logger.formatEventAsClassicLogText}, the lines of C{twistd}'s default observer):
    C{"{time} [{system}] {text}\\n"}, the same text for every event, for less work.  The
    time prefix is made once per second (C{strftime} is the costliest part of a line), and an
    access line's text is taken as it is, with no format string to expand.
    """

    def __init__(self, time_format: str = timeFormatRFC3339) -> None:
        self._time_format = time_format
        self._second: float | None = None
        self._stamp = ""
        #: Times in [_low, _high) show the second of the stamp kept (well inside it: no
        #: rounding to the next second there).
        self._low = self._high = 0.0
        #: The system shown for each namespace and level of access events.
        self._systems: dict[tuple[str, Any], str] = {}

    def time(self, when: float | None) -> str:
        """C{twisted.logger.formatTime(when, time_format)}, made once per second shown."""
        if when is not None and self._low <= when < self._high:
            return self._stamp
        if when is None or not math.isfinite(when):
            return formatTime(when, self._time_format)
        # The second datetime.fromtimestamp shows: it rounds to the microsecond (half to
        # even), so a time a hair before a second shows that second.
        fraction, second = math.modf(when)
        micro = round(fraction * 1e6)
        if micro >= 1_000_000:
            second += 1
        elif micro < 0:
            second -= 1
        if second != self._second:
            self._stamp = formatTime(when, self._time_format)
            self._second = second
            if second >= 0:
                self._low, self._high = second, second + 0.99999
            else:
                self._low = self._high = 0.0
        return self._stamp

    def __call__(self, event: dict[str, Any]) -> str | None:
        line = event.get("access_line")
        if (
            type(line) is not _Line
            or event.get("log_format") != ACCESS_FORMAT
            or "log_failure" in event
            or "log_flattened" in event
        ):
            return formatEventAsClassicLogText(event, formatTime=self.time)
        if not line.text:
            return None
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            namespace = event.get("log_namespace", "-")
            key = (namespace, level)
            system = self._systems.get(key) if type(namespace) is str else None
            if system is None:
                system = f"{namespace}#{'-' if level is None else level.name}"
                if type(namespace) is str and len(self._systems) < 64:
                    self._systems[key] = system
        else:
            try:
                system = str(system)
            except Exception:
                system = "UNFORMATTABLE"
        text = f"{self.time(event.get('log_time'))} [{system}] {line.text}"
        return text.replace("\n", "\n\t") + "\n"


def text_observer(out: IO[str] | None = None) -> FileLogObserver:
    """
    An observer writing what C{twisted.logger.textFileLogObserver(out)} writes (standard
    output by default), with less work per line (L{ClassicText}).
    """
    return FileLogObserver(sys.stdout if out is None else out, ClassicText())


def json_observer() -> JSONLinesObserver:
    """
    A JSON-lines observer on standard output; also usable as
    C{twistd --logger aoaiproxy.log.json_observer}.
    """
    return JSONLinesObserver(sys.stdout)
