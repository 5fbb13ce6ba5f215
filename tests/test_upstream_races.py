"""
The races a pooled HTTP/1.1 client has with an upstream that closes keep-alive connections,
each made to happen deterministically over loopback sockets with a scripted upstream, and
the client's side of each connection watched (what it wrote, when it closed):

  - the upstream's close crosses the next request on the wire (a FIN or a reset right after
    its answer, or at the first byte of the next request; Azure's idle timeout, or one equal
    to the pool's): the request is sent once more on a new connection, and only once, and
    only because the connection was reused and no byte of a response came;
  - an answer that ends the connection (C{Connection: close}, HTTP/1.0, a body delimited by
    the close), bytes nobody asked for on an idle connection, an answer that comes while the
    request body is still being sent: that connection is never handed out again;
  - a body not yet read: its connection is pooled only once the whole response has arrived;
  - the pool's idle timer firing at the moment a connection is taken.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import ssl
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import IResponse
from zope.interface import implementer

from aoaiproxy.errors import ProxyError
from aoaiproxy.upstream import UpstreamClient

from .certs import make_ca
from .rawnet import BodyReader, get_reactor
from .test_upstream import URL_PATH, Received, Served, Upstream, body_of, chunked, send, serve, sized

__all__ = ["serve"]  # a fixture

TIMEOUT = 10.0


# -- the client's side of its connections, watched -----------------------------------------------


class Watched(ProtocolWrapper):
    """
    The client's side of one upstream connection: what the client wrote on it (C{sent}) and
    read (C{received}), C{lost} once it has closed, and the watcher's C{after_data} hook
    called after each piece the client has read and handled.
    """

    factory: Watching

    def __init__(self, factory: Watching, wrapped: Protocol) -> None:
        super().__init__(factory, wrapped)
        self.sent: list[bytes] = []
        self.received = b""
        self.lost: Deferred[None] = Deferred()

    @property
    def requests_written(self) -> int:
        return b"".join(self.sent).count(b" " + URL_PATH + b" HTTP/1.1\r\n")

    def write(self, data: bytes) -> None:
        self.sent.append(data)
        super().write(data)

    def writeSequence(self, data: Any) -> None:
        self.sent.extend(data)
        super().writeSequence(data)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        super().dataReceived(data)
        hook = self.factory.watcher.after_data
        if hook is not None:
            hook(self, data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.lost.callback(None)


class Watching(WrappingFactory):
    protocol = Watched
    noisy = False

    def __init__(self, watcher: Watcher, wrapped: IProtocolFactory) -> None:
        super().__init__(wrapped)
        self.watcher = watcher

    def buildProtocol(self, addr: Any) -> Watched:
        conn: Watched = super().buildProtocol(addr)
        self.watcher.connections.append(conn)
        return conn


@implementer(IStreamClientEndpoint)
class _WatchedEndpoint:
    def __init__(self, watcher: Watcher, host: str, port: int, timeout: float) -> None:
        self._watcher, self._host, self._port, self._timeout = watcher, host, port, timeout

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        endpoint: IStreamClientEndpoint = TCP4ClientEndpoint(
            get_reactor(), self._host, self._port, timeout=self._timeout
        )
        if self._watcher.tls is not None:
            endpoint = wrapClientTLS(self._watcher.tls, endpoint)
        d = endpoint.connect(Watching(self._watcher, factory))
        return d.addCallback(lambda watched: watched.wrappedProtocol)


class Watcher:
    """The C{endpoints} of an L{UpstreamClient}: real loopback connections (over TLS with
    C{tls}, a client connection creator), each one's client side kept in C{connections}."""

    def __init__(self, tls: Any = None) -> None:
        self.tls = tls
        self.connections: list[Watched] = []
        self.after_data: Callable[[Watched, bytes], None] | None = None

    def __call__(self, scheme: str, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
        return _WatchedEndpoint(self, host, port, timeout)


@pytest_twisted.async_yield_fixture
async def watched() -> AsyncIterator[tuple[UpstreamClient, Watcher]]:
    """A client whose connections are watched."""
    watcher = Watcher()
    client = UpstreamClient(get_reactor(), endpoints=watcher)
    yield client, watcher
    await client.close()


# -- scripted upstreams ----------------------------------------------------------------------------


def answer_all(answer: bytes) -> Callable[[Served, Received], None]:
    return lambda conn, request: conn.write(answer)


def fin(conn: Served) -> None:
    """Close the connection (a FIN after what was written)."""
    assert conn.transport is not None
    conn.transport.loseConnection()


def reset(conn: Served) -> None:
    """Reset the connection (an RST, nothing more written)."""
    assert conn.transport is not None
    handle: socket.socket = conn.transport.getHandle()  # type: ignore[attr-defined]
    handle.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.transport.abortConnection()  # type: ignore[attr-defined]


class SendsOnEnd(BodyReader):
    """
    Reads a body and, the instant it ends (its connection has just gone back to the pool,
    and the reactor has done nothing since), sends the next request with C{send_next}.
    """

    def __init__(self, send_next: Callable[[], Deferred[IResponse]]) -> None:
        super().__init__()
        self._send_next = send_next
        self.next: Deferred[IResponse] | None = None

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.next = maybeDeferred(self._send_next)
        super().connectionLost(reason)


async def first_then_next(client: UpstreamClient, server: Upstream) -> tuple[BodyReader, IResponse]:
    """The first request, its body read, and the second request sent at the instant the
    first body ended: the second's response and the first body."""
    reader = SendsOnEnd(lambda: send(client, server))
    await send(client, server).addCallback(lambda r: r.deliverBody(reader)).addTimeout(TIMEOUT, get_reactor())
    await reader.done
    assert reader.next is not None
    return reader, await reader.next.addTimeout(TIMEOUT, get_reactor())


# -- the upstream's close crosses the next request ------------------------------------------------


@pytest.mark.parametrize(
    "first", [sized(b'{"n": 1}'), chunked(b"data: 1\n\n", b"data: [DONE]\n\n")], ids=["sized", "chunked"]
)
@pytest.mark.parametrize("close", ["fin-with-the-answer", "fin-after", "reset-after"])
@pytest_twisted.ensureDeferred
async def test_close_right_after_the_answer_crosses_the_next_request(
    watched: tuple[UpstreamClient, Watcher], serve: Callable[..., Upstream], first: bytes, close: str
) -> None:
    """
    The upstream closes its connection right after answering (a FIN behind the body, or a
    FIN or a reset once the client has read it), and the client takes that connection for
    its next request before it has read the close: the request was written on it, and is
    sent again on a new connection.
    """
    client, watcher = watched

    def answer(conn: Served, request: Received) -> None:
        if conn is conn.server.connections[0]:
            conn.write(first)
            if close == "fin-with-the-answer":
                fin(conn)
        else:
            conn.write(sized(b'{"n": 2}'))

    def after_data(conn: Watched, data: bytes) -> None:
        if conn.received == first:  # the whole answer read (and the next request sent)
            watcher.after_data = None
            (fin if close == "fin-after" else reset)(server.connections[0])

    if close != "fin-with-the-answer":
        watcher.after_data = after_data
    server = serve(answer)
    reader, r = await first_then_next(client, server)
    assert reader.reason is not None and reader.reason.check(ResponseDone)
    assert (r.code, (await body_of(r)).data) == (200, b'{"n": 2}')
    await watcher.connections[0].lost.addTimeout(TIMEOUT, get_reactor())
    assert [c.requests_written for c in watcher.connections] == [2, 1]
    assert [len(c.requests) for c in server.connections][1:] == [1]


class CutsAtSecondRequest(Served):
    """The first connection closes (a FIN) at the first byte of its second request, unread."""

    def cut(self) -> None:
        fin(self)

    def dataReceived(self, data: bytes) -> None:
        if self is self.server.connections[0] and len(self.requests) == 1:
            self.cut()
            return
        super().dataReceived(data)


class ResetsAtSecondRequest(CutsAtSecondRequest):
    """... with a reset."""

    def cut(self) -> None:
        reset(self)


@pytest.mark.parametrize("protocol", [CutsAtSecondRequest, ResetsAtSecondRequest], ids=["fin", "reset"])
@pytest_twisted.ensureDeferred
async def test_close_at_the_first_byte_of_the_next_request(
    watched: tuple[UpstreamClient, Watcher], serve: Callable[..., Upstream], protocol: type[Served]
) -> None:
    """The upstream's idle timeout expires as the next request reaches it: retried once."""
    client, watcher = watched
    server = serve(answer_all(sized(b"{}")), protocol)
    assert (await body_of(await send(client, server))).data == b"{}"
    r = await send(client, server)
    assert (r.code, (await body_of(r)).data) == (200, b"{}")
    assert [c.requests_written for c in watcher.connections] == [2, 1]
    assert [len(c.requests) for c in server.connections] == [1, 1]


@pytest_twisted.ensureDeferred
async def test_the_retry_is_made_once(
    watched: tuple[UpstreamClient, Watcher], serve: Callable[..., Upstream]
) -> None:
    """A reused connection closed without an answer, and the new one too: a 502, no third try."""
    client, watcher = watched

    def answer(conn: Served, request: Received) -> None:
        if len(conn.server.requests) == 1:
            conn.write(sized(b"{}"))
        else:
            fin(conn)

    server = serve(answer)
    await body_of(await send(client, server))
    with pytest.raises(ProxyError) as e:
        await send(client, server)
    assert (e.value.status, e.value.message) == (
        502,
        "Upstream unreachable: connection closed before a response",
    )
    assert [c.requests_written for c in watcher.connections] == [2, 1]


@pytest_twisted.ensureDeferred
async def test_close_crosses_the_next_request_over_tls(
    tmp_path: Path, serve: Callable[..., Upstream]
) -> None:
    """As Azure's front ends close idle connections: a TLS close_notify and a FIN right behind
    the answer, the next request written before they are read: retried on a new connection."""
    ca = make_ca()
    key, cert = ca.issue(tmp_path, "127.0.0.1", 2, hosts=("127.0.0.1",))
    tls = ssl.PrivateCertificate.loadPEM(key.read_bytes() + cert.read_bytes()).options()

    def answer(conn: Served, request: Received) -> None:
        conn.write(sized(b'{"n": %d}' % len(conn.server.connections)))
        if len(conn.server.connections) == 1:
            fin(conn)

    server = serve(answer, tls=tls)
    trust = ssl.Certificate.loadPEM(ca.pem)
    watcher = Watcher(tls=ssl.optionsForClientTLS("127.0.0.1", trustRoot=trust))
    client = UpstreamClient(get_reactor(), endpoints=watcher)
    try:
        _, r = await first_then_next(client, server)
        assert (r.code, (await body_of(r)).data) == (200, b'{"n": 2}')
        assert [c.requests_written for c in watcher.connections] == [2, 1]
    finally:
        await client.close()


# -- connections that must not be handed out again -------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "reused"),
    [
        (sized(b"{}", extra=b"Connection: close\r\n"), False),
        (sized(b"{}", status=b"200 OK").replace(b"HTTP/1.1", b"HTTP/1.0"), False),
        (sized(b"{}", extra=b"Connection: keep-alive\r\n").replace(b"HTTP/1.1", b"HTTP/1.0"), True),
        (sized(b"{}"), True),
    ],
    ids=["connection-close", "http-1.0", "http-1.0-keep-alive", "http-1.1"],
)
@pytest_twisted.ensureDeferred
async def test_an_answer_that_ends_the_connection_is_never_pooled(
    watched: tuple[UpstreamClient, Watcher], serve: Callable[..., Upstream], answer: bytes, reused: bool
) -> None:
    """The upstream keeps the connection open whatever it said: the client decides, and closes
    the connections it may not reuse."""
    client, watcher = watched
    server = serve(answer_all(answer))
    for _ in range(2):
        r = await send(client, server)
        assert (r.code, (await body_of(r)).data) == (200, b"{}")
    if reused:
        assert [c.requests_written for c in watcher.connections] == [2]
    else:
        assert [c.requests_written for c in watcher.connections] == [1, 1]
        await server.connections[0].closed.addTimeout(TIMEOUT, get_reactor())


