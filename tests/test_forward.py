"""
The forward proxy (SPEC §8) on a real loopback port: CONNECT tunnels (both ways, pipelined
bytes, half-close, backpressure, idle timeout), 403/407/502/504, absolute-form requests
(relayed with hop-by-hop and Proxy-* headers stripped, or served as API requests), and the
rule that an allowlisted name never leads to a loopback or private address.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import json
import re
import select
import socket
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import error as ierror
from twisted.internet import tcp
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHalfCloseableProtocol, IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource
from zope.interface import implementer

from aoaiproxy import forward
from aoaiproxy.config import Config, LiveConfig, load_config
from aoaiproxy.connecting import TCPDial
from aoaiproxy.deadlines import Deadlines
from aoaiproxy.forward import Forwarder, handlers, pending_write_bytes
from aoaiproxy.forward import tunnel as tunnel_module
from aoaiproxy.resource import ApiResource
from aoaiproxy.site import ProxySite
from aoaiproxy.testing import FakeAzure
from aoaiproxy.upstream import UpstreamClient

from .conftest import Events, ParsedLines, free_port, get_reactor, wait_until
from .rawnet import (
    RawClient,
    Response,
    assert_openai_error,
    connect,
    connect_half,
    parse_response,
    response_done,
)

BLOCK = bytes(range(256)) * 256  # 64 KiB


# -- helpers ----------------------------------------------------------------------------------


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


class Echo(Protocol):
    """Echoes everything; on EOF from the client, answers with how much it got, then closes."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)  # type: ignore[attr-defined]
        self.got = b""

    def dataReceived(self, data: bytes) -> None:
        self.got += data
        self.factory.received.append(data)  # type: ignore[attr-defined]
        self.transport.write(data)  # type: ignore[union-attr]


@implementer(IHalfCloseableProtocol)
class CountThenClose(Echo):
    """Reads until the client half-closes, then answers C{got N} and closes."""

    def dataReceived(self, data: bytes) -> None:
        self.got += data

    def readConnectionLost(self) -> None:
        self.transport.write(b"got %d" % len(self.got))  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class GreetThenRead(Protocol):
    """
    Sends C{hello} and half-closes at once, then reads until the client half-closes: its
    factory's C{ended} fires with what it got, and it closes.
    """

    def connectionMade(self) -> None:
        self.got = b""
        self.transport.write(b"hello")  # type: ignore[union-attr]
        self.transport.loseWriteConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.got += data

    def readConnectionLost(self) -> None:
        self.factory.ended.callback(self.got)  # type: ignore[attr-defined]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass


class Firehose(Protocol):
    """Sends C{blocks} deterministic 64 KiB blocks as fast as the connection takes them."""

    blocks = 512

    def connectionMade(self) -> None:
        self.factory.connections.append(self)  # type: ignore[attr-defined]
        self.sent = 0
        self.paused = False
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.sent < self.blocks:
            self.sent += 1
            self.transport.write(BLOCK)  # type: ignore[union-attr]
        if self.sent >= self.blocks and not self.paused:
            self.transport.unregisterProducer()  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]

    def stopProducing(self) -> None:
        self.paused = True


