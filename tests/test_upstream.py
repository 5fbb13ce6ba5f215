"""
The upstream client is a transparent proxy client: no cookie jar shared between clients, no
redirect followed, Accept-Encoding and compressed bodies untouched, one pool, and one retry
when a pooled connection turns out stale before any response byte.  Then the client itself
against scripted upstreams: framing (sized, chunked, close-delimited, no body), 1xx, the
headers it keeps out, the limits on a response head, request bodies from files, cancel,
backpressure and TLS verification.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import IO, Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import ssl
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionRefusedError, UserError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport, SynchronousResolver
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    FileBodyProducer,
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
    readBody,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

from aoaiproxy.errors import ProxyError
from aoaiproxy.testing import FakeAzure
from aoaiproxy.upstream import UpstreamClient
from aoaiproxy.upstream.client import parse_target
from aoaiproxy.upstream.protocol import HTTP11Connection

from .certs import make_ca
from .conftest import Proxy, get_reactor
from .rawnet import BodyReader
from .test_streaming import proxy_stops_reading_upstream

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


# -- the client itself, against scripted upstreams on loopback ------------------------------------

URL_PATH = b"/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"


@attrs.define
class Received:
    """One request as the upstream received it."""

    head: bytes
    body: bytes

    def header(self, name: bytes) -> list[bytes]:
        lines = self.head.split(b"\r\n")[1:]
        return [line.partition(b":")[2].strip() for line in lines if line.partition(b":")[0].lower() == name]


class Served(Protocol):
    """An upstream connection: splits what arrives into requests (sized bodies) and hands
    each to its server's C{answer(conn, request)}."""

    def __init__(self, server: Upstream) -> None:
        self.server = server
        self.buffer = b""
        self.requests: list[Received] = []
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.server.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            lengths = Received(head, b"").header(b"content-length")
            size = int(lengths[0]) if lengths else 0
            if len(rest) < size:
                return
            self.buffer = rest[size:]
            request = Received(head, rest[:size])
            self.requests.append(request)
            self.server.requests.append(request)
            self.server.answer(self, request)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(None)


class Upstream:
    """A loopback HTTP server whose answers a test scripts: C{answer(conn, request)}; over
    TLS with C{tls} (a server context factory)."""

    def __init__(
        self, answer: Callable[[Served, Received], None], protocol: type[Served] = Served, tls: Any = None
    ) -> None:
        self.answer = answer
        self.connections: list[Served] = []
        self.requests: list[Received] = []
        factory = Factory.forProtocol(lambda: protocol(self))
        if tls is None:
            self.port = get_reactor().listenTCP(0, factory, interface="127.0.0.1")
        else:
            self.port = get_reactor().listenSSL(0, factory, tls, interface="127.0.0.1")
        self.scheme = b"http" if tls is None else b"https"

    @property
    def url(self) -> bytes:
        return b"%s://127.0.0.1:%d" % (self.scheme, self.port.getHost().port)

    async def stop(self) -> None:
        await self.port.stopListening()
        for conn in self.connections:
            if conn.transport is not None and not conn.closed.called:
                conn.transport.abortConnection()  # type: ignore[attr-defined]
                await conn.closed


def sized(body: bytes, status: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s" % (
        status,
        extra,
        len(body),
        body,
    )


def chunked(*pieces: bytes) -> bytes:
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunks
        + b"0\r\n\r\n"
    )


@pytest_twisted.async_yield_fixture
async def upstream_client() -> AsyncIterator[UpstreamClient]:
    client = UpstreamClient(get_reactor())
    yield client
    await client.close()


@pytest_twisted.async_yield_fixture
async def serve() -> AsyncIterator[Callable[..., Upstream]]:
    servers: list[Upstream] = []

    def make(
        answer: Callable[[Served, Received], None], protocol: type[Served] = Served, tls: Any = None
    ) -> Upstream:
        servers.append(Upstream(answer, protocol, tls))
        return servers[-1]

    yield make
    for server in servers:
        await server.stop()