@pytest_twisted.ensureDeferred
async def test_bytes_nobody_asked_for_on_an_idle_connection(
    watched: tuple[UpstreamClient, Watcher], serve: Callable[..., Upstream]
) -> None:
    """
    An idle pooled connection receives bytes out of turn (some servers send a 408 before they
    close an idle connection): the client closes it, and a request made at that very instant
    (before its close has completed) goes on a new connection.
    """
    client, watcher = watched
    server = serve(answer_all(sized(b"{}")))
    await body_of(await send(client, server))
    made: Deferred[IResponse] = Deferred()

    def after_data(conn: Watched, data: bytes) -> None:
        if data.startswith(b"HTTP/1.1 408"):  # read (and handled) by the idle connection
            watcher.after_data = None
            maybeDeferred(send, client, server).chainDeferred(made)

    watcher.after_data = after_data
    server.connections[0].write(
        b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    r = await made.addTimeout(TIMEOUT, get_reactor())
    assert (r.code, (await body_of(r)).data) == (200, b"{}")
    await watcher.connections[0].lost.addTimeout(TIMEOUT, get_reactor())
    assert [c.requests_written for c in watcher.connections] == [1, 1]


class AnswersAtTheHead(Served):
    """The first connection answers as soon as the head of its request arrives, and reads no
    more (an upload refused early, the connection kept alive)."""

    def dataReceived(self, data: bytes) -> None:
        if self is not self.server.connections[0]:
            super().dataReceived(data)
            return
        self.buffer += data
        if b"\r\n\r\n" in self.buffer and not self.requests:
            assert self.transport is not None
            self.transport.pauseProducing()  # type: ignore[attr-defined]
            self.requests.append(Received(self.buffer.partition(b"\r\n\r\n")[0], b""))
            self.write(sized(b'{"early": true}'))


@pytest_twisted.ensureDeferred
async def test_an_answer_before_the_request_body_was_sent_retires_the_connection(
    watched: tuple[UpstreamClient, Watcher], serve: Callable[..., Upstream], tmp_path: Path
) -> None:
    """The rest of the body will not be sent: the client closes that connection, and the next
    request goes on a new one."""
    client, watcher = watched
    server = serve(answer_all(sized(b"{}")), AnswersAtTheHead)
    upload = tmp_path / "upload"
    upload.write_bytes(b"x" * (32 * 1024 * 1024))  # more than the socket buffers hold
    with upload.open("rb") as body:  # open until the end: the upload could go on
        r = await send(client, server, body=body)
        assert (r.code, (await body_of(r)).data) == (200, b'{"early": true}')
        r = await send(client, server, header_timeout=TIMEOUT)
        assert (await body_of(r)).data == b"{}"
        await watcher.connections[0].lost.addTimeout(TIMEOUT, get_reactor())
    assert [c.requests_written for c in watcher.connections] == [1, 1]


# -- a body not yet read ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_connection_is_pooled_only_once_its_response_has_arrived_whole(
    watched: tuple[UpstreamClient, Watcher], serve: Callable[..., Upstream]
) -> None:
    """A small unread body is kept by its response, so its connection carries the next
    request at once; a large one holds its connection (unread, not pooled) until it is read."""
    client, watcher = watched
    large = b"L" * (1024 * 1024)
    answers = [sized(b"small"), sized(b"next"), sized(large), sized(b"meanwhile"), sized(b"last")]

    def answer(conn: Served, request: Received) -> None:
        conn.write(answers[len(conn.server.requests) - 1])

    server = serve(answer)
    small = await send(client, server)
    r = await send(client, server)  # small's body not read yet
    assert (await body_of(r)).data == b"next"
    assert (await body_of(small)).data == b"small"
    assert [c.requests_written for c in watcher.connections] == [2]
    big = await send(client, server)
    r = await send(client, server)  # big's body not read: its connection is not free
    assert (await body_of(r)).data == b"meanwhile"
    assert (await body_of(big)).data == large
    r = await send(client, server)  # the first connection, pooled last
    assert (await body_of(r)).data == b"last"
    assert [c.requests_written for c in watcher.connections] == [4, 1]


