"""
Broken upstreams, each injected on loopback and its client-visible outcome asserted:

  - before response headers (refused, DNS failure, TLS failure, connect timeout, no answer,
    closed without an answer, a malformed answer): a 502 or 504 in OpenAI's error shape;
  - inside the body (reset, stall): the client's connection is aborted, so the truncation is
    visible; never a clean end (no terminating 0-chunk, no short body passed off as complete).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import ssl
from twisted.internet.interfaces import IHostnameResolver, IHostResolution, IReactorPluggableNameResolver
from zope.interface import implementer

from aoaiproxy.testing import FakeAzure

from .certs import make_ca
from .conftest import Proxy, free_port
from .rawnet import (
    Connect,
    RawClient,
    Scripted,
    ScriptedUpstream,
    assert_openai_error,
    get_reactor,
    parse_response,
    raw_post,
)

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


async def ask(raw_connect: Connect, proxy: Proxy, stream: bool = False) -> RawClient:
    client = await raw_connect(int(proxy.port.getHost().port))  # type: ignore[attr-defined]
    client.send(raw_post("/v1/chat/completions", {**CHAT, "stream": stream}))
    return client


async def proxy_error(raw_connect: Connect, proxy: Proxy) -> Any:
    """The proxy's own complete answer to a chat request."""
    client = await ask(raw_connect, proxy)
    return parse_response(await client.wait_for(b"}}"))


@pytest_twisted.async_yield_fixture
async def scripted() -> AsyncIterator[Callable[[Callable[[Scripted], None]], ScriptedUpstream]]:
    servers: list[ScriptedUpstream] = []

    def make(script: Callable[[Scripted], None]) -> ScriptedUpstream:
        server = ScriptedUpstream(script)
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


# -- before the response headers -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_connection_refused_is_502(make_proxy: Callable[..., Proxy], raw_connect: Connect) -> None:
    closed_port = free_port()  # bound, then closed: nothing listens there
    proxy = make_proxy(endpoint=f"http://127.0.0.1:{closed_port}")
    response = await proxy_error(raw_connect, proxy)
    assert_openai_error(response, 502, "bad_gateway")
    assert response.json()["error"]["type"] == "api_error"
    assert response.json()["error"]["message"] == "Upstream unreachable: connection refused"


