"""
L{aoaiproxy._twisted.write_through}, the tunnel's write: straight to a plain TCP socket with
nothing buffered, else (and for what the kernel does not take) through C{transport.write}, on
real loopback connections: the bytes arrive whole and in order, and backpressure still works.
And L{aoaiproxy._twisted.half_close_through} and L{aoaiproxy._twisted.close_through}, the
tunnel's half-close and close: at once with nothing buffered, else after the buffered bytes (a
half-closed connection's other direction stays open).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IListeningPort
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from aoaiproxy._twisted import close_through, half_close_through, pending_write_bytes, write_through

from .conftest import get_reactor
from .rawnet import RawClient, connect, connect_half

BLOCK = bytes(range(256)) * 256  # 64 KiB


@implementer(IHalfCloseableProtocol)
class Accepted(Protocol):
    """
    The server's side of a test connection: the transport under test.  It records the bytes
    it reads, to the client's half-close (C{read_ended}), its write side's end
    (C{writeConnectionLost}), and the reason its connection ended.
    """

    def __init__(self) -> None:
        self.received = b""
        self.read_ended: Deferred[bytes] = Deferred()
        self.write_ended = 0
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        self.factory.accepted.callback(self)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.read_ended.callback(self.received)

    def writeConnectionLost(self) -> None:
        self.write_ended += 1

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


@attrs.define
class Pair:
    server: Accepted
    client: Any

    @property
    def transport(self) -> Any:
        return self.server.transport


async def _pair(connected: Callable[[int], Awaitable[RawClient]]) -> Pair:
    """
    A loopback connection: a Twisted transport (the server's), and the client C{connected}
    (L{rawnet.connect} or L{rawnet.connect_half}) makes to its port.
    """
    factory = Factory.forProtocol(Accepted)
    factory.accepted = Deferred()  # type: ignore[attr-defined]
    port: IListeningPort = get_reactor().listenTCP(0, factory, interface="127.0.0.1")
    client = await connected(port.getHost().port)  # type: ignore[attr-defined]
    server = await factory.accepted  # type: ignore[attr-defined]
    await port.stopListening()
    return Pair(server, client)


@pytest_twisted.async_yield_fixture
async def pair() -> AsyncIterator[Pair]:
    """A loopback connection whose client closes at the server's half-close."""
    made = await _pair(connect)
    yield made
    await made.client.abort()


@pytest_twisted.async_yield_fixture
async def half_pair() -> AsyncIterator[Pair]:
    """A loopback connection whose client, at the server's half-close, stays open to write."""
    made = await _pair(connect_half)
    yield made
    await made.client.abort()


@pytest_twisted.ensureDeferred
async def test_sent_at_once_when_nothing_is_buffered(pair: Pair) -> None:
    transport = pair.transport
    write_through(transport, b"hello")
    # Handed to the kernel now: nothing kept, no wait for the next reactor turn.
    assert pending_write_bytes(transport) == 0
    assert transport not in get_reactor().getWriters()
    assert await pair.client.wait_for(b"hello") == b"hello"


@pytest_twisted.ensureDeferred
async def test_behind_buffered_bytes_it_keeps_the_order(pair: Pair) -> None:
    transport = pair.transport
    transport.write(b"first;")  # buffered until the reactor's next turn
    write_through(transport, b"second;")
    write_through(transport, b"third")
    assert await pair.client.wait_for(b"third") == b"first;second;third"


@pytest_twisted.ensureDeferred
async def test_what_the_kernel_refuses_is_buffered_and_pauses_the_producer(pair: Pair) -> None:
    """
    The client stops reading: the kernel's buffers fill, the rest waits in the transport and
    its streaming producer is paused; once the client reads, every byte arrives in order.
    """
    transport = pair.transport
    paused: list[bool] = []

    class Producer:
        def pauseProducing(self) -> None:
            paused.append(True)

        def resumeProducing(self) -> None:
            paused.append(False)

        def stopProducing(self) -> None:
            pass

    transport.registerProducer(Producer(), True)
    pair.client.transport.pauseProducing()  # type: ignore[union-attr]
    digest = hashlib.sha256()
    sent = 0
    for _ in range(1024):  # bounded: 64 MiB at most, far more than any socket buffer
        write_through(transport, BLOCK)
        digest.update(BLOCK)
        sent += len(BLOCK)
        if paused:
            break
    assert paused == [True]
    assert pending_write_bytes(transport) > 0
    received = hashlib.sha256()
    total = 0

    def on_data(data: bytes) -> None:
        nonlocal total
        received.update(data)
        total += len(data)

    pair.client.on_data = on_data
    pair.client.transport.resumeProducing()  # type: ignore[union-attr]
    await pair.client.wait_for(lambda _: total == sent)
    assert received.hexdigest() == digest.hexdigest()
    assert paused == [True, False]  # resumed once the transport had written it all
    transport.unregisterProducer()


def test_other_transports_write_as_usual() -> None:
    """A transport that is not a plain TCP socket (TLS, a wrapper, a test double) gets write()."""
    transport = StringTransport()
    write_through(transport, b"through the transport")
    assert transport.value() == b"through the transport"


@pytest_twisted.ensureDeferred
async def test_a_half_close_comes_after_every_byte(pair: Pair) -> None:
    """As with C{transport.write}: bytes written before the write side closes all arrive first."""
    transport = pair.transport
    write_through(transport, b"last ")
    transport.loseWriteConnection()
    write_through(transport, b"words")
    await pair.client.closed.addTimeout(10, get_reactor())
    assert pair.client.received == b"last words"


@pytest_twisted.ensureDeferred
async def test_half_closed_at_once_when_nothing_is_buffered(half_pair: Pair) -> None:
    """
    Nothing buffered: the write side is shut now, not on a later reactor turn (the transport
    is not registered for writing), and the protocol is told; the client reads the end of
    our bytes, and what it sends afterwards still arrives.
    """
    transport = half_pair.transport
    write_through(transport, b"all of it")
    half_close_through(transport)
    assert transport not in get_reactor().getWriters()
    assert half_pair.server.write_ended == 1
    assert await half_pair.client.eof.addTimeout(10, get_reactor()) == b"all of it"
    half_pair.client.send(b"the other way")
    half_pair.client.transport.loseWriteConnection()  # type: ignore[union-attr]
    assert await half_pair.server.read_ended.addTimeout(10, get_reactor()) == b"the other way"


@pytest_twisted.ensureDeferred
async def test_half_closed_after_the_buffered_bytes(half_pair: Pair) -> None:
    """Bytes buffered in the transport: they all arrive before the end (Twisted's own way)."""
    transport = half_pair.transport
    transport.write(b"buffered ")  # sent on the reactor's next turn
    half_close_through(transport)
    assert half_pair.server.write_ended == 0  # not yet: after the bytes
    assert await half_pair.client.eof.addTimeout(10, get_reactor()) == b"buffered "
    assert half_pair.server.write_ended == 1
    half_pair.client.send(b"reply")
    half_pair.client.transport.loseWriteConnection()  # type: ignore[union-attr]
    assert await half_pair.server.read_ended.addTimeout(10, get_reactor()) == b"reply"


@pytest_twisted.ensureDeferred
async def test_closed_at_once_when_nothing_is_buffered(pair: Pair) -> None:
    """
    Nothing buffered, no producer: closed before close_through returns (the protocol has
    its connectionLost, an orderly end), and the client reads every byte, then the end.
    """
    transport = pair.transport
    write_through(transport, b"all of it")
    close_through(transport)
    assert pair.server.lost is not None and pair.server.lost.check(ConnectionDone)
    reactor = get_reactor()
    assert transport not in reactor.getWriters() and transport not in reactor.getReaders()
    await pair.client.closed.addTimeout(10, reactor)
    assert pair.client.received == b"all of it"
    assert pair.client.reason is not None and pair.client.reason.check(ConnectionDone)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("behind", ["buffered bytes", "a producer"])
async def test_closed_after_buffered_bytes_or_a_producer(pair: Pair, behind: str) -> None:
    """Bytes buffered, or a producer registered: Twisted's own close, once they are done."""
    transport = pair.transport
    transport.write(b"buffered ")  # sent on the reactor's next turn
    if behind == "a producer":
        await pair.client.wait_for(b"buffered ")
        transport.registerProducer(StringTransport(), True)
    close_through(transport)
    assert pair.server.lost is None  # not yet
    if behind == "a producer":
        transport.unregisterProducer()  # as the tunnel does, but after
    await pair.client.closed.addTimeout(10, get_reactor())
    assert pair.client.received == b"buffered "
    assert pair.server.lost is not None and pair.server.lost.check(ConnectionDone)
