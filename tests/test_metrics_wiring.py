"""
The metrics a running proxy records (SPEC §14), in this process on real loopback sockets:
one C{request_done} per access line (route, model, status, duration, time to first byte),
token usage from JSON bodies and streams (and the include_usage rewrite a client never sees),
the open connections, streams and tunnels, and tunnel bytes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.web import server
from twisted.web.resource import Resource

from aoaiproxy.config import LiveConfig, load_config
from aoaiproxy.forward import Forwarder
from aoaiproxy.metrics import Metrics
from aoaiproxy.resource import ApiResource
from aoaiproxy.site import ProxySite
from aoaiproxy.testing import FakeAzure
from aoaiproxy.testing.sse import FILTER_FRAME, completion_events
from aoaiproxy.testing.usage import count_tokens, prompt_tokens
from aoaiproxy.upstream import UpstreamClient

from .conftest import Events, get_reactor, wait_until
from .rawnet import RawClient, Scripted, ScriptedUpstream, connect, raw_post

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "say hello to the proxy"}]}
STREAM = {**CHAT, "stream": True}
ASKING = {**STREAM, "stream_options": {"include_usage": True}}
CHAT_ROUTE = "/v1/chat/completions"
#: What the fake answers a chat request (not streamed): its completion tokens.
ANSWER_TOKENS = count_tokens("Hello from fake Azure (gpt-4o)")


@attrs.define
class Metered:
    """A proxy in this process with metrics on."""

    port: IListeningPort
    site: ProxySite
    upstream: UpstreamClient
    forwarder: Forwarder
    metrics: Metrics
    clients: list[RawClient] = attrs.field(factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"

    def value(self, name: str, **labels: str) -> float:
        """A sample's value (0 when it was never recorded)."""
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def requests(self, route: str, status: int, model: str = "", backend: str | None = None) -> float:
        # A request with a model was sent to a backend: the one-backend form's is "default".
        if backend is None:
            backend = "default" if model else ""
        labels = {"route": route, "model": model, "backend": backend, "status": str(status)}
        return self.value("aoaiproxy_requests_total", **labels)

    def tokens(self, model: str, kind: str, client: str = "anonymous") -> float:
        labels = {"model": model, "backend": "default", "client": client, "type": kind}
        return self.value("aoaiproxy_tokens_total", **labels)

    async def connect(self, first: bytes = b"") -> RawClient:
        client = await connect(self.port.getHost().port, first)
        self.clients.append(client)
        return client


@pytest_twisted.async_yield_fixture
async def make_metered(fake: FakeAzure) -> AsyncIterator[Callable[..., Metered]]:
    """C{make_metered(site_reactor=None, **flags)}: a proxy with a L{Metrics} recorder."""
    reactor = get_reactor()
    started: list[Metered] = []

    def make(site_reactor: Any = None, **flags: Any) -> Metered:
        flags.setdefault("endpoint", fake.url)
        live = LiveConfig(load_config(flags, {}))
        metrics = Metrics(process_metrics=False)
        upstream = UpstreamClient(reactor)
        forwarder = Forwarder(reactor, live, upstream=upstream, recorder=metrics)
        resource = ApiResource(live, upstream, reactor, recorder=metrics)
        site = ProxySite(resource, live, site_reactor or reactor, forwarder, recorder=metrics)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        proxy = Metered(port, site, upstream, forwarder, metrics)
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.forwarder.close()
        for client in proxy.clients:
            await client.abort()
        await proxy.port.stopListening()
        await proxy.upstream.close()


async def post(client: HTTPClient, proxy: Metered, path: str, body: Any, key: str = "k") -> tuple[int, bytes]:
    response = await client.post(proxy.url + path, json=body, headers={"Authorization": f"Bearer {key}"})
    return response.code, await response.content()


def fake_stream(fake: FakeAzure, received: bytes, body: dict[str, Any], *, include_usage: bool) -> bytes:
    """
    The chat stream the fake sends for C{body} (L{completion_events}: its exact bytes), with
    the id and time C{received} shows, without Azure's filter-only frame (the proxy drops it).
    """
    first = json.loads(received.split(b"\n\n", 1)[0].removeprefix(b"data: "))
    events = completion_events(
        fake,
        completion_id=first["id"],
        created=first["created"],
        deployment=first["model"],
        chat=True,
        include_usage=include_usage,
        prompt=prompt_tokens(body),
    )
    return b"".join(e for e in events if isinstance(e, bytes) and e != FILTER_FRAME)


