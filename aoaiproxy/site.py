"""
The HTTP site shared by every listener, and the request class that decides each request's
role from its request-target (RFC 9112 §3.2): C{CONNECT host:port} and absolute-form
(C{GET http://host/path}) go to the forward proxy, origin-form (C{POST /v1/...}) to the
reverse API resource.

The request class also enforces C{max_body}: a body announced or found to be larger gets a
413 as soon as that is known, before the rest is read.

The channel class enforces the limits on a request's head (L{ProxyChannel}: 414, 431, 408,
and 400 for malformed requests, all in OpenAI's error shape), and L{ConnectionCap} wraps the
site once per listener to cap its open connections (503 beyond the cap).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from aoaiproxy import errors
from aoaiproxy.config import LiveConfig
from aoaiproxy.errors import ProxyError
from aoaiproxy.log import AccessLog
from aoaiproxy.service import Connections

if TYPE_CHECKING:
    from aoaiproxy.forward import Forwarder

#: How long a connection whose body was refused (413) may go on sending it, so that the client
#: reads our answer instead of a reset, before it is cut.
LINGER_SECONDS = 5.0

#: How long a connection refused before its request was read (400, 408, 414, 431, 503) is
#: kept open, reading and discarding, so the client reads our answer rather than a reset.
REJECT_LINGER_SECONDS = 2.0
#: How much a refused connection may send meanwhile before it is cut at once.
REJECT_DISCARD_BYTES = 256 * 1024
#: At most this many connections over a listener's cap linger at once; beyond it, they get the
#: 503 and are closed at once (best effort), so a flood cannot pile up file descriptors.
BUSY_LINGER_MAX = 64


def answer_and_close(
    transport: Any, reactor: Any, error: ProxyError, linger: float = REJECT_LINGER_SECONDS
) -> IDelayedCall:
    """
    Write C{error} as a complete HTTP/1.1 response on a connection whose request will not be
    read, half-close it (so the client sees the end of our answer at once), and abort it after
    C{linger} seconds.  The caller discards whatever the client sends meanwhile, and cancels
    the returned call when the connection is lost.
    """
    body = error.body()
    head = [
        b"HTTP/1.1 %d %s" % (error.status, http.RESPONSES.get(error.status, b"Error")),
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
        b"Access-Control-Allow-Origin: *",
        b"Connection: close",
    ]
    head.extend(name + b": " + value for name, value in error.headers)
    transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
    # TCP supports half-closing; TLS (TLSMemoryBIOProtocol) does not: there, the client
    # closes after reading our complete answer, or the linger timer does.
    half_close = getattr(transport, "loseWriteConnection", None)
    if half_close is not None:
        half_close()
    return reactor.callLater(linger, transport.abortConnection)  # type: ignore[no-any-return]


def _head_error(status: int, message: str, code: str) -> ProxyError:
    return ProxyError(status, message, code=code)


class ProxyChannel(http.HTTPChannel):
    """
    The HTTP/1.1 connection of every listener, with the limits from the configuration:

      - C{max_request_line}: a longer request line gets 414;
      - C{max_header_size} (request line and header lines) and C{max_headers}: 431;
      - C{header_timeout}: a request head not complete this long after its first byte (a
        slow-loris client) gets 408;
      - a malformed request gets 400 (Twisted's own bare 400, in OpenAI's shape here).

    Each of these answers is complete, says C{Connection: close}, and the connection is then
    closed: its request is never processed.  The idle timeout (keep-alive, and silence inside
    a request body) is the site's C{timeOut}, set per connection by L{ProxySite}.
    """

    site: ProxySite
    _in_head = True
    _head_lines = 0
    _head_timer: IDelayedCall | None = None
    _rejected = False
    _discarded = 0
    _linger: IDelayedCall | None = None
    _max_request_line = 8192
    _header_timeout = 30.0

    def connectionMade(self) -> None:
        config = self.site.live.config
        self.maxHeaders = config.max_headers
        self.totalHeadersSize = config.max_header_size
        # No single line may be longer than the whole head (LineReceiver's own limit would
        # drop the connection without an answer).
        self.MAX_LENGTH = max(config.max_header_size, config.max_request_line)
        self._max_request_line = config.max_request_line
        self._header_timeout = config.header_timeout
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        if self._rejected:
            self._discard(data)
            return
        if self._in_head and data:
            self._start_head_timer()
        super().dataReceived(data)

    def _start_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.site.reactor.callLater(self._header_timeout, self._head_timed_out)

    def lineReceived(self, line: bytes) -> None:
        if self._rejected:
            return
        if self._in_head:
            # A pipelined request's lines arrive here without a new dataReceived.
            self._start_head_timer()
            if self._head_lines == 0 and line and len(line) > self._max_request_line:
                self._reject(_request_line_too_long(self._max_request_line))
                return
            if line:
                self._head_lines += 1
            if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
                self._reject(_head_too_large(self.totalHeadersSize))
                return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._in_head and self._head_lines == 0:
            self._reject(_request_line_too_long(self._max_request_line))
        else:
            self._reject(_head_too_large(self.totalHeadersSize))

    def headerReceived(self, line: bytes) -> bool:
        if self._receivedHeaderCount >= self.maxHeaders:
            self._reject(
                _head_error(
                    431,
                    f"Too many header fields (more than {self.maxHeaders}).",
                    "request_header_fields_too_large",
                )
            )
            return False
        ok: bool = super().headerReceived(line)
        return ok

    def allHeadersReceived(self) -> None:
        self._end_head()
        super().allHeadersReceived()

    def checkPersistence(self, request: http.Request, version: bytes) -> bool:
        # While draining, a request whose head was still arriving must not make its
        # connection keep-alive again: it is answered with Connection: close.
        if self.site.connections.draining:
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            return False
        persistent: bool = super().checkPersistence(request, version)
        return persistent

    def requestDone(self, request: http.Request) -> None:
        # The next request's head starts now (its bytes may already be buffered).
        self._in_head = True
        self._head_lines = 0
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._end_head()
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        super().connectionLost(reason)

    def _respondToBadRequestAndDisconnect(self) -> None:
        self._reject(_head_error(400, "Malformed HTTP request.", "bad_request"))

    def _end_head(self) -> None:
        self._in_head = False
        if self._head_timer is not None and self._head_timer.active():
            self._head_timer.cancel()
        self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        self._reject(
            _head_error(
                408,
                f"The request head was not received within {self._header_timeout:g}s.",
                "request_timeout",
            )
        )

    def _reject(self, error: ProxyError) -> None:
        """Answer C{error} instead of reading the request, and close the connection."""
        if self._rejected or self.transport is None:
            return
        self._rejected = True
        self._end_head()
        self.setTimeout(None)
        self.clearLineBuffer()
        self._dataBuffer = []
        # Read (and discard) until the client closes: it may have been paused for pipelining.
        self._networkProducer.resumeProducing()
        self._linger = answer_and_close(self.transport, self.site.reactor, error)
        self.site.access_log.refused_head(self, error.status)

    def _discard(self, data: bytes) -> None:
        self._discarded += len(data)
        if self._discarded > REJECT_DISCARD_BYTES and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


def _request_line_too_long(limit: int) -> ProxyError:
    return _head_error(414, f"The request line is longer than {limit} bytes.", "request_line_too_long")


def _head_too_large(limit: int) -> ProxyError:
    return _head_error(
        431, f"The request head is larger than {limit} bytes.", "request_header_fields_too_large"
    )


def _proxy_channel(factory: object) -> Any:
    """C{ProxySite.protocol}: Twisted's HTTP/1.1-or-2 switch, over a L{ProxyChannel}."""
    return http._GenericHTTPChannelProtocol(ProxyChannel())  # type: ignore[attr-defined]