def send(
    client: UpstreamClient,
    server: Upstream,
    method: bytes = b"POST",
    body: bytes | IO[bytes] | None = CHAT,
    headers: Sequence[tuple[bytes, bytes]] = ((b"Content-Type", b"application/json"),),
    header_timeout: float = 20,
) -> Deferred[IResponse]:
    return client.request(
        method, server.url + URL_PATH, headers, body, connect_timeout=5, header_timeout=header_timeout
    )


async def body_of(response: IResponse) -> BodyReader:
    """The whole body, read until the response says it ended (see the reader's C{reason})."""
    reader = BodyReader()
    response.deliverBody(reader)
    await reader.done.addTimeout(10, get_reactor())
    return reader


def answer_each(*answers: bytes) -> Callable[[Served, Received], None]:
    """Answer the Nth request received (over all connections) with C{answers[N]}."""

    def answer(conn: Served, request: Received) -> None:
        conn.write(answers[len(conn.server.requests) - 1])

    return answer


@pytest_twisted.ensureDeferred
async def test_one_connection_carries_sized_chunked_and_empty_responses(
    upstream_client: UpstreamClient, serve: Callable[..., Upstream]
) -> None:
    server = serve(
        answer_each(
            sized(b'{"a": 1}'),
            chunked(b"data: 1\n\n", b"data: [DONE]\n\n"),
            b"HTTP/1.1 204 No Content\r\n\r\n",
            sized(b'{"b": 2}'),
        )
    )
    r = await send(upstream_client, server)
    assert (r.code, r.length, (await body_of(r)).data) == (200, 8, b'{"a": 1}')
    r = await send(upstream_client, server)
    reader = await body_of(r)
    assert (r.code, r.length, reader.data) == (200, UNKNOWN_LENGTH, b"data: 1\n\ndata: [DONE]\n\n")
    assert reader.reason is not None and reader.reason.check(ResponseDone)
    r = await send(upstream_client, server, b"DELETE", None)
    assert (r.code, r.length) == (204, 0)
    r = await send(upstream_client, server, b"GET", None)
    assert (await body_of(r)).data == b'{"b": 2}'
    assert len(server.connections) == 1
    assert [req.head.split(b"\r\n")[0] for req in server.requests] == [
        b"POST " + URL_PATH + b" HTTP/1.1",
        b"POST " + URL_PATH + b" HTTP/1.1",
        b"DELETE " + URL_PATH + b" HTTP/1.1",
        b"GET " + URL_PATH + b" HTTP/1.1",
    ]
    first = server.requests[0]
    assert first.header(b"host") == [server.url[len(b"http://") :]]
    assert first.header(b"content-length") == [b"%d" % len(CHAT)] and first.body == CHAT
    assert server.requests[2].header(b"content-length") == []


@pytest_twisted.ensureDeferred
async def test_close_delimited_body(upstream_client: UpstreamClient, serve: Callable[..., Upstream]) -> None:
    def answer(conn: Served, request: Received) -> None:
        if len(conn.server.requests) == 1:
            conn.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
            conn.transport.loseConnection()  # type: ignore[union-attr]
        else:
            conn.write(sized(b"{}"))

    server = serve(answer)
    r = await send(upstream_client, server)
    reader = await body_of(r)
    assert (r.length, reader.data) == (UNKNOWN_LENGTH, b"until the end")
    # As twisted.web.client reports it: the end cannot be told from a cut.
    assert reader.reason is not None and reader.reason.check(PotentialDataLoss)
    r = await send(upstream_client, server)
    assert (await body_of(r)).data == b"{}"
    assert len(server.connections) == 2


@pytest_twisted.ensureDeferred
async def test_reset_inside_a_close_delimited_body_is_a_failure(
    upstream_client: UpstreamClient, serve: Callable[..., Upstream]
) -> None:
    def answer(conn: Served, request: Received) -> None:
        conn.transport.getHandle().sendall(b"HTTP/1.1 200 OK\r\n\r\npart")  # type: ignore[union-attr]
        conn.transport.abortConnection()  # type: ignore[union-attr]

    r = await send(upstream_client, serve(answer))
    reader = await body_of(r)
    assert reader.data == b"part"
    assert reader.reason is not None and reader.reason.check(ResponseFailed)