# -- requests and tokens ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_requests_and_tokens_are_counted_once_each(
    fake: FakeAzure, make_metered: Callable[..., Metered], client: HTTPClient, events: Events
) -> None:
    proxy = make_metered()
    prompt = prompt_tokens(CHAT)
    for _ in range(2):
        assert (await post(client, proxy, CHAT_ROUTE, CHAT))[0] == 200
    status, _ = await post(client, proxy, CHAT_ROUTE, STREAM)
    assert status == 200
    status, _ = await post(client, proxy, CHAT_ROUTE, ASKING)
    assert status == 200
    embed = {"model": "ada", "input": ["one two", "three"]}
    assert (await post(client, proxy, "/v1/embeddings", embed))[0] == 200
    responses = {"model": "gpt-4o", "input": "four words of input", "stream": True}
    assert (await post(client, proxy, "/v1/responses", responses))[0] == 200
    logged = await events.access(6)

    assert proxy.requests(CHAT_ROUTE, 200, "gpt-4o") == 4
    assert proxy.requests("/v1/embeddings", 200, "ada") == 1
    assert proxy.requests("/v1/responses", 200, "gpt-4o") == 1
    chunks = fake.stream_chunks  # one token each
    assert proxy.tokens("gpt-4o", "prompt") == 4 * prompt + prompt_tokens(responses)
    assert proxy.tokens("gpt-4o", "completion") == 2 * ANSWER_TOKENS + 2 * chunks + chunks
    assert proxy.tokens("ada", "prompt") == 3
    assert proxy.tokens("ada", "completion") == 0
    chat = {"route": CHAT_ROUTE, "model": "gpt-4o", "backend": "default"}
    assert proxy.value("aoaiproxy_request_duration_seconds_count", **chat) == 4
    assert proxy.value("aoaiproxy_time_to_first_byte_seconds_count", **chat) == 4
    assert proxy.value("aoaiproxy_open_streams") == 0
    # The access lines carry the same usage.
    assert f"prompt_tokens={prompt} completion_tokens={ANSWER_TOKENS}" in logged[0]
    assert f"prompt_tokens={prompt} completion_tokens={chunks}" in logged[2]
    assert "prompt_tokens=3 completion_tokens=0" in logged[4]
    assert "client_name" not in logged[0]  # no client keys


@pytest_twisted.ensureDeferred
async def test_a_stream_whose_client_did_not_ask_is_what_the_fake_sends_without_usage(
    fake: FakeAzure, make_metered: Callable[..., Metered], client: HTTPClient
) -> None:
    proxy = make_metered()
    status, received = await post(client, proxy, CHAT_ROUTE, STREAM)
    assert status == 200
    # Azure was asked for the usage ...
    assert json.loads(fake.requests[-1].body)["stream_options"] == {"include_usage": True}
    assert fake.requests[-1].header("accept-encoding") == "identity"
    # ... and the client got every byte it would have got without it.
    assert received == fake_stream(fake, received, STREAM, include_usage=False)
    assert b'"usage"' not in received
    assert proxy.tokens("gpt-4o", "completion") == fake.stream_chunks


@pytest_twisted.ensureDeferred
async def test_a_client_that_asked_gets_the_usage_unchanged(
    fake: FakeAzure, make_metered: Callable[..., Metered], client: HTTPClient
) -> None:
    proxy = make_metered()
    sent = json.dumps({**ASKING, "stream_options": {"include_usage": True, "x": 1}}).encode()
    response = await client.post(
        proxy.url + CHAT_ROUTE,
        data=sent,
        headers={"Authorization": "Bearer k", "Content-Type": "application/json"},
    )
    received = await response.content()
    assert fake.requests[-1].body == sent  # the client's bytes, untouched
    assert received == fake_stream(fake, received, ASKING, include_usage=True)
    assert b'"usage":{"prompt_tokens"' in received
    assert proxy.tokens("gpt-4o", "prompt") == prompt_tokens(ASKING)


@pytest_twisted.ensureDeferred
async def test_kept_filter_frames_and_the_usage_removed(
    fake: FakeAzure, make_metered: Callable[..., Metered], client: HTTPClient
) -> None:
    proxy = make_metered(keep_filter_frames=True)
    status, received = await post(client, proxy, CHAT_ROUTE, STREAM)
    assert status == 200
    assert received.startswith(FILTER_FRAME)
    assert received[len(FILTER_FRAME) :] == fake_stream(
        fake, received[len(FILTER_FRAME) :], STREAM, include_usage=False
    )
    assert proxy.tokens("gpt-4o", "completion") == fake.stream_chunks


@pytest_twisted.ensureDeferred
async def test_errors_and_local_answers_are_counted_without_tokens(
    fake: FakeAzure, make_metered: Callable[..., Metered], client: HTTPClient, events: Events
) -> None:
    proxy = make_metered()
    fake.rate_limit_next()
    status, _ = await post(client, proxy, CHAT_ROUTE, STREAM)
    assert status == 429
    assert (await client.get(proxy.url + "/healthz")).code == 200
    response = await client.get(proxy.url + "/metrics")
    assert response.code == 404  # metrics are never on the API's port
    assert (await client.post(proxy.url + "/v1/chat/completions", json=CHAT)).code == 401
    logged = await events.access(4)
    assert proxy.requests(CHAT_ROUTE, 429, "gpt-4o") == 1
    assert proxy.requests("/healthz", 200) == 1
    assert proxy.requests("other", 404) == 1
    assert proxy.requests(CHAT_ROUTE, 401) == 1
    assert proxy.tokens("gpt-4o", "prompt") == 0
    assert all("prompt_tokens" not in line for line in logged)
    assert proxy.value("aoaiproxy_open_streams") == 0