class ProxyRequest(server.Request):
    """One request on any listener."""

    site: ProxySite
    _refused = False
    _received = 0
    #: For the access log: when the request started, and whether it has been logged.
    log_started = 0.0
    log_done = False

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        # Never parse form bodies into request.args: Twisted does that for every POST
        # multipart/urlencoded body, in memory (a 20 MB upload cost 250 MB).  It must be
        # passed here: Request.__init__ sets the attribute, so a class attribute is ignored.
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(channel, *args, **kwargs)
        self.log_started = channel.site.reactor.seconds()

    def connectionLost(self, reason: Failure) -> None:
        # The connection went away before the response was finished (client gone, stream
        # cut, drain deadline): still one access line, marked aborted.
        site = self._site  # Request.connectionLost drops the channel
        super().connectionLost(reason)
        site.access_log.emit(self, aborted=True)

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
        """
        Answer 413 now; the rest of the body is read and discarded (so the client reads our
        answer, not a reset) until it ends or L{LINGER_SECONDS} pass.
        """
        self._refused = True
        # No "100 Continue" after our final answer.
        self.requestHeaders.removeHeader(b"expect")
        answer_and_close(self._transport, self._site.reactor, errors.too_large(self._limit()), LINGER_SECONDS)
        self._site.access_log.refused(self)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            self._transport.loseConnection()
            return
        super().requestReceived(command, path, version)

    def process(self) -> None:
        # CONNECT and absolute-form targets are the forward proxy's; it answers them, or
        # turns an API request (http://api.openai.com/v1/...) into origin-form for the tree.
        if (self.method == b"CONNECT" or self.uri[:1] != b"/") and self._site.forwarder.handle(self):
            return
        super().process()


