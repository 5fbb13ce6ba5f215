"""
The cost-cutting paths of the log: L{ClassicText} (and L{text_observer}) writes exactly what
twisted.logger's text observer writes, for access lines and every other event; L{format_text}
writes the line the reference below does; the access event is the one C{Logger.info} would
publish; twistd's text log to standard output (only) goes through L{text_observer}.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.application.service import Application
from twisted.internet.task import Clock
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogPublisher,
    formatEventAsClassicLogText,
    formatTime,
    textFileLogObserver,
    timeFormatRFC3339,
)
from twisted.python.failure import Failure
from twisted.scripts.twistd import ServerOptions
from twisted.web.http import Request
from twisted.web.test.requesthelper import DummyChannel

from aoaiproxy.config import LiveConfig, load_config
from aoaiproxy.log import (
    ACCESS_FORMAT,
    AccessLog,
    ClassicText,
    JSONLinesObserver,
    format_text,
    note,
    text_observer,
)
from aoaiproxy.tap import logs_to_stdout, makeService

# -- format_text ------------------------------------------------------------------------------


def reference_text(fields: Mapping[str, Any]) -> str:
    """The access line as format_text wrote it before it was made cheaper (the oracle)."""
    parts = [
        str(fields["client"]),
        f'"{fields["method"]} {fields["path"]}"',
        str(fields["status"]),
        f"bytes={fields['bytes']}",
        f"duration={fields['duration']:.3f}s",
    ]
    keys = (
        "model",
        "deployment",
        "upstream_status",
        "backend",
        "attempts",
        "error",
        "prompt_tokens",
        "completion_tokens",
        "client_name",
    )
    for key in keys:
        if key in fields:
            name = "upstream" if key == "upstream_status" else key
            value = str(fields[key])
            if key == "error" or " " in value or '"' in value:
                value = json.dumps(value)
            parts.append(f"{name}={value}")
    if fields.get("aborted"):
        parts.append("aborted")
    return " ".join(parts)


TEXT = st.text(alphabet=st.sampled_from('ab {}"\n\\é-/:'), max_size=12)
OPTIONAL = {
    "model": TEXT,
    "deployment": TEXT,
    "upstream_status": st.integers(100, 599),
    "backend": TEXT,
    "attempts": st.integers(0, 5),
    "error": TEXT,
    "prompt_tokens": st.integers(0, 10**6),
    "completion_tokens": st.integers(0, 10**6),
    "client_name": TEXT,
}


@st.composite
def access_fields(draw: st.DrawFn) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "client": draw(st.sampled_from(["127.0.0.1", "::1", "-"])),
        "method": draw(st.sampled_from(["POST", "CONNECT", "-"])),
        "path": draw(TEXT),
        "status": draw(st.integers(100, 599)),
        "bytes": draw(st.integers(0, 10**9)),
        "duration": draw(st.floats(0, 1e5)),
    }
    for key in draw(st.lists(st.sampled_from(sorted(OPTIONAL)), unique=True)):
        fields[key] = draw(OPTIONAL[key])
    if draw(st.booleans()):
        fields["aborted"] = True
    return fields


@given(access_fields())
def test_format_text_writes_the_reference_line(fields: dict[str, Any]) -> None:
    assert format_text(fields) == reference_text(fields)


# -- ClassicText -------------------------------------------------------------------------------

# Times near whole seconds (where the microsecond rounding shows the next second), and any.
NEAR_SECOND = st.builds(
    lambda s, d: s + d,
    st.integers(0, 2**32),
    st.sampled_from([0.0, 0.5, 0.999999, 0.9999994, 0.9999995, 0.9999996, 1 - 1e-9, 1e-7, -1e-9]),
)
TIMES = st.one_of(NEAR_SECOND, st.floats(0, 2**32), st.none())


@settings(max_examples=300)
@given(st.lists(TIMES, min_size=1, max_size=20))
@example([1.9999995, 1.9999996, 2.0, 2.9999994, 2.9999995])
def test_classic_time_is_twisteds_for_any_sequence_of_times(times: list[float | None]) -> None:
    """The per-second cache never shows a time twisted.logger would show otherwise."""
    classic = ClassicText()
    for when in times:
        assert classic.time(when) == formatTime(when, timeFormatRFC3339)


def test_classic_time_of_an_odd_time_is_twisteds() -> None:
    classic = ClassicText()
    for when in (None, 0.0, -0.5, -1.0000001):
        assert classic.time(when) == formatTime(when)


class Peer:
    host = "127.0.0.1"


class Transport:
    def getPeer(self) -> Peer:
        return Peer()


class Channel:
    """A channel with no request: what AccessLog.refused_head logs for one refused early."""

    transport = Transport()
    requests: list[Any] = []


def access_events(notes: list[dict[str, Any]], log_format: str = "text") -> list[dict[str, Any]]:
    """
    Real access events, as AccessLog publishes them: a request with each of C{notes}, and one
    refused before its request line (with the first note's error).
    """
    events: list[dict[str, Any]] = []
    config = load_config({"endpoint": "http://127.0.0.1:1", "log_format": log_format}, {})
    clock = Clock()
    access = AccessLog(LiveConfig(config), clock)
    access.logger = Logger(namespace=access.logger.namespace, observer=events.append)
    for info in notes:
        request = Request(DummyChannel())
        request.method, request.uri = b"POST", b"/v1/chat/completions?api-key=x"
        request.log_started = clock.seconds()  # type: ignore[attr-defined]
        note(request, **info)
        clock.advance(0.25)
        access.emit(request)
    access.refused_head(Channel(), 400, sent=1, error=str(notes[0].get("error")))
    return events


NOTES = st.fixed_dictionaries({}, optional=OPTIONAL)


@st.composite
def other_events(draw: st.DrawFn) -> dict[str, Any]:
    """Events of every other shape: a format with fields, a system, a failure, no time."""
    event: dict[str, Any] = {
        "log_format": draw(st.sampled_from(["hello {who}", "{n:>5} x", "plain", "", "{missing}", "{{}}"])),
        "log_namespace": draw(st.sampled_from(["aoaiproxy", "twisted.web"])),
        "log_time": draw(TIMES),
        "who": draw(TEXT),
        "n": draw(st.integers()),
    }
    if draw(st.booleans()):
        event["log_level"] = draw(st.sampled_from(list(LogLevel.iterconstants())))
    if draw(st.booleans()):
        event["log_system"] = draw(st.sampled_from(["-", "HTTPChannel,0,127.0.0.1", "x worker 9"]))
    if draw(st.booleans()):
        try:
            raise ValueError("boom")
        except ValueError:
            event["log_failure"] = Failure()
    return event


@settings(max_examples=200)
@given(
    st.lists(NOTES, min_size=1, max_size=5),
    st.lists(other_events(), max_size=5),
    st.sampled_from(["text", "json"]),
)
def test_classic_text_is_twisteds_for_every_event(
    notes: list[dict[str, Any]], others: list[dict[str, Any]], log_format: str
) -> None:
    classic = ClassicText()
    for event in [*access_events(notes, log_format), *others]:
        assert classic(event) == formatEventAsClassicLogText(event)


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")


def test_access_line_with_a_system_or_failure_is_twisteds() -> None:
    """An access event another observer changed (a worker marks its lines with a system)."""
    [event, _] = access_events([{"model": "gpt-4o"}])
    try:
        raise ValueError("boom")
    except ValueError:
        failure = Failure()
    classic = ClassicText()
    changes: list[dict[str, Any]] = [
        {"log_system": "aoaiproxy.access#info worker 9"},
        {"log_system": Unprintable()},
        {"log_failure": failure},
        {"log_time": None, "log_level": None},
    ]
    for change in changes:
        changed = {**event, **change}
        assert classic(changed) == formatEventAsClassicLogText(changed)
    text = classic({**event, "log_system": "aoaiproxy.access#info worker 9"}) or ""
    assert " [aoaiproxy.access#info worker 9] 192.168.1.1 " in text
    assert " [UNFORMATTABLE] 192.168.1.1 " in (classic({**event, "log_system": Unprintable()}) or "")


def test_text_observer_writes_what_twisteds_text_observer_writes() -> None:
    ours, twisteds = io.StringIO(), io.StringIO()
    publisher = LogPublisher(text_observer(ours), textFileLogObserver(twisteds))
    log = Logger(namespace="aoaiproxy", observer=publisher)
    log.info("listening on {listener}", listener="tcp:8080")
    for event in access_events([{"model": "two\nlines", "error": 'a "quoted"\nerror', "prompt_tokens": 3}]):
        publisher(event)
    log.warn("odd {value!r}", value={"a": 1})
    assert ours.getvalue() == twisteds.getvalue()
    lines = ours.getvalue().splitlines()
    assert len(lines) == 5  # the newline in the model continued with a tab
    request = '192.168.1.1 "POST /v1/chat/completions" 200 bytes=0 duration=0.250s model=two'
    assert lines[1].endswith(f" [aoaiproxy.access#info] {request}")
    assert lines[2] == '\tlines error="a \\"quoted\\"\\nerror" prompt_tokens=3'
    assert lines[3].endswith(
        ' [aoaiproxy.access#info] 127.0.0.1 "- -" 400 bytes=1 duration=0.000s error="a \\"quoted\\"\\nerror"'
    )


def test_access_event_is_the_one_logger_info_publishes() -> None:
    [event, _] = access_events([{}])
    expected: list[dict[str, Any]] = []
    logger = event["log_logger"]
    Logger(namespace=logger.namespace, source=logger.source, observer=expected.append).info(
        ACCESS_FORMAT, access_line=event["access_line"], access=event["access"]
    )
    [info] = expected
    assert sorted(event) == sorted(info)
    for key in info:
        if key not in ("log_logger", "log_time"):
            assert event[key] == info[key], key
    assert event["log_level"] is LogLevel.info


# -- twistd ----------------------------------------------------------------------------------


def twistd_options(*argv: str, plugin: tuple[str, ...] = ()) -> ServerOptions:
    """twistd's options for C{twistd ARGV aoaiproxy ... PLUGIN}."""
    options = ServerOptions()
    options.parseOptions(
        [
            *argv,
            "--pidfile=",
            "aoaiproxy",
            "--endpoint",
            "http://127.0.0.1:1",
            "--listen",
            "tcp:0:interface=127.0.0.1",
            *plugin,
        ]
    )
    return options


@pytest.mark.parametrize(
    ("argv", "stdout"),
    [
        (["-n"], True),
        (["-n", "--logfile=-"], True),
        (["-n", "--logfile=proxy.log"], False),
        (["--logfile=proxy.log"], False),
        ([], False),  # a daemon logs to twistd.log
        (["-n", "--syslog"], False),
        (["-n", "--logger=aoaiproxy.log.json_observer"], False),
    ],
)
def test_logs_to_stdout_as_twistd_would(argv: list[str], stdout: bool) -> None:
    assert logs_to_stdout(twistd_options(*argv)) is stdout


def test_logs_to_stdout_without_twistd() -> None:
    assert logs_to_stdout(None) is False


@pytest.mark.parametrize(
    ("argv", "observer"),
    [(["-n"], "text"), (["-n", "--logfile=proxy.log"], None), (["-n", "--log-format=json"], "json")],
)
def test_twistd_application_gets_the_cheaper_text_observer(argv: list[str], observer: str | None) -> None:
    """Only where twistd would write text to standard output; --logfile stays twistd's."""
    plugin_argv = tuple(a for a in argv if a.startswith("--log-format"))
    options = twistd_options(*(a for a in argv if a not in plugin_argv), plugin=plugin_argv)
    application = Application("aoaiproxy")
    makeService(options.subOptions).setServiceParent(application)
    found = application.getComponent(ILogObserver, None)
    if observer is None:
        assert found is None
    elif observer == "text":
        assert isinstance(found, FileLogObserver) and isinstance(found.formatEvent, ClassicText)
    else:
        assert found is not None and not isinstance(found, FileLogObserver)


# -- JSON lines -------------------------------------------------------------------------------


def reference_json_time(stamp: float) -> str:
    """The time of a JSON line as JSONLinesObserver wrote it before it was made cheaper."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp)) + f".{int(stamp % 1 * 1000):03d}Z"


@settings(max_examples=300)
@given(st.lists(st.one_of(NEAR_SECOND, st.floats(1e-6, 2**32)).filter(bool), min_size=1, max_size=20))
@example([1.9999995, 1.9999996, 2.0, 2.9999994, 2.9999995, 3.0005])
def test_json_time_is_the_reference_for_any_sequence_of_times(times: list[float]) -> None:
    """(A time of 0 is taken for no time: the line shows the current time.)"""
    out = io.StringIO()
    observer = JSONLinesObserver(out)
    for when in times:
        observer({"log_format": "x", "log_time": when, "log_namespace": "aoaiproxy"})
    shown = [json.loads(line)["time"] for line in out.getvalue().splitlines()]
    assert shown == [reference_json_time(when) for when in times]
