"""
How L{ProxyChannel} writes a response, on real loopback sockets: the head and the body go to
the socket in the same call that makes them (nothing left in Twisted's buffer for a later
reactor turn), a head with no body after it (HEAD, 204) is sent at once, and client
connections have C{TCP_NODELAY} (a stream's small events are not held behind a delayed ACK).
"""

from __future__ import annotations

import re
import socket
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IListeningPort
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from aoaiproxy._twisted import pending_write_bytes
from aoaiproxy.config import LiveConfig, load_config
from aoaiproxy.forward import Forwarder
from aoaiproxy.site import ProxyRequest, ProxySite

from .conftest import Holding
from .rawnet import connect, get_reactor, parse_response, response_done

BODY = b'{"answer": "' + b"x" * 2000 + b'"}'


class Answering(Resource):
    """Answers at once, and records what Twisted still buffered right after finish()."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.buffered: list[int] = []
        self.nodelay: list[int] = []

    def render(self, request: Any) -> Any:
        transport = request.channel.transport
        self.nodelay.append(transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        if request.path == b"/empty":
            request.setResponseCode(204)
        else:
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Content-Length", b"%d" % len(BODY))
            if request.method != b"HEAD":
                request.write(BODY)
        request.finish()
        self.buffered.append(pending_write_bytes(transport))
        return NOT_DONE_YET


class NoForwarding(Forwarder):
    """No proxy requests come here."""

    def __init__(self) -> None:
        pass


@pytest_twisted.async_yield_fixture
async def served() -> AsyncIterator[tuple[Answering, int]]:
    resource = Answering()
    live = LiveConfig(load_config({"endpoint": "https://r.openai.azure.com"}, {}))
    site = ProxySite(resource, live, get_reactor(), NoForwarding())
    port: IListeningPort = get_reactor().listenTCP(0, site, interface="127.0.0.1")
    yield resource, port.getHost().port  # type: ignore[attr-defined]
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_head_and_body_leave_in_the_call_that_made_them(served: tuple[Answering, int]) -> None:
    resource, port = served
    client = await connect(port)
    for method, path in ((b"GET", b"/a"), (b"HEAD", b"/a"), (b"GET", b"/empty"), (b"GET", b"/b")):
        client.received = b""
        client.send(method + b" " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        if method == b"HEAD" or path == b"/empty":
            raw = await client.wait_for(lambda data: b"\r\n\r\n" in data)
            assert raw.endswith(b"\r\n\r\n"), raw
        else:
            raw = await client.wait_for(response_done)
            response = parse_response(raw)
            assert response.status == 200 and response.body == BODY
    assert resource.buffered == [0, 0, 0, 0]
    assert resource.nodelay and all(resource.nodelay)
    await client.abort()


def held_request(length: int | None) -> tuple[ProxyRequest, StringTransport]:
    """A request on a channel over a StringTransport, its response not begun."""
    resource = Holding()
    live = LiveConfig(load_config({"endpoint": "https://r.openai.azure.com"}, {}))
    site = ProxySite(resource, live, MemoryReactorClock(), NoForwarding())
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    [request] = resource.requests
    request.setHeader(b"Content-Type", b"text/event-stream")
    if length is not None:
        request.setHeader(b"Content-Length", b"%d" % length)
    return request, transport


def _dateless(written: bytes) -> bytes:
    """C{written} with its C{Date} header's value blanked (the wall clock's second)."""
    return re.sub(rb"\r\nDate: [^\r]*\r\n", b"\r\nDate: -\r\n", written, count=1)


@settings(max_examples=150, deadline=None)
@given(
    pieces=st.lists(st.binary(max_size=40), max_size=6),
    sized=st.booleans(),
    gone_after=st.one_of(st.none(), st.integers(0, 6)),
)
def test_body_pieces_are_written_as_twisted_writes_them(
    pieces: list[bytes], sized: bool, gone_after: int | None
) -> None:
    """
    L{ProxyRequest.write}'s own path for a piece after the head gives the bytes, the
    C{sentLength} and the errors of Twisted's C{Request.write} (C{server.Request.write},
    called past ours): chunked or sized, empty pieces, a client that left, a write after
    C{finish}.
    """
    length = sum(map(len, pieces)) if sized else None
    ours, ours_transport = held_request(length)
    twisted, twisted_transport = held_request(length)
    for request, write in ((ours, ours.write), (twisted, partial(server.Request.write, twisted))):
        for i, piece in enumerate(pieces):
            if i == gone_after:
                request.connectionLost(Failure(ConnectionDone()))
            # The first write (the head's) is ProxyRequest's for both.
            (write if request.startedWriting else request.write)(piece)
        if gone_after is None or gone_after >= len(pieces):
            request.finish()
            with pytest.raises(RuntimeError):
                write(b"late")
    # The two heads are made one after the other: their Date may fall in two seconds.
    assert _dateless(ours_transport.value()) == _dateless(twisted_transport.value())
    assert ours.sentLength == twisted.sentLength
    if gone_after is None and pieces:
        body = b"".join(pieces)
        assert ours_transport.value().endswith(body if sized else b"0\r\n\r\n")
