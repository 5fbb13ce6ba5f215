"""
Running as a service (SPEC §9), in this process: the access log (text and JSON, never a key),
reload (swap the live configuration, keep the old one on error), the graceful drain on a real
loopback site, sd_notify, and the systemd units (C{systemd-analyze verify}).
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import Logger, LogLevel, formatEvent

from aoaiproxy.config import LiveConfig, load_config
from aoaiproxy.log import JSONLinesObserver, format_text
from aoaiproxy.service import DaemonService, Reloader, sd_notify
from aoaiproxy.site import Connections
from aoaiproxy.testing import FakeAzure

from .conftest import REPO, Events, Proxy, access_lines, get_reactor, wait_until
from .rawnet import ScriptedUpstream, connect, raw_post

CLIENT_KEY = "sk-client-DISTINCTIVE-7f3a9c"
SERVER_KEY = "srv-key-DISTINCTIVE-b81e42"
OTHER_KEY = "sk-other-DISTINCTIVE-55d1aa"
SECRETS = (CLIENT_KEY, SERVER_KEY, OTHER_KEY)

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def all_text(events: list[dict[str, Any]]) -> str:
    return "\n".join(formatEvent(e) + repr(e.get("access", "")) for e in events)


def keys_file(tmp_path: Path, *keys: str) -> str:
    path = tmp_path / "client-keys"
    path.write_text("# client keys\n" + "".join(k + "\n" for k in keys))
    return str(path)


# -- access log ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_access_line_text_has_the_facts_and_no_key(
    fake: FakeAzure, make_proxy: Callable[..., Proxy], events: Events, tmp_path: Path
) -> None:
    proxy = make_proxy(
        token=SERVER_KEY, client_keys=keys_file(tmp_path, CLIENT_KEY), model_mapper=["gpt-4o=prod-4o"]
    )
    path = f"/v1/chat/completions?api-key={OTHER_KEY}"
    client = await connect(proxy, raw_post(path, CHAT, key=CLIENT_KEY, extra=b"Connection: close\r\n"))
    await client.closed
    assert client.received.startswith(b"HTTP/1.1 200")
    assert fake.requests[0].header("api-key") == SERVER_KEY
    [line] = access_lines(events)
    assert line.startswith('127.0.0.1 "POST /v1/chat/completions" 200 bytes=')
    assert "model=gpt-4o deployment=prod-4o upstream=200" in line
    assert " duration=" in line
    for secret in SECRETS:
        assert secret not in all_text(events)


@pytest_twisted.ensureDeferred
async def test_access_line_json_and_refused_requests(
    fake: FakeAzure, make_proxy: Callable[..., Proxy], events: Events, tmp_path: Path
) -> None:
    proxy = make_proxy(
        token=SERVER_KEY,
        client_keys=keys_file(tmp_path, CLIENT_KEY),
        log_format="json",
        max_body=100_000,
    )
    client = await connect(proxy, raw_post("/v1/chat/completions", CHAT, key=OTHER_KEY))
    await client.wait_for(b"}}")
    big = {"model": "gpt-4o", "input": "x" * 200_000}
    client = await connect(proxy, raw_post("/v1/embeddings", big, key=CLIENT_KEY))
    await client.wait_for(b"HTTP/1.1 413")
    await events.access(2)
    first, second = (json.loads(line) for line in access_lines(events))
    assert first["method"] == "POST" and first["path"] == "/v1/chat/completions"
    assert first["status"] == 401 and first["bytes"] > 0
    assert set(first) >= {"client", "method", "path", "status", "bytes", "duration"}
    assert second["status"] == 413 and second["path"] == "/v1/embeddings"
    for secret in SECRETS:
        assert secret not in all_text(events)
    assert fake.requests == []


@pytest_twisted.ensureDeferred
async def test_stream_cut_by_the_client_is_logged_once_as_aborted(
    fake: FakeAzure, make_proxy: Callable[..., Proxy], events: Events
) -> None:
    fake.hold_last_chunk()
    proxy = make_proxy()
    client = await connect(proxy, raw_post("/v1/chat/completions", {**CHAT, "stream": True}, key=CLIENT_KEY))
    await client.wait_for(b"data: ")
    assert client.transport is not None
    client.transport.abortConnection()
    await events.access(1)
    [line] = access_lines(events)
    assert line.endswith(" aborted")


@pytest_twisted.ensureDeferred
async def test_request_abandoned_before_its_answer_is_logged_499(
    make_proxy: Callable[..., Proxy], events: Events
) -> None:
    """A client that leaves before any answer is logged as nginx logs it: 499, aborted (not 200)."""
    silent = ScriptedUpstream(lambda conn: None)  # takes the request, never answers
    try:
        proxy = make_proxy(endpoint=silent.url)
        client = await connect(proxy, raw_post("/v1/chat/completions", CHAT, key=CLIENT_KEY))
        await wait_until(lambda: len(silent.connections) == 1, "the upstream request")
        await client.abort()
        [line] = await events.access(1)
    finally:
        await silent.stop()
    assert line.startswith('127.0.0.1 "POST /v1/chat/completions" 499 bytes=0 ')
    assert line.endswith(" aborted")


def test_format_text_quotes_odd_values() -> None:
    line = format_text(
        {
            "client": "::1",
            "method": "CONNECT",
            "path": "api.openai.com:443",
            "status": 403,
            "bytes": 0,
            "duration": 0.5,
            "error": "not allowed",
        }
    )
    assert line == '::1 "CONNECT api.openai.com:443" 403 bytes=0 duration=0.500s error="not allowed"'


def test_json_observer_writes_one_object_per_line() -> None:
    out = io.StringIO()
    log = Logger(namespace="aoaiproxy.test", observer=JSONLinesObserver(out))
    log.info("hello {who}", who="world")
    log.info("{access_line}", access_line="-", access={"method": "GET", "status": 200})
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.failure("oops")
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["level"] for r in records] == ["info", "info", LogLevel.critical.name]
    assert records[0]["message"] == "hello world" and records[0]["logger"] == "aoaiproxy.test"
    assert records[1]["method"] == "GET" and "message" not in records[1]
    assert "ZeroDivisionError" in records[2]["traceback"]


# -- reload -----------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def logger(self) -> Logger:
        return Logger(namespace="aoaiproxy.reload", observer=self.events.append)

    def text(self) -> str:
        return "\n".join(formatEvent(e) for e in self.events)


class Certificates:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.reloads = 0

    def reload(self) -> None:
        self.reloads += 1
        if self.fail:
            raise ValueError("certificate /etc/x.pem holds no PEM certificate")


def test_reload_swaps_the_config_and_reloads_certificates(tmp_path: Path) -> None:
    keys = keys_file(tmp_path, CLIENT_KEY)
    flags = {"endpoint": "https://r.openai.azure.com", "token": SERVER_KEY, "client_keys": keys}
    live = LiveConfig(load_config(flags, {}))
    first = live.config
    certificates = Certificates()
    log = Recorder()
    reloader = Reloader(flags, {}, live, lambda: [certificates], log.logger())
    keys_file(tmp_path, OTHER_KEY)
    assert reloader.reload()
    assert live.config is not first
    assert live.config.client_keys == {OTHER_KEY}
    assert certificates.reloads == 1
    assert "configuration reloaded: client_keys" in log.text()
    for secret in SECRETS:
        assert secret not in log.text()


def test_reload_keeps_the_old_config_on_error(tmp_path: Path) -> None:
    config_file = tmp_path / "aoaiproxy.toml"
    config_file.write_text(
        f'endpoint = "https://r.openai.azure.com"\napi_key = "{SERVER_KEY}"\nallow_anonymous = true\n'
    )
    flags = {"config": str(config_file)}
    live = LiveConfig(load_config(flags, {}))
    first = live.config
    log = Recorder()
    certificates = Certificates()
    reloader = Reloader(flags, {}, live, lambda: [certificates], log.logger())

    config_file.write_text(f'endpoint = "https://r.openai.azure.com"\napi_key = "{SERVER_KEY}"\nmode = \n')
    assert not reloader.reload()
    assert live.config is first
    config_file.write_text('endpoint = "ftp://nowhere"\n')
    assert not reloader.reload()
    assert live.config is first
    errors = [formatEvent(e) for e in log.events if e["log_level"] == LogLevel.error]
    assert len(errors) == 2
    assert "keeping the running configuration: --config:" in errors[0]
    assert "is not valid TOML" in errors[0]
    assert "--endpoint: 'ftp://nowhere' is not an http(s) URL" in errors[1]
    assert all("\n" not in e for e in errors)
    assert SERVER_KEY not in log.text()
    # Certificates are their own files: a renewed certificate is taken all the same.
    assert certificates.reloads == 2


def test_reload_with_a_bad_certificate_still_takes_the_config(tmp_path: Path) -> None:
    flags = {"endpoint": "https://r.openai.azure.com", "api_version": "2024-10-21"}
    live = LiveConfig(load_config(flags, {}))
    log = Recorder()
    reloader = Reloader(
        {**flags, "api_version": "2025-01-01"}, {}, live, lambda: [Certificates(fail=True)], log.logger()
    )
    assert not reloader.reload()
    assert live.config.api_version == "2025-01-01"
    assert "it keeps its old certificate: certificate /etc/x.pem holds no PEM certificate" in log.text()


def test_reload_cannot_change_listeners_or_log_format(tmp_path: Path) -> None:
    flags: dict[str, Any] = {"endpoint": "https://r.openai.azure.com", "listen": ["tcp:8080"]}
    live = LiveConfig(load_config(flags, {}))
    log = Recorder()
    flags["listen"] = ["tcp:9090"]
    flags["log_format"] = "json"
    assert Reloader(flags, {}, live, log=log.logger()).reload()
    assert live.config.listen == ("tcp:8080",)
    assert live.config.log_format == "text"
    assert "listen changed from tcp:8080 to tcp:9090: it changes only on restart" in log.text()
    assert "log_format changed from text to json: it changes only on restart" in log.text()


# -- drain ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_drain_closes_idle_connections_and_waits_for_streams(
    fake: FakeAzure, make_proxy: Callable[..., Proxy]
) -> None:
    fake.hold_last_chunk()
    proxy = make_proxy()
    stream = await connect(proxy, raw_post("/v1/chat/completions", {**CHAT, "stream": True}, key=CLIENT_KEY))
    await stream.wait_for(b"chunk2 ")  # the fake holds a stream once its last content chunk is out
    idle = await connect(proxy, b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n")
    await idle.wait_for(b'"ok"}')
    assert fake.held_streams == 1

    drained = proxy.site.connections.drain(get_reactor(), 30)
    await idle.closed  # an idle keep-alive connection is closed at once
    assert not drained.called
    assert not stream.closed.called
    fake.release()
    cut = await drained
    assert cut == 0
    await stream.closed  # Connection: close once the response is done
    assert stream.received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert proxy.site.connections.open == set()


@pytest_twisted.ensureDeferred
async def test_drain_deadline_cuts_open_streams_visibly(
    fake: FakeAzure, make_proxy: Callable[..., Proxy]
) -> None:
    fake.hold_last_chunk()
    proxy = make_proxy()
    stream = await connect(proxy, raw_post("/v1/chat/completions", {**CHAT, "stream": True}, key=CLIENT_KEY))
    await stream.wait_for(b"chunk2 ")  # the fake holds a stream once its last content chunk is out
    assert fake.held_streams == 1
    upstream_closed = fake.wait_connection_closed()
    cut = await proxy.site.connections.drain(get_reactor(), 0.05)
    assert cut == 1
    await stream.closed
    assert not stream.received.endswith(b"0\r\n\r\n")  # no last chunk: truncation is visible
    # The upstream request is cancelled with it.
    await upstream_closed.addTimeout(10, get_reactor())
    assert fake.open_connections == 0


@pytest_twisted.ensureDeferred
async def test_drain_during_a_request_head_closes_after_its_answer(
    make_proxy: Callable[..., Proxy],
) -> None:
    proxy = make_proxy()
    client = await connect(proxy, b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n")
    connections = proxy.site.connections
    await wait_until(lambda: any(channel.busy for channel in connections.open), "the request line")
    drained = connections.drain(get_reactor(), 30)
    assert client.transport is not None
    client.transport.write(b"\r\n")  # the head ends after the drain began
    # Answered, then closed: the head's end did not make the connection keep-alive again.
    await client.closed.addTimeout(10, get_reactor())
    assert b'{"status": "ok"}' in client.received
    assert b"connection: close" in client.received.lower()
    assert await drained == 0


def test_drain_with_nothing_open_is_immediate() -> None:
    # A clock that never advances: the drain must not wait for any time to pass.
    from twisted.internet.task import Clock

    d = Connections().drain(Clock(), 30)
    assert d.called and d.result == 0


# -- sd_notify --------------------------------------------------------------------------------


def test_sd_notify_path_and_abstract_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(path)
        assert sd_notify("READY=1", {"NOTIFY_SOCKET": path})
        assert listener.recv(100) == b"READY=1"
    name = f"aoaiproxy-test-{tmp_path.name}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        assert sd_notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert listener.recv(100) == b"STOPPING=1"
    assert not sd_notify("READY=1", {})
    assert not sd_notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody")})


def test_reload_notifies_reloading_with_its_monotonic_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd 253+ (Type=notify-reload) expects MONOTONIC_USEC= with RELOADING=1."""
    from twisted.internet.task import Clock

    flags = {"endpoint": "https://r.openai.azure.com"}
    live = LiveConfig(load_config(flags, {}))
    top = DaemonService(live, Connections(), Clock(), Reloader(flags, {}, live))
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert top.reload()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        reloading = listener.recv(200).decode()
        assert listener.recv(200) == b"READY=1"
    state = dict(line.split("=", 1) for line in reloading.split("\n"))
    assert state.keys() == {"RELOADING", "MONOTONIC_USEC"}
    assert state["RELOADING"] == "1"
    assert before <= int(state["MONOTONIC_USEC"]) <= after