class Record(Resource):
    """A plain HTTP destination that records requests and answers with a small body."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[bytes, bytes, dict[bytes, list[bytes]], bytes]] = []

    def render(self, request: server.Request) -> bytes:
        assert request.content is not None
        headers = {k.lower(): v for k, v in request.requestHeaders.getAllRawHeaders()}
        self.requests.append((request.method, request.uri, headers, request.content.read()))
        request.setHeader(b"X-Upstream", b"yes")
        request.setHeader(b"Keep-Alive", b"timeout=5")
        request.setHeader(b"Proxy-Authenticate", b"Basic realm=upstream")
        request.setHeader(b"Content-Type", b"text/plain")
        return b"hello from " + request.uri


@attrs.define
class Servers:
    ports: list[IListeningPort] = attrs.field(factory=list)
    factories: list[Any] = attrs.field(factory=list)

    def tcp(self, protocol: type[Protocol]) -> tuple[int, Any]:
        factory = Factory.forProtocol(protocol)
        factory.connections = []  # type: ignore[attr-defined]
        factory.received = []  # type: ignore[attr-defined]
        port = get_reactor().listenTCP(0, factory, interface="127.0.0.1")
        self.ports.append(port)
        self.factories.append(factory)
        return port.getHost().port, factory

    def web(self, resource: Resource) -> int:
        site = server.Site(resource)
        site.connections = []  # type: ignore[attr-defined]
        port = get_reactor().listenTCP(0, site, interface="127.0.0.1")
        self.ports.append(port)
        return int(port.getHost().port)


@pytest_twisted.async_yield_fixture
async def servers() -> AsyncIterator[Servers]:
    s = Servers()
    yield s
    for port in s.ports:
        await port.stopListening()
    for factory in s.factories:
        for conn in factory.connections:
            if conn.transport is not None and conn.transport.connected:
                conn.transport.abortConnection()


@attrs.define
class FwdProxy:
    port: IListeningPort
    live: LiveConfig
    forwarder: Forwarder
    upstream: UpstreamClient
    clients: list[RawClient]
    site: ProxySite

    @property
    def port_number(self) -> int:
        return int(self.port.getHost().port)

    @property
    def config(self) -> Config:
        return self.live.config

    async def connect(self, first: bytes = b"", on_data: Callable[[bytes], None] | None = None) -> RawClient:
        client = await connect(self.port_number, first, on_data)
        self.clients.append(client)
        return client

    async def ask(self, raw: bytes) -> Response:
        """Send one raw request; return the parsed response."""
        client = await self.connect(raw)
        data = await client.wait_for(response_done)
        return parse_response(data)


@pytest_twisted.async_yield_fixture
async def make_forward(fake: FakeAzure) -> AsyncIterator[Callable[..., FwdProxy]]:
    """C{make_forward(resolver=, connector=, **flags)}: a proxy with a Forwarder."""
    reactor = get_reactor()
    started: list[FwdProxy] = []

    def make(
        resolver: forward.Resolver | None = None,
        connector: forward.Connector | None = None,
        **flags: Any,
    ) -> FwdProxy:
        flags.setdefault("endpoint", fake.url)
        live = LiveConfig(load_config(flags, {}))
        upstream = UpstreamClient(reactor)
        forwarder = Forwarder(reactor, live, resolver, connector=connector, upstream=upstream)
        site = ProxySite(ApiResource(live, upstream, reactor), live, reactor, forwarder)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        proxy = FwdProxy(port, live, forwarder, upstream, [], site)
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.forwarder.close()
        for client in proxy.clients:
            await client.abort()
        await proxy.port.stopListening()
        await proxy.upstream.close()


def connect_request(target: str, *extra: bytes) -> bytes:
    return b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (
        target.encode(),
        target.encode(),
        b"".join(h + b"\r\n" for h in extra),
    )


# -- CONNECT -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tunnel_relays_both_ways_including_pipelined_bytes(
    make_forward: Callable[..., FwdProxy], servers: Servers
) -> None:
    port, echo = servers.tcp(Echo)
    proxy = make_forward(forward_allow=[f"127.0.0.1:{port}"])
    # The client's first bytes ride in the same segment as the CONNECT head.
    client = await proxy.connect(connect_request(f"127.0.0.1:{port}") + b"early bytes;")
    data = await client.wait_for(lambda r: r.endswith(b"early bytes;"))
    assert data == b"HTTP/1.1 200 Connection Established\r\n\r\nearly bytes;"
    client.send(b"second write")
    await client.wait_for(lambda r: r.endswith(b"second write"))
    assert b"".join(echo.received) == b"early bytes;second write"
    assert len(proxy.forwarder.tunnels) == 1
    client.transport.loseConnection()  # type: ignore[union-attr]
    await client.closed


@pytest_twisted.ensureDeferred
async def test_both_legs_of_a_tunnel_send_without_waiting_for_acks(
    make_forward: Callable[..., FwdProxy], servers: Servers
) -> None:
    """
    TCP_NODELAY on the client's connection and on the target's: with Nagle's algorithm on the
    target's, a client's second small write (a TLS record after another) waited for the
    target's delayed ACK of the first, 40 ms on each exchange.
    """
    port, _echo = servers.tcp(Echo)
    proxy = make_forward(forward_allow=[f"127.0.0.1:{port}"])
    client = await proxy.connect(connect_request(f"127.0.0.1:{port}"))
    await client.wait_for(b"\r\n\r\n")
    [tunnel] = proxy.forwarder.tunnels
    for leg in (tunnel.client, tunnel.target):
        assert leg.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    client.transport.loseConnection()  # type: ignore[union-attr]
    await client.closed


@pytest_twisted.ensureDeferred
async def test_tunnel_pipelined_bytes_after_async_head(
    make_forward: Callable[..., FwdProxy], servers: Servers
) -> None:
    """Bytes sent after the head but before the 200 (buffered by HTTPChannel) get through."""
    port, echo = servers.tcp(Echo)
    proxy = make_forward(forward_allow=[f"127.0.0.1:{port}"])
    client = await proxy.connect(connect_request(f"127.0.0.1:{port}"))
    client.send(b"A" * 100_000)  # more than HTTPChannel's eager-read buffer
    await client.wait_for(lambda r: r.count(b"A") == 100_000)
    assert b"".join(echo.received) == b"A" * 100_000


@pytest_twisted.ensureDeferred
async def test_tunnel_half_close(make_forward: Callable[..., FwdProxy], servers: Servers) -> None:
    port, _ = servers.tcp(CountThenClose)
    proxy = make_forward(forward_allow=[f"127.0.0.1:{port}"])
    client = await proxy.connect(connect_request(f"127.0.0.1:{port}") + b"x" * 5000)
    await client.wait_for(b"\r\n\r\n")
    client.transport.loseWriteConnection()  # type: ignore[union-attr]
    await client.closed
    assert client.received.endswith(b"\r\n\r\ngot 5000")
    assert not proxy.forwarder.tunnels


@pytest_twisted.ensureDeferred
async def test_tunnel_half_close_from_the_target(
    make_forward: Callable[..., FwdProxy], servers: Servers
) -> None:
    """The target ends first: the client reads the end, and what it sends still arrives."""
    port, target = servers.tcp(GreetThenRead)
    target.ended = Deferred()
    proxy = make_forward(forward_allow=[f"127.0.0.1:{port}"])
    client = await connect_half(proxy, connect_request(f"127.0.0.1:{port}"))
    proxy.clients.append(client)
    assert (await client.eof.addTimeout(10, get_reactor())).endswith(b"\r\n\r\nhello")
    client.send(b"after the target's end")
    client.transport.loseWriteConnection()  # type: ignore[union-attr]
    assert await target.ended.addTimeout(10, get_reactor()) == b"after the target's end"
    await wait_until(lambda: not proxy.forwarder.tunnels, "the tunnel closed")


@pytest_twisted.ensureDeferred
async def test_tunnel_access_line(
    make_forward: Callable[..., FwdProxy], servers: Servers, events: Events
) -> None:
    """
    A tunnel's access line, written when it closes: its status, and the bytes the target
    sent (not the 200 head).
    """
    port, _ = servers.tcp(CountThenClose)
    proxy = make_forward(forward_allow=[f"127.0.0.1:{port}"])
    client = await proxy.connect(connect_request(f"127.0.0.1:{port}") + b"x" * 5000)
    await client.wait_for(b"\r\n\r\n")
    client.transport.loseWriteConnection()  # type: ignore[union-attr]
    await client.closed
    [line] = await events.access(1)
    assert client.received.endswith(b"\r\n\r\ngot 5000")
    assert line.startswith(f'127.0.0.1 "CONNECT 127.0.0.1:{port}" 200 bytes=8 duration='), line


@pytest_twisted.ensureDeferred
async def test_tunnel_logs_no_factory_lines(
    make_forward: Callable[..., FwdProxy], servers: Servers, events: Events
) -> None:
    """A CONNECT is one access line, not also "Starting factory" / "Stopping factory" noise."""
    port, _ = servers.tcp(CountThenClose)
    proxy = make_forward(forward_allow=[f"127.0.0.1:{port}"])
    before = len(events)  # (the test's own listeners log their start)
    client = await proxy.connect(connect_request(f"127.0.0.1:{port}") + b"abc")
    await client.wait_for(b"\r\n\r\n")
    client.transport.loseWriteConnection()  # type: ignore[union-attr]
    await client.closed
    assert client.received.endswith(b"got 3")
    lines = [formatEvent(e) for e in events[before:]]
    # The test's own client connects with connectProtocol, whose OneShotFactory is noisy.
    assert not [line for line in lines if "factory" in line.lower() and "OneShotFactory" not in line], lines


@pytest_twisted.ensureDeferred
async def test_tunnel_idle_timeout(make_forward: Callable[..., FwdProxy], servers: Servers) -> None:
    port, _ = servers.tcp(Echo)
    proxy = make_forward(forward_allow=[f"127.0.0.1:{port}"], tunnel_idle_timeout=0.2)
    client = await proxy.connect(connect_request(f"127.0.0.1:{port}"))
    await client.wait_for(b"\r\n\r\n")
    await client.closed  # nothing was sent either way: the proxy closes the tunnel
    assert not proxy.forwarder.tunnels


class Quiet(Protocol):
    """A target that reads and answers only when the test writes to it."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.factory.received.append(data)  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_drain_closes_tunnels_at_rest_and_lets_one_awaiting_its_answer_finish(
    make_forward: Callable[..., FwdProxy], servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    On a graceful stop, a client's pooled tunnel (its target answered last) and one nobody
    used are closed once at rest, not held for the whole drain; one whose client has sent a
    request and awaits the answer keeps going, and closes once answered and at rest.
    """
    monkeypatch.setattr(forward.Tunnel, "rest_seconds", 0.2)
    echo_port, _ = servers.tcp(Echo)
    quiet_port, quiet = servers.tcp(Quiet)
    proxy = make_forward(forward_allow=[f"127.0.0.1:{echo_port}", f"127.0.0.1:{quiet_port}"])
    pooled = await proxy.connect(connect_request(f"127.0.0.1:{echo_port}") + b"ping")
    await pooled.wait_for(lambda r: r.endswith(b"ping"))
    unused = await proxy.connect(connect_request(f"127.0.0.1:{echo_port}"))
    await unused.wait_for(b"\r\n\r\n")
    waiting = await proxy.connect(connect_request(f"127.0.0.1:{quiet_port}") + b"request")
    await waiting.wait_for(b"\r\n\r\n")
    await wait_until(lambda: quiet.received == [b"request"], "the request at its target")

    drained = proxy.site.connections.drain(get_reactor(), 60)
    for client in (pooled, unused):
        await client.closed.addTimeout(10, get_reactor())  # well before the drain deadline
    assert waiting.reason is None and not drained.called
    [target] = quiet.connections
    target.transport.write(b"answer")
    await waiting.wait_for(lambda r: r.endswith(b"answer"))
    assert await drained.addTimeout(10, get_reactor()) == 0  # nothing cut
    await waiting.closed


@pytest_twisted.ensureDeferred
async def test_bulk_is_read_in_larger_pieces_and_small_bytes_in_small_ones(
    make_forward: Callable[..., FwdProxy], servers: Servers
) -> None:
    """
    A tunnel reads 64 KiB at once until a read fills that (bulk is flowing): then 256 KiB,
    until reads are small again.  Every byte arrives, in order, either way.
    """
    port, quiet = servers.tcp(Quiet)
    proxy = make_forward(forward_allow=[f"127.0.0.1:{port}"])
    client = await proxy.connect(connect_request(f"127.0.0.1:{port}"))
    await client.wait_for(b"\r\n\r\n")
    [tunnel] = proxy.forwarder.tunnels
    [target] = quiet.connections
    assert tunnel.target.bufferSize == tunnel_module.READ_SIZE
    blob = BLOCK * 16  # 1 MiB, written at once: the proxy's reads fill their buffer
    target.transport.write(blob)
    await client.wait_for(lambda r: len(r) >= len(blob))
    assert tunnel.target.bufferSize == tunnel_module.BULK_READ
    target.transport.write(b"a few bytes")
    received = await client.wait_for(lambda r: r.endswith(b"a few bytes"))
    assert tunnel.target.bufferSize == tunnel_module.READ_SIZE
    assert received.partition(b"\r\n\r\n")[2] == blob + b"a few bytes"


class Buffering(StringTransport):
    """A transport that says it holds C{unsent} bytes not yet taken by the kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.dataBuffer = b""


