"""
TLS interception in this process, over real loopback sockets (SPEC §13): a CONNECT to an
intercepted host is answered 200 and TLS is completed by the proxy with a certificate from
its CA; the requests inside are the API's (converted for Azure, keys, streaming with
backpressure, cancellation); the host is never resolved or dialled; proxy authentication
applies to the CONNECT; the connection inside idles as long as a tunnel and is closed by the
drain; the CA is served at /aoaiproxy/ca.pem.

The client is Twisted's own: a raw TCP connection that sends the CONNECT, reads the 200, then
starts TLS on the same connection, as curl and httpx do after their CONNECT.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import globalLogPublisher

from aoaiproxy import forward
from aoaiproxy.config import LiveConfig, load_config
from aoaiproxy.forward import Forwarder
from aoaiproxy.forward.intercept import CARoute, Interceptor
from aoaiproxy.log import ACCESS_NAMESPACE
from aoaiproxy.resource import ApiResource
from aoaiproxy.site import ProxySite
from aoaiproxy.testing import FakeAzure
from aoaiproxy.upstream import UpstreamClient

from .certs import make_ca
from .rawnet import RawClient, assert_openai_error, connect, parse_response, raw_post, response_done
from .test_streaming import STREAM, dechunk, proxy_stops_reading_upstream

CHAT = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}]}
OPENAI = b"api.openai.com:443"


@attrs.define
class Intercepting:
    """A proxy with interception on, in this process."""

    port: IListeningPort
    live: LiveConfig
    site: ProxySite
    interceptor: Interceptor
    #: Every name resolved and address connected to by the forward proxy.
    dialled: list[str]

    @property
    def number(self) -> int:
        return int(self.port.getHost().port)

    @property
    def ca_pem(self) -> bytes:
        return self.interceptor.authority.pem


@pytest.fixture
def connect_lines() -> Iterator[list[dict[str, Any]]]:
    """The access-line facts of every CONNECT logged meanwhile."""
    seen: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == ACCESS_NAMESPACE and event["access"]["method"] == "CONNECT":
            seen.append(event["access"])

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


@pytest_twisted.async_yield_fixture
async def make_intercepting(fake: FakeAzure, tmp_path: Path) -> AsyncIterator[Callable[..., Intercepting]]:
    """
    C{make_intercepting(toml="", **flags)}: a proxy with C{--intercept} against the fake, its
    CA generated in a temporary state directory; C{toml} is more of the config file.
    """
    from twisted.internet import reactor

    started: list[tuple[IListeningPort, UpstreamClient, Forwarder]] = []

    def make(toml: str = "", **flags: Any) -> Intercepting:
        config_file = tmp_path / f"config-{len(started)}.toml"
        config_file.write_text(f"[intercept]\nenabled = true\n{toml}")
        flags.setdefault("endpoint", fake.url)
        flags.setdefault("state_dir", str(tmp_path / "state"))
        live = LiveConfig(load_config({"config": str(config_file), **flags}, {}))
        dialled: list[str] = []
        tcp = forward.tcp_connector(reactor)

        def resolver(name: str) -> Deferred[list[str]]:
            dialled.append(name)
            return fail(DNSLookupError(name))

        def connector(ip: str, port: int, timeout: float) -> Any:
            dialled.append(f"{ip}:{port}")
            return tcp(ip, port, timeout)

        interceptor = Interceptor.start(live, reactor.seconds)
        upstream = UpstreamClient(reactor)
        forwarder = Forwarder(
            reactor, live, resolver, connector=connector, upstream=upstream, interceptor=interceptor
        )
        site = ProxySite(CARoute(interceptor, ApiResource(live, upstream, reactor)), live, reactor, forwarder)
        port = reactor.listenTCP(0, site.listener(), interface="127.0.0.1")
        started.append((port, upstream, forwarder))
        return Intercepting(port, live, site, interceptor, dialled)

    yield make
    for port, upstream, forwarder in started:
        await port.stopListening()
        forwarder.close()
        await upstream.close()


def connect_head(target: bytes = OPENAI, extra: bytes = b"") -> bytes:
    return b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (target, target, extra)


async def intercepted(
    proxy: Intercepting,
    target: bytes = OPENAI,
    extra: bytes = b"",
    trust: bytes | None = None,
) -> RawClient:
    """
    A client whose CONNECT to C{target} was answered 200, then speaking TLS on that connection
    (trusting C{trust}, by default the proxy's CA; offering h2 and http/1.1 as curl does).
    Its C{received} holds what came inside the TLS.
    """
    client = await connect(proxy.number, connect_head(target, extra))
    head = await client.wait_for(b"\r\n\r\n")
    assert head == b"HTTP/1.1 200 Connection Established\r\n\r\n"
    client.received = b""
    host = target.rpartition(b":")[0].strip(b"[]").decode()
    options = optionsForClientTLS(
        host,
        trustRoot=Certificate.loadPEM(trust or proxy.ca_pem),
        acceptableProtocols=[b"h2", b"http/1.1"],
    )
    client.transport.startTLS(options)  # type: ignore[union-attr]
    return client


def openai_post(path: str, body: Any, key: str | None = "AZURE-KEY") -> bytes:
    """A request as an OpenAI client sends it to https://api.openai.com (Host included)."""
    data = json.dumps(body).encode()
    auth = b"Authorization: Bearer %s\r\n" % key.encode() if key else b""
    return (
        b"POST %s HTTP/1.1\r\nHost: api.openai.com\r\n%sContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (path.encode(), auth, len(data))
    ) + data


# -- the requests inside --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_requests_inside_reach_azure_converted_and_the_host_is_never_dialled(
    fake: FakeAzure, make_intercepting: Callable[..., Intercepting], connect_lines: list[dict[str, Any]]
) -> None:
    from twisted.internet import reactor

    # The default allowlist has api.openai.com:443: were it tunnelled, it would be dialled.
    proxy = make_intercepting()
    assert "api.openai.com:443" in proxy.live.config.forward_allow
    client = await intercepted(proxy)
    for n in range(2):  # keep-alive inside the TLS
        client.received = b""
        client.send(openai_post("/v1/chat/completions", CHAT))
        response = parse_response(await client.wait_for(response_done))
        assert response.status == 200, response
        assert response.json()["object"] == "chat.completion"
        rec = fake.requests[n]
        assert rec.path == "/openai/deployments/gpt-35-turbo/chat/completions"
        assert rec.query["api-version"] == [proxy.live.config.api_version]
        assert rec.header("api-key") == "AZURE-KEY"
        assert rec.header("authorization") is None
    tls: SSL.Connection = client.transport.getHandle()  # type: ignore[union-attr]
    assert tls.get_alpn_proto_negotiated() == b"http/1.1"
    assert tls.get_protocol_version_name() in ("TLSv1.2", "TLSv1.3")
    assert proxy.dialled == []
    await client.abort()
    await proxy.site.connections.wait_closed().addTimeout(10, reactor)
    [line] = connect_lines
    assert (line["path"], line["status"], line.get("error")) == ("api.openai.com:443", 200, None)


