"""
Raw-socket helpers for the limit and fault tests: a client that sends exact bytes and records
exactly what comes back (and how the connection ended), and tiny misbehaving upstream servers.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import attrs
import pytest_twisted
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol, IListeningPort
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer


def get_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class RawClient(Protocol):
    """
    Sends C{first} once connected, then bytes as told; records every byte received and the
    reason the connection ended.  With C{on_data}, each piece goes to it instead of into
    C{received} (for streams too long to keep).
    """

    def __init__(self, first: bytes = b"", on_data: Callable[[bytes], None] | None = None) -> None:
        self.first = first
        self.on_data = on_data
        self.received = b""
        self.reason: Failure | None = None
        self.closed: Deferred[None] = Deferred()
        self._waiting: list[tuple[Callable[[bytes], bool], Deferred[bytes]]] = []

    def connectionMade(self) -> None:
        if self.first:
            self.send(self.first)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        if self.on_data is not None:
            self.on_data(data)
        else:
            self.received += data
        waiting, self._waiting = self._waiting, []
        for predicate, d in waiting:
            if d.called:  # timed out
                continue
            if predicate(self.received):
                d.callback(self.received)
            else:
                self._waiting.append((predicate, d))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        waiting, self._waiting = self._waiting, []
        for _, d in waiting:
            if not d.called:
                d.errback(self._closed_early())
        self.closed.callback(None)

    def _closed_early(self) -> AssertionError:
        return AssertionError(f"connection closed; received {self.received[:300]!r}")

    def wait_for(self, until: bytes | Callable[[bytes], bool], timeout: float = 15.0) -> Deferred[bytes]:
        """
        Fires with everything received so far once C{until} (a marker to find in it, or a
        predicate on it) holds; fails if the connection closes first, or after C{timeout}s.
        """
        predicate = until if callable(until) else lambda received: until in received
        if predicate(self.received):
            return succeed(self.received)
        if self.reason is not None:
            return fail(self._closed_early())
        d: Deferred[bytes] = Deferred()
        self._waiting.append((predicate, d))
        return d.addTimeout(timeout, get_reactor())

    def abort(self) -> Deferred[None]:
        """Reset the connection (if still open); fires once it is closed."""
        if self.reason is None and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        return self.closed


@implementer(IHalfCloseableProtocol)
class HalfClient(RawClient):
    """
    A L{RawClient} that, at the server's half-close, keeps its connection open to write on:
    C{eof} fires with everything received.  (A L{RawClient} closes its connection then.)
    """

    def __init__(self, first: bytes = b"") -> None:
        super().__init__(first)
        self.eof: Deferred[bytes] = Deferred()

    def readConnectionLost(self) -> None:
        self.eof.callback(self.received)

    def writeConnectionLost(self) -> None:
        pass


_Client = TypeVar("_Client", bound=RawClient)


async def connect(
    target: int | Any, first: bytes = b"", on_data: Callable[[bytes], None] | None = None
) -> RawClient:
    """A L{RawClient} connected to 127.0.0.1 at C{target} (a port, or a proxy with a C{port})."""
    return await _connected(target, RawClient(first, on_data))


async def connect_half(target: int | Any, first: bytes = b"") -> HalfClient:
    """A L{HalfClient} connected to 127.0.0.1 at C{target} (a port, or a proxy with a C{port})."""
    return await _connected(target, HalfClient(first))


async def _connected(target: int | Any, client: _Client) -> _Client:
    port = target if isinstance(target, int) else int(target.port.getHost().port)
    await connectProtocol(TCP4ClientEndpoint(get_reactor(), "127.0.0.1", port), client)
    return client


def raw_post(path: str, body: Any, key: str = "k", extra: bytes = b"") -> bytes:
    """A POST of C{body} as JSON with a bearer C{key}; C{extra} holds more header lines."""
    data = json.dumps(body).encode()
    return (
        b"POST %s HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
        % (path.encode(), key.encode(), len(data), extra)
    ) + data


class BodyReader(Protocol):
    """Collects a response body as it arrives; wait_for() fires once a marker is in it."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self.done: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self._waiting: list[tuple[bytes, Deferred[None]]] = []

    @property
    def data(self) -> bytes:
        return b"".join(self._chunks)

    def dataReceived(self, data: bytes) -> None:
        self._chunks.append(data)
        if not self._waiting:
            return
        still = []
        for marker, d in self._waiting:
            if marker in self.data:
                d.callback(None)
            else:
                still.append((marker, d))
        self._waiting = still

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.done.callback(None)

    def wait_for(self, marker: bytes) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiting.append((marker, d))
        self.dataReceived(b"")
        return d


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


def response_done(raw: bytes) -> bool:
    """Whether C{raw} holds a whole response with a Content-Length."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def assert_openai_error(response: Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The proxy's own error: status, OpenAI's shape (and C{code}, if given); the error object."""
    assert response.status == status, response
    assert response.headers[b"content-type"] == b"application/json"
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code, error
    assert response.headers[b"access-control-allow-origin"] == b"*"
    return error


Connect = Callable[[int], Awaitable[RawClient]]


@pytest_twisted.async_yield_fixture
async def raw_connect() -> AsyncIterator[Connect]:
    """C{await raw_connect(port)}: a L{RawClient} connected to 127.0.0.1:port; aborted at the end."""
    clients: list[RawClient] = []

    async def open_client(port: int) -> RawClient:
        client = await connect(port)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
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
