"""
Running as a service, end to end: C{twistd -n aoaiproxy} subprocesses against the fake Azure
upstream in this process.  Socket activation through C{systemd-socket-activate}; C{SIGTERM}
drains streams in flight (and cuts them at the deadline); C{SIGHUP} reloads client keys,
the config file and TLS certificates without dropping a stream; C{READY=1} for systemd; and
no key ever reaches the log.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import ssl
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.web.client import ResponseFailed

from aoaiproxy.testing import FakeAzure

from ..certs import CA, make_ca
from ..conftest import Daemon, free_port, get_reactor, spawned, twistd_command, twistd_env
from ..rawnet import connect
from ..test_service import wait_until

CLIENT_KEY = "sk-client-DISTINCTIVE-e2e-41c7"
NEW_KEY = "sk-new-DISTINCTIVE-e2e-9d02"
SERVER_KEY = "srv-key-DISTINCTIVE-e2e-77ab"
STREAM = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


async def wait_log(daemon: Daemon, text: str, count: int = 1, timeout: float = 10.0) -> None:
    """Wait (bounded) until the daemon's log holds C{text} C{count} times."""
    try:
        await wait_until(lambda: daemon.log().count(text) >= count, repr(text), timeout=timeout)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{daemon.log()}") from None


async def wait_exit(daemon: Daemon, timeout: float = 40.0) -> int:
    code: int = await deferToThread(daemon.proc.wait, timeout)
    return code


def headers(key: str = CLIENT_KEY) -> dict[str, str]:
    return {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}