@pytest.mark.parametrize("case", ["target last", "nobody", "client last", "still flushing"])
def test_tunnel_at_rest_on_drain(case: str) -> None:
    """
    The drain's rule, on a clock: a tunnel is at rest once silent for its rest time with the
    target having spoken last (or nobody), and nothing left to write either way.
    """
    clock = Clock()
    target = forward.TargetProtocol()
    target.makeConnection(Buffering())
    closed: list[forward.Tunnel] = []
    tunnel = forward.Tunnel(clock, target, 300, closed.append, Deadlines(clock))
    client = Buffering()
    tunnel.makeConnection(client)
    if case != "nobody":
        tunnel.dataReceived(b"request")
    if case in ("target last", "still flushing"):
        target.dataReceived(b"answer")
    if case == "still flushing":
        client.dataBuffer = b"answer"  # a slow client has not read it yet
    clock.advance(tunnel.rest_seconds)
    tunnel.close_when_done()
    if case in ("target last", "nobody"):
        assert closed == [tunnel]  # at once
        assert client.disconnecting and target.transport.disconnecting  # type: ignore[union-attr]
        return
    assert closed == []
    clock.advance(tunnel.rest_seconds * 10)
    assert closed == []  # however long it takes, until the drain deadline cuts it
    if case == "client last":
        target.dataReceived(b"answer")
    else:
        client.dataBuffer = b""
    clock.advance(tunnel.rest_seconds)
    assert closed == [tunnel]  # at rest now


def test_tunnel_idle_timeout_counts_from_the_last_byte() -> None:
    """
    The idle timeout is silence both ways: bytes either way postpone the cut, which comes
    once the tunnel has been silent for the whole timeout (not a fixed time after its start).
    """
    clock = Clock()
    target = forward.TargetProtocol()
    target.makeConnection(StringTransport())
    closed: list[forward.Tunnel] = []
    tunnel = forward.Tunnel(clock, target, 10, closed.append, Deadlines(clock))
    client = StringTransport()
    tunnel.makeConnection(client)
    clock.advance(6)
    tunnel.dataReceived(b"request")
    clock.advance(6)
    target.dataReceived(b"answer")
    clock.advance(9.5)
    assert closed == [] and not client.disconnecting  # silent for 9.5 s of 10
    clock.advance(0.5)
    assert closed == [tunnel]
    assert client.disconnecting and target.transport.disconnecting  # type: ignore[union-attr]
    assert clock.getDelayedCalls() == []  # no timer left behind


