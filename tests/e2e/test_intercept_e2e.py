"""
TLS interception end to end (SPEC §13): the Go README's C{https_proxy} example, for real.

A C{twistd -n aoaiproxy --intercept} subprocess with a plain and a native TLS listener and
proxy authentication, against the fake Azure in this process; curl and the C{openai} SDK in
subprocesses talk to C{https://api.openai.com} through it, trusting the CA they fetched from
C{/aoaiproxy/ca.pem}, and reach the fake converted.  C{api.openai.com} resolves to nothing
real here: curl and httpx send its name in the CONNECT and never resolve it; the daemon never
dials it (it is not even on the daemon's allowlist, which holds only the local TLS echo
target: had it been dialled, the CONNECT would have been refused with a 403).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import attrs
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread

from aoaiproxy.testing import FakeAzure
from aoaiproxy.tls import load_certificate_options

from ..certs import make_ca
from ..conftest import Daemon, free_port, spawned, twistd_command
from ..rawnet import get_reactor, parse_response, response_done
from .test_forward_e2e import curl, no_proxy_env
from .test_service_e2e import wait_exit, wait_log

USER, PASSWORD = "alice", "intercept-pw-DISTINCTIVE"
AZURE_KEY = "azure-key-DISTINCTIVE-e2e"
CHAT = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}
AZURE_PATH = "/openai/deployments/gpt-35-turbo/chat/completions"
PROXY_AUTH = b"Proxy-Authorization: Basic YWxpY2U6aW50ZXJjZXB0LXB3LURJU1RJTkNUSVZF\r\n"


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


@attrs.frozen
class Env:
    directory: Path
    daemon: Daemon
    fake: FakeAzure
    tls_port: int
    echo_port: int
    #: The CA of the TLS listener's certificate, and of the echo target's.
    listener_ca: Path
    echo_ca: Path
    state: Path

    @property
    def port(self) -> int:
        return self.daemon.port

    @property
    def http_proxy(self) -> str:
        return f"http://{USER}:{PASSWORD}@127.0.0.1:{self.port}"

    @property
    def https_proxy(self) -> str:
        return f"https://{USER}:{PASSWORD}@127.0.0.1:{self.tls_port}"

    @property
    def ca(self) -> Path:
        """The interception CA, as a client fetched it from /aoaiproxy/ca.pem."""
        return self.directory / "fetched-ca.pem"


@pytest_twisted.async_yield_fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    reactor = get_reactor()
    directory = tmp_path_factory.mktemp("intercept-e2e")
    listener_ca, echo_ca = make_ca("listener CA"), make_ca("echo CA")
    listener_key, listener_cert = listener_ca.issue(directory, "listener", 21)
    echo_key, echo_cert = echo_ca.issue(directory, "echo", 22)
    echo: IListeningPort = reactor.listenSSL(
        0,
        Factory.forProtocol(Echo),
        load_certificate_options(str(echo_key), str(echo_cert)),
        interface="127.0.0.1",
    )
    fake = FakeAzure(reactor)
    fake.listen()
    users = directory / "users"
    users.write_text(f"{USER}:{PASSWORD}\n")
    port, tls_port = free_port(), free_port()
    echo_port = echo.getHost().port
    state = directory / "state"
    args = [
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "--listen",
        f"ssl:{tls_port}:interface=127.0.0.1:privateKey={listener_key}:certKey={listener_cert}",
        "--endpoint",
        fake.url,
        "--intercept",
        "--state-dir",
        str(state),
        "--forward-allow",
        f"127.0.0.1:{echo_port}",
        "--forward-users",
        str(users),
    ]
    log = directory / "twistd.log"
    try:
        with spawned(twistd_command(*args), log, port, tls_port) as daemon:
            yield Env(
                directory,
                daemon,
                fake,
                tls_port,
                echo_port,
                listener_ca.write(directory / "listener-ca.pem"),
                echo_ca.write(directory / "echo-ca.pem"),
                state,
            )
            daemon.stop_cleanly()
    finally:
        await fake.stop()
        await echo.stopListening()
    text = log.read_text()
    assert PASSWORD not in text and AZURE_KEY not in text


@pytest.fixture
def fake(env: Env) -> Iterator[FakeAzure]:
    """The module's fake, its records and holds reset for each test."""
    env.fake.requests.clear()
    yield env.fake
    env.fake.release()
    env.fake.holding = False