class Stream:
    """A streamed chat completion read chunk by chunk (treq, unbuffered)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done: Deferred[None] | None = None
        self.code = 0

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    async def start(self, url: str, key: str = CLIENT_KEY) -> Stream:
        response = await treq.post(
            url + "/v1/chat/completions", json=STREAM, headers=headers(key), unbuffered=True
        )
        self.code = response.code
        self.done = treq.collect(response, self.chunks.append)
        return self


async def post(url: str, key: str = CLIENT_KEY) -> int:
    response = await treq.post(url + "/v1/chat/completions", json=CHAT, headers=headers(key))
    await response.content()
    code: int = response.code
    return code


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True


def assert_no_secret(daemon: Daemon, *secrets: str) -> None:
    log = daemon.log()
    for secret in secrets:
        assert secret not in log


# -- SIGTERM ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sigterm_lets_a_stream_finish_then_exits_0(
    fake: FakeAzure, start_daemon: Callable[..., Daemon]
) -> None:
    fake.hold_last_chunk()
    daemon = start_daemon("--endpoint", fake.url, "--drain-timeout", "30")
    stream = await Stream().start(daemon.url)
    assert stream.code == 200
    await wait_until(lambda: fake.held_streams == 1, "the held stream")

    daemon.proc.send_signal(signal.SIGTERM)
    await wait_log(daemon, "draining: 1 connection(s) with a request in flight")
    await wait_log(daemon, f"(TCP Port {daemon.port} Closed)")
    assert await deferToThread(refused, daemon.port)  # no new connections meanwhile
    assert daemon.proc.poll() is None  # still serving the stream

    fake.release()
    assert stream.done is not None
    await stream.done
    assert stream.body.endswith(b"data: [DONE]\n\n")
    assert await wait_exit(daemon) == 0
    log = daemon.log()
    assert "drained: every request in flight has finished" in log
    assert '"POST /v1/chat/completions" 200 ' in log
    assert " aborted" not in log
    # twistd's text lines (here from aoaiproxy.log.text_observer): time, system, the line.
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}"
    access = r'127\.0\.0\.1 "POST /v1/chat/completions" 200 bytes=\d+ duration=\d+\.\d{3}s model=gpt-4o'
    assert re.search(rf"^{stamp} \[aoaiproxy\.access#info\] {access}", log, re.MULTILINE), log
    assert re.search(rf"^{stamp} \[[\w.]+#info\] twistd .* starting up\.$", log, re.MULTILINE), log
    # The reactor twistd aoaiproxy installs (aoaiproxy.reactor), as twistd reports it.
    assert "reactor class: aoaiproxy.reactor.ProxyReactor." in log


@pytest_twisted.ensureDeferred
async def test_sigterm_cuts_a_stream_still_open_at_the_deadline(
    fake: FakeAzure, start_daemon: Callable[..., Daemon]
) -> None:
    fake.hold_last_chunk()
    daemon = start_daemon("--endpoint", fake.url, "--drain-timeout", "1")
    stream = await Stream().start(daemon.url)
    await wait_until(lambda: fake.held_streams == 1, "the held stream")

    daemon.proc.send_signal(signal.SIGTERM)
    assert stream.done is not None
    with pytest.raises(ResponseFailed):  # the client sees the truncation
        await stream.done
    assert b"data: " in stream.body and not stream.body.endswith(b"data: [DONE]\n\n")
    assert await wait_exit(daemon) == 0
    log = daemon.log()
    assert "drain timeout (1s): cut 1 connection(s) still open" in log
    assert '"POST /v1/chat/completions" 200 ' in log and " aborted" in log
    fake.release()


class _Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_sigterm_does_not_wait_for_a_pooled_tunnel(start_daemon: Callable[..., Daemon]) -> None:
    """
    A client's pooled CONNECT tunnel (its last response in, nothing since) does not hold
    the daemon for the drain timeout: it is closed once at rest, and the daemon exits.
    """
    reactor = get_reactor()
    target = reactor.listenTCP(0, Factory.forProtocol(_Echo), interface="127.0.0.1")
    try:
        port = target.getHost().port
        daemon = start_daemon(
            "--endpoint",
            "http://127.0.0.1:9",
            "--forward-allow",
            f"127.0.0.1:{port}",
            "--drain-timeout",
            "120",
        )
        tunnel = await connect(daemon.port, b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\nping" % port)
        await tunnel.wait_for(lambda received: received.endswith(b"ping"))

        daemon.proc.send_signal(signal.SIGTERM)
        assert await wait_exit(daemon, timeout=60) == 0  # not after the 120 s drain
        await tunnel.closed
        assert tunnel.reason is not None and tunnel.reason.check(ConnectionDone)  # closed, not cut
        log = daemon.log()
        assert "draining: 1 connection(s) with a request in flight" in log
        assert "drained: every request in flight has finished" in log
    finally:
        await target.stopListening()


# -- SIGHUP -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sighup_reloads_client_keys_without_dropping_a_stream(
    fake: FakeAzure, start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    keys = tmp_path / "client-keys"
    keys.write_text(CLIENT_KEY + "\n")
    daemon = start_daemon("--endpoint", fake.url, "--token", SERVER_KEY, "--client-keys", str(keys))
    assert await post(daemon.url, NEW_KEY) == 401
    fake.hold_last_chunk()
    stream = await Stream().start(daemon.url, CLIENT_KEY)
    await wait_until(lambda: fake.held_streams == 1, "the held stream")

    keys.write_text(f"# rotated\n{NEW_KEY}\n")
    daemon.proc.send_signal(signal.SIGHUP)
    await wait_log(daemon, "configuration reloaded: client_keys")
    assert await post(daemon.url, NEW_KEY) == 200
    assert await post(daemon.url, CLIENT_KEY) == 401

    fake.release()
    assert stream.done is not None
    await stream.done  # the stream opened with the old key was not dropped
    assert stream.body.endswith(b"data: [DONE]\n\n")
    assert {r.header("api-key") for r in fake.requests} == {SERVER_KEY}
    assert daemon.stop() == 0
    assert_no_secret(daemon, CLIENT_KEY, NEW_KEY, SERVER_KEY)


@pytest_twisted.ensureDeferred
async def test_sighup_with_a_broken_config_keeps_the_old_one(
    fake: FakeAzure, start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    config = tmp_path / "aoaiproxy.toml"
    config.write_text(f'endpoint = "{fake.url}"\n[models]\n"gpt-4o" = "prod-4o"\n')
    daemon = start_daemon("--config", str(config))
    assert await post(daemon.url) == 200

    config.write_text(f'endpoint = "{fake.url}"\n[models\n')
    daemon.proc.send_signal(signal.SIGHUP)
    await wait_log(daemon, "reload failed, keeping the running configuration: --config:")
    assert await post(daemon.url) == 200
    assert [r.path for r in fake.requests] == ["/openai/deployments/prod-4o/chat/completions"] * 2

    config.write_text(f'endpoint = "{fake.url}"\n[models]\n"gpt-4o" = "next-4o"\n')
    daemon.proc.send_signal(signal.SIGHUP)
    await wait_log(daemon, "configuration reloaded: models")
    assert await post(daemon.url) == 200
    assert fake.requests[-1].path == "/openai/deployments/next-4o/chat/completions"
    assert daemon.stop() == 0


def make_certificate(ca: CA, directory: Path, name: str, serial: int) -> tuple[Path, Path, str]:
    """A certificate for 127.0.0.1 issued by C{ca}: (key, cert, PEM)."""
    key_path, cert_path = ca.issue(directory, name, serial)
    return key_path, cert_path, cert_path.read_text()


def server_certificate(port: int) -> str:
    return ssl.get_server_certificate(("127.0.0.1", port), timeout=10)


@pytest_twisted.ensureDeferred
async def test_sighup_reloads_tls_certificates(
    fake: FakeAzure, start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    pytest.importorskip("aoaiproxy.tls")
    ca = make_ca()
    old_key, old_cert, old_pem = make_certificate(ca, tmp_path, "old", 1)
    new_key, new_cert, new_pem = make_certificate(ca, tmp_path, "new", 2)
    live_key, live_cert = tmp_path / "server.key", tmp_path / "server.crt"
    shutil.copy(old_key, live_key)
    shutil.copy(old_cert, live_cert)
    port = free_port()
    listen = f"ssl:{port}:interface=127.0.0.1:privateKey={live_key}:certKey={live_cert}"
    daemon = start_daemon("--endpoint", fake.url, "--listen", listen, port=port, listen=False)
    assert await deferToThread(server_certificate, port) == old_pem

    shutil.copy(new_key, live_key)
    shutil.copy(new_cert, live_cert)
    daemon.proc.send_signal(signal.SIGHUP)
    await wait_log(daemon, "configuration reloaded")
    assert await deferToThread(server_certificate, port) == new_pem

    # A broken certificate file keeps the new one serving.
    live_cert.write_text("not a certificate\n")
    daemon.proc.send_signal(signal.SIGHUP)
    await wait_log(daemon, "configuration reloaded", count=2)
    assert "it keeps its old certificate" in daemon.log()
    assert await deferToThread(server_certificate, port) == new_pem
    assert daemon.stop() == 0


# -- logs ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_json_log_lines_and_no_keys(
    fake: FakeAzure, start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    keys = tmp_path / "client-keys"
    keys.write_text(CLIENT_KEY + "\n")
    daemon = start_daemon(
        "--endpoint", fake.url, "--token", SERVER_KEY, "--client-keys", str(keys), "--log-format", "json"
    )
    assert await post(daemon.url) == 200
    assert await post(daemon.url, NEW_KEY) == 401
    assert daemon.stop() == 0
    records = [json.loads(line) for line in daemon.log().splitlines()]  # every line is JSON
    access = [r for r in records if r["logger"] == "aoaiproxy.access"]
    assert [(r["method"], r["path"], r["status"]) for r in access] == [
        ("POST", "/v1/chat/completions", 200),
        ("POST", "/v1/chat/completions", 401),
    ]
    assert access[0]["model"] == "gpt-4o" and access[0]["deployment"] == "gpt-4o"
    messages = [r.get("message", "") for r in records]
    assert f"listening on tcp:{daemon.port}:interface=127.0.0.1" in messages
    assert any(m.startswith(f"aoaiproxy 0.1.0: mode azure, upstream {fake.url}") for m in messages)
    assert_no_secret(daemon, CLIENT_KEY, NEW_KEY, SERVER_KEY)


# -- systemd ---------------------------------------------------------------------------------


async def notified(notify: socket.socket) -> bytes:
    """The next notification the daemon sends (bounded by the socket's timeout)."""
    state: bytes = await deferToThread(notify.recv, 200)
    return state


@pytest_twisted.ensureDeferred
async def test_ready_reloading_and_stopping_are_notified(
    fake: FakeAzure, start_daemon: Callable[..., Daemon], tmp_path: Path, notify_socket: socket.socket
) -> None:
    daemon = start_daemon("--endpoint", fake.url, env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
    assert await notified(notify_socket) == b"READY=1\nSTATUS=serving"
    daemon.proc.send_signal(signal.SIGHUP)
    reloading = await notified(notify_socket)
    # systemd 253+ wants the monotonic time with RELOADING=1 (checked in tests/test_service.py).
    assert re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=[0-9]+", reloading), reloading
    assert await notified(notify_socket) == b"READY=1"
    daemon.proc.send_signal(signal.SIGTERM)
    assert await notified(notify_socket) == b"STOPPING=1"
    assert await wait_exit(daemon) == 0


@pytest.fixture
def socket_activated(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """C{systemd-socket-activate -l 127.0.0.1:PORT --fdname=aoaiproxy twistd ... aoaiproxy ...}."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed (Debian package systemd)")
    with ExitStack() as daemons:

        def start(*args: str) -> Daemon:
            port = free_port()
            command = [
                activate,
                "-l",
                f"127.0.0.1:{port}",
                "--fdname=aoaiproxy",
                # It passes on only the environment it is told to (and LISTEN_FDS and friends).
                f"--setenv=PYTHONPATH={twistd_env()['PYTHONPATH']}",
                *twistd_command("--listen", "systemd:domain=INET:name=aoaiproxy", *args),
            ]
            # systemd-socket-activate listens; twistd starts on a connection.
            return daemons.enter_context(spawned(command, tmp_path / f"activated-{port}.log", port))

        yield start


@pytest_twisted.ensureDeferred
async def test_socket_activation(fake: FakeAzure, socket_activated: Callable[..., Daemon]) -> None:
    daemon = socket_activated("--endpoint", fake.url)
    assert await post(daemon.url) == 200
    assert fake.requests[0].path == "/openai/deployments/gpt-4o/chat/completions"
    await wait_log(daemon, '"POST /v1/chat/completions" 200 ')  # written after the answer leaves
    log = daemon.log()
    assert "listening on systemd:domain=INET:name=aoaiproxy" in log
    assert '"POST /v1/chat/completions" 200 ' in log
    assert daemon.stop() == 0


@pytest_twisted.ensureDeferred
async def test_a_reactor_chosen_with_twistd_is_kept(fake: FakeAzure, tmp_path: Path) -> None:
    """
    C{twistd --reactor=poll aoaiproxy} runs on the reactor asked for (aoaiproxy installs its
    own, aoaiproxy.reactor.ProxyReactor, only when none was chosen), and serves on it.
    """
    port = free_port()
    command = twistd_command("--listen", f"tcp:{port}:interface=127.0.0.1", "--endpoint", fake.url)
    command.insert(command.index("aoaiproxy"), "--reactor=poll")
    with spawned(command, tmp_path / "daemon.log", port) as daemon:
        response = await treq.get(f"http://127.0.0.1:{port}/healthz")
        assert response.code == 200
        assert await response.content() == b'{"status": "ok"}'
        assert "reactor class: twisted.internet.pollreactor.PollReactor." in daemon.log()
        assert "ProxyReactor" not in daemon.log()
