"""
The forward proxy end to end: a C{twistd -n aoaiproxy} subprocess with a plain and a native
TLS listener, real clients (curl, httpx, the openai SDK) in subprocesses and threads, and a
local HTTPS upstream in this process (a 50 MiB file, a small JSON and a chat completion).

Proxy authentication is on (C{--forward-users}), so every proxy request below carries
credentials except the one that checks the 407.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import pytest_twisted
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import deferToThread
from twisted.web import server
from twisted.web.resource import Resource

from aoaiproxy.testing import FakeAzure
from aoaiproxy.tls import load_certificate_options

from ..certs import make_ca
from ..conftest import free_port, get_reactor, spawned, twistd_command

USER, PASSWORD = "alice", "pa:ss-e2e-DISTINCTIVE"
PATTERN = hashlib.shake_256(b"aoaiproxy e2e").digest(1024 * 1024)  # 1 MiB, no repeats inside
BIG_MIB = 50
BIG_SHA256 = hashlib.sha256(PATTERN * BIG_MIB).hexdigest()
SMALL = {"hello": "through the tunnel"}
CHAT = {
    "id": "chatcmpl-e2e",
    "object": "chat.completion",
    "created": 0,
    "model": "gpt-4o",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "tunnelled"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


class _BigProducer:
    """Writes the 50 MiB body as fast as the client takes it (a push producer)."""

    def __init__(self, request: server.Request) -> None:
        self.request = request
        self.sent = 0
        self.paused = False

    def start(self) -> None:
        self.request.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.sent < BIG_MIB:
            self.sent += 1
            self.request.write(PATTERN)
        if self.sent >= BIG_MIB and not self.paused and not self.request.finished:
            self.request.unregisterProducer()
            self.request.finish()

    def stopProducing(self) -> None:
        self.paused = True
        self.sent = BIG_MIB


class Upstream(Resource):
    """The HTTPS destination: /big (50 MiB), /small.json, POST /v1/chat/completions."""

    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes | int:
        if request.path == b"/big":
            request.setHeader(b"Content-Type", b"application/octet-stream")
            request.setHeader(b"Content-Length", b"%d" % (len(PATTERN) * BIG_MIB))
            _BigProducer(request).start()
            return server.NOT_DONE_YET
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(SMALL).encode()

    def render_POST(self, request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(CHAT).encode()


@attrs.frozen
class Env:
    directory: Path
    proxy_port: int
    tls_port: int
    upstream_port: int
    closed_port: int
    blackhole_port: int
    proxy_ca: Path
    upstream_ca: Path
    fake: FakeAzure
    log: Path
    #: Allowed as localhost:PORT only (nothing listens there): refused, localhost is loopback.
    by_name_port: int

    @property
    def upstream(self) -> str:
        return f"https://127.0.0.1:{self.upstream_port}"

    @property
    def http_proxy(self) -> str:
        return f"http://{USER}:{PASSWORD.replace(':', '%3A')}@127.0.0.1:{self.proxy_port}"

    @property
    def https_proxy(self) -> str:
        return f"https://{USER}:{PASSWORD.replace(':', '%3A')}@127.0.0.1:{self.tls_port}"


@pytest.fixture(scope="module")
def blackhole() -> Iterator[int]:
    """A port whose accept queue is full: connecting there hangs (for the 504)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(listener.getsockname())
        fillers.append(s)
    yield listener.getsockname()[1]
    for s in fillers:
        s.close()
    listener.close()


@pytest_twisted.async_yield_fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory, blackhole: int) -> AsyncIterator[Env]:
    reactor = get_reactor()
    directory = tmp_path_factory.mktemp("forward-e2e")
    proxy_ca, upstream_ca = make_ca("proxy CA"), make_ca("upstream CA")
    proxy_key, proxy_cert = proxy_ca.issue(directory, "proxy", 11)
    up_key, up_cert = upstream_ca.issue(directory, "upstream", 12, ("127.0.0.1", "localhost"))
    upstream_port: IListeningPort = reactor.listenSSL(
        0,
        server.Site(Upstream()),
        load_certificate_options(str(up_key), str(up_cert)),
        interface="127.0.0.1",
    )
    fake = FakeAzure(reactor)
    fake.listen()
    users = directory / "users"
    users.write_text(f"{USER}:{PASSWORD}\n")
    proxy_port, tls_port, closed_port, by_name = free_port(), free_port(), free_port(), free_port()
    up = upstream_port.getHost().port
    args = [
        "--listen",
        f"tcp:{proxy_port}:interface=127.0.0.1",
        "--listen",
        f"ssl:{tls_port}:interface=127.0.0.1:privateKey={proxy_key}:certKey={proxy_cert}",
        "--endpoint",
        fake.url,
        "--forward-users",
        str(users),
        "--connect-timeout",
        "1",
    ]
    for allowed in (
        f"127.0.0.1:{up}",
        f"localhost:{by_name}",
        f"127.0.0.1:{closed_port}",
        f"127.0.0.1:{blackhole}",
    ):
        args += ["--forward-allow", allowed]
    log = directory / "twistd.log"
    try:
        with spawned(twistd_command(*args), log, proxy_port, tls_port) as daemon:
            yield Env(
                directory,
                proxy_port,
                tls_port,
                up,
                closed_port,
                blackhole,
                proxy_ca.write(directory / "proxy-ca.pem"),
                upstream_ca.write(directory / "upstream-ca.pem"),
                fake,
                log,
                by_name,
            )
            # Every tunnel and request is over: the daemon drains at once and exits.
            daemon.stop_cleanly()
    finally:
        await fake.stop()
        await upstream_port.stopListening()
    text = log.read_text()
    assert PASSWORD not in text  # proxy credentials are never logged