@implementer(IHostnameResolver)
class _NoSuchHost:
    """A resolver that knows no name at all (so no lookup can leave this machine)."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def resolveHostName(self, receiver: Any, hostName: str, *args: Any, **kwargs: Any) -> IHostResolution:
        self.asked.append(hostName)

        @implementer(IHostResolution)
        class Resolution:
            name = hostName

            def cancel(self) -> None:
                pass

        resolution = Resolution()
        receiver.resolutionBegan(resolution)
        receiver.resolutionComplete()
        return resolution


@implementer(IReactorPluggableNameResolver)
class _ReactorWithResolver:
    """The reactor, but for its name resolver."""

    def __init__(self, reactor: Any, resolver: IHostnameResolver) -> None:
        self._reactor = reactor
        self.nameResolver = resolver

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        raise NotImplementedError

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


@pytest_twisted.ensureDeferred
async def test_dns_failure_is_502(make_proxy: Callable[..., Proxy], raw_connect: Connect) -> None:
    resolver = _NoSuchHost()
    proxy = make_proxy(
        endpoint="https://nonexistent.invalid",
        upstream_reactor=_ReactorWithResolver(get_reactor(), resolver),
    )
    response = await proxy_error(raw_connect, proxy)
    assert_openai_error(response, 502, "bad_gateway")
    assert response.json()["error"]["message"] == "Upstream unreachable: host name lookup failed"
    assert resolver.asked == ["nonexistent.invalid"]


@pytest.fixture(scope="module")
def untrusted(tmp_path_factory: pytest.TempPathFactory) -> ssl.PrivateCertificate:
    """A certificate for 127.0.0.1 from a CA that no trust store knows."""
    key, cert = make_ca("untrusted CA").issue(tmp_path_factory.mktemp("untrusted"), "upstream", 1)
    return ssl.PrivateCertificate.loadPEM(key.read_bytes() + cert.read_bytes())


@pytest_twisted.ensureDeferred
async def test_untrusted_tls_certificate_is_502(
    make_proxy: Callable[..., Proxy], raw_connect: Connect, untrusted: ssl.PrivateCertificate
) -> None:
    upstream = FakeAzure(get_reactor())
    upstream.listen(context_factory=untrusted.options())
    try:
        assert upstream.url.startswith("https://127.0.0.1:")
        proxy = make_proxy(endpoint=upstream.url)
        response = await proxy_error(raw_connect, proxy)
        assert_openai_error(response, 502, "bad_gateway")
        assert response.json()["error"]["message"] == (
            "Upstream unreachable: TLS handshake or certificate failed"
        )
        assert upstream.requests == []
    finally:
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_connect_timeout_is_504(make_proxy: Callable[..., Proxy], raw_connect: Connect) -> None:
    # A listener whose accept queue is full: the kernel drops further SYNs, so connecting hangs.
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.connect(listener.getsockname())
        proxy = make_proxy(endpoint=f"http://127.0.0.1:{listener.getsockname()[1]}", connect_timeout=0.3)
        response = await proxy_error(raw_connect, proxy)
    assert_openai_error(response, 504, "gateway_timeout")
    assert response.json()["error"]["message"] == "Upstream timed out: could not connect within 0.3s"


@pytest_twisted.ensureDeferred
async def test_no_response_headers_in_time_is_504(
    make_proxy: Callable[..., Proxy], raw_connect: Connect, scripted: Callable[..., ScriptedUpstream]
) -> None:
    silent = scripted(lambda conn: None)  # reads the request, never answers
    proxy = make_proxy(endpoint=silent.url, upstream_timeout=0.5)
    response = await proxy_error(raw_connect, proxy)
    assert_openai_error(response, 504, "gateway_timeout")
    assert response.json()["error"]["message"] == "Upstream timed out: no response headers within 0.5s"
    assert len(silent.connections) == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
        b"HTTP/1.1 abc Bad\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header Line\r\n\r\n",
        b"",  # closed without a byte of answer
    ],
)
@pytest_twisted.ensureDeferred
async def test_malformed_or_missing_answer_is_502(
    make_proxy: Callable[..., Proxy],
    raw_connect: Connect,
    scripted: Callable[..., ScriptedUpstream],
    answer: bytes,
) -> None:
    def script(conn: Scripted) -> None:
        assert conn.transport is not None
        conn.transport.write(answer)
        conn.transport.loseConnection()

    upstream = scripted(script)
    proxy = make_proxy(endpoint=upstream.url)
    response = await proxy_error(raw_connect, proxy)
    assert_openai_error(response, 502, "bad_gateway")
    assert response.json()["error"]["message"].startswith("Upstream unreachable: ")


# -- inside the body -------------------------------------------------------------------------


def assert_truncated_chunked(client: RawClient) -> bytes:
    """The response started (200, chunked) and the connection was cut without the 0-chunk."""
    assert client.reason is not None
    head, _, body = client.received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), client.received
    assert b"transfer-encoding: chunked" in head.lower()
    assert not body.endswith(b"0\r\n\r\n"), body
    assert b"\r\n0\r\n" not in body and not body.startswith(b"0\r\n"), body
    return body


@pytest_twisted.ensureDeferred
async def test_stall_mid_stream_aborts_the_client(
    fake: FakeAzure, make_proxy: Callable[..., Proxy], raw_connect: Connect
) -> None:
    fake.hold_last_chunk()
    proxy = make_proxy(upstream_timeout=0.5)
    client = await ask(raw_connect, proxy, stream=True)
    await client.closed
    body = assert_truncated_chunked(client)
    assert b'"delta"' in body  # the events before the stall did arrive
    assert b"[DONE]" not in body
    assert fake.held_streams == 0  # the proxy hung up on the stalled upstream
    fake.release()


def _reset_after(head: bytes, part: bytes) -> Callable[[Scripted], None]:
    def script(conn: Scripted) -> None:
        assert conn.transport is not None
        # Straight to the socket (transport.write would buffer until after the abort), then
        # a reset.
        conn.transport.getHandle().sendall(head + part)  # type: ignore[attr-defined]
        conn.transport.abortConnection()  # type: ignore[attr-defined]

    return script


@pytest_twisted.ensureDeferred
async def test_reset_mid_chunked_stream_aborts_the_client(
    make_proxy: Callable[..., Proxy], raw_connect: Connect, scripted: Callable[..., ScriptedUpstream]
) -> None:
    event = b'data: {"choices": [{"index": 0, "delta": {"content": "x"}}]}\n\n'
    upstream = scripted(
        _reset_after(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"%x\r\n%s\r\n" % (len(event), event),
        )
    )
    proxy = make_proxy(endpoint=upstream.url, idle_timeout=5)
    client = await ask(raw_connect, proxy, stream=True)
    await client.closed
    body = assert_truncated_chunked(client)
    assert event in body


@pytest_twisted.ensureDeferred
async def test_reset_mid_sized_body_leaves_it_visibly_short(
    make_proxy: Callable[..., Proxy], raw_connect: Connect, scripted: Callable[..., ScriptedUpstream]
) -> None:
    upstream = scripted(
        _reset_after(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n",
            b'{"id": "chatcmpl-1", "choices": [',
        )
    )
    proxy = make_proxy(endpoint=upstream.url, idle_timeout=5)
    client = await ask(raw_connect, proxy)
    await client.closed
    head, _, body = client.received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"content-length: 1000" in head.lower()
    assert body == b'{"id": "chatcmpl-1", "choices": ['  # short of its announced length


@pytest_twisted.ensureDeferred
async def test_stall_in_body_without_length_is_not_a_clean_end(
    make_proxy: Callable[..., Proxy], raw_connect: Connect, scripted: Callable[..., ScriptedUpstream]
) -> None:
    # A body delimited by the connection's close: when the proxy gives up on it (idle
    # timeout), it must not end the client's response as if the body were complete.
    def script(conn: Scripted) -> None:
        assert conn.transport is not None
        conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\n")

    upstream = scripted(script)
    proxy = make_proxy(endpoint=upstream.url, upstream_timeout=0.5, idle_timeout=5)
    client = await ask(raw_connect, proxy, stream=True)
    await client.closed
    body = assert_truncated_chunked(client)
    assert b"data: 1\n\n" in body