def completion_args(body: dict[str, object]) -> list[str]:
    return [
        "https://api.openai.com/v1/chat/completions",
        "-H",
        f"Authorization: Bearer {AZURE_KEY}",
        "-H",
        "Content-Type: application/json",
        "-d",
        json.dumps(body),
    ]


def assert_reached_azure(fake: FakeAzure) -> None:
    [rec] = fake.requests
    assert rec.path == AZURE_PATH
    assert rec.query["api-version"]
    assert rec.header("api-key") == AZURE_KEY
    assert rec.header("authorization") is None and rec.header("proxy-authorization") is None


def assert_stream(body: bytes) -> None:
    assert body.endswith(b"data: [DONE]\n\n"), body[-200:]
    assert b"prompt_filter_results" not in body  # Azure's filter-only frames dropped
    assert body.count(b"data: ") > 2


# -- the CA -------------------------------------------------------------------------------------


async def fetch_ca(env: Env) -> Path:
    """Step one of the README: fetch the CA from the proxy (any listener, no key)."""
    fetched = await curl(
        "-o", str(env.ca), f"http://127.0.0.1:{env.port}/aoaiproxy/ca.pem", env=no_proxy_env()
    )
    assert fetched.status == 200, fetched
    return env.ca


@pytest_twisted.ensureDeferred
async def test_the_ca_is_kept_logged_and_served_on_every_listener(env: Env) -> None:
    ca = (await fetch_ca(env)).read_bytes()
    assert ca == (env.state / "ca.pem").read_bytes()
    assert stat.S_IMODE((env.state / "ca-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE(env.state.stat().st_mode) == 0o700
    over_tls = await curl(
        "--cacert",
        str(env.listener_ca),
        f"https://127.0.0.1:{env.tls_port}/aoaiproxy/ca.pem",
        env=no_proxy_env(),
    )
    assert over_tls.status == 200 and over_tls.body == ca, over_tls
    assert f"interception CA generated in {env.state / 'ca.pem'}" in env.daemon.log()


# -- curl ---------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_curl_through_the_plain_listener(env: Env, fake: FakeAzure) -> None:
    await fetch_ca(env)
    result = await curl(
        "--proxy", env.http_proxy, "--cacert", str(env.ca), *completion_args(CHAT), env=no_proxy_env()
    )
    assert (result.connect_status, result.status) == (200, 200), result
    assert json.loads(result.body)["choices"][0]["message"]["content"]
    assert_reached_azure(fake)
    fake.requests.clear()
    streamed = await curl(
        "-N", "--proxy", env.http_proxy, "--cacert", str(env.ca), *completion_args(STREAM), env=no_proxy_env()
    )
    assert streamed.status == 200, streamed
    assert_stream(streamed.body)
    assert_reached_azure(fake)


@pytest_twisted.ensureDeferred
async def test_curl_through_the_tls_listener_tls_inside_tls(env: Env, fake: FakeAzure) -> None:
    await fetch_ca(env)
    result = await curl(
        "--proxy",
        f"https://127.0.0.1:{env.tls_port}",
        "--proxy-user",
        f"{USER}:{PASSWORD}",
        "--proxy-cacert",
        str(env.listener_ca),
        "--cacert",
        str(env.ca),
        *completion_args(CHAT),
        env=no_proxy_env(),
    )
    assert (result.connect_status, result.status) == (200, 200), result
    assert_reached_azure(fake)
    fake.requests.clear()
    # The Go README's way: https_proxy in the environment, curl as usual.
    streamed = await curl(
        "-N",
        "--proxy-cacert",
        str(env.listener_ca),
        "--cacert",
        str(env.ca),
        *completion_args(STREAM),
        env={**no_proxy_env(), "https_proxy": env.https_proxy},
    )
    assert (streamed.connect_status, streamed.status) == (200, 200), streamed
    assert_stream(streamed.body)
    assert_reached_azure(fake)


@pytest_twisted.ensureDeferred
async def test_a_client_that_does_not_trust_the_ca_gets_a_tls_error(env: Env, fake: FakeAzure) -> None:
    result = await curl("--proxy", env.http_proxy, *completion_args(CHAT), env=no_proxy_env())
    assert result.connect_status == 200
    assert result.returncode == 60, result  # "SSL certificate problem"
    assert fake.requests == []
    health = await curl(f"http://127.0.0.1:{env.port}/healthz", env=no_proxy_env())
    assert health.status == 200 and json.loads(health.body) == {"status": "ok"}


@pytest_twisted.ensureDeferred
async def test_without_proxy_credentials_the_connect_gets_407(env: Env, fake: FakeAzure) -> None:
    await fetch_ca(env)
    result = await curl(
        "--proxy",
        f"http://127.0.0.1:{env.port}",
        "--cacert",
        str(env.ca),
        *completion_args(CHAT),
        env=no_proxy_env(),
    )
    assert result.connect_status == 407, result
    assert fake.requests == []


@pytest_twisted.ensureDeferred
async def test_other_ports_are_not_intercepted_nor_allowed(env: Env) -> None:
    """The same name on another port is an ordinary destination: not on the allowlist, 403."""
    result = await curl(
        "--proxy", env.http_proxy, "https://api.openai.com:8443/v1/models", env=no_proxy_env()
    )
    assert result.connect_status == 403, result


# -- the openai SDK ------------------------------------------------------------------------------

SDK_SCRIPT = """
import json, openai
client = openai.OpenAI(max_retries=0)  # the default base URL: https://api.openai.com/v1
messages = [{"role": "user", "content": "hi"}]
completion = client.chat.completions.create(model="gpt-3.5-turbo", messages=messages)
stream = client.chat.completions.create(model="gpt-3.5-turbo", messages=messages, stream=True)
parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
print(json.dumps({"plain": completion.choices[0].message.content, "streamed": "".join(parts)}))
"""


def _run_sdk(env: Env) -> subprocess.CompletedProcess[bytes]:
    # Only HTTPS_PROXY: an empty https_proxy would win over it (lower case comes first).
    unset = ("OPENAI", "SSL_CERT", "REQUESTS_CA", *(name.upper() for name in no_proxy_env()), *no_proxy_env())
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith(unset)},
        "HTTPS_PROXY": env.http_proxy,
        "SSL_CERT_FILE": str(env.ca),
        "OPENAI_API_KEY": AZURE_KEY,
    }
    return subprocess.run(
        [sys.executable, "-c", SDK_SCRIPT], capture_output=True, env=environ, timeout=60, check=False
    )


