"""
The HTTP site shared by every listener, and the request class that decides each request's
role from its request-target (RFC 9112 §3.2): C{CONNECT host:port} and absolute-form
(C{GET http://host/path}) go to the forward proxy, origin-form (C{POST /v1/...}) to the
reverse API resource.

The request class also enforces C{max_body}: a body announced or found to be larger gets a
413 as soon as that is known, before the rest is read.

The channel class enforces the limits on a request's head (L{ProxyChannel}: 414, 431, 408,
and 400 for malformed requests, all in OpenAI's error shape), keeps its site's count of open
connections (L{Connections}, for the graceful stop), and can hand its connection to another
protocol (L{ProxyChannel.hand_over}: a CONNECT tunnel, TLS interception).  Each listener
listens with its own L{Listener}, which refuses connections over the process's cap (503).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IProtocol,
    IPushProducer,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource
from zope.interface import alsoProvides

from aoaiproxy import _twisted, errors
from aoaiproxy.config import LiveConfig
from aoaiproxy.errors import ProxyError
from aoaiproxy.log import AccessLog

if TYPE_CHECKING:
    from aoaiproxy.forward import Forwarder

_log = Logger(namespace="aoaiproxy")

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

    The channel counts itself among its site's open connections (L{ProxySite.connections})
    and its listener's (L{Listener}) from C{connectionMade} to C{connectionLost}, and knows
    whether it is L{busy}.  L{hand_over} gives the connection to another protocol.
    """

    site: ProxySite
    #: The listener this connection came from; None for one made inside another connection
    #: (TLS interception serves HTTP inside a CONNECT): such a one counts for the drain, not
    #: for a listener's cap.
    listener: Listener | None = None
    _in_head = True
    _head_lines = 0
    _head_size = 0
    _header_count = 0
    _head_timer: IDelayedCall | None = None
    _rejected = False
    _discarded = 0
    _linger: IDelayedCall | None = None
    _max_request_line = 8192
    _header_timeout = 30.0
    _handed_to: IProtocol | None = None
    _lost = False

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
        self.site.connections.add(self)
        if self.listener is not None:
            self.listener.channels.add(self)

    # -- the connection's modes ----------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """
        Whether the connection has a request in flight (its head or body being read, its
        response or stream being sent) or was handed over (a tunnel); idle otherwise.
        """
        return bool(self.requests) or self._handed_to is not None

    @property
    def handed_over(self) -> bool:
        """Whether L{hand_over} gave this connection to another protocol."""
        return self._handed_to is not None

    def hand_over(self, protocol: IProtocol) -> None:
        """
        Give this connection to C{protocol}, for good: a CONNECT tunnel, or a TLS server
        (C{TLSMemoryBIOFactory(creator, False, site).buildProtocol(addr)}) for interception.

        Call it while the channel handles a request (typically a CONNECT whose answer the
        caller has just written), from the request's C{process()} or any later callback,
        once.  From then on:

          - the channel parses no more HTTP and writes nothing; its idle and head timeouts
            are off (C{protocol} keeps its own);
          - C{protocol.makeConnection(transport)} is called with this channel's transport
            (plain TCP, or the listener's TLS): C{protocol} writes, closes and registers
            producers on it directly (the channel no longer produces for it), and reading
            is resumed if the channel had paused it;
          - the bytes the client sent after the request's head and body, which the channel
            had buffered, are passed to C{protocol.dataReceived} before this returns, then
            every byte that arrives;
          - a half-close by a plain TCP client reaches C{protocol.readConnectionLost} if
            C{protocol} provides C{IHalfCloseableProtocol} (else the connection is lost);
          - C{connectionLost} reaches C{protocol} first; then the channel ends the request it
            was handling (its access line, with the status the caller set, is written then)
            and leaves its site's and listener's counts.

        The channel stays the transport's protocol and stays counted as open and L{busy}
        until the connection is lost.  The request being handled must not be finished.

        @raise RuntimeError: when the connection was already handed over or is gone.
        """
        if self._handed_to is not None:
            raise RuntimeError("this connection was already handed over")
        if self._lost or self.transport is None:
            raise RuntimeError("this connection is gone")
        transport = self.transport
        self._handed_to = protocol
        self._end_head()
        self.setTimeout(None)
        pipelined = _twisted.take_pipelined(self) + self.clearLineBuffer()
        # A transport takes one producer: the new protocol may register its own.
        transport.unregisterProducer()  # type: ignore[attr-defined]
        network = IPushProducer(transport, None)
        if network is not None:
            # The channel pauses reading while it buffers pipelined bytes.
            network.resumeProducing()
        if IHalfCloseableProtocol.providedBy(protocol):
            # The transport asks its protocol (this channel) for the interface on a half-close.
            alsoProvides(self, IHalfCloseableProtocol)
        protocol.makeConnection(transport)
        if pipelined:
            protocol.dataReceived(pipelined)

    def readConnectionLost(self) -> None:
        """A half-close, passed on (provided once handed to a half-closeable protocol)."""
        IHalfCloseableProtocol(self._handed_to).readConnectionLost()

    def writeConnectionLost(self) -> None:
        """Our half-close completed, passed on (as L{readConnectionLost})."""
        IHalfCloseableProtocol(self._handed_to).writeConnectionLost()

    def close_when_done(self) -> None:
        """
        For a graceful stop: close the connection now if it is idle; else let the request in
        flight finish, answered with C{Connection: close}, and close it then.
        """
        if not self.busy:
            if not self._lost:
                self.loseConnection()
            return
        self.persistent = False
        for request in list(self.requests):
            if not request.startedWriting:
                request.responseHeaders.setRawHeaders(b"connection", [b"close"])

    def abort(self) -> None:
        """Cut the connection now (a stream in flight is visibly truncated)."""
        if not self._lost and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- HTTP, with limits ---------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._handed_to is not None:
            self._handed_to.dataReceived(data)
            return
        if self._rejected:
            self._discard(data)
            return
        if self._in_head and data:
            self._start_head_timer()
        super().dataReceived(data)

    def rawDataReceived(self, data: bytes) -> None:
        if self._handed_to is not None:  # handed over from inside LineReceiver's loop
            self._handed_to.dataReceived(data)
            return
        super().rawDataReceived(data)

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
            self._head_size += len(line)
            if self._head_size > self.totalHeadersSize:
                self._reject(_head_too_large(self.totalHeadersSize))
                return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._in_head and self._head_lines == 0:
            self._reject(_request_line_too_long(self._max_request_line))
        else:
            self._reject(_head_too_large(self.totalHeadersSize))

    def headerReceived(self, line: bytes) -> bool:
        if self._header_count >= self.maxHeaders:
            self._reject(
                _head_error(
                    431,
                    f"Too many header fields (more than {self.maxHeaders}).",
                    "request_header_fields_too_large",
                )
            )
            return False
        ok: bool = super().headerReceived(line)
        if ok:
            self._header_count += 1
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
        if self._handed_to is not None:
            # Finished after the hand-over (it should not be): no HTTP is parsed any more.
            if request in self.requests:
                self.requests.remove(request)
            return
        # The next request's head starts now (its bytes may already be buffered).
        self._in_head = True
        self._head_lines = 0
        self._head_size = 0
        self._header_count = 0
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        try:
            if self._handed_to is not None:
                self._handed_to.connectionLost(reason)
        finally:
            self._end_head()
            if self._linger is not None and self._linger.active():
                self._linger.cancel()
            self._linger = None
            try:
                super().connectionLost(reason)
            finally:
                self.site.connections.remove(self)
                if self.listener is not None:
                    self.listener.channels.discard(self)

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's hook for every malformed request (listed in aoaiproxy._twisted).
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
        if self._rejected or self._lost or self.transport is None:
            return
        self._rejected = True
        self._end_head()
        self.setTimeout(None)
        self.clearLineBuffer()
        # Read (and discard) until the client closes: reading may have been paused while
        # the channel held pipelined bytes or the client did not read our answers.
        network = IPushProducer(self.transport, None)
        if network is not None:
            network.resumeProducing()
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

    def establish(self, protocol: IProtocol) -> None:
        """
        Answer this CONNECT with C{200 Connection Established} and hand the connection to
        C{protocol} (L{ProxyChannel.hand_over}: a tunnel, or TLS for interception).  The
        request is never finished: its access line (status 200) is written when the
        connection closes.
        """
        channel: ProxyChannel = self.channel  # type: ignore[assignment]
        self.setResponseCode(200)
        self._transport.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        channel.hand_over(protocol)


class ProxySite(server.Site):
    """
    The factory of every client connection: one role decision, one resource tree.  Each
    listener listens with its own L{listener} factory; a connection made inside another
    (TLS interception) is built by C{buildProtocol} directly.
    """

    requestFactory = ProxyRequest
    protocol = ProxyChannel  # type: ignore[assignment]
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
        #: Open client connections, for the graceful stop (L{Connections.drain}).
        self.connections = Connections()

    def buildProtocol(self, addr: IAddress | None) -> ProxyChannel:  # type: ignore[override]
        # A ProxyChannel itself, not Twisted's private wrapper that switches to HTTP/2 (the
        # listeners offer HTTP/1.1 only): the channel is the transport's protocol.
        # The idle timeout in force when the connection is made (a reload changes new ones).
        self.timeOut = self.live.config.idle_timeout
        channel: ProxyChannel = super().buildProtocol(addr)
        return channel

    def listener(self) -> Listener:
        """A new listener's factory (one per listening port)."""
        return Listener(self)

    def log(self, request: http.Request) -> None:
        """One access-log line per request (called by twisted.web when it finishes)."""
        self.access_log.emit(request)


class Listener(Factory):
    """
    One listener's factory: the site's channels.  At most C{max_connections} are open at once
    in the process (every listener's together); a connection beyond the cap gets a 503 in
    OpenAI's shape and is closed, so a flood of connections cannot use up the process's file
    descriptors.
    """

    noisy = False  # no "Starting factory" log lines

    def __init__(self, site: ProxySite) -> None:
        self.site = site
        #: This listener's open connections (each channel adds and removes itself).
        self.channels: set[ProxyChannel] = set()
        #: Connections over the cap that are being answered right now.
        self.lingering = 0

    @property
    def open_connections(self) -> int:
        return len(self.channels)

    def startFactory(self) -> None:
        self.site.doStart()

    def stopFactory(self) -> None:
        self.site.doStop()

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        if len(self.site.connections.open) >= self.site.live.config.max_connections:
            return _Busy(self)
        channel = self.site.buildProtocol(addr)
        channel.listener = self
        return channel


class _Busy(Protocol):
    """Answers a connection over a listener's cap with a 503, and closes it."""

    _linger: IDelayedCall | None = None
    _discarded = 0

    def __init__(self, listener: Listener) -> None:
        self._listener = listener

    def connectionMade(self) -> None:
        self._listener.lingering += 1
        error = ProxyError(
            503,
            "The proxy is serving as many connections as it allows; retry shortly.",
            type="server_error",
            code="server_busy",
            headers=((b"Retry-After", b"1"),),
        )
        self._linger = answer_and_close(self.transport, self._listener.site.reactor, error)
        if self._listener.lingering > BUSY_LINGER_MAX:
            assert self.transport is not None
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self._discarded += len(data)
        if self._discarded > REJECT_DISCARD_BYTES and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._listener.lingering -= 1
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None


class Connections:
    """
    The open client connections of one site (every listener's), for a graceful stop.

    Each L{ProxyChannel} adds itself when it connects and removes itself when its connection
    is lost.  On stop, L{drain} closes idle keep-alive connections at once, lets the ones
    with a request in flight (a stream, a tunnel) finish and close, and aborts whatever is
    still open at the deadline, so that a cut stream is visibly truncated.
    """

    def __init__(self) -> None:
        self.open: set[ProxyChannel] = set()
        self.draining = False
        self._drained: list[Deferred[None]] = []

    def add(self, channel: ProxyChannel) -> None:
        self.open.add(channel)

    def remove(self, channel: ProxyChannel) -> None:
        self.open.discard(channel)
        if self.draining and not self.open:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    def close_idle(self) -> int:
        """
        Stop taking new requests: close idle connections now, and make busy ones close once
        their response is done (C{Connection: close}).  Returns how many are busy.
        """
        self.draining = True
        busy = 0
        for channel in list(self.open):
            busy += channel.busy
            channel.close_when_done()
        return busy

    def wait_closed(self) -> Deferred[None]:
        """Fires once every open connection is gone (after L{close_idle})."""
        self.draining = True
        if not self.open:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        return d

    def cut(self) -> int:
        """Abort every connection still open; returns how many."""
        channels = list(self.open)
        for channel in channels:
            channel.abort()
        return len(channels)

    def drain(self, reactor: Any, timeout: float) -> Deferred[int]:
        """
        L{close_idle}, then wait until every connection is closed or C{timeout} seconds have
        passed, and then L{cut} the rest.  Fires with how many connections were cut.
        """
        busy = self.close_idle()
        _log.info(
            "draining: {busy} connection(s) with a request in flight, waiting up to {timeout:g}s",
            busy=busy,
            timeout=timeout,
        )
        result: Deferred[int] = Deferred()
        cut = [0]
        timer: IDelayedCall | None = None

        def deadline() -> None:
            nonlocal timer
            timer = None
            cut[0] = self.cut()
            _log.warn(
                "drain timeout ({timeout:g}s): cut {count} connection(s) still open",
                timeout=timeout,
                count=cut[0],
            )
            # Aborted connections are lost on the next reactor iteration; do not wait for
            # anything that might not go away.
            reactor.callLater(0.5, finish, None)

        def finish(_: object) -> None:
            nonlocal timer
            if timer is not None and timer.active():
                timer.cancel()
            timer = None
            if not result.called:
                if not cut[0]:
                    _log.info("drained: every request in flight has finished")
                result.callback(cut[0])

        if self.open:
            timer = reactor.callLater(timeout, deadline)
        self.wait_closed().addCallback(finish)
        return result
