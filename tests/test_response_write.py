"""
How L{ProxyChannel} writes a response, on real loopback sockets: the head and the body go to
the socket in the same call that makes them (nothing left in Twisted's buffer for a later
reactor turn), a head with no body after it (HEAD, 204) is sent at once, and client
connections have C{TCP_NODELAY} (a stream's small events are not held behind a delayed ACK).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted
from twisted.internet.interfaces import IListeningPort
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from aoaiproxy._twisted import pending_write_bytes
from aoaiproxy.config import LiveConfig, load_config
from aoaiproxy.forward import Forwarder
from aoaiproxy.site import ProxySite

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