@pytest_twisted.ensureDeferred
async def test_no_body_for_head_204_and_304(
    upstream_client: UpstreamClient, serve: Callable[..., Upstream]
) -> None:
    server = serve(
        answer_each(
            # A HEAD response's Content-Length describes the entity; no body follows it.
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
            sized(b"after"),
        )
    )
    r = await send(upstream_client, server, b"HEAD", None)
    reader = await body_of(r)
    assert (r.code, r.length, r.headers.getRawHeaders(b"content-length"), reader.data) == (
        200,
        0,
        [b"5"],
        b"",
    )
    for code in (204, 304):
        r = await send(upstream_client, server, b"GET", None)
        reader = await body_of(r)
        assert (r.code, r.length, reader.data) == (code, 0, b"")
        assert reader.reason is not None and reader.reason.check(ResponseDone)
    # The 204 and 304 were not followed by five body bytes: the next answer is read right.
    r = await send(upstream_client, server, b"GET", None)
    assert (await body_of(r)).data == b"after"


@pytest_twisted.ensureDeferred
async def test_informational_responses_are_skipped(
    upstream_client: UpstreamClient, serve: Callable[..., Upstream]
) -> None:
    server = serve(
        answer_each(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + sized(b"{}")
        )
    )
    r = await send(upstream_client, server)
    assert (r.code, r.headers.getRawHeaders(b"link"), (await body_of(r)).data) == (200, None, b"{}")


@pytest_twisted.ensureDeferred
async def test_connection_control_headers_and_those_connection_lists_are_not_relayed(
    upstream_client: UpstreamClient, serve: Callable[..., Upstream]
) -> None:
    server = serve(
        answer_each(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop-Secret\r\nConnection: x-other\r\n"
            b"X-Hop-Secret: s\r\nX-Other: o\r\nKeep-Alive: timeout=5\r\nX-Kept: yes\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
        )
    )
    r = await send(upstream_client, server)
    assert sorted(name.lower() for name, _ in r.headers.getAllRawHeaders()) == [b"content-type", b"x-kept"]
    assert (await body_of(r)).data == b"{}"


@pytest_twisted.ensureDeferred
async def test_connection_listed_headers_do_not_reach_the_client(make_proxy: Callable[..., Proxy]) -> None:
    def answer(conn: Served, request: Received) -> None:
        conn.write(sized(b'{"ok": 1}', extra=b"Connection: X-Hop\r\nX-Hop: secret\r\nX-Kept: yes\r\n"))

    server = Upstream(answer)
    try:
        proxy = make_proxy(endpoint=server.url.decode())
        r = await chat(proxy)
        assert (r.code, r.json()) == (200, {"ok": 1})
        assert r.headers.getRawHeaders("x-kept") == ["yes"]
        assert not r.headers.hasHeader("x-hop")
    finally:
        await server.stop()