@attrs.frozen
class Curl:
    returncode: int
    status: int
    connect_status: int
    body: bytes
    stderr: str


def _curl(*args: str, env: dict[str, str] | None = None, output: Path | None = None) -> Curl:
    out = ["-o", str(output)] if output else []
    write_out = "\n%{http_code} %{http_connect}"
    proc = subprocess.run(
        ["curl", "-sS", "--max-time", "30", *out, "-w", write_out, *args],
        capture_output=True,
        env={**os.environ, **(env or {})},
        timeout=40,
        check=False,
    )
    body, _, codes = proc.stdout.rpartition(b"\n")
    status, connect = (int(c) for c in codes.split())
    return Curl(proc.returncode, status, connect, body, proc.stderr.decode(errors="replace"))


async def curl(*args: str, env: dict[str, str] | None = None, output: Path | None = None) -> Curl:
    """curl in a thread (the upstream servers run on this process's reactor)."""
    result: Curl = await deferToThread(_curl, *args, env=env, output=output)
    return result


def no_proxy_env() -> dict[str, str]:
    return {
        name: ""
        for name in ("http_proxy", "https_proxy", "HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "all_proxy")
    }


@pytest_twisted.ensureDeferred
async def test_curl_http_proxy_connect(env: Env) -> None:
    result = await curl(
        "-x",
        env.http_proxy,
        "--cacert",
        str(env.upstream_ca),
        f"{env.upstream}/small.json",
        env=no_proxy_env(),
    )
    assert (result.status, result.connect_status) == (200, 200), result
    assert json.loads(result.body) == SMALL


@pytest_twisted.ensureDeferred
async def test_curl_https_proxy_and_env(env: Env) -> None:
    result = await curl(
        "--proxy",
        f"https://127.0.0.1:{env.tls_port}",
        "--proxy-user",
        f"{USER}:{PASSWORD}",
        "--proxy-cacert",
        str(env.proxy_ca),
        "--cacert",
        str(env.upstream_ca),
        f"{env.upstream}/small.json",
        env=no_proxy_env(),
    )
    assert (result.status, result.connect_status) == (200, 200), result
    assert json.loads(result.body) == SMALL
    # The shell way: https_proxy in the environment.
    via_env = await curl(
        "--proxy-cacert",
        str(env.proxy_ca),
        "--cacert",
        str(env.upstream_ca),
        f"{env.upstream}/small.json",
        env={**no_proxy_env(), "https_proxy": env.https_proxy},
    )
    assert (via_env.status, via_env.connect_status) == (200, 200), via_env


@pytest_twisted.ensureDeferred
async def test_50mib_through_tls_proxy_tunnel_is_byte_identical(env: Env) -> None:
    target = env.directory / "big.bin"
    started = time.monotonic()
    result = await curl(
        "--proxy",
        env.https_proxy,
        "--proxy-cacert",
        str(env.proxy_ca),
        "--cacert",
        str(env.upstream_ca),
        f"{env.upstream}/big",
        env=no_proxy_env(),
        output=target,
    )
    elapsed = time.monotonic() - started
    assert (result.returncode, result.status) == (0, 200), result
    digest = hashlib.sha256()
    with open(target, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == BIG_SHA256
    print(f"50 MiB through the TLS proxy's CONNECT tunnel (TLS upstream) in {elapsed:.2f}s")
    target.unlink()


def _through_https_proxy(env: Env) -> httpx.Client:
    """An httpx client using the TLS listener as its HTTPS proxy (trusting both CAs)."""
    proxy = httpx.Proxy(env.https_proxy, ssl_context=ssl.create_default_context(cafile=str(env.proxy_ca)))
    verify = ssl.create_default_context(cafile=str(env.upstream_ca))
    return httpx.Client(proxy=proxy, verify=verify, trust_env=False, timeout=20)


def _httpx_get(env: Env) -> tuple[int, Any]:
    with _through_https_proxy(env) as client:
        response = client.get(f"{env.upstream}/small.json")
        return response.status_code, response.json()


@pytest_twisted.ensureDeferred
async def test_httpx_through_https_proxy(env: Env) -> None:
    assert await deferToThread(_httpx_get, env) == (200, SMALL)


def _openai_via_proxy(env: Env) -> str | None:
    import openai

    with _through_https_proxy(env) as http_client:
        client = openai.OpenAI(
            api_key="sk-e2e", base_url=f"{env.upstream}/v1", http_client=http_client, max_retries=0
        )
        completion = client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )
        return completion.choices[0].message.content


def _openai_reverse_over_tls(env: Env) -> str | None:
    import openai

    verify = ssl.create_default_context(cafile=str(env.proxy_ca))
    with httpx.Client(verify=verify, trust_env=False) as http_client:
        client = openai.OpenAI(
            api_key="sk-e2e",
            base_url=f"https://127.0.0.1:{env.tls_port}/v1",
            http_client=http_client,
            max_retries=0,
        )
        completion = client.chat.completions.create(
            model="gpt-3.5-turbo", messages=[{"role": "user", "content": "hi"}]
        )
        return completion.choices[0].message.content


@pytest_twisted.ensureDeferred
async def test_openai_sdk_both_roles_on_the_tls_listener(env: Env) -> None:
    assert await deferToThread(_openai_via_proxy, env) == "tunnelled"
    before = len(env.fake.requests)
    content = await deferToThread(_openai_reverse_over_tls, env)
    assert isinstance(content, str)
    rec = env.fake.requests[before]
    assert rec.path == "/openai/deployments/gpt-35-turbo/chat/completions"


@pytest_twisted.ensureDeferred
async def test_error_statuses(env: Env) -> None:
    common = ["--cacert", str(env.upstream_ca), "-x", env.http_proxy]
    forbidden = await curl(*common, "https://127.0.0.1:1/", env=no_proxy_env())
    assert forbidden.connect_status == 403, forbidden
    by_name = await curl(*common, f"https://localhost:{env.by_name_port}/", env=no_proxy_env())
    assert by_name.connect_status == 403, by_name  # localhost is loopback: not by name
    no_auth = await curl(
        "--cacert",
        str(env.upstream_ca),
        "-x",
        f"http://127.0.0.1:{env.proxy_port}",
        f"{env.upstream}/small.json",
        env=no_proxy_env(),
    )
    assert no_auth.connect_status == 407, no_auth
    wrong = await curl(
        "--cacert",
        str(env.upstream_ca),
        "-x",
        f"http://127.0.0.1:{env.proxy_port}",
        "--proxy-user",
        f"{USER}:wrong",
        f"{env.upstream}/small.json",
        env=no_proxy_env(),
    )
    assert wrong.connect_status == 407, wrong
    refused = await curl(*common, f"https://127.0.0.1:{env.closed_port}/", env=no_proxy_env())
    assert refused.connect_status == 502, refused
    timed_out = await curl(*common, f"https://127.0.0.1:{env.blackhole_port}/", env=no_proxy_env())
    assert timed_out.connect_status == 504, timed_out


def _httpx_status(env: Env, url: str) -> int:
    proxy = f"http://127.0.0.1:{env.proxy_port}"
    with httpx.Client(proxy=proxy, trust_env=False, timeout=20) as client:
        return client.get(url).status_code


@pytest_twisted.ensureDeferred
async def test_absolute_form_error_statuses_with_httpx(env: Env) -> None:
    """Plain-http requests through the proxy are absolute-form; httpx sees the proxy's status."""
    assert await deferToThread(_httpx_status, env, "http://127.0.0.1:1/") == 407


@pytest_twisted.ensureDeferred
async def test_absolute_form_openai_is_converted_to_azure(env: Env) -> None:
    before = len(env.fake.requests)
    result = await curl(
        "-x",
        env.http_proxy,
        "http://api.openai.com/v1/chat/completions",
        "-H",
        "Authorization: Bearer sk-client",
        "-H",
        "Content-Type: application/json",
        "-d",
        json.dumps({"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}]}),
        env=no_proxy_env(),
    )
    assert result.status == 200, result
    assert json.loads(result.body)["object"] == "chat.completion"
    [rec] = env.fake.requests[before:]
    assert rec.path == "/openai/deployments/gpt-35-turbo/chat/completions"
    assert rec.query["api-version"]
    assert rec.header("api-key") == "sk-client"
    assert rec.header("proxy-authorization") is None