@pytest_twisted.ensureDeferred
async def test_a_request_inside_without_a_key_gets_401(
    fake: FakeAzure, make_intercepting: Callable[..., Intercepting]
) -> None:
    proxy = make_intercepting()
    client = await intercepted(proxy)
    client.send(openai_post("/v1/chat/completions", CHAT, key=None))
    assert_openai_error(parse_response(await client.wait_for(response_done)), 401, "missing_api_key")
    assert fake.requests == []
    await client.abort()


@pytest_twisted.ensureDeferred
async def test_hosts_from_the_config_ip_literals_too(
    fake: FakeAzure, make_intercepting: Callable[..., Intercepting]
) -> None:
    """[intercept] hosts: an IP literal gets a certificate for that address (its SAN)."""
    proxy = make_intercepting("hosts = ['127.0.0.2:8443']\n", forward_allow=["none"])
    client = await intercepted(proxy, b"127.0.0.2:8443")
    client.send(openai_post("/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"}))
    response = parse_response(await client.wait_for(response_done))
    assert response.status == 200, response
    assert fake.requests[0].path == "/openai/deployments/text-embedding-3-small/embeddings"
    assert proxy.dialled == []
    await client.abort()


@pytest_twisted.ensureDeferred
async def test_other_ports_of_the_host_are_not_intercepted(
    make_intercepting: Callable[..., Intercepting],
) -> None:
    proxy = make_intercepting(forward_allow=["none"])
    client = await connect(proxy.number, connect_head(b"api.openai.com:8443"))
    assert_openai_error(parse_response(await client.wait_for(response_done)), 403, "forward_not_allowed")
    await client.abort()


