"""
L{ProxyChannel.hand_over}, in memory: how a client connection is given to another protocol
(a CONNECT tunnel now, TLS interception next).  The pipelined bytes come first, then every
byte; half-close and connection loss are passed on; the channel writes nothing of its own,
stops producing for the transport, and stays counted as an open, busy connection until the
connection is lost, when the CONNECT's access line is written.  Over real sockets:
tests/test_forward.py (tunnels) and tests/test_tls.py (TLS handed over).
"""

from __future__ import annotations

import io
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.http import Request
from twisted.web.resource import EncodingResourceWrapper, Resource
from zope.interface import implementedBy, implementer

from aoaiproxy.config import LiveConfig, load_config
from aoaiproxy.forward import Forwarder
from aoaiproxy.log import ACCESS_NAMESPACE
from aoaiproxy.site import ProxyChannel, ProxyRequest, ProxySite

from .conftest import Holding, ParsedLines

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
    site.protocol = ParsedLines  # type: ignore[assignment]
    site.access_log.logger = Logger(namespace=ACCESS_NAMESPACE, observer=lambda e: events.append(e["access"]))
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    channel.makeConnection(transport)
    assert site.connections.open == {channel}
    assert transport.producer is channel
    return site, channel, transport, events


def send(channel: ProxyChannel, data: bytes, whole: bool) -> None:
    """C{data} whole (a head in it may be read at once), or its first byte alone first (parsed)."""
    for piece in (data,) if whole else (data[:1], data[1:]):
        channel.dataReceived(piece)


@pytest.mark.parametrize("whole", [True, False], ids=["head-read-at-once", "head-parsed"])
@pytest.mark.parametrize("at_once", [True, False], ids=["in-process", "from-a-later-callback"])
def test_hand_over_passes_pipelined_bytes_then_everything(at_once: bool, whole: bool) -> None:
    site, channel, transport, events = connected(at_once)
    # The first tunnel bytes ride with the CONNECT head: whole (read at once), or after its
    # first byte alone (the parser reads it).
    send(channel, CONNECT + b"first;", whole)
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
    assert channel.parsed_lines == (0 if whole else 3)  # type: ignore[attr-defined]


@pytest.mark.parametrize("whole", [True, False], ids=["head-read-at-once", "head-parsed"])
def test_hand_over_passes_half_close_and_loss_then_logs(whole: bool) -> None:
    site, channel, _transport, events = connected(at_once=True)
    # The transport finds a half-closeable protocol (HTTP answers what it has on EOF)...
    assert IHalfCloseableProtocol.providedBy(channel)
    send(channel, CONNECT, whole)
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


def body_channel() -> tuple[ProxyChannel, StringTransport]:
    live = LiveConfig(load_config({"endpoint": "https://r.openai.azure.com"}, {}))
    site = ProxySite(Holding(), live, MemoryReactorClock(), Handing([], at_once=True))
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


@pytest.mark.parametrize(
    ("length", "in_memory"),
    [
        (b"Content-Length: 99999", True),
        (b"Content-Length: 100000", False),
        (b"Transfer-Encoding: chunked", False),
    ],
)
def test_a_body_is_kept_in_memory_only_when_small(length: bytes, in_memory: bool) -> None:
    """The site's content file: memory below 100,000 announced bytes, else a temporary file."""
    channel, _ = body_channel()
    channel.dataReceived(b"POST /v1/chat/completions HTTP/1.1\r\napi-key: k\r\n" + length + b"\r\n\r\n")
    [request] = channel.requests
    assert isinstance(request.content, io.BytesIO) == in_memory
    if not in_memory:
        assert request.content is not None
        assert request.content.fileno() >= 0  # a file of its own
        request.content.close()


# -- the response head: the leaf fast path and the joined head give Twisted's own bytes --------


class Answers(Resource):
    """
    Answers as the request asks (C{/<code>/<mode>}): a status, then C{length} (its body with
    a Content-Length), C{chunked} (written without one), C{empty} (no body at all), or
    C{later} (Content-Length, body written after render returned).
    """

    isLeaf = True

    def render(self, request: Request) -> bytes | int:
        _, code, mode = request.path.split(b"/")
        request.setResponseCode(int(code))
        request.setHeader(b"X-Multi", b"one")
        request.responseHeaders.addRawHeader(b"X-Multi", b"two")
        body = b'{"answer": %s}' % code
        if mode == b"length":
            return body
        if mode == b"chunked":
            request.write(body)
            request.write(b"more")
        elif mode == b"later":
            request.setHeader(b"Content-Length", b"%d" % len(body))
            request.write(body)
        request.finish()
        return server.NOT_DONE_YET