def test_a_closed_tunnel_is_freed_without_the_garbage_collector() -> None:
    """
    A tunnel and its target protocol link to each other while open; once both connections
    are gone nothing keeps them, not even a reference cycle (left to the cyclic collector,
    each CONNECT's objects would pile up between its passes).
    """
    clock = Clock()
    target = forward.TargetProtocol()
    target.makeConnection(StringTransport())
    tunnel = forward.Tunnel(clock, target, 10, lambda _: None, Deadlines(clock))
    tunnel.makeConnection(StringTransport())
    tunnel.dataReceived(b"request")
    target.dataReceived(b"answer")
    tunnel.connectionLost(Failure(ierror.ConnectionDone()))
    target.connectionLost(Failure(ierror.ConnectionDone()))
    freed = [weakref.ref(tunnel), weakref.ref(target)]
    gc.disable()
    try:
        del tunnel, target
        assert [ref() for ref in freed] == [None, None]
    finally:
        gc.enable()


class Connects:
    """An endpoint that connects at once, recording where it was asked to go."""

    def __init__(self, dialled: list[str], ip: str) -> None:
        self.dialled = dialled
        self.ip = ip

    def connect(self, factory: Any) -> Deferred[Any]:
        self.dialled.append(self.ip)
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        return succeed(protocol)


def test_dialing_an_ip_literal_resolves_nothing_and_leaves_no_timer() -> None:
    clock = Clock()
    asked: list[str] = []
    dialled: list[str] = []

    def resolver(name: str) -> Deferred[list[str]]:
        asked.append(name)
        return succeed(["93.184.216.34"])

    dialer = forward.Dialer(clock, resolver, lambda ip, port, timeout: Connects(dialled, ip))
    config = Config(forward_allow=("192.0.2.7:443", "svc.example:443"))
    for host in ("192.0.2.7", "svc.example"):
        connected = dialer.connect(config, host, 443, forward.TargetFactory())
        assert isinstance(connected.result, forward.TargetProtocol)  # type: ignore[attr-defined]
        assert len(dialer.deadlines) == 0  # the connect timeout is gone
    assert asked == ["svc.example"]  # the IP literal was never resolved
    assert dialled == ["192.0.2.7", "93.184.216.34"]


def test_dialing_times_out_as_a_whole() -> None:
    """One connect timeout bounds resolving and connecting: 504, and the attempt is cancelled."""
    clock = Clock()
    cancelled: list[str] = []
    resolving: Deferred[list[str]] = Deferred()

    class Hangs:
        def connect(self, factory: Any) -> Deferred[Any]:
            return Deferred(lambda _: cancelled.append("connect"))

    dialer = forward.Dialer(clock, lambda name: resolving, lambda ip, port, timeout: Hangs())
    config = Config(forward_allow=("svc.example:443",), connect_timeout=10)
    outcome: list[Any] = []
    dialer.connect(config, "svc.example", 443, forward.TargetFactory()).addBoth(outcome.append)
    clock.advance(4)
    resolving.callback(["93.184.216.34"])  # 4 s to resolve: 6 s are left to connect
    clock.advance(5.9)
    assert outcome == [] and cancelled == []
    clock.advance(0.1)
    [failure] = outcome
    assert forward.refusal(failure, 10).status == 504
    assert cancelled == ["connect"]
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_a_whole_connect_is_freed_without_the_garbage_collector(
    make_forward: Callable[..., FwdProxy],
    servers: Servers,
    cyclic_garbage: Callable[[Callable[[object], bool]], list[str]],
) -> None:
    """
    A CONNECT's objects (its dial, its target's connection and factory, the tunnel) are freed
    by reference counting once both connections are gone: none is left in a cycle for the
    cyclic collector.
    """
    port, _ = servers.tcp(Echo)
    proxy = make_forward(forward_allow=[f"127.0.0.1:{port}"])

    async def one_connect() -> None:
        client = await proxy.connect(connect_request(f"127.0.0.1:{port}"))
        await client.wait_for(lambda r: r.endswith(b"\r\n\r\n"))
        client.transport.loseConnection()  # type: ignore[union-attr]
        await client.closed
        await wait_until(lambda: not proxy.forwarder.tunnels, "the tunnel closed")

    await one_connect()  # anything made once, on the first use, is made now
    cyclic_garbage(_of_a_connect)  # (and forgotten)
    for _ in range(3):
        await one_connect()
    assert cyclic_garbage(_of_a_connect) == []


def _of_a_connect(thing: object) -> bool:
    """Whether C{thing} is one of a CONNECT's objects (not, say, another test's client)."""
    if isinstance(thing, tcp.Connection):  # (a closed one has let go of its protocol)
        thing = getattr(thing, "protocol", None)
    return isinstance(thing, (TCPDial, forward.TargetFactory, forward.TargetProtocol, forward.Tunnel))


def _dial_by(api: str, ending: str) -> tuple[Any, ...]:
    """
    One CONNECT dial over the default TCP connector (a memory reactor), through C{api}
    (C{Dialer.connect}'s Deferred, or C{Dialer.dial}'s callbacks), ending as C{ending} says:
    what the caller was told, and what was left of the connection attempt.
    """
    reactor = MemoryReactorClock()
    told: list[Any] = []
    dialer = forward.Dialer(reactor, connector=forward.tcp_connector(reactor))
    config = Config(forward_allow=("192.0.2.7:443",), connect_timeout=10)
    factory = forward.TargetFactory()
    if api == "deferred":
        d = dialer.connect(config, "192.0.2.7", 443, factory)
        d.addBoth(told.append)
        cancel = d.cancel
    else:
        attempt = dialer.dial(config, "192.0.2.7", 443, factory, told.append, told.append)
        cancel = attempt.cancel
    [(host, port, connecting_factory, timeout, _)] = reactor.tcpClients
    [connector] = reactor.connectors
    assert (host, port, connecting_factory, timeout) == ("192.0.2.7", 443, factory, None)
    if ending == "connected":
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
    elif ending == "refused":
        factory.clientConnectionFailed(connector, Failure(ierror.ConnectionRefusedError()))
    elif ending == "timeout":
        reactor.advance(10)
    else:
        cancel()
    if connector.stoppedConnecting:  # what a real connector then tells its factory
        factory.clientConnectionFailed(connector, Failure(ierror.UserError()))
    outcome: Any = told
    if told and isinstance(told[0], Failure):
        outcome = type(told[0].value).__name__
        if isinstance(told[0].value, forward.Refused):
            outcome = told[0].value.error.status
    elif told:
        outcome = type(told[0]).__name__
    return outcome, connector.stoppedConnecting, len(dialer.deadlines)


