"""
The HTTP site shared by every listener, and the request class that decides each request's
role from its request-target (RFC 9112 §3.2): C{CONNECT host:port} and absolute-form
(C{GET http://host/path}) go to the forward proxy, origin-form (C{POST /v1/...}) to the
reverse API resource.

The request class also enforces C{max_body}: a body announced or found to be larger gets a
413 as soon as that is known, before the rest is read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.web import server
from twisted.web.resource import Resource

from aoaiproxy import errors
from aoaiproxy.config import LiveConfig

if TYPE_CHECKING:
    from aoaiproxy.forward import Forwarder

#: How long a connection whose body was refused (413) may go on sending it, so that the client
#: reads our answer instead of a reset, before it is closed.
LINGER_SECONDS = 5.0


class ProxyRequest(server.Request):
    """One request on any listener."""

    site: ProxySite
    # Never parse form bodies into memory (Twisted does that for POST multipart/urlencoded).
    _parsePOSTFormSubmission = False
    _refused = False
    _received = 0

    @property
    def _site(self) -> ProxySite:
        site: ProxySite = self.channel.site  # type: ignore[attr-defined]
        return site

    @property
    def _transport(self) -> Any:
        return self.channel.transport

    def _limit(self) -> int:
        return self._site.live.config.max_body

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit():
            self._refuse()
        super().gotLength(0 if self._refused else length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._limit():
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        """Answer 413 now and close the connection once the client stops sending (or soon)."""
        self._refused = True
        # No "100 Continue" after our final answer.
        self.requestHeaders.removeHeader(b"expect")
        body = errors.too_large(self._limit()).body()
        transport = self._transport
        transport.write(
            b"HTTP/1.1 413 Request Entity Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n"
            b"Access-Control-Allow-Origin: *\r\n"
            b"Connection: close\r\n\r\n" % len(body) + body
        )
        self._site.reactor.callLater(LINGER_SECONDS, transport.loseConnection)
        self._site.log_refused(self)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            self._transport.loseConnection()
            return
        super().requestReceived(command, path, version)

    def process(self) -> None:
        forwarder = self._site.forwarder
        if self.method == b"CONNECT" or self.uri[:1] != b"/":
            if forwarder is not None and forwarder.handle(self):
                return
            if self.method == b"CONNECT" or self.uri[:1] != b"/":
                self._proxy_refused()
                return
        super().process()

    def _proxy_refused(self) -> None:
        self.setHeader(b"Access-Control-Allow-Origin", b"*")
        self.setResponseCode(403)
        self.setHeader(b"Content-Type", b"application/json")
        body = errors.error_body(
            "Forwarding is turned off on this proxy.",
            "invalid_request_error",
            None,
            "forward_not_allowed",
        )
        self.setHeader(b"Content-Length", b"%d" % len(body))
        self.write(body)
        self.finish()


class ProxySite(server.Site):
    """The factory for every listener: one role decision, one resource tree."""

    requestFactory = ProxyRequest
    displayTracebacks = False

    def __init__(
        self,
        resource: Resource,
        live: LiveConfig,
        reactor: Any,
        forwarder: Forwarder | None = None,
    ) -> None:
        super().__init__(resource, reactor=reactor)
        self.live = live
        self.forwarder = forwarder

    def log_refused(self, request: ProxyRequest) -> None:
        """Hook: a request refused before it was read (413)."""
