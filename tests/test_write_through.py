"""
L{aoaiproxy._twisted.write_through}, the tunnel's write: straight to a plain TCP socket with
nothing buffered, else (and for what the kernel does not take) through C{transport.write}, on
real loopback connections: the bytes arrive whole and in order, and backpressure still works.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport

from aoaiproxy._twisted import pending_write_bytes, write_through

from .conftest import get_reactor
from .rawnet import RawClient, connect

BLOCK = bytes(range(256)) * 256  # 64 KiB


class Accepted(Protocol):
    """The server's side of a test connection: the transport under test."""

    def connectionMade(self) -> None:
        self.factory.accepted.callback(self)  # type: ignore[attr-defined]


@attrs.define
class Pair:
    server: Accepted
    client: RawClient

    @property
    def transport(self) -> Any:
        return self.server.transport


@pytest_twisted.async_yield_fixture
async def pair() -> AsyncIterator[Pair]:
    """A loopback connection: a Twisted transport (the server's) and a client recording bytes."""
    factory = Factory.forProtocol(Accepted)
    factory.accepted = Deferred()  # type: ignore[attr-defined]
    port: IListeningPort = get_reactor().listenTCP(0, factory, interface="127.0.0.1")
    client = await connect(port.getHost().port)  # type: ignore[attr-defined]
    server = await factory.accepted  # type: ignore[attr-defined]
    yield Pair(server, client)
    await client.abort()
    await port.stopListening()


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