@pytest.mark.parametrize(
    "start,line",
    [
        (b"HTTP/1.1 200 OK\r\n", b"X-Many: header\r\n"),  # 20,000 headers and more
        (b"HTTP/1.1 200 OK\r\nX-Endless: ", b"a" * 1024),  # one header that never ends
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b""),  # (control: a normal answer)
    ],
    ids=["many-headers", "endless-header", "control"],
)
@pytest_twisted.ensureDeferred
async def test_oversized_response_head_is_502(
    make_proxy: Callable[..., Proxy], start: bytes, line: bytes
) -> None:
    """20,000 headers and more, or an endless one: a 502 once the head passes the limits, not
    a stall until the upstream timeout (60 s here, past the test's wait) nor memory growth."""
    sent: list[int] = []

    @implementer(IPushProducer)
    class Flood:
        def __init__(self, conn: Served) -> None:
            self.conn = conn
            self.paused = False

        def start(self) -> None:
            assert self.conn.transport is not None
            self.conn.transport.registerProducer(self, True)
            self.conn.write(start)
            self.resumeProducing()

        def pauseProducing(self) -> None:
            self.paused = True

        def resumeProducing(self) -> None:
            self.paused = False
            # Bounded: 20,000 lines and more, or 8 MiB, whichever comes first.
            while line and not self.paused and sent[0] < 8 * 1024 * 1024 and not self.conn.closed.called:
                self.conn.write(line * 1000)
                sent[0] += len(line) * 1000

        def stopProducing(self) -> None:
            self.paused = True

    sent.append(0)
    server = Upstream(lambda conn, request: Flood(conn).start())
    try:
        proxy = make_proxy(endpoint=server.url.decode(), upstream_timeout=60)
        r = await Deferred.fromCoroutine(chat(proxy)).addTimeout(20, get_reactor())
        if not line:
            assert r.code == 200
            return
        assert r.code == 502
        assert r.json()["error"]["message"].startswith("Upstream unreachable: response head too large")
        await server.connections[0].closed.addTimeout(10, get_reactor())
        assert sent[0] < 8 * 1024 * 1024  # the proxy hung up long before the flood ended
    finally:
        await server.stop()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    ],
    ids=["upgrade", "length-and-chunked", "two-lengths", "bare-lf"],
)
@pytest_twisted.ensureDeferred
async def test_ambiguous_or_unexpected_answers_are_502(
    upstream_client: UpstreamClient, serve: Callable[..., Upstream], answer: bytes
) -> None:
    with pytest.raises(ProxyError) as e:
        await send(upstream_client, serve(answer_each(answer)))
    assert (e.value.status, e.value.message) == (
        502,
        "Upstream unreachable: malformed or incomplete response",
    )


@pytest_twisted.ensureDeferred
async def test_a_second_answer_nobody_asked_for_retires_the_connection(
    upstream_client: UpstreamClient, serve: Callable[..., Upstream]
) -> None:
    server = serve(answer_each(sized(b"1") + sized(b"unasked"), sized(b"2")))
    r = await send(upstream_client, server)
    assert (await body_of(r)).data == b"1"
    r = await send(upstream_client, server)
    assert (await body_of(r)).data == b"2"
    assert len(server.connections) == 2


