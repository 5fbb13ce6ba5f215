"""
L{aoaiproxy.connecting.TCPDial}: a TCP connection made on a socket of our own for a
L{ConnectingFactory}, on real loopback sockets.  (Every CONNECT test dials through it too.)
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import error as ierror
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from aoaiproxy import connecting
from aoaiproxy.connecting import ConnectingFactory, TCPDial

from .conftest import free_port
from .rawnet import get_reactor


class _Target(Protocol):
    def __init__(self) -> None:
        self.received = Deferred[bytes]()

    def connectionMade(self) -> None:
        factory = getattr(self, "factory", None)
        assert isinstance(factory, ConnectingFactory)
        factory.connected(self)

    def dataReceived(self, data: bytes) -> None:
        if not self.received.called:
            self.received.callback(data)


class _Factory(ConnectingFactory):
    protocol = _Target


class _Told:
    """What a dial tells its factory's caller, as a Deferred, and whether it told it early."""

    def __init__(self, factory: ConnectingFactory) -> None:
        self.result: Deferred[Any] = Deferred()
        self.early = False
        self._started = False
        factory.await_connection(self._told, self._told)

    def _told(self, outcome: Any) -> None:
        self.early = not self._started
        self.result.callback((outcome,))  # a Failure too, as a value

    def dial(self, reactor: Any, ip: str, port: int, factory: ConnectingFactory) -> TCPDial:
        dial = TCPDial(reactor, ip, port, factory)
        self._started = True
        return dial


def _listening(family: int = socket.AF_INET, host: str = "127.0.0.1") -> socket.socket:
    server = socket.socket(family, socket.SOCK_STREAM)
    server.bind((host, 0))
    server.listen(8)
    server.setblocking(False)
    return server


async def _connected_both_ways(family: int, host: str, kind: type) -> None:
    reactor = get_reactor()
    server = _listening(family, host)
    port = server.getsockname()[1]
    factory = _Factory()
    told = _Told(factory)
    try:
        told.dial(reactor, host, port, factory)
        (protocol,) = await told.result
        assert not told.early
        assert isinstance(protocol, _Target)
        transport: Any = protocol.transport
        assert transport.getPeer() == kind("TCP", host, port)
        assert f"to {host}:{port}" in repr(transport)
        accepted, _ = server.accept()
        with accepted:
            accepted.settimeout(10)
            transport.write(b"ping")
            assert await deferToThread(accepted.recv, 16) == b"ping"
            accepted.sendall(b"pong")
            assert await protocol.received == b"pong"
            transport.loseConnection()
            assert await deferToThread(accepted.recv, 16) == b""  # closed by the transport
    finally:
        server.close()


@pytest_twisted.ensureDeferred
async def test_it_connects_and_the_transport_carries_bytes_both_ways() -> None:
    await _connected_both_ways(socket.AF_INET, "127.0.0.1", IPv4Address)


@pytest_twisted.ensureDeferred
async def test_ipv6() -> None:
    try:
        _listening(socket.AF_INET6, "::1").close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    await _connected_both_ways(socket.AF_INET6, "::1", IPv6Address)


@pytest_twisted.ensureDeferred
async def test_a_refused_connection_is_reported_after_the_dial_returns() -> None:
    factory = _Factory()
    told = _Told(factory)
    dial = told.dial(get_reactor(), "127.0.0.1", free_port(), factory)
    (failure,) = await told.result
    assert not told.early
    assert isinstance(failure, Failure) and failure.check(ierror.ConnectionRefusedError)
    assert dial.fileno() == -1  # its socket is closed


@pytest_twisted.ensureDeferred
async def test_no_socket_is_reported_as_twisted_does(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_socket(*args: Any) -> socket.socket:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(connecting.socket, "socket", no_socket)
    factory = _Factory()
    told = _Told(factory)
    told.dial(get_reactor(), "127.0.0.1", 9, factory)
    monkeypatch.undo()
    (failure,) = await told.result
    assert not told.early
    assert isinstance(failure, Failure) and failure.check(ierror.ConnectBindError)


@contextmanager
def _in_progress() -> Iterator[tuple[TCPDial, _Told]]:
    """A dial to a listening loopback port, just started (the reactor has not run since)."""
    server = _listening()
    factory = _Factory()
    told = _Told(factory)
    try:
        yield told.dial(get_reactor(), "127.0.0.1", server.getsockname()[1], factory), told
    finally:
        server.close()


@pytest_twisted.ensureDeferred
async def test_stopped_it_tells_nothing_and_lets_go_of_its_socket() -> None:
    with _in_progress() as (dial, told):
        assert dial in get_reactor().getWriters()
        dial.stopConnecting()
        assert dial not in get_reactor().getWriters()
        assert dial.fileno() == -1
        await deferLater(get_reactor(), 0)  # nothing told on a later turn either
        assert not told.result.called


def test_lost_while_connecting_is_a_connect_error() -> None:
    # The reactor drops a descriptor that reports an error or a hang-up before it is writable.
    with _in_progress() as (dial, told):
        get_reactor().removeWriter(dial)  # as the reactor does before connectionLost
        dial.connectionLost(Failure(ierror.ConnectionLost()))
        (failure,) = told.result.result
        assert isinstance(failure, Failure) and failure.check(ierror.ConnectError)
        assert not failure.check(ierror.ConnectionLost)
        assert dial.fileno() == -1


class _Refusing(ConnectingFactory):
    def buildProtocol(self, addr: Any) -> IProtocol | None:
        return None


@pytest_twisted.ensureDeferred
async def test_a_factory_that_builds_no_protocol_fails_the_attempt() -> None:
    server = _listening()
    factory = _Refusing()
    told = _Told(factory)
    try:
        told.dial(get_reactor(), "127.0.0.1", server.getsockname()[1], factory)
        (failure,) = await told.result
        assert isinstance(failure, Failure) and failure.check(ierror.NoProtocol)
        accepted, _ = server.accept()
        with accepted:
            accepted.settimeout(10)
            assert await deferToThread(accepted.recv, 16) == b""  # the connection was closed
    finally:
        server.close()