class ProxySite(server.Site):
    """The factory for every listener: one role decision, one resource tree."""

    requestFactory = ProxyRequest
    protocol = _proxy_channel  # type: ignore[assignment]
    displayTracebacks = False
    noisy = False

    def __init__(
        self,
        resource: Resource,
        live: LiveConfig,
        reactor: Any,
        forwarder: Forwarder,
    ) -> None:
        super().__init__(resource, reactor=reactor)
        self.live = live
        self.forwarder = forwarder
        self.access_log = AccessLog(live, self.reactor)
        #: Open client connections, for the graceful stop (aoaiproxy.service).
        self.connections = Connections()

    def buildProtocol(self, addr: IAddress | None) -> Any:
        # The idle timeout in force when the connection is made (a reload changes new ones).
        self.timeOut = self.live.config.idle_timeout
        protocol = super().buildProtocol(addr)
        if protocol is not None:
            self.connections.track(protocol)
        return protocol

    def log(self, request: http.Request) -> None:
        """One access-log line per request (called by twisted.web when it finishes)."""
        self.access_log.emit(request)


class ConnectionCap(WrappingFactory):
    """
    One listener's factory: the shared L{ProxySite}, with at most C{max_connections} open
    connections.  A connection beyond the cap gets a 503 in OpenAI's shape and is closed, so
    a flood of connections cannot use up the process's file descriptors.
    """

    noisy = False  # no "Starting factory" log lines

    def __init__(self, site: ProxySite) -> None:
        super().__init__(site)
        self.site = site
        #: Connections over the cap that are being answered right now.
        self.busy = 0

    @property
    def open_connections(self) -> int:
        return len(self.protocols)

    def buildProtocol(self, addr: IAddress | None) -> Any:
        if len(self.protocols) >= self.site.live.config.max_connections:
            return _Busy(self)
        return super().buildProtocol(addr)


class _Busy(Protocol):
    """Answers a connection over a listener's cap with a 503, and closes it."""

    _linger: IDelayedCall | None = None
    _discarded = 0

    def __init__(self, cap: ConnectionCap) -> None:
        self._cap = cap

    def connectionMade(self) -> None:
        self._cap.busy += 1
        error = ProxyError(
            503,
            "The proxy is serving as many connections as it allows; retry shortly.",
            type="server_error",
            code="server_busy",
            headers=((b"Retry-After", b"1"),),
        )
        self._linger = answer_and_close(self.transport, self._cap.site.reactor, error)
        if self._cap.busy > BUSY_LINGER_MAX:
            assert self.transport is not None
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self._discarded += len(data)
        if self._discarded > REJECT_DISCARD_BYTES and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cap.busy -= 1
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