@pytest_twisted.ensureDeferred
async def test_proxy_authentication_applies_to_the_connect(
    fake: FakeAzure, make_intercepting: Callable[..., Intercepting], tmp_path: Path
) -> None:
    users = tmp_path / "users"
    users.write_text("alice:secret\n")
    proxy = make_intercepting(forward_users=str(users))
    refused = await connect(proxy.number, connect_head())
    response = parse_response(await refused.wait_for(response_done))
    assert_openai_error(response, 407, "proxy_authentication_required")
    assert response.headers[b"proxy-authenticate"] == b'Basic realm="aoaiproxy"'
    await refused.abort()
    client = await intercepted(proxy, extra=b"Proxy-Authorization: Basic YWxpY2U6c2VjcmV0\r\n")
    client.send(openai_post("/v1/chat/completions", CHAT))
    assert parse_response(await client.wait_for(response_done)).status == 200
    assert fake.requests[0].header("proxy-authorization") is None
    await client.abort()


@pytest_twisted.ensureDeferred
async def test_a_client_that_does_not_trust_the_ca_fails_and_the_proxy_serves_on(
    fake: FakeAzure, make_intercepting: Callable[..., Intercepting], connect_lines: list[dict[str, Any]]
) -> None:
    from twisted.internet import reactor

    proxy = make_intercepting()
    client = await intercepted(proxy, trust=make_ca("not the proxy's").pem)
    client.send(openai_post("/v1/chat/completions", CHAT))
    await client.closed
    assert client.reason is not None and client.reason.check(SSL.Error), client.reason
    assert client.received == b""
    assert fake.requests == []
    health = await connect(proxy.number, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert parse_response(await health.wait_for(response_done)).status == 200
    await health.abort()
    # The refused connection is gone from the site's count (as is the health check's), and
    # its CONNECT's access line says why it carried nothing.
    await health.closed
    await proxy.site.connections.wait_closed().addTimeout(10, reactor)
    [line] = connect_lines
    assert (line["status"], line["error"]) == (200, "tls_handshake_failed")


# -- streaming ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_stream_inside_has_backpressure(
    fake: FakeAzure, make_intercepting: Callable[..., Intercepting]
) -> None:
    from twisted.internet import reactor

    proxy = make_intercepting()
    fake.big_stream_bytes = 64 * 1024 * 1024
    client = await intercepted(proxy)
    client.send(openai_post("/v1/chat/completions", STREAM))
    await client.wait_for(b"\r\n\r\n")
    client.transport.pauseProducing()  # type: ignore[union-attr]
    await proxy_stops_reading_upstream(fake)
    assert fake.bytes_sent < 24 * 1024 * 1024, fake.bytes_sent
    closed = fake.wait_connection_closed()
    client.transport.abortConnection()  # type: ignore[union-attr]
    await closed.addTimeout(10, reactor)


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_a_stream_inside_cancels_the_upstream(
    fake: FakeAzure, make_intercepting: Callable[..., Intercepting]
) -> None:
    from twisted.internet import reactor

    proxy = make_intercepting()
    fake.hold_last_chunk()
    client = await intercepted(proxy)
    client.send(openai_post("/v1/chat/completions", STREAM))
    await client.wait_for(b"chunk0 ")
    assert fake.open_connections == 1
    closed = fake.wait_connection_closed()
    client.transport.abortConnection()  # type: ignore[union-attr]
    await closed.addTimeout(5, reactor)
    assert fake.open_connections == 0