# -- the pool's idle timer ---------------------------------------------------------------------


class BoundedClock(Clock):
    """A clock that fails a test whose timers keep rescheduling themselves (C{advance} would
    never return)."""

    scheduled = 0

    def callLater(self, delay: float, f: Callable[..., object], *args: object, **kw: object) -> Any:
        self.scheduled += 1
        assert self.scheduled < 1000, "a timer keeps rescheduling itself"
        return super().callLater(delay, f, *args, **kw)


@pytest_twisted.ensureDeferred
async def test_idle_timer_and_a_request_at_the_same_instant(serve: Callable[..., Upstream]) -> None:
    """
    The pool's timer (on a clock the test moves) closes a connection idle for exactly
    C{idle_timeout}; a request made at that instant gets a new connection.  A connection taken
    an instant before the timer fires is left alone by it, and pooled again afterwards.
    """
    clock = BoundedClock()
    watcher = Watcher()
    client = UpstreamClient(clock, endpoints=watcher, idle_timeout=50)
    server = serve(answer_all(sized(b"{}")))
    try:
        await body_of(await send(client, server))  # pooled at t=0
        clock.advance(49.5)
        d = send(client, server)  # taken at t=49.5
        clock.advance(0.5)  # the timer fires at t=50 with the connection in use
        await body_of(await d)  # pooled again at t=50
        assert [c.requests_written for c in watcher.connections] == [2]
        clock.advance(50)  # t=100: idle for exactly 50 s
        r = await send(client, server)
        assert (await body_of(r)).data == b"{}"
        await watcher.connections[0].lost.addTimeout(TIMEOUT, get_reactor())
        assert [c.requests_written for c in watcher.connections] == [2, 1]
    finally:
        await client.close()