class RecordingFile(io.BytesIO):
    """A body file that records how much each read asked for."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads: list[int] = []

    def read(self, size: int | None = -1) -> bytes:
        self.reads.append(-1 if size is None else size)
        return super().read(size)


@pytest_twisted.ensureDeferred
async def test_file_body_is_streamed_in_pieces_and_resent_whole_on_retry(
    upstream_client: UpstreamClient, serve: Callable[..., Upstream]
) -> None:
    payload = bytes(range(256)) * (12 * 1024)  # 3 MiB
    prefix = b"already read by someone: "

    def answer(conn: Served, request: Received) -> None:
        if len(conn.server.requests) == 2:
            conn.transport.loseConnection()  # type: ignore[union-attr]  # gone stale, say
        else:
            conn.write(sized(b"{}"))

    server = serve(answer)
    body = RecordingFile(prefix + payload)
    for _ in range(2):
        body.seek(len(prefix))  # positioned at the body's start, as the resource leaves it
        r = await send(upstream_client, server, body=body)
        assert (await body_of(r)).data == b"{}"
    # The first request on a new connection, the second on the pooled one that closed
    # without an answer, then again on a new connection: the whole body each time.
    assert [len(c.requests) for c in server.connections] == [2, 1]
    assert [req.body == payload for req in server.requests] == [True, True, True]
    assert server.requests[0].header(b"content-length") == [b"%d" % len(payload)]
    assert body.reads and max(body.reads) <= 64 * 1024


@pytest_twisted.ensureDeferred
async def test_reused_connection_that_answers_in_part_is_not_retried(
    upstream_client: UpstreamClient, serve: Callable[..., Upstream]
) -> None:
    def answer(conn: Served, request: Received) -> None:
        if len(conn.server.requests) == 1:
            conn.write(sized(b"{}"))
        else:
            conn.write(b"HTTP/1.1 200 OK\r\nContent-")
            conn.transport.loseConnection()  # type: ignore[union-attr]

    server = serve(answer)
    await body_of(await send(upstream_client, server))
    with pytest.raises(ProxyError) as e:
        await send(upstream_client, server)
    assert e.value.message == "Upstream unreachable: malformed or incomplete response"
    assert len(server.requests) == 2 and len(server.connections) == 1


@pytest_twisted.ensureDeferred
async def test_header_with_a_line_break_is_never_sent(
    upstream_client: UpstreamClient, serve: Callable[..., Upstream]
) -> None:
    server = serve(answer_each(sized(b"{}")))
    with pytest.raises(ProxyError) as e:
        await send(upstream_client, server, headers=[(b"X-Evil", b"a\r\nInjected: 1")])
    assert e.value.status == 502
    assert server.connections == []


@pytest_twisted.ensureDeferred
async def test_cancel_before_the_head_closes_the_connection(
    upstream_client: UpstreamClient, serve: Callable[..., Upstream]
) -> None:
    asked: Deferred[None] = Deferred()
    server = serve(lambda conn, request: asked.callback(None))
    d = send(upstream_client, server)
    await asked.addTimeout(10, get_reactor())
    d.cancel()
    await server.connections[0].closed.addTimeout(10, get_reactor())
    with pytest.raises(CancelledError):
        await d


@pytest_twisted.ensureDeferred
async def test_stop_inside_the_body_closes_the_connection(
    upstream_client: UpstreamClient, serve: Callable[..., Upstream]
) -> None:
    server = serve(
        answer_each(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst \r\n")  # and holds
    )
    r = await send(upstream_client, server)
    reader = BodyReader()
    r.deliverBody(reader)
    await reader.wait_for(b"first ").addTimeout(10, get_reactor())
    reader.transport.stopProducing()  # type: ignore[union-attr]
    await server.connections[0].closed.addTimeout(10, get_reactor())
    await reader.done.addTimeout(10, get_reactor())
    assert reader.reason is not None and not reader.reason.check(ResponseDone, PotentialDataLoss)


class PausesAtOnce(BodyReader):
    """Pauses the upstream on its first bytes and counts the deliveries."""

    calls = 0

    def dataReceived(self, data: bytes) -> None:
        self.calls += 1
        super().dataReceived(data)
        self.transport.pauseProducing()  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_paused_body_is_not_read_from_the_socket(
    upstream_client: UpstreamClient, fake: FakeAzure
) -> None:
    fake.big_stream_bytes = 64 * 1024 * 1024
    stream = json.dumps({"stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
    r = await upstream_client.request(
        b"POST",
        fake.url.encode() + URL_PATH,
        [(b"Content-Type", b"application/json")],
        stream,
        connect_timeout=5,
        header_timeout=20,
    )
    reader = PausesAtOnce()
    r.deliverBody(reader)
    # The socket is no longer read: the upstream is pushed back, and the reader got only
    # what arrived with (or right after) the head.
    await proxy_stops_reading_upstream(fake)
    assert reader.calls == 1
    assert fake.bytes_sent < 24 * 1024 * 1024
    reader.transport.stopProducing()  # type: ignore[union-attr]
    await reader.done.addTimeout(10, get_reactor())


@pytest_twisted.ensureDeferred
async def test_https_upstream_verified_with_the_given_trust_root(tmp_path: Path) -> None:
    ca = make_ca()
    good = FakeAzure(get_reactor())
    wrong = FakeAzure(get_reactor())
    for fake, host in ((good, "127.0.0.1"), (wrong, "elsewhere.example")):
        key, cert = ca.issue(tmp_path, host, 2 if fake is good else 3, hosts=(host,))
        fake.listen(
            context_factory=ssl.PrivateCertificate.loadPEM(key.read_bytes() + cert.read_bytes()).options()
        )
    client = UpstreamClient(
        get_reactor(), BrowserLikePolicyForHTTPS(trustRoot=ssl.Certificate.loadPEM(ca.pem))
    )
    try:
        for _ in range(2):
            r = await client.request(
                b"POST", good.url.encode() + URL_PATH, [], CHAT, connect_timeout=5, header_timeout=20
            )
            assert r.code == 200 and json.loads((await body_of(r)).data)["object"] == "chat.completion"
        assert good.open_connections == 1  # pooled, TLS included
        with pytest.raises(ProxyError) as e:
            await client.request(
                b"POST", wrong.url.encode() + URL_PATH, [], CHAT, connect_timeout=5, header_timeout=20
            )
        assert e.value.message == "Upstream unreachable: TLS handshake or certificate failed"
        assert wrong.requests == []
    finally:
        await client.close()
        await good.stop()
        await wrong.stop()


@pytest_twisted.ensureDeferred
async def test_header_count_limit(serve: Callable[..., Upstream]) -> None:
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(11))  # a small head, one header too many
    server = serve(answer_each(sized(b"{}", extra=many[: -len(b"X-H10: v\r\n")]), sized(b"{}", extra=many)))
    client = UpstreamClient(get_reactor(), max_headers=12)  # 10 + Content-Type and -Length: 12
    try:
        r = await send(client, server)
        assert len(list(r.headers.getAllRawHeaders())) == 11
        await body_of(r)
        with pytest.raises(ProxyError) as e:
            await send(client, server)
        assert (
            e.value.message == "Upstream unreachable: response head too large (more than 12 response headers)"
        )
    finally:
        await client.close()


@pytest.mark.parametrize(
    "prefix,parsed",
    [
        (b"http://h.example", ("http", "h.example", 80, b"Host: h.example\r\n")),
        (b"https://H.Example:443", ("https", "h.example", 443, b"Host: h.example\r\n")),
        (b"http://h.example:8080", ("http", "h.example", 8080, b"Host: h.example:8080\r\n")),
        (b"http://[::1]:8080", ("http", "::1", 8080, b"Host: [::1]:8080\r\n")),
        (b"https://[::1]", ("https", "::1", 443, b"Host: [::1]\r\n")),
        (b"ftp://h.example", None),
        (b"http://user:pw@h.example", None),
        (b"http://h.example:99999", None),
        (b"http://", None),
        (b"http://h\xc3\xa9.example", None),
    ],
)
def test_upstream_url_parsing(prefix: bytes, parsed: tuple[str, str, int, bytes] | None) -> None:
    if parsed is None:
        with pytest.raises(ProxyError) as e:
            parse_target(prefix)
        assert (e.value.status, e.value.message) == (502, "Upstream unreachable: invalid upstream URL")
    else:
        target = parse_target(prefix)
        assert (target.scheme, target.host, target.port, target.host_line) == parsed


class Asked(SynchronousResolver):
    """Resolves every name to 127.0.0.1 at once, noting the names asked."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def resolveHostName(self, receiver: Any, hostName: str, *args: Any, **kwargs: Any) -> Any:
        self.names.append(hostName)
        return super().resolveHostName(receiver, hostName, *args, **kwargs)