# -- systemd units ----------------------------------------------------------------------------

UNITS = REPO / "systemd"


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    # verify checks that ExecStart's program exists: point it at this virtualenv's twistd.
    twistd = str(Path(sys.executable).parent / "twistd")
    service = (UNITS / "aoaiproxy.service").read_text()
    assert "ExecStart=/opt/aoaiproxy/bin/twistd --nodaemon --pidfile= aoaiproxy\n" in service
    (tmp_path / "aoaiproxy.service").write_text(service.replace("/opt/aoaiproxy/bin/twistd", twistd))
    shutil.copy(UNITS / "aoaiproxy.socket", tmp_path / "aoaiproxy.socket")
    result = subprocess.run(
        [
            analyze,
            "verify",
            "--man=no",
            str(tmp_path / "aoaiproxy.socket"),
            str(tmp_path / "aoaiproxy.service"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_units_are_hardened_and_wired_together() -> None:
    service = unit_settings((UNITS / "aoaiproxy.service").read_text())
    for key, value in {
        "Type": "notify",
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "Restart": "on-failure",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "EnvironmentFile": "-/etc/aoaiproxy/aoaiproxy.env",
    }.items():
        assert value in service[key], key
    assert "@system-service" in service["SystemCallFilter"]
    assert "AOAIPROXY_CONFIG=/etc/aoaiproxy/aoaiproxy.toml" in service["Environment"]
    assert "MemoryDenyWriteExecute" not in service
    socket_unit = unit_settings((UNITS / "aoaiproxy.socket").read_text())
    assert socket_unit["FileDescriptorName"] == ["aoaiproxy"]
    # The example configuration is valid and listens on the socket unit's descriptor.
    config = load_config({"config": str(UNITS / "aoaiproxy.toml.example")}, {})
    assert config.listen == ("systemd:domain=INET:name=aoaiproxy",)