@pytest_twisted.ensureDeferred
async def test_time_to_first_byte_is_the_first_chunk(make_metered: Callable[..., Metered]) -> None:
    """Timed on the site's clock: the head and first chunk at 2 s, the end at 5 s."""
    clock = Clock()
    upstreams: list[Scripted] = []
    scripted = ScriptedUpstream(upstreams.append)
    try:
        proxy = make_metered(site_reactor=clock, endpoint=scripted.url)
        client = await proxy.connect(raw_post(CHAT_ROUTE, STREAM))
        await wait_until(lambda: bool(upstreams), "the upstream request")
        clock.advance(2)
        assert upstreams[0].transport is not None
        upstreams[0].transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
            b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
        )
        await client.wait_for(b'"hi"')
        await wait_until(lambda: proxy.value("aoaiproxy_open_streams") == 1, "the stream counted")
        clock.advance(3)
        upstreams[0].transport.write(b"data: [DONE]\n\n")
        upstreams[0].transport.loseConnection()
        await client.wait_for(b"0\r\n\r\n")
    finally:
        await scripted.stop()
    chat = {"route": CHAT_ROUTE, "model": "gpt-4o", "backend": "default"}
    assert proxy.value("aoaiproxy_time_to_first_byte_seconds_sum", **chat) == 2.0
    assert proxy.value("aoaiproxy_request_duration_seconds_sum", **chat) == 5.0
    assert proxy.value("aoaiproxy_open_streams") == 0


# -- connections, tunnels, forward ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_open_connections(make_metered: Callable[..., Metered]) -> None:
    proxy = make_metered()
    first = await proxy.connect()
    second = await proxy.connect()
    await wait_until(lambda: proxy.value("aoaiproxy_open_connections") == 2, "two connections")
    await first.abort()
    await second.abort()
    await wait_until(lambda: proxy.value("aoaiproxy_open_connections") == 0, "none")


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        return b"hello"


@pytest_twisted.ensureDeferred
async def test_tunnels_and_forwarded_requests(make_metered: Callable[..., Metered], events: Events) -> None:
    reactor = get_reactor()
    echo = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
    web = reactor.listenTCP(0, server.Site(Hello()), interface="127.0.0.1")
    try:
        echo_at = f"127.0.0.1:{echo.getHost().port}"
        web_at = f"127.0.0.1:{web.getHost().port}"
        proxy = make_metered(forward_allow=[echo_at, web_at])
        tunnel = await proxy.connect(b"CONNECT %s HTTP/1.1\r\nHost: x\r\n\r\n" % echo_at.encode())
        await tunnel.wait_for(b"\r\n\r\n")
        await wait_until(lambda: proxy.value("aoaiproxy_open_tunnels") == 1, "the tunnel counted")
        tunnel.send(b"x" * 1000)
        await tunnel.wait_for(lambda received: received.count(b"x") == 1000)
        tunnel.send(b"y" * 500)
        await tunnel.wait_for(lambda received: received.count(b"y") == 500)
        await tunnel.abort()
        forwarded = await proxy.connect(b"GET http://%s/ HTTP/1.1\r\nHost: x\r\n\r\n" % web_at.encode())
        await forwarded.wait_for(b"hello")
        await events.access(2)
    finally:
        await echo.stopListening()
        await web.stopListening()
    assert proxy.requests("CONNECT", 200) == 1
    assert proxy.requests("forward", 200) == 1
    assert proxy.value("aoaiproxy_tunnel_bytes_total", direction="up") == 1500
    assert proxy.value("aoaiproxy_tunnel_bytes_total", direction="down") == 1500
    assert proxy.value("aoaiproxy_open_tunnels") == 0


# -- client names -----------------------------------------------------------------------------


def keys(tmp_path: Path) -> str:
    path = tmp_path / "client-keys"
    path.write_text("alice:sk-alice-1\nbob:sk-bob-2\n")
    return str(path)


@pytest_twisted.ensureDeferred
async def test_tokens_by_client_name(
    make_metered: Callable[..., Metered], client: HTTPClient, events: Events, tmp_path: Path
) -> None:
    proxy = make_metered(token="server-key", client_keys=keys(tmp_path))
    await post(client, proxy, CHAT_ROUTE, CHAT, key="sk-alice-1")
    await post(client, proxy, CHAT_ROUTE, STREAM, key="sk-bob-2")
    await post(client, proxy, CHAT_ROUTE, CHAT, key="sk-nobody")
    logged = await events.access(3)
    prompt = prompt_tokens(CHAT)
    assert proxy.tokens("gpt-4o", "prompt", "alice") == prompt
    assert proxy.tokens("gpt-4o", "completion", "bob") == 3
    assert proxy.tokens("gpt-4o", "prompt", "anonymous") == 0
    assert proxy.requests(CHAT_ROUTE, 401) == 1
    assert logged[0].endswith("client_name=alice")
    assert logged[1].endswith("client_name=bob")
    assert "client_name" not in logged[2]  # an unknown key: 401, no name
    assert "sk-" not in "\n".join(logged)
