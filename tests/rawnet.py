"""
Raw-socket helpers for the limit and fault tests: a client that sends exact bytes and records
exactly what comes back (and how the connection ended), and tiny misbehaving upstream servers.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import pytest_twisted
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure


def get_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class RawClient(Protocol):
    """Sends bytes as told; records every byte received and the reason the connection ended."""

    def __init__(self) -> None:
        self.received = b""
        self.reason: Failure | None = None
        self._closed: list[Deferred[None]] = []
        self._waiting: list[tuple[bytes, Deferred[bytes]]] = []

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        still = []
        for marker, d in self._waiting:
            if marker in self.received:
                d.callback(self.received)
            else:
                still.append((marker, d))
        self._waiting = still

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        waiting, self._waiting = self._waiting, []
        for _, d in waiting:
            d.callback(self.received)
        closed, self._closed = self._closed, []
        for c in closed:
            c.callback(None)

    async def closed(self) -> Failure:
        """The reason, once the connection is closed (by either side)."""
        if self.reason is None:
            d: Deferred[None] = Deferred()
            self._closed.append(d)
            await d
        assert self.reason is not None
        return self.reason

    def until(self, marker: bytes) -> Deferred[bytes]:
        """Fires with everything received so far once C{marker} was received, or at close."""
        if marker in self.received or self.reason is not None:
            return succeed(self.received)
        d: Deferred[bytes] = Deferred()
        self._waiting.append((marker, d))
        return d

    async def abort(self) -> Failure:
        if self.reason is None and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        return await self.closed()


@attrs.define
class Response:
    """One HTTP/1.1 response parsed from raw bytes."""

    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_response(raw: bytes) -> Response:
    """Parse a complete response with a Content-Length (the proxy's own answers)."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, raw
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get(b"content-length", b"-1"))
    body = rest[:length] if length >= 0 else rest
    return Response(status, headers, body)


def assert_openai_error(response: Response, status: int, code: str) -> None:
    """The proxy's own error: status, OpenAI's shape, and a connection that will close."""
    assert response.status == status, response
    assert response.headers[b"content-type"] == b"application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code, error
    assert response.headers[b"access-control-allow-origin"] == b"*"


@pytest_twisted.async_yield_fixture
async def raw_connect() -> AsyncIterator[Callable[[int], Deferred[RawClient]]]:
    """C{await raw_connect(port)}: a L{RawClient} connected to 127.0.0.1:port; aborted at the end."""
    reactor = get_reactor()
    clients: list[RawClient] = []

    def connect(port: int) -> Deferred[RawClient]:
        client = RawClient()
        clients.append(client)
        d: Deferred[RawClient] = connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        return d

    yield connect
    for client in clients:
        if client.transport is not None:
            await client.abort()


class Scripted(Protocol):
    """An upstream server connection that runs C{script(self)} once a request head arrived."""

    def __init__(self, script: Callable[[Scripted], None]) -> None:
        self._script = script
        self._buffer = b""
        self._done = False

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if not self._done and b"\r\n\r\n" in self._buffer:
            self._done = True
            self._script(self)


class ScriptedUpstream:
    """A loopback TCP server whose every connection runs a script; tracks connections to close them."""

    def __init__(self, script: Callable[[Scripted], None]) -> None:
        self.connections: list[Protocol] = []
        self._script = script
        factory = Factory.forProtocol(self._build)
        self.port: IListeningPort = get_reactor().listenTCP(0, factory, interface="127.0.0.1")

    def _build(self) -> Protocol:
        p = Scripted(self._script)
        self.connections.append(p)
        return p

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"  # type: ignore[attr-defined]

    async def stop(self) -> None:
        await self.port.stopListening()
        for p in self.connections:
            if p.transport is not None and p.connected:
                p.transport.abortConnection()  # type: ignore[attr-defined]