def normalised(data: bytes) -> bytes:
    """The bytes of responses, with their Date values (the second they were made) blanked."""
    return re.sub(rb"\r\nDate: [^\r]*", b"\r\nDate: -", data)


def served(site: server.Site, data: bytes) -> bytes:
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    assert channel is not None
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(data)
    return normalised(transport.value())


@given(
    requests=st.lists(
        st.tuples(
            st.sampled_from([b"GET", b"HEAD", b"POST", b"DELETE"]),
            st.sampled_from([b"200", b"201", b"204", b"304", b"404", b"500"]),
            st.sampled_from([b"length", b"chunked", b"empty", b"later"]),
            st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]),
        ),
        min_size=1,
        max_size=4,
    )
)
@settings(max_examples=150, deadline=None)
def test_responses_are_the_bytes_twisted_writes(requests: list[tuple[bytes, bytes, bytes, bytes]]) -> None:
    """
    A tree that is one leaf is served without Twisted's traversal, with the Date of the
    second, its head joined and written with the first bytes of its body: the bytes are
    exactly those of Twisted's own Site, for every method, status and body (pipelined).
    """
    data = b"".join(
        b"%s /%s/%s %s\r\nHost: p\r\n\r\n" % (method, code, mode, version)
        for method, code, mode, version in requests
    )
    live = LiveConfig(load_config({"endpoint": "https://r.openai.azure.com"}, {}))
    ours = ProxySite(Answers(), live, MemoryReactorClock(), Handing([], at_once=True))
    ours.access_log.logger = Logger(namespace=ACCESS_NAMESPACE, observer=lambda e: None)
    assert ours.leaf is not None  # the fast path is the one tested
    twisteds = server.Site(Answers(), reactor=MemoryReactorClock())
    expected = served(twisteds, data)
    assert expected.startswith(b"HTTP/1.")
    assert served(ours, data) == expected


def test_date_is_the_current_second() -> None:
    live = LiveConfig(load_config({"endpoint": "https://r.openai.azure.com"}, {}))
    site = ProxySite(Answers(), live, MemoryReactorClock(), Handing([], at_once=True))
    before = http.datetimeToString()
    date = site.date()
    assert date in (before, http.datetimeToString())
    assert site.date() is date  # made once a second


def test_a_tree_with_children_is_traversed_by_twisted() -> None:
    root = Resource()
    root.putChild(b"200", Answers())
    live = LiveConfig(load_config({"endpoint": "https://r.openai.azure.com"}, {}))
    site = ProxySite(root, live, MemoryReactorClock(), Handing([], at_once=True))
    site.access_log.logger = Logger(namespace=ACCESS_NAMESPACE, observer=lambda e: None)
    assert site.leaf is None
    # Answers sees its own path; a leaf root that encodes is Twisted's to process too.
    assert served(site, b"GET /200/length HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200 OK\r\n")
    assert (
        ProxySite(EncodingResourceWrapper(Answers(), []), live, MemoryReactorClock(), Handing([], True)).leaf
        is None
    )


# -- the connection's one timer: head, body and idle deadlines ---------------------------------


def timed(**options: Any) -> tuple[ProxySite, ProxyChannel, StringTransport, MemoryReactorClock]:
    config = {"endpoint": "https://r.openai.azure.com", **options}
    live = LiveConfig(load_config(config, {}))
    clock = MemoryReactorClock()
    site = ProxySite(Answers(), live, clock, Handing([], at_once=True))
    site.access_log.logger = Logger(namespace=ACCESS_NAMESPACE, observer=lambda e: None)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    return site, channel, transport, clock


def test_keep_alive_requests_share_one_timer_and_idle_time_counts_from_the_last() -> None:
    _site, channel, transport, clock = timed(idle_timeout=10, header_timeout=4)
    for _ in range(20):  # Twisted stops and restarts the idle timeout around each request
        channel.dataReceived(b"GET /200/length HTTP/1.1\r\n\r\n")
        clock.advance(1)
        assert len(clock.getDelayedCalls()) == 1
    assert transport.value().count(b"HTTP/1.1 200 OK") == 20
    clock.advance(8.9)  # 9.9 s since the last request
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting  # the idle timeout closes it, silently
    assert transport.value().count(b"HTTP/1.1") == 20