@pytest.mark.parametrize("ending", ["connected", "refused", "timeout", "cancelled"])
def test_dialing_with_callbacks_tells_what_the_deferred_does(ending: str) -> None:
    """
    C{Dialer.dial} (callbacks, no Deferred: the CONNECT path) and C{Dialer.connect} (a
    Deferred) give the same verdicts and stop the same way; cancelled, the callbacks are told
    nothing (the Deferred fails with CancelledError).
    """
    expected = {
        "connected": ("TargetProtocol", False),
        "refused": (502, False),
        "timeout": (504, True),
        "cancelled": ("CancelledError", True),
    }[ending]
    by_deferred = _dial_by("deferred", ending)
    by_callbacks = _dial_by("callbacks", ending)
    assert by_deferred == (expected[0], expected[1], 0)
    assert by_callbacks == ([] if ending == "cancelled" else expected[0], expected[1], 0)


@pytest_twisted.ensureDeferred
async def test_stalled_reader_keeps_proxy_buffer_bounded(
    make_forward: Callable[..., FwdProxy], servers: Servers
) -> None:
    """
    The client stops reading while the target sends 32 MiB: the proxy stops reading from the
    target once its write buffer to the client is full, so its buffer stays small; when the
    client reads again every byte arrives, in order.
    """
    port, _ = servers.tcp(Firehose)
    proxy = make_forward(forward_allow=[f"127.0.0.1:{port}"])
    digest = hashlib.sha256()
    total = 0
    first: Deferred[None] = Deferred()

    def on_data(data: bytes) -> None:
        nonlocal total
        if not first.called:
            head, _, data = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            first.callback(None)
        digest.update(data)
        total += len(data)

    client = await proxy.connect(connect_request(f"127.0.0.1:{port}"), on_data)
    await first
    [tunnel] = proxy.forwarder.tunnels
    client.transport.pauseProducing()  # type: ignore[union-attr]  # the stalled reader
    most = pending_write_bytes(tunnel.client)
    write = tunnel.client.write

    def measured_write(data: bytes) -> None:
        nonlocal most
        write(data)
        most = max(most, pending_write_bytes(tunnel.client))

    tunnel.client.write = measured_write
    # Wait for the stall: the proxy has stopped reading from the target, holds bytes for the
    # client, and the kernel will not take more of them (the socket is not writable: its
    # buffers are full because the client does not read).
    stalled: Deferred[None] = Deferred()
    pause = tunnel.target.pauseProducing

    def on_pause() -> None:
        pause()
        writable = select.select([], [tunnel.client.socket], [], 0)[1]
        if pending_write_bytes(tunnel.client) and not writable and not stalled.called:
            stalled.callback(None)

    tunnel.target.pauseProducing = on_pause
    await stalled.addTimeout(15, get_reactor())
    stalled_read = tunnel.bytes_down
    client.transport.resumeProducing()  # type: ignore[union-attr]
    await client.closed
    assert total == len(BLOCK) * Firehose.blocks
    assert digest.hexdigest() == hashlib.sha256(BLOCK * Firehose.blocks).hexdigest()
    # Bounded: the proxy holds about one socket buffer's worth, never the stream.
    assert most < 1024 * 1024, most
    assert stalled_read < total
    print(f"proxy write buffer at most {most} bytes; {stalled_read} bytes read when stalled")


@pytest_twisted.ensureDeferred
async def test_connect_not_allowed_403(make_forward: Callable[..., FwdProxy], servers: Servers) -> None:
    port, echo = servers.tcp(Echo)
    proxy = make_forward(forward_allow=["api.openai.com:443"])
    response = await proxy.ask(connect_request(f"127.0.0.1:{port}"))
    error = assert_openai_error(response, 403)
    assert error["code"] == "forward_not_allowed"
    assert echo.connections == []


