"""
The floor of the bench's CONNECT scenario: the least a CONNECT proxy on Twisted can do, with
Twisted's own APIs and nothing added (no policy, no limits, no timers, no log, no metrics).

It reads a CONNECT head, connects to its target (C{connectTCP}), answers 200, relays both ways
with producers registered both ways (as C{twisted.protocols.portforward} does), passes a
half-close on, and closes each side when the other is gone: what aoaiproxy's tunnel does for
the bench's load, so that aoaiproxy's figure can be read as a ratio to what Twisted costs.

    python bench/connect_floor.py PORT

It listens on 127.0.0.1:PORT until it is stopped (SIGTERM), and at most an hour.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import protocol, reactor  # noqa: E402
from twisted.internet.interfaces import IHalfCloseableProtocol  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402
from zope.interface import implementer  # noqa: E402

ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"


@implementer(IHalfCloseableProtocol)
class Target(protocol.Protocol):
    """The target's side: relays to its client."""

    client: Client

    def connectionMade(self) -> None:
        client: Client = self.factory.client  # type: ignore[attr-defined]
        self.client = client
        if client.lost:  # the client left while its target was dialled
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        client.target = self
        client.transport.write(ESTABLISHED)  # type: ignore[union-attr]
        client.transport.registerProducer(self.transport, True)  # type: ignore[union-attr]
        self.transport.registerProducer(client.transport, True)  # type: ignore[union-attr]
        if client.early:
            self.transport.write(client.early)  # type: ignore[union-attr]
            client.early = b""
        if client.ended:
            self.transport.loseWriteConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.client.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        self.client.transport.loseWriteConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.client.transport.loseConnection()  # type: ignore[union-attr]


class Dial(protocol.ClientFactory):
    protocol = Target
    noisy = False

    def __init__(self, client: Client) -> None:
        self.client = client

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.client.transport.loseConnection()  # type: ignore[union-attr]


@implementer(IHalfCloseableProtocol)
class Client(protocol.Protocol):
    """The client's side: its CONNECT head, then relays to its target."""

    target: Target | None = None
    dialing = False
    ended = False
    lost = False

    def connectionMade(self) -> None:
        self.early = b""
        self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.target is not None:
            self.target.transport.write(data)  # type: ignore[union-attr]
            return
        self.early += data
        end = self.early.find(b"\r\n\r\n")
        if self.dialing or end < 0:
            return
        self.dialing = True
        authority = self.early.split(b" ", 2)[1]
        host, _, port = authority.rpartition(b":")
        self.early = self.early[end + 4 :]
        reactor.connectTCP(host.decode(), int(port), Dial(self))  # type: ignore[attr-defined]

    def readConnectionLost(self) -> None:
        self.ended = True
        if self.target is not None:
            self.target.transport.loseWriteConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = True
        if self.target is not None:
            self.target.transport.loseConnection()  # type: ignore[union-attr]


def main() -> None:
    factory = protocol.ServerFactory.forProtocol(Client)
    factory.noisy = False
    reactor.listenTCP(int(sys.argv[1]), factory, backlog=4096, interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
    reactor.callLater(3600, reactor.stop)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
