"""What every fake server shares: a loopback listener, connection tracking, request recording.

L{FakeServer} is the base of L{aoaiproxy.testing.FakeAzure} and
L{aoaiproxy.testing.FakeManagedIdentity}: it listens (TCP or TLS), counts and closes
connections, records every request it is asked to (with the instance's name and the time), lets
tests wait for the Nth request, and writes L{Reply} values, whole or cut short.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, Any, Protocol, cast
from urllib.parse import parse_qs, unquote

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    IPushProducer,
    ITCPTransport,
)
from twisted.internet.protocol import connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from .records import RecordedRequest
from .replies import Reply

__all__ = ["FakeServer", "HTTPRequest"]


class HTTPRequest(Protocol):
    """What the fakes use of a twisted.web request (whose methods are untyped)."""

    uri: bytes
    method: bytes
    content: IO[bytes]
    requestHeaders: Headers
    transport: ITCPTransport

    def setResponseCode(self, code: int) -> None: ...
    def setHeader(self, name: str, value: str) -> None: ...
    def write(self, data: bytes) -> None: ...
    def finish(self) -> None: ...
    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def notifyFinish(self) -> Deferred[None]: ...


class _Connection(ProtocolWrapper):
    """Tracks one client connection (see _ConnectionTracker)."""

    factory: _ConnectionTracker

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)  # type: ignore[no-untyped-call]
        self.factory.closed()  # after the HTTP channel (and its requests) saw it


class _ConnectionTracker(WrappingFactory):
    """Wraps the Site to count open connections and notice when one closes."""

    protocol = _Connection
    noisy = False

    def __init__(self, site: server.Site) -> None:
        super().__init__(site)  # type: ignore[no-untyped-call]
        self.closed_waiters: list[Deferred[None]] = []
        self.all_closed_waiters: list[Deferred[None]] = []

    def closed(self) -> None:
        """A connection has closed: fire the waiters."""
        waiters, self.closed_waiters = self.closed_waiters, []
        if not self.protocols:
            waiters += self.all_closed_waiters
            self.all_closed_waiters = []
        for d in waiters:
            d.callback(None)


class _FormlessRequest(server.Request):
    """A request that keeps the body as bytes (no form parsing into request.args)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]


class _Site(server.Site):
    requestFactory = _FormlessRequest
    noisy = False

    def log(self, request: http.Request) -> None:
        """No access log: FakeServer.on_request is the hook for that."""


class _Root(Resource):
    isLeaf = True

    def __init__(self, fake: FakeServer) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._fake = fake

    def render(self, request: server.Request) -> bytes | int:
        try:
            return self._fake._render(cast(HTTPRequest, request))
        finally:
            self._fake._notify_waiters()


def parse_uri(raw_uri: str) -> tuple[str, dict[str, list[str]]]:
    """The (unquoted) path and the query of a request target."""
    path, _, query = raw_uri.partition("?")
    return unquote(path), parse_qs(query, keep_blank_values=True)