@pytest_twisted.ensureDeferred
async def test_openai_sdk_with_https_proxy_and_ssl_cert_file(env: Env, fake: FakeAzure) -> None:
    await fetch_ca(env)
    run = await deferToThread(_run_sdk, env)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    out = json.loads(run.stdout)
    assert out["plain"] and out["streamed"], out
    assert len(fake.requests) == 2
    for rec in fake.requests:
        assert rec.path == AZURE_PATH
        assert rec.header("api-key") == AZURE_KEY
    assert [rec.json()["model"] for rec in fake.requests] == ["gpt-3.5-turbo"] * 2
    assert fake.requests[1].json()["stream"] is True


# -- Node.js: NODE_EXTRA_CA_CERTS --------------------------------------------------------------------

#: CONNECT by hand (Node 20 has no proxy support of its own), then TLS with Node's default roots:
#: only NODE_EXTRA_CA_CERTS can make it trust the proxy's certificate for api.openai.com.
NODE_SCRIPT = r"""
const http = require("http"), tls = require("tls");
const [port, auth, key] = process.argv.slice(1);
const body = JSON.stringify({model: "gpt-3.5-turbo", messages: [{role: "user", content: "hi"}]});
http.request({host: "127.0.0.1", port, method: "CONNECT", path: "api.openai.com:443",
              headers: {"Proxy-Authorization": "Basic " + auth}})
  .on("connect", (res, socket) => {
    const s = tls.connect({socket, servername: "api.openai.com"}, () => {
      s.write("POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nConnection: close\r\n" +
              "Authorization: Bearer " + key + "\r\nContent-Type: application/json\r\n" +
              "Content-Length: " + Buffer.byteLength(body) + "\r\n\r\n" + body);
    });
    let out = "";
    s.on("data", (d) => { out += d; });
    s.on("end", () => { process.stdout.write(out); });
    s.on("error", (e) => { console.error(e.code || e.message); process.exit(3); });
  })
  .end();
"""