@pytest.mark.parametrize(
    ("url", "asked", "address"),
    [
        (b"http://127.0.0.1:8080/v1", [], ("127.0.0.1", 8080)),
        (b"https://[::1]/v1", [], ("::1", 443)),
        (b"http://upstream.example/v1", ["upstream.example"], ("127.0.0.1", 80)),
    ],
)
def test_an_ip_address_is_dialled_without_a_name_lookup(
    url: bytes, asked: list[str], address: tuple[str, int]
) -> None:
    """An upstream given by address is dialled at once (no lookup in a thread first)."""
    reactor = MemoryReactorClock()
    resolver = Asked()
    reactor.installNameResolver(resolver)
    client = UpstreamClient(reactor)
    outcome: list[Any] = []
    client.request(b"GET", url, [], None, connect_timeout=7, header_timeout=30).addBoth(outcome.append)
    assert resolver.names == asked
    [(host, port, _, timeout, _)] = reactor.tcpClients
    assert (host, port, timeout) == (*address, 7)
    assert outcome == []


def test_each_request_waits_for_its_head_its_own_timeout_on_one_timer() -> None:
    """
    Each request fails with a 504 exactly when its own header timeout is up (its connection
    aborted), however many are in flight; one answered in time is untouched when its time
    comes; and the client keeps one timer for all of them.
    """
    reactor = MemoryReactorClock()
    client = UpstreamClient(reactor)
    outcomes: dict[str, tuple[float, Any]] = {}

    def send(name: str, timeout: float) -> tuple[StringTransport, Any]:
        d = client.request(
            b"GET", b"http://127.0.0.1:8080/x", [], None, connect_timeout=5, header_timeout=timeout
        )
        d.addBoth(lambda result: outcomes.setdefault(name, (reactor.seconds(), result)))
        factory = reactor.tcpClients[-1][2]
        transport = StringTransport()
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(transport)
        return transport, protocol

    def timed_out(name: str) -> tuple[float, str, bool]:
        when, result = outcomes[name]
        assert isinstance(result, Failure) and isinstance(result.value, ProxyError)
        return when, result.value.message, transports[name].disconnected

    transports = {}
    transports["a"], _ = send("a", 30)
    reactor.advance(10)
    transports["b"], _ = send("b", 30)
    transports["c"], _ = send("c", 5)  # due before the others
    transports["answered"], answered = send("answered", 5)
    assert all(t.value().startswith(b"GET /x HTTP/1.1\r\n") for t in transports.values())
    answered.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert outcomes["answered"][1].code == 204
    # One timer for the four requests' heads, and the pool's for its idle connection.
    assert sorted(call.getTime() for call in reactor.getDelayedCalls()) == [15, 60]
    reactor.advance(4.9)
    assert set(outcomes) == {"answered"}
    reactor.advance(0.1)
    assert timed_out("c") == (15, "Upstream timed out: no response headers within 5s", True)
    assert not transports["answered"].disconnected  # answered in time: kept for reuse
    reactor.advance(14.9)
    assert set(outcomes) == {"answered", "c"}
    reactor.advance(0.1)
    assert timed_out("a") == (30, "Upstream timed out: no response headers within 30s", True)
    reactor.advance(9.9)
    assert "b" not in outcomes
    reactor.advance(0.1)
    assert timed_out("b") == (40, "Upstream timed out: no response headers within 30s", True)
    assert [call.getTime() for call in reactor.getDelayedCalls()] == [60]  # the pool's