@pytest_twisted.ensureDeferred
async def test_connect_forwarding_off_403(make_forward: Callable[..., FwdProxy], servers: Servers) -> None:
    port, echo = servers.tcp(Echo)
    proxy = make_forward(forward_allow=["none"])
    assert proxy.config.forward_allow == ()
    for target in (f"127.0.0.1:{port}", "api.openai.com:443"):
        assert_openai_error(await proxy.ask(connect_request(target)), 403)
    response = await proxy.ask(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert_openai_error(response, 403)
    assert echo.connections == []


@pytest_twisted.ensureDeferred
async def test_loopback_by_name_is_refused(make_forward: Callable[..., FwdProxy], servers: Servers) -> None:
    """'localhost' resolves (with the real resolver) to loopback: never reached by name."""
    port, echo = servers.tcp(Echo)
    web = servers.web(Record())
    proxy = make_forward(forward_allow=[f"localhost:{port}", f"localhost:{web}"])
    error = assert_openai_error(await proxy.ask(connect_request(f"localhost:{port}")), 403)
    assert "non-public" in error["message"]
    response = await proxy.ask(b"GET http://localhost:%d/x HTTP/1.1\r\nHost: localhost\r\n\r\n" % web)
    assert_openai_error(response, 403)
    assert echo.connections == []


@pytest_twisted.ensureDeferred
async def test_name_connects_to_checked_address_not_name(
    make_forward: Callable[..., FwdProxy], servers: Servers
) -> None:
    """
    A name is resolved once, every address checked, and the connection goes to the checked
    address.  A private address is allowed only when listed itself.
    """
    port, _ = servers.tcp(Echo)
    asked: list[str] = []

    def resolver(name: str) -> Deferred[list[str]]:
        asked.append(name)
        return succeed(["127.0.0.1"])

    dialed: list[tuple[str, int]] = []
    tcp = forward.tcp_connector(get_reactor())

    def connector(ip: str, p: int, timeout: float) -> Any:
        dialed.append((ip, p))
        return tcp(ip, p, timeout)

    blocked = make_forward(resolver, connector, forward_allow=[f"internal.example:{port}"])
    assert_openai_error(await blocked.ask(connect_request(f"internal.example:{port}")), 403)
    assert dialed == []

    allowed = make_forward(
        resolver, connector, forward_allow=[f"internal.example:{port}", f"127.0.0.1:{port}"]
    )
    client = await allowed.connect(connect_request(f"internal.example:{port}") + b"ping")
    await client.wait_for(lambda r: r.endswith(b"ping"))
    assert dialed == [("127.0.0.1", port)]
    assert asked == ["internal.example", "internal.example"]


@pytest_twisted.ensureDeferred
async def test_proxy_auth_407_then_ok(
    make_forward: Callable[..., FwdProxy], servers: Servers, tmp_path: Path
) -> None:
    port, _ = servers.tcp(Echo)
    users = tmp_path / "users"
    users.write_text("alice:s3cret:with-colon\nbob:hunter2\n")
    proxy = make_forward(forward_allow=[f"127.0.0.1:{port}"], forward_users=str(users))
    target = f"127.0.0.1:{port}"
    for extra in (
        (),
        (b"Proxy-Authorization: " + basic("alice", "wrong"),),
        (b"Proxy-Authorization: " + basic("mallory", "s3cret:with-colon"),),
        (b"Proxy-Authorization: Basic !!notbase64",),
        (b"Proxy-Authorization: Bearer s3cret",),
    ):
        response = await proxy.ask(connect_request(target, *extra))
        error = assert_openai_error(response, 407)
        assert response.headers[b"proxy-authenticate"] == b'Basic realm="aoaiproxy"'
        assert "s3cret" not in response.body.decode() and "wrong" not in error["message"]
    # Absolute-form requests too, including the API host.
    response = await proxy.ask(
        b"POST http://api.openai.com/v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    assert_openai_error(response, 407)
    # The same connection may retry with credentials (as curl does).
    client = await proxy.connect(connect_request(target))
    first = parse_response(await client.wait_for(response_done))
    assert first.status == 407
    client.received = b""
    client.send(connect_request(target, b"Proxy-Authorization: " + basic("alice", "s3cret:with-colon")))
    await client.wait_for(b"\r\n\r\n")
    assert client.received.startswith(b"HTTP/1.1 200 ")
    client.send(b"tunnelled")
    await client.wait_for(lambda r: r.endswith(b"tunnelled"))
    # Origin-form API requests need no proxy credentials.
    health = await proxy.ask(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert health.status == 200


@pytest_twisted.ensureDeferred
async def test_connect_refused_502(make_forward: Callable[..., FwdProxy]) -> None:
    closed_port = free_port()  # bound, then closed: nothing listens there
    proxy = make_forward(forward_allow=[f"127.0.0.1:{closed_port}"])
    response = await proxy.ask(connect_request(f"127.0.0.1:{closed_port}"))
    error = assert_openai_error(response, 502)
    assert "refused" in error["message"]


@pytest_twisted.ensureDeferred
async def test_connect_timeout_504(make_forward: Callable[..., FwdProxy]) -> None:
    cancelled: list[str] = []

    class Never:
        def __init__(self, ip: str) -> None:
            self.ip = ip

        def connect(self, factory: Any) -> Deferred[Any]:
            return Deferred(lambda d: cancelled.append(self.ip))

    proxy = make_forward(
        connector=lambda ip, port, timeout: Never(ip),
        forward_allow=["127.0.0.1:9"],
        connect_timeout="0.2",
    )
    response = await proxy.ask(connect_request("127.0.0.1:9"))
    error = assert_openai_error(response, 504)
    assert "0.2s" in error["message"]
    assert cancelled == ["127.0.0.1"]  # the attempt is cancelled, not left dangling


@pytest_twisted.ensureDeferred
async def test_connect_timeout_504_real_socket(make_forward: Callable[..., FwdProxy]) -> None:
    """A real connect that hangs: a listener whose accept queue is full drops new SYNs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        proxy = make_forward(forward_allow=[f"127.0.0.1:{port}"], connect_timeout="0.3")
        error = assert_openai_error(await proxy.ask(connect_request(f"127.0.0.1:{port}")), 504)
        assert error["code"] == "gateway_timeout"
    finally:
        for s in fillers:
            s.close()
        listener.close()


@pytest_twisted.ensureDeferred
async def test_connect_malformed_target_400(make_forward: Callable[..., FwdProxy]) -> None:
    proxy = make_forward(forward_allow=["api.openai.com:443"])
    for target in ("api.openai.com", "[::1:443", "a b:443", "host:0", "host:99999"):
        assert_openai_error(await proxy.ask(connect_request(target)), 400)


@pytest_twisted.ensureDeferred
async def test_connect_to_a_name_with_an_empty_label_is_400_at_once(
    make_forward: Callable[..., FwdProxy], events: Events
) -> None:
    """
    Allowed by its suffix, but no name: answered at once, not after the connect timeout
    (the resolver raised, and the failure was logged as an unhandled error).
    """
    proxy = make_forward(forward_allow=["*.example.test:443"], connect_timeout="600")
    for target in ("a..example.test:443", "x" * 64 + ".example.test:443"):
        error = assert_openai_error(await proxy.ask(connect_request(target)), 400)
        assert error["code"] == "invalid_request_target"
    response = await proxy.ask(b"GET http://a..example.test/ HTTP/1.1\r\nHost: a\r\n\r\n")
    assert_openai_error(response, 400, "invalid_request_target")
    assert [formatEvent(e) for e in events if e.get("log_failure") or e.get("isError")] == []


@pytest.mark.parametrize(
    "refusal",
    ["403", "400", "502", "407"],
)
@pytest_twisted.ensureDeferred
async def test_refused_connect_closes_and_serves_no_pipelined_bytes(
    make_forward: Callable[..., FwdProxy], tmp_path: Path, refusal: str
) -> None:
    """
    What a client sent behind a CONNECT is tunnel data: when the CONNECT is refused it is
    never served as HTTP (an API request behind it got 200); the answer says
    C{Connection: close} and the connection closes.
    """
    closed_port = free_port()
    flags: dict[str, Any] = {"forward_allow": [f"127.0.0.1:{closed_port}"]}
    target = {"403": "127.0.0.2:443", "400": "a..b:443"}.get(refusal, f"127.0.0.1:{closed_port}")
    if refusal == "407":
        users = tmp_path / "users"
        users.write_text("alice:secret\n")
        flags["forward_users"] = str(users)
    proxy = make_forward(**flags)
    client = await proxy.connect(connect_request(target) + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await client.closed
    response = parse_response(client.received)
    assert_openai_error(response, int(refusal))
    assert response.headers[b"connection"] == b"close"
    assert client.received.count(b"HTTP/1.1 ") == 1  # the healthz request was not served


@pytest_twisted.ensureDeferred
async def test_refused_connect_over_a_slow_answer_closes(make_forward: Callable[..., FwdProxy]) -> None:
    """Tunnel bytes sent while the CONNECT is still being decided (504) are not HTTP either."""
    proxy = make_forward(
        connector=lambda ip, port, timeout: Never(),
        forward_allow=["127.0.0.1:9"],
        connect_timeout="0.3",
    )
    client = await proxy.connect(connect_request("127.0.0.1:9"))
    client.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await client.closed
    assert_openai_error(parse_response(client.received), 504)
    assert client.received.count(b"HTTP/1.1 ") == 1


def without_time(text: bytes) -> bytes:
    """An answer or an access line without what differs from one run to the next."""
    return re.sub(rb"(Date: [^\r]*|duration=\S+)", b"", text)


@pytest.mark.parametrize("case", ["tunnel", "http/1.0", "credentials", "refused"])
@pytest_twisted.ensureDeferred
async def test_a_connect_read_at_once_is_served_as_a_parsed_one(
    make_forward: Callable[..., FwdProxy], servers: Servers, events: Events, tmp_path: Path, case: str
) -> None:
    """
    A plain CONNECT head whole in the client's first segment is read at once, without
    twisted.web's parser (the channel's fast path); the same request with bare-LF line ends
    goes through the parser.  The client, the target and the access log see the same either
    way: the 200, the tunnelled bytes both ways, the half-close, the error of a dial refused
    (with its first tunnel bytes never served as HTTP), one access line.
    """
    port, _ = servers.tcp(CountThenClose)
    flags: dict[str, Any] = {}
    extra: tuple[bytes, ...] = ()
    target = f"127.0.0.1:{free_port() if case == 'refused' else port}"
    if case == "credentials":
        users = tmp_path / "users"
        users.write_text("alice:secret\n")
        flags["forward_users"] = str(users)
        extra = (b"Proxy-Authorization: " + basic("alice", "secret"),)
    proxy = make_forward(forward_allow=[target], **flags)
    made: list[ParsedLines] = []

    class Kept(ParsedLines):
        def connectionMade(self) -> None:
            super().connectionMade()
            made.append(self)

    proxy.site.protocol = Kept  # type: ignore[assignment]
    head = connect_request(target, b"User-Agent: parity/1", *extra)
    if case == "http/1.0":
        head = head.replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    seen = []
    parsed_lines = []
    for sent in (head, head.replace(b"\r\n", b"\n")):
        client = await proxy.connect(sent + b"x" * 5000 + b"GET /healthz HTTP/1.1\r\n\r\n")
        if case != "refused":
            await client.wait_for(b"\r\n\r\n")
            client.transport.loseWriteConnection()  # type: ignore[union-attr]
        await client.closed
        [*_, line] = await events.access(len(seen) + 1)
        seen.append((without_time(client.received), without_time(line.encode())))
        parsed_lines.append(made[-1].parsed_lines)
    assert parsed_lines[0] == 0 and parsed_lines[1] > 0  # read at once, then parsed
    assert seen[0] == seen[1]
    answer, line = seen[0]
    if case == "refused":
        assert parse_response(answer).status == 502
        assert answer.count(b"HTTP/1.1 ") == 1  # the request behind it was not served
    else:
        assert answer == b"HTTP/1.1 200 Connection Established\r\n\r\ngot 5025"
        assert line.startswith(b'127.0.0.1 "CONNECT %s" 200 bytes=8 ' % target.encode()), line


class Never:
    """An endpoint whose connection attempt never ends (until cancelled)."""

    def connect(self, factory: Any) -> Deferred[Any]:
        return Deferred()


# -- absolute-form -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_absolute_form_relayed_without_hop_by_hop_or_proxy_headers(
    make_forward: Callable[..., FwdProxy], servers: Servers, tmp_path: Path
) -> None:
    record = Record()
    port = servers.web(record)
    users = tmp_path / "users"
    users.write_text("alice:pw\n")
    proxy = make_forward(forward_allow=[f"127.0.0.1:{port}"], forward_users=str(users))
    response = await proxy.ask(
        b"POST http://127.0.0.1:%d/some/path?q=1 HTTP/1.1\r\n"
        b"Host: not-the-target.example\r\n"
        b"Proxy-Authorization: %s\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Connection: keep-alive, X-Drop-Me\r\n"
        b"X-Drop-Me: 1\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"TE: trailers\r\n"
        b"Authorization: Bearer for-the-destination\r\n"
        b"X-Keep: yes\r\n"
        b"Content-Length: 5\r\n\r\nhello" % (port, basic("alice", "pw"))
    )
    assert response.status == 200
    assert response.body == b"hello from /some/path?q=1"
    assert response.headers[b"x-upstream"] == b"yes"
    assert response.headers[b"access-control-allow-origin"] == b"*"
    assert b"keep-alive" not in response.headers
    assert b"proxy-authenticate" not in response.headers
    [(method, uri, headers, body)] = record.requests
    assert (method, uri, body) == (b"POST", b"/some/path?q=1", b"hello")
    assert headers[b"x-keep"] == [b"yes"]
    assert headers[b"authorization"] == [b"Bearer for-the-destination"]
    assert headers[b"host"] == [b"127.0.0.1:%d" % port]
    for name in (b"proxy-authorization", b"proxy-connection", b"x-drop-me", b"keep-alive", b"te"):
        assert name not in headers, name


@pytest_twisted.ensureDeferred
async def test_absolute_form_not_allowed_403(make_forward: Callable[..., FwdProxy], servers: Servers) -> None:
    record = Record()
    port = servers.web(record)
    proxy = make_forward(forward_allow=["api.openai.com:443"])
    response = await proxy.ask(b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % port)
    assert_openai_error(response, 403)
    https = await proxy.ask(b"GET https://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert_openai_error(https, 400)
    assert record.requests == []


@pytest_twisted.ensureDeferred
async def test_absolute_form_bad_port_400(make_forward: Callable[..., FwdProxy]) -> None:
    """An explicit port 0 (or one out of range) is refused as CONNECT's is, not taken for 80."""
    proxy = make_forward(forward_allow=["127.0.0.1:80"])
    for authority in (b"127.0.0.1:0", b"127.0.0.1:65536", b"127.0.0.1:-1"):
        response = await proxy.ask(b"GET http://%s/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % authority)
        assert_openai_error(response, 400)


@pytest_twisted.ensureDeferred
async def test_absolute_form_refused_502(make_forward: Callable[..., FwdProxy]) -> None:
    closed_port = free_port()
    proxy = make_forward(forward_allow=[f"127.0.0.1:{closed_port}"])
    response = await proxy.ask(b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % closed_port)
    assert_openai_error(response, 502)


@pytest_twisted.ensureDeferred
async def test_absolute_form_error_while_relaying_is_answered(
    make_forward: Callable[..., FwdProxy], servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception while relaying the response still answers the client (502), not silence."""

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(handlers, "relay_response", broken)
    port = servers.web(Record())
    proxy = make_forward(forward_allow=[f"127.0.0.1:{port}"])
    response = await proxy.ask(b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % port)
    assert_openai_error(response, 502)


@pytest_twisted.ensureDeferred
async def test_absolute_form_openai_is_converted_to_azure(
    make_forward: Callable[..., FwdProxy], fake: FakeAzure
) -> None:
    proxy = make_forward(forward_allow=["none"])
    body = json.dumps({"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}]})
    response = await proxy.ask(
        b"POST http://api.openai.com/v1/chat/completions?x=1 HTTP/1.1\r\n"
        b"Host: api.openai.com\r\nProxy-Connection: keep-alive\r\n"
        b"Authorization: Bearer client-key\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body.encode())
    )
    assert response.status == 200, response.body
    assert response.json()["object"] == "chat.completion"
    [rec] = fake.requests
    assert rec.path == "/openai/deployments/gpt-35-turbo/chat/completions"
    assert rec.query["api-version"] == [proxy.config.api_version]
    assert rec.query["x"] == ["1"]
    assert rec.header("api-key") == "client-key"
    assert rec.header("proxy-connection") is None


# -- pure functions ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"api.openai.com:443", ("api.openai.com", 443)),
        (b"API.OpenAI.com.:443", ("api.openai.com", 443)),
        (b"[::1]:8443", ("::1", 8443)),
        (b"[0:0::1]:8443", ("::1", 8443)),
        (b"10.0.0.1:80", ("10.0.0.1", 80)),
    ],
)
def test_parse_authority(target: bytes, expected: tuple[str, int]) -> None:
    assert forward.parse_authority(target) == expected


@pytest.mark.parametrize(
    "target",
    [
        b"host",
        b"host:",
        b"host:x",
        b"::1:443",
        b"[::1]",
        b"[zz]:1",
        b"h/x:1",
        b":443",
        # Names no resolver takes: an empty label, a label or a name too long, odd characters.
        b"a..example.test:443",
        b".example.test:443",
        b"a" * 64 + b".example.test:443",
        b"a." * 127 + b"b:443",
        b"-a.example.test:443",
        b"a!.example.test:443",
    ],
)
def test_parse_authority_rejects(target: bytes) -> None:
    with pytest.raises(ValueError):
        forward.parse_authority(target)


def test_destination_allowed() -> None:
    config = Config(
        endpoint="https://x.openai.azure.com",
        forward_allow=("api.openai.com:443", "*.openai.azure.com:443", "[::1]:4443"),
    )
    assert forward.destination_allowed(config, "api.openai.com", 443)
    assert not forward.destination_allowed(config, "api.openai.com", 80)
    assert forward.destination_allowed(config, "res.openai.azure.com", 443)
    assert forward.destination_allowed(config, "a.b.openai.azure.com", 443)
    assert not forward.destination_allowed(config, "openai.azure.com", 443)
    assert not forward.destination_allowed(config, "evilopenai.azure.com", 443)
    assert forward.destination_allowed(config, "::1", 4443)
    assert not forward.destination_allowed(config, "::1", 443)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "::",
        "fd00:ec2::254",
        "fc00::1",
        "fe80::1",
        "::ffff:127.0.0.1",
        "64:ff9b::a00:1",
        "ff02::1",
        "not-an-ip",
        # IPv6 forms that lead to an IPv4 address inside: 6to4, IPv4-compatible.
        "2002:7f00:1::",
        "2002:a00:1::1",
        "2002:a9fe:a9fe::1",
        "::127.0.0.1",
        "::10.0.0.1",
        "::169.254.169.254",
        # Refused whole: local-use NAT64, site-local, Teredo.
        "64:ff9b:1::a00:1",
        "64:ff9b:1:808:8:800::",
        "fec0::1",
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",
    ],
)
def test_address_blocked(address: str) -> None:
    assert forward.address_blocked(address)


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "2606:2800:220:1::1", "20.42.73.28", "2002:808:808::1", "64:ff9b::808:808"]
)
def test_address_public(address: str) -> None:
    assert not forward.address_blocked(address)


def test_checked_addresses_all_or_nothing() -> None:
    config = Config(forward_allow=("svc.example:443", "10.0.0.5:443"))
    check = forward.checked_addresses
    assert check(config, "svc.example", 443, ["93.184.216.34"]) == ["93.184.216.34"]
    assert check(config, "svc.example", 443, ["93.184.216.34", "127.0.0.1"]) == []
    assert check(config, "svc.example", 443, ["10.0.0.5"]) == ["10.0.0.5"]
    assert check(config, "svc.example", 443, ["10.0.0.6"]) == []


def test_proxy_authorized() -> None:
    config = Config(forward_users={"alice": "pw:x", "bob": "b"})
    ok = forward.proxy_authorized
    assert ok(Config(), None)
    assert ok(config, basic("alice", "pw:x"))
    assert ok(config, b"basic " + base64.b64encode(b"bob:b"))
    assert not ok(config, None)
    assert not ok(config, basic("alice", "pw"))
    assert not ok(config, basic("bob", "pw:x"))
    assert not ok(config, b"Basic " + base64.b64encode(b"alicepw:x"))
    assert not ok(config, b"Basic ***")


def test_connect_error_classification() -> None:
    classify = forward.refusal
    assert classify(Failure(ierror.TimeoutError()), 3).status == 504
    assert classify(Failure(ierror.ConnectionRefusedError()), 3).status == 502
    assert classify(Failure(ierror.NoRouteError()), 3).status == 502