def _run_node(env: Env, extra_ca: bool) -> subprocess.CompletedProcess[bytes]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NODE_")}
    if extra_ca:
        environ["NODE_EXTRA_CA_CERTS"] = str(env.ca)
    auth = PROXY_AUTH.split(b"Basic ")[1].strip().decode()
    return subprocess.run(
        ["node", "-e", NODE_SCRIPT, str(env.port), auth, AZURE_KEY],
        capture_output=True,
        env=environ,
        timeout=60,
        check=False,
    )


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
@pytest_twisted.ensureDeferred
async def test_node_trusts_the_ca_with_node_extra_ca_certs(env: Env, fake: FakeAzure) -> None:
    await fetch_ca(env)
    untrusted = await deferToThread(_run_node, env, False)
    assert untrusted.returncode == 3 and b"UNABLE_TO_VERIFY_LEAF_SIGNATURE" in untrusted.stderr, untrusted
    trusted = await deferToThread(_run_node, env, True)
    assert trusted.returncode == 0, trusted.stderr.decode()
    assert trusted.stdout.startswith(b"HTTP/1.1 200 "), trusted.stdout[:300]
    assert_reached_azure(fake)


# -- raw clients: a tunnel byte for byte, a stream cancelled ----------------------------------------


def _connect(env: Env, target: str) -> socket.socket:
    """A socket through the plain listener whose CONNECT to C{target} was answered 200."""
    sock = socket.create_connection(("127.0.0.1", env.port), timeout=20)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n".encode() + PROXY_AUTH + b"\r\n")
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)  # exactly the head: what follows is TLS
        assert byte, head
        head += byte
    assert head.startswith(b"HTTP/1.1 200 "), head
    return sock


def _echo_through_tunnel(env: Env, payload: bytes) -> bytes:
    context = ssl.create_default_context(cafile=str(env.echo_ca))  # the target's own CA only
    with context.wrap_socket(_connect(env, f"127.0.0.1:{env.echo_port}"), server_hostname="127.0.0.1") as tls:
        tls.sendall(payload)
        echoed = b""
        while len(echoed) < len(payload):
            chunk = tls.recv(65536)
            assert chunk, len(echoed)
            echoed += chunk
        return echoed


@pytest_twisted.ensureDeferred
async def test_a_host_not_intercepted_is_tunnelled_byte_for_byte(env: Env) -> None:
    payload = os.urandom(1024 * 1024)
    assert await deferToThread(_echo_through_tunnel, env, payload) == payload


def _start_stream(env: Env) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(env.ca))
    tls = context.wrap_socket(_connect(env, "api.openai.com:443"), server_hostname="api.openai.com")
    body = json.dumps(STREAM).encode()
    tls.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nAuthorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (AZURE_KEY.encode(), len(body), body)
    )
    got = b""
    while b"chunk0 " not in got:
        chunk = tls.recv(65536)
        assert chunk, got
        got += chunk
    return tls


@pytest_twisted.ensureDeferred
async def test_a_stream_cancelled_inside_cancels_the_upstream(env: Env, fake: FakeAzure) -> None:
    await fetch_ca(env)
    fake.hold_last_chunk()
    tls = await deferToThread(_start_stream, env)
    assert fake.open_connections == 1 and fake.held_streams == 1
    closed = fake.wait_connection_closed()
    tls.close()
    await closed.addTimeout(10, get_reactor())
    assert fake.open_connections == 0


# -- SIGHUP, SIGTERM, and interception off ----------------------------------------------------------


def _get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