def test_an_http_upstream_address_is_dialled_with_no_wrapper_protocol() -> None:
    """
    The connection to an http upstream given by address is the transport's protocol itself
    (no endpoint wrapper between them, a call per read); dialled as an endpoint would, with
    its errors: refused (502), cancelled while connecting (the attempt is stopped).
    """
    reactor = MemoryReactorClock()
    client = UpstreamClient(reactor)

    def dial(port: int) -> tuple[list[Any], Any, Any]:
        outcome: list[Any] = []
        url = b"http://127.0.0.1:%d/v1" % port
        d = client.request(b"GET", url, [], None, connect_timeout=7, header_timeout=30)
        d.addBoth(outcome.append)
        _, _, factory, _, _ = reactor.tcpClients[-1]
        return outcome, factory, reactor.connectors[-1]

    outcome, factory, _ = dial(8080)
    conn = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
    assert isinstance(conn, HTTP11Connection)
    transport = StringTransport()
    conn.makeConnection(transport)
    assert transport.value().startswith(b"GET /v1 HTTP/1.1\r\n")  # sent once connected
    conn.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    [response] = outcome
    assert response.code == 204

    outcome, factory, connector = dial(8081)
    factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
    [failure] = outcome
    assert failure.value.status == 502 and "connection refused" in failure.value.message

    outcome, factory, connector = dial(8082)
    reactor.advance(30)  # the head timeout: the attempt is cancelled
    [failure] = outcome
    assert failure.value.status == 504 and connector.stoppedConnecting
    factory.clientConnectionFailed(connector, Failure(UserError()))  # what stopConnecting reports
    assert len(outcome) == 1