# -- timeouts and the drain -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_connection_inside_idles_as_long_as_a_tunnel(
    make_intercepting: Callable[..., Intercepting],
) -> None:
    """With a long keep-alive idle timeout and a short tunnel one, the short one closes it."""
    from twisted.internet import reactor

    proxy = make_intercepting(idle_timeout="300", tunnel_idle_timeout="0.5")
    client = await intercepted(proxy)
    client.send(b"GET /healthz HTTP/1.1\r\nHost: api.openai.com\r\n\r\n")
    assert parse_response(await client.wait_for(response_done)).status == 200
    await client.closed.addTimeout(10, reactor)
    await proxy.site.connections.wait_closed().addTimeout(10, reactor)


@pytest_twisted.ensureDeferred
async def test_drain_closes_idle_intercepted_connections_and_lets_streams_finish(
    fake: FakeAzure, make_intercepting: Callable[..., Intercepting]
) -> None:
    from twisted.internet import reactor

    proxy = make_intercepting()
    idle = await intercepted(proxy)
    idle.send(b"GET /healthz HTTP/1.1\r\nHost: api.openai.com\r\n\r\n")
    await idle.wait_for(response_done)
    fake.hold_last_chunk()
    streaming = await intercepted(proxy)
    streaming.send(openai_post("/v1/chat/completions", STREAM))
    await streaming.wait_for(b"chunk0 ")
    # Two CONNECTs, each with a connection inside: all four are counted for the drain.
    assert len(proxy.site.connections.open) == 4
    drained = proxy.site.connections.drain(reactor, 30)
    await idle.closed.addTimeout(10, reactor)  # idle: closed at once
    assert streaming.reason is None and not drained.called
    fake.release()
    raw = await streaming.wait_for(lambda got: got.endswith(b"0\r\n\r\n"))
    assert dechunk(raw).endswith(b"data: [DONE]\n\n")
    await streaming.closed.addTimeout(10, reactor)  # then closed, its stream complete
    assert await drained.addTimeout(10, reactor) == 0  # nothing had to be cut


# -- the CA certificate, served -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_ca_certificate_is_served_to_anyone(make_intercepting: Callable[..., Intercepting]) -> None:
    proxy = make_intercepting()

    async def ask(request: bytes, done: Callable[[bytes], bool] = response_done) -> bytes:
        client = await connect(proxy.number, request)
        raw = await client.wait_for(done)
        await client.abort()
        return raw

    got = parse_response(await ask(b"GET /aoaiproxy/ca.pem HTTP/1.1\r\nHost: proxy\r\n\r\n"))
    assert got.status == 200
    assert got.headers[b"content-type"] == b"application/x-pem-file"
    assert got.headers[b"access-control-allow-origin"] == b"*"
    assert got.body == proxy.ca_pem and got.body.startswith(b"-----BEGIN CERTIFICATE-----")
    head = await ask(
        b"HEAD /aoaiproxy/ca.pem HTTP/1.1\r\nHost: proxy\r\n\r\n", lambda got: b"\r\n\r\n" in got
    )
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    assert b"Content-Length: %d\r\n" % len(proxy.ca_pem) in head
    post = parse_response(await ask(raw_post("/aoaiproxy/ca.pem", {})))
    assert_openai_error(post, 405, "method_not_allowed")
    assert post.headers[b"allow"] == b"GET, HEAD"
    # Every other path is the API's.
    other = parse_response(await ask(b"GET /aoaiproxy/other HTTP/1.1\r\nHost: proxy\r\n\r\n"))
    assert_openai_error(other, 404, "unknown_url")