def test_head_time_counts_from_each_heads_first_byte() -> None:
    _site, channel, transport, clock = timed(idle_timeout=100, header_timeout=4)
    clock.advance(3)
    channel.dataReceived(b"GET /200/length HTTP/1.1\r\n\r\nGET /200/length HTTP/1.1\r\n")
    clock.advance(3.9)  # the second head's 4 s are not over
    assert transport.value().count(b"HTTP/1.1 ") == 1
    channel.dataReceived(b"Host: p\r\n")  # data: the idle time starts again, not the head's
    clock.advance(0.2)
    assert transport.value().count(b"HTTP/1.1 ") == 2
    assert transport.value().endswith(b'"code": "request_timeout"}}')
    assert b"HTTP/1.1 408 Request Timeout" in transport.value()


def test_body_time_counts_from_the_end_of_its_head() -> None:
    _site, channel, transport, clock = timed(idle_timeout=100, header_timeout=4)
    head = b"POST /v1/chat/completions HTTP/1.1\r\napi-key: k\r\nContent-Length: 10\r\n\r\n"
    channel.dataReceived(head)
    for _ in range(29):  # a byte every 10 s: the idle timeout never ends it
        clock.advance(10)
        assert b"HTTP/1.1" not in transport.value()
        channel.dataReceived(b"")
    clock.advance(10)  # 300 s
    assert b"HTTP/1.1 408 Request Timeout" in transport.value()
    assert b"body was not received within 300s" in transport.value()


def test_shorter_idle_timeout_set_later_still_fires_on_time() -> None:
    _site, channel, transport, clock = timed(idle_timeout=100, header_timeout=50)
    channel.setTimeout(2)  # shorter than anything the timer was armed for
    clock.advance(1.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting


def test_the_timer_stops_with_the_connection() -> None:
    site, channel, _transport, _clock = timed()
    channel.dataReceived(b"GET /200/len")
    assert len(site.deadlines) == 1
    channel.connectionLost(Failure(ConnectionDone()))
    assert len(site.deadlines) == 0


# -- when_gone: notifyFinish's errback without a Deferred -------------------------------------


def test_when_gone_runs_if_the_client_leaves_before_the_response_is_finished() -> None:
    channel, _transport = body_channel()  # Hold: requests stay in flight
    channel.dataReceived(b"GET /a HTTP/1.1\r\n\r\n")
    [request] = channel.requests
    assert isinstance(request, ProxyRequest)
    called: list[str] = []

    def fails() -> None:
        called.append("fails")
        raise ValueError("logged, not raised")

    request.when_gone(fails)
    request.when_gone(lambda: called.append("then"))
    channel.connectionLost(Failure(ConnectionDone()))
    assert called == ["fails", "then"]  # once each, in order, despite the exception


def test_when_gone_is_not_called_once_the_response_is_finished() -> None:
    _site, channel, transport, _clock = timed()
    channel.dataReceived(b"GET /200/length HTTP/1.1\r\n")
    [request] = channel.requests
    assert isinstance(request, ProxyRequest)
    called: list[str] = []
    request.when_gone(lambda: called.append("gone"))
    channel.dataReceived(b"\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200 OK\r\n")
    channel.connectionLost(Failure(ConnectionDone()))
    assert called == []


def test_every_request_of_a_connection_has_its_addresses() -> None:
    _site, channel, transport, _clock = timed()
    channel.dataReceived(b"GET /200/length HTTP/1.1\r\n\r\nGET /200/length HTTP/1.1\r\n")
    [second] = channel.requests
    assert second.getClientAddress() == transport.getPeer()
    assert second.getHost() == transport.getHost()
    assert channel.getPeer() == transport.getPeer()


def test_the_request_provides_what_twisted_webs_does() -> None:
    """ProxyRequest's own zope declaration (a speed-up) adds no interface and drops none."""
    assert list(implementedBy(ProxyRequest)) == list(implementedBy(server.Request))
    assert "__provides__" in vars(ProxyRequest)  # its own: no walk up to server.Request's
