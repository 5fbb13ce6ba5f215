"""
The upstream client is a transparent proxy client: no cookie jar shared between clients, no
redirect followed, Accept-Encoding and compressed bodies untouched, one pool, and one retry
when a pooled connection turns out stale before any response byte.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Callable
from typing import Any

import attrs
import pytest_twisted
from twisted.internet.protocol import Factory, Protocol
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from aoaiproxy.testing import FakeAzure

from .conftest import Proxy, get_reactor

CHAT = json.dumps({"model": "gpt-4o", "messages": []}).encode()


@attrs.frozen
class Answer:
    code: int
    headers: Headers
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def chat(proxy: Proxy, headers: dict[str, str] | None = None) -> Answer:
    """
    POST through the proxy with a plain Agent: a fresh client with no cookie jar, no
    redirect following and no decoding of its own (treq would decode gzip), so what the
    test sees is what the proxy sent.
    """
    h = Headers({"Authorization": ["Bearer k"], "Content-Type": ["application/json"]})
    for name, value in (headers or {}).items():
        h.setRawHeaders(name, [value])
    agent = Agent(get_reactor(), pool=HTTPConnectionPool(get_reactor(), persistent=False))
    url = (proxy.url + "/v1/chat/completions").encode()
    response = await agent.request(b"POST", url, h, FileBodyProducer(io.BytesIO(CHAT)))
    return Answer(response.code, response.headers, await readBody(response))


@pytest_twisted.ensureDeferred
async def test_no_cookie_is_kept_between_clients(fake: FakeAzure, make_proxy: Callable[..., Proxy]) -> None:
    proxy = make_proxy()
    fake.respond_next(200, {"ok": 1}, {"set-cookie": "session=alice-secret; Path=/"})
    r = await chat(proxy)
    assert r.headers.getRawHeaders("set-cookie") == ["session=alice-secret; Path=/"]
    await chat(proxy)
    assert fake.requests[1].header("cookie") is None


@pytest_twisted.ensureDeferred
async def test_redirects_reach_the_client(fake: FakeAzure, make_proxy: Callable[..., Proxy]) -> None:
    proxy = make_proxy()
    fake.respond_next(302, b"", {"location": "http://127.0.0.1:1/elsewhere"})
    r = await chat(proxy)
    assert r.code == 302
    assert r.headers.getRawHeaders("location") == ["http://127.0.0.1:1/elsewhere"]
    assert len(fake.requests) == 1


@pytest_twisted.ensureDeferred
async def test_accept_encoding_and_compressed_bodies_untouched(
    fake: FakeAzure, make_proxy: Callable[..., Proxy]
) -> None:
    proxy = make_proxy()
    compressed = gzip.compress(b'{"compressed": true}')
    fake.respond_next(200, compressed, {"content-encoding": "gzip"})
    r = await chat(proxy, {"Accept-Encoding": "gzip, br"})
    assert r.headers.getRawHeaders("content-encoding") == ["gzip"]
    assert r.body == compressed
    assert fake.requests[0].headers["accept-encoding"] == ["gzip, br"]
    await chat(proxy)
    assert "accept-encoding" not in fake.requests[1].headers


class DropsSecondRequest(Protocol):
    """Answers the first request with keep-alive, then closes on the next without answering:
    what a pooled connection that went stale looks like to the proxy."""

    connections: list[int]

    def connectionMade(self) -> None:
        self.seen = 0
        self.connections.append(0)

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" not in data:
            return
        self.seen += 1
        self.connections[-1] = self.seen
        if self.seen == 2 and len(self.connections) == 1:
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        body = b'{"n": %d}' % len(self.connections)
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )


@pytest_twisted.ensureDeferred
async def test_stale_pooled_connection_is_retried_once(make_proxy: Callable[..., Proxy]) -> None:
    connections: list[int] = []

    def build() -> Protocol:
        p = DropsSecondRequest()
        p.connections = connections
        return p

    port = get_reactor().listenTCP(0, Factory.forProtocol(build), interface="127.0.0.1")
    try:
        proxy = make_proxy(endpoint=f"http://127.0.0.1:{port.getHost().port}")
        r = await chat(proxy)
        assert (r.code, r.json()) == (200, {"n": 1})
        # The pooled connection is reused, dropped without an answer, and the proxy retries
        # on a new connection: the client sees one clean answer.
        r = await chat(proxy)
        assert (r.code, r.json()) == (200, {"n": 2})
        assert connections == [2, 1]
    finally:
        await proxy.upstream.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_fresh_connection_closed_without_answer_is_502_not_retried(
    make_proxy: Callable[..., Proxy],
) -> None:
    connections: list[int] = []

    class Hangup(Protocol):
        def connectionMade(self) -> None:
            connections.append(1)

        def dataReceived(self, data: bytes) -> None:
            self.transport.loseConnection()  # type: ignore[union-attr]

    port = get_reactor().listenTCP(0, Factory.forProtocol(Hangup), interface="127.0.0.1")
    try:
        proxy = make_proxy(endpoint=f"http://127.0.0.1:{port.getHost().port}")
        r = await chat(proxy)
        assert r.code == 502
        assert r.json()["error"]["type"] == "api_error"
        assert connections == [1]
    finally:
        await port.stopListening()