class FakeServer:
    """A fake HTTP server on loopback: the listening, recording and waiting every fake needs.

    ``reactor`` must provide IReactorTCP and IReactorTime (and IReactorSSL to listen with TLS).
    ``name`` names this instance in its records.  ``on_request`` is called with every request as
    it is recorded.  ``max_recorded`` bounds L{requests} (the oldest go first; L{request_count}
    still counts them all); None keeps every one.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        name: str,
        on_request: Callable[[RecordedRequest], None] | None = None,
        max_recorded: int | None = None,
    ) -> None:
        self._reactor = reactor
        self.name = name
        self.on_request = on_request
        self.max_recorded = max_recorded
        self.requests: list[RecordedRequest] = []
        self.request_count = 0
        self._request_waiters: list[tuple[int, Deferred[RecordedRequest]]] = []
        self._hanging: set[HTTPRequest] = set()
        self._ports: list[IListeningPort] = []
        self._url: str | None = None
        self._tracker = _ConnectionTracker(_Site(_Root(self)))  # type: ignore[no-untyped-call]

    # -- listening and connections ---------------------------------------------------------

    def listen(
        self,
        port: int = 0,
        interface: str = "127.0.0.1",
        context_factory: IOpenSSLServerConnectionCreator | IOpenSSLContextFactory | None = None,
    ) -> IListeningPort:
        """Listen on ``interface:port`` (TLS if ``context_factory``) and set :attr:`url`."""
        listening: IListeningPort
        if context_factory is None:
            listening = self._reactor.listenTCP(port, self._tracker, interface=interface)
        else:
            listening = self._reactor.listenSSL(port, self._tracker, context_factory, interface=interface)
        self._ports.append(listening)
        host = f"[{interface}]" if ":" in interface else interface
        scheme = "http" if context_factory is None else "https"
        address = listening.getHost()
        assert isinstance(address, (IPv4Address, IPv6Address))
        self._url = f"{scheme}://{host}:{address.port}"
        return listening

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (or ``https://``) of the latest :meth:`listen`."""
        if self._url is None:
            raise RuntimeError(f"{type(self).__name__}.listen() has not been called")
        return self._url

    @property
    def open_connections(self) -> int:
        """How many client connections are open right now."""
        return len(self._tracker.protocols)

    def wait_connection_closed(self) -> Deferred[None]:
        """A Deferred that fires the next time any client connection closes."""
        d: Deferred[None] = Deferred()
        self._tracker.closed_waiters.append(d)
        return d

    def stop(self) -> Deferred[None]:
        """Stop listening and abort every open connection (hanging requests too).

        Fires once the ports are closed and every connection is gone.
        """
        waits: list[Deferred[None]] = [d for p in self._ports if (d := p.stopListening())]
        self._ports = []
        if self._tracker.protocols:
            closed: Deferred[None] = Deferred()
            self._tracker.all_closed_waiters.append(closed)
            waits.append(closed)
            for conn in list(self._tracker.protocols):
                conn.transport.abortConnection()
        if not waits:
            return succeed(None)
        return gatherResults(waits).addCallback(lambda _: None)

    # -- recording ---------------------------------------------------------------------------

    def wait_request(self, count: int | None = None) -> Deferred[RecordedRequest]:
        """A Deferred that fires with the ``count``-th request this fake receives (counting
        from 1, since it started or L{clear_requests}), once the fake has decided what to do
        with it (at once if that has happened already); without ``count``, with the next one."""
        d: Deferred[RecordedRequest] = Deferred()
        count = self.request_count + 1 if count is None else count
        if count <= self.request_count and self.requests:
            back = self.request_count - count + 1
            d.callback(self.requests[-min(back, len(self.requests))])
        else:
            self._request_waiters.append((count, d))
        return d

    def clear_requests(self) -> None:
        """Forget the requests received so far (and restart L{request_count})."""
        self.requests.clear()
        self.request_count = 0

    @property
    def hanging_requests(self) -> int:
        """How many requests are being left unanswered right now (see L{hang})."""
        return len(self._hanging)

    def _record(self, request: HTTPRequest) -> RecordedRequest:
        raw_uri = request.uri.decode("latin-1")
        path, query = parse_uri(raw_uri)
        request.content.seek(0)
        headers: dict[str, list[str]] = {}
        for name, values in request.requestHeaders.getAllRawHeaders():
            key = name.decode("latin-1").lower()
            headers.setdefault(key, []).extend(v.decode("latin-1") for v in values)
        rec = RecordedRequest(
            method=request.method.decode("latin-1"),
            path=path,
            query=query,
            raw_uri=raw_uri,
            headers=headers,
            body=request.content.read(),
            instance=self.name,
            received_at=self._reactor.seconds(),
        )
        self.requests.append(rec)
        self.request_count += 1
        if self.max_recorded is not None and len(self.requests) > 2 * self.max_recorded:
            del self.requests[: -self.max_recorded]
        if self.on_request is not None:
            self.on_request(rec)
        return rec

    def _notify_waiters(self) -> None:
        """Fire the L{wait_request}s that the request just handled satisfies (once the fake
        has decided what to do with it: hang, answer...)."""
        waiting, self._request_waiters = self._request_waiters, []
        for count, d in waiting:
            if count <= self.request_count:
                d.callback(self.requests[-1])
            else:
                self._request_waiters.append((count, d))

    # -- answering ---------------------------------------------------------------------------

    def _render(self, request: HTTPRequest) -> bytes | int:
        raise NotImplementedError

    def _write_reply(self, request: HTTPRequest, reply: Reply) -> bytes | int:
        """Answer ``request`` with ``reply`` (the value L{_render} returns)."""
        request.setResponseCode(reply.status)
        for name, value in reply.headers:
            request.setHeader(name, value)
        if reply.writes == 1:
            request.setHeader("content-length", str(len(reply.body)))
            return reply.body
        size = -(-len(reply.body) // reply.writes)
        for start in range(0, len(reply.body), size):
            request.write(reply.body[start : start + size])
        request.finish()
        return server.NOT_DONE_YET

    def _hang(self, request: HTTPRequest) -> int:
        """Never answer ``request`` (until its connection closes or the fake stops)."""
        self._hanging.add(request)
        request.notifyFinish().addBoth(lambda _: self._hanging.discard(request))
        return server.NOT_DONE_YET

    def _cut_reply(self, request: HTTPRequest, reply: Reply, after_bytes: int, close: bool) -> int:
        """Send ``reply``'s status, headers and first ``after_bytes`` body bytes, then hang or
        (``close``) close the connection."""
        request.setResponseCode(reply.status)
        for name, value in reply.headers:
            request.setHeader(name, value)
        request.setHeader("content-length", str(len(reply.body)))
        request.write(reply.body[:after_bytes])
        if close:
            request.transport.loseConnection()
            return server.NOT_DONE_YET
        return self._hang(request)