def _write_ca(directory: Path, name: str) -> bytes:
    ca = make_ca(name)
    (directory / "ca.pem").write_bytes(ca.pem)
    (directory / "ca-key.pem").write_bytes(
        ca.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return ca.pem


@pytest_twisted.ensureDeferred
async def test_sighup_reloads_the_ca_files(
    fake: FakeAzure, start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    files = tmp_path / "ca"
    files.mkdir()
    first = _write_ca(files, "first CA")
    config = tmp_path / "aoaiproxy.toml"
    config.write_text(f"[intercept]\nca_cert = '{files / 'ca.pem'}'\nca_key = '{files / 'ca-key.pem'}'\n")
    daemon = start_daemon("--endpoint", fake.url, "--intercept", "--config", str(config))
    assert parse_response(await deferToThread(_get, daemon.port, "/aoaiproxy/ca.pem")).body == first
    second = _write_ca(files, "second CA")
    daemon.proc.send_signal(signal.SIGHUP)
    await wait_log(daemon, f"interception CA reloaded from {files / 'ca.pem'}")
    assert parse_response(await deferToThread(_get, daemon.port, "/aoaiproxy/ca.pem")).body == second
    # A bad file: the second CA stays, with one line.
    (files / "ca-key.pem").write_text("not a key")
    daemon.proc.send_signal(signal.SIGHUP)
    await wait_log(daemon, "the interception CA was not reloaded, the old one stays in force")
    assert parse_response(await deferToThread(_get, daemon.port, "/aoaiproxy/ca.pem")).body == second
    # Other files named by the config file: the CA follows the configuration reloaded with it.
    other = tmp_path / "other"
    other.mkdir()
    third = _write_ca(other, "third CA")
    config.write_text(f"[intercept]\nca_cert = '{other / 'ca.pem'}'\nca_key = '{other / 'ca-key.pem'}'\n")
    daemon.proc.send_signal(signal.SIGHUP)
    await wait_log(daemon, f"interception CA reloaded from {other / 'ca.pem'}")
    assert parse_response(await deferToThread(_get, daemon.port, "/aoaiproxy/ca.pem")).body == third


def _idle_intercepted(env_port: int, ca: Path) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", env_port), timeout=20)
    sock.sendall(b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n")
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += sock.recv(1)
    tls = ssl.create_default_context(cafile=str(ca)).wrap_socket(sock, server_hostname="api.openai.com")
    tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: api.openai.com\r\n\r\n")
    got = b""
    while not response_done(got):
        got += tls.recv(65536)
    assert parse_response(got).status == 200
    return tls


def _wait_closed(tls: ssl.SSLSocket) -> bytes:
    """What arrives before the proxy ends the connection; then closes it, as clients do."""
    try:
        return tls.recv(65536)
    except (ConnectionError, ssl.SSLError):
        return b""
    finally:
        tls.close()


@pytest_twisted.ensureDeferred
async def test_sigterm_closes_an_idle_intercepted_connection_at_once(
    fake: FakeAzure, start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = start_daemon("--endpoint", fake.url, "--intercept", "--state-dir", str(tmp_path / "state"))
    tls = await deferToThread(_idle_intercepted, daemon.port, tmp_path / "state" / "ca.pem")
    closed: Deferred[bytes] = deferToThread(_wait_closed, tls)
    daemon.proc.send_signal(signal.SIGTERM)
    # The CONNECT counts as in flight (it was handed over), the connection inside is idle:
    # closed at once, and with it the CONNECT's, well before the 30 s drain timeout.
    assert await closed.addTimeout(10, get_reactor()) == b""
    await wait_log(daemon, "drained: every request in flight has finished")
    assert await wait_exit(daemon, 20) == 0


@pytest_twisted.ensureDeferred
async def test_without_intercept_there_is_no_ca(
    fake: FakeAzure, start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = start_daemon("--endpoint", fake.url, "--state-dir", str(tmp_path / "state"))
    response = parse_response(await deferToThread(_get, daemon.port, "/aoaiproxy/ca.pem"))
    assert response.status == 404
    assert not (tmp_path / "state").exists()
