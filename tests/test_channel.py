"""
L{ProxyChannel.hand_over}, in memory: how a client connection is given to another protocol
(a CONNECT tunnel now, TLS interception next).  The pipelined bytes come first, then every
byte; half-close and connection loss are passed on; the channel writes nothing of its own,
stops producing for the transport, and stays counted as an open, busy connection until the
connection is lost, when the CONNECT's access line is written.  Over real sockets:
tests/test_forward.py (tunnels) and tests/test_tls.py (TLS handed over).
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import Request
from twisted.web.resource import Resource
from zope.interface import implementer

from aoaiproxy.config import LiveConfig, load_config
from aoaiproxy.forward import Forwarder
from aoaiproxy.log import ACCESS_NAMESPACE
from aoaiproxy.site import ProxyChannel, ProxyRequest, ProxySite

CONNECT = b"CONNECT target.test:443 HTTP/1.1\r\nHost: target.test:443\r\n\r\n"
ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    """The protocol a connection is handed to: records what reaches it, in C{events}."""

    def __init__(self, events: list[Any]) -> None:
        self.events = events

    def connectionMade(self) -> None:
        # A protocol taking a connection may produce for it: the channel must have let go.
        assert self.transport is not None
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self.events.append("made")

    def dataReceived(self, data: bytes) -> None:
        self.events.append(data)

    def readConnectionLost(self) -> None:
        self.events.append("eof")

    def writeConnectionLost(self) -> None:
        self.events.append("write closed")

    def connectionLost(self, reason: Failure = ConnectionDone()) -> None:  # noqa: B008
        self.events.append("lost")

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class Handing(Forwarder):
    """Serves every CONNECT by handing the connection to a L{Recorder}: at once, or later."""

    def __init__(self, events: list[Any], at_once: bool) -> None:  # no upstream: nothing relayed
        self.events = events
        self.at_once = at_once
        self.waiting: list[ProxyRequest] = []

    def handle(self, request: Request) -> bool:
        assert isinstance(request, ProxyRequest)
        if self.at_once:
            request.establish(Recorder(self.events))
            self.events.append("returned")
        else:
            self.waiting.append(request)
        return True


def connected(at_once: bool) -> tuple[ProxySite, ProxyChannel, StringTransport, list[Any]]:
    events: list[Any] = []
    live = LiveConfig(load_config({"endpoint": "https://r.openai.azure.com"}, {}))
    site = ProxySite(Resource(), live, MemoryReactorClock(), Handing(events, at_once))
    site.access_log.logger = Logger(namespace=ACCESS_NAMESPACE, observer=lambda e: events.append(e["access"]))
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    channel.makeConnection(transport)
    assert site.connections.open == {channel}
    assert transport.producer is channel
    return site, channel, transport, events


@pytest.mark.parametrize("at_once", [True, False], ids=["in-process", "from-a-later-callback"])
def test_hand_over_passes_pipelined_bytes_then_everything(at_once: bool) -> None:
    site, channel, transport, events = connected(at_once)
    # The first tunnel bytes ride with the CONNECT head.
    channel.dataReceived(CONNECT + b"first;")
    if not at_once:
        # While the CONNECT is handled, the channel buffers what arrives (more than it
        # reads eagerly: it pauses reading), and parses none of it as HTTP.
        channel.dataReceived(b"GET / HTTP/1.1\r\n\r\n" + b"x" * 20_000)
        assert transport.producerState == "paused"
        assert events == []
        [request] = site.forwarder.waiting  # type: ignore[attr-defined]
        request.establish(Recorder(events))
        events.append("returned")
        assert transport.producerState == "producing"  # reading resumed
    assert transport.value() == ESTABLISHED  # the channel wrote nothing else
    assert channel.handed_over and channel.busy
    channel.dataReceived(b"later")
    pipelined = b"first;" if at_once else b"first;GET / HTTP/1.1\r\n\r\n" + b"x" * 20_000
    # The pipelined bytes are passed before hand_over returns.
    assert events == ["made", pipelined, "returned", b"later"]
    assert site.connections.open == {channel}


def test_hand_over_passes_half_close_and_loss_then_logs() -> None:
    site, channel, _transport, events = connected(at_once=True)
    # The transport finds a half-closeable protocol (HTTP answers what it has on EOF)...
    assert IHalfCloseableProtocol.providedBy(channel)
    channel.dataReceived(CONNECT)
    # ...and once handed to a half-closeable protocol, the half-close reaches it.
    channel.readConnectionLost()
    channel.writeConnectionLost()
    with pytest.raises(RuntimeError):
        channel.hand_over(Recorder([]))  # once only
    channel.connectionLost(Failure(ConnectionDone()))
    *passed, access = events
    assert passed == ["made", "returned", "eof", "write closed", "lost"]  # the protocol first...
    # ...then the CONNECT's one access line: 200, not an abort.
    assert (access["method"], access["path"], access["status"]) == ("CONNECT", "target.test:443", 200)
    assert "aborted" not in access
    assert site.connections.open == set()
    with pytest.raises(RuntimeError):
        channel.hand_over(Recorder([]))  # the connection is gone


def test_drain_counts_a_handed_over_connection_busy() -> None:
    site, channel, transport, _events = connected(at_once=True)
    idle = site.buildProtocol(None)
    idle.makeConnection(StringTransport())
    channel.dataReceived(CONNECT)
    assert site.connections.close_idle() == 1
    assert idle.transport.disconnecting  # type: ignore[union-attr]
    assert not transport.disconnecting  # the tunnel goes on until it ends or is cut
    assert site.connections.cut() == 2


# -- bodies: stored only for a route that reads them ------------------------------------------


class Hold(Resource):
    """Answers nothing (the request stays in flight, its body kept as the channel stored it)."""

    isLeaf = True

    def render(self, request: Request) -> int:
        return server.NOT_DONE_YET


def body_channel() -> tuple[ProxyChannel, StringTransport]:
    live = LiveConfig(load_config({"endpoint": "https://r.openai.azure.com"}, {}))
    site = ProxySite(Hold(), live, MemoryReactorClock(), Handing([], at_once=True))
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


@pytest.mark.parametrize(
    ("head", "stored"),
    [
        (b"GET /healthz HTTP/1.1", False),
        (b"OPTIONS /v1/chat/completions HTTP/1.1", False),
        (b"POST /v1/chat/completions HTTP/1.1\r\napi-key: k", True),
    ],
)
def test_a_body_is_stored_only_for_a_route_that_reads_it(head: bytes, stored: bool) -> None:
    channel, transport = body_channel()
    body = b"x" * 300_000  # more than Twisted keeps in memory: a temporary file
    channel.dataReceived(head + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    [request] = channel.requests
    assert request.content is not None
    assert request.content.seek(0, 2) == (len(body) if stored else 0)
    assert b"HTTP/1.1 4" not in transport.value()
