"""
The HTTP site shared by every listener, and the request class that decides each request's
role from its request-target (RFC 9112 §3.2): C{CONNECT host:port} and absolute-form
(C{GET http://host/path}) go to the forward proxy, origin-form (C{POST /v1/...}) to the
reverse API resource.

The request class decides at the end of each head whether the request will be refused
(L{aoaiproxy.admission}): a body announced or found to be larger than C{max_body} gets a 413,
and a request with a body that its route, its key or its proxy credentials refuse (401, 407,
403, 404...) is answered at once, before its body is read (and with no C{100 Continue}).  A
body no route reads (C{/healthz}, C{OPTIONS}) is discarded as it arrives, never stored.

The channel class enforces the limits on a request's head (L{ProxyChannel}: 414, 431, 408,
and 400 for malformed requests, all in OpenAI's error shape) and the total time its body may
take (408), keeps its site's count of open connections (L{Connections}, for the graceful
stop), and can hand its connection to another protocol (L{ProxyChannel.hand_over}: a CONNECT
tunnel, TLS interception).  Each listener listens with its own L{Listener}, which refuses
connections over the process's cap (503).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from io import BytesIO
from time import time
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

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
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from zope.interface import implementer

from aoaiproxy import _twisted, admission, errors
from aoaiproxy.config import LiveConfig
from aoaiproxy.deadlines import Deadlines
from aoaiproxy.errors import ProxyError
from aoaiproxy.forward.tunnel import half_closeable
from aoaiproxy.head import read_head
from aoaiproxy.log import AccessLog
from aoaiproxy.metrics import NullMetrics, Recorder
from aoaiproxy.resource import raw_headers

if TYPE_CHECKING:
    from aoaiproxy.forward import Forwarder

_log = Logger(namespace="aoaiproxy")

#: How long a connection whose body was refused (413, 401, 407...) may go on sending it, so
#: that the client reads our answer instead of a reset, before it is cut.
LINGER_SECONDS = 5.0

#: The total time a request body may take to arrive, from the end of its head (a client
#: sending one byte now and then stays within the idle timeout, not within this): beyond it,
#: 408 and the connection is closed.
BODY_TIMEOUT = 300.0

#: How long a connection refused before its request was read (400, 408, 414, 431, 503) is
#: kept open, reading and discarding, so the client reads our answer rather than a reset.
REJECT_LINGER_SECONDS = 2.0
#: How much a refused connection may send meanwhile before it is cut at once.
REJECT_DISCARD_BYTES = 256 * 1024
#: At most this many connections over a listener's cap linger at once; beyond it, they get the
#: 503 and are closed at once (best effort), so a flood cannot pile up file descriptors.
BUSY_LINGER_MAX = 64
#: How many bytes a client may send while its request read at once is handled before reading
#: pauses (twisted.web's C{HTTPChannel._optimisticEagerReadSize} for pipelined bytes).
_HOLD_BEFORE_PAUSE = 16 * 1024


#: Reason phrases of RFC 9110 and RFC 6585 where Twisted's table has none or an obsolete one.
_REASONS = {
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    504: b"Gateway Timeout",
}


def reason(status: int) -> bytes:
    """The reason phrase of the proxy's own answers with C{status}."""
    return _REASONS.get(status) or http.RESPONSES.get(status) or b"Unknown"


#: A request body announcing this many bytes or more (or of unknown length) is kept in a
#: temporary file as it arrives, a smaller one in memory (L{ProxySite.getContentFile}).
MEMORY_BODY = 100_000

#: The reason phrase of a 200 (L{ProxyRequest.establish}'s).
_OK = reason(200)


def close_lingering(transport: Any, reactor: Any, linger: float) -> IDelayedCall:
    """
    Close a connection whose last answer was written: end our side of it, so that the client
    sees the end of our answer at once (plain TCP: a half-close; TLS: its C{close_notify},
    after which TLS goes on reading until the client's), and abort it after C{linger}
    seconds.  The caller reads and discards whatever the client sends meanwhile (so that
    closing does not reset the connection before the client has read the answer), and
    cancels the returned call when the connection is lost.
    """
    if half_closeable(transport):
        transport.loseWriteConnection()
    elif isinstance(transport, TLSMemoryBIOProtocol):
        # TLS sends its close_notify once no producer is registered (the channel is one).
        transport.unregisterProducer()
        transport.loseConnection()
    return reactor.callLater(linger, transport.abortConnection)  # type: ignore[no-any-return]


def answer_and_close(
    transport: Any, reactor: Any, error: ProxyError, linger: float = REJECT_LINGER_SECONDS
) -> IDelayedCall:
    """
    Write C{error} as a complete HTTP/1.1 response (C{Connection: close}) on a connection
    whose request will not be read, and close it (L{close_lingering}).
    """
    transport.write(_answer(error))
    return close_lingering(transport, reactor, linger)


def _answer(error: ProxyError) -> bytes:
    body = error.body()
    head = [
        b"HTTP/1.1 %d %s" % (error.status, reason(error.status)),
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
        b"Access-Control-Allow-Origin: *",
        b"Connection: close",
    ]
    head.extend(name + b": " + value for name, value in error.headers)
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def _head_error(status: int, message: str, code: str) -> ProxyError:
    return ProxyError(status, message, code=code)


@implementer(IHalfCloseableProtocol)
class ProxyChannel(http.HTTPChannel):
    """
    The HTTP/1.1 connection of every listener, with the limits from the configuration:

      - C{max_request_line}: a longer request line gets 414;
      - C{max_header_size} (request line and header lines) and C{max_headers}: 431;
      - C{header_timeout}: a request head not complete this long after its first byte (a
        slow-loris client) gets 408;
      - L{BODY_TIMEOUT}: a request body not complete this long after its head gets 408;
      - a malformed request gets 400 (Twisted's own bare 400, in OpenAI's shape here).

    Each of these answers is complete, says C{Connection: close}, and the connection is then
    closed: its request is never processed.  The idle timeout (keep-alive, and silence inside
    a request body) is the site's C{timeOut}, set per connection by L{ProxySite}.

    Head lines may end with a bare LF, as nginx accepts (what a person typing into nc
    sends); the head is parsed here and never passed on as bytes, so this cannot make a
    request mean two things.  A client that half-closes still reads the answers already
    made (a refusal, a finished response); one that half-closes while its request is in
    flight has left (as nginx sees it), and its request is cancelled.

    The channel counts itself among its site's open connections (L{ProxySite.connections})
    and its listener's (L{Listener}) from C{connectionMade} to C{connectionLost}, and knows
    whether it is L{busy}.  L{hand_over} gives the connection to another protocol.

    A plain request whose head and body are whole in the bytes that bring its first byte
    is read without twisted.web's parser (L{_read_at_once}); the request it makes is the one
    the parser would have made.
    """

    site: ProxySite
    #: Lines end with LF; a CR before it is removed (L{lineReceived}).
    delimiter = b"\n"
    #: No adapter of its own (PEP 246): zope.interface's adaptation, which Twisted's TCP
    #: transport asks at each half-close (C{IHalfCloseableProtocol(protocol, None)}), then
    #: finds none at once instead of raising and clearing an AttributeError.
    __conform__ = None

    # One per open connection: this class's own state, and Twisted's public attributes that
    # have class defaults, in slots, so that the instance dictionary holds few enough names
    # (every name ever set on an instance counts, under CPython 3.11's 30) for it to stay a
    # compact key-sharing one, not a dictionary of its own (~1.5 KB per open connection).
    __slots__ = (
        "MAX_LENGTH",
        "_body_at",
        "_close_after",
        "_discard_limit",
        "_discarded",
        "_early",
        "_handed_to",
        "_head",
        "_head_at",
        "_head_lines",
        "_head_size",
        "_header_count",
        "_header_timeout",
        "_host",
        "_idle_after",
        "_idle_at",
        "_in_head",
        "_linger",
        "_lost",
        "_max_request_line",
        "_peer",
        "_rejected",
        "_relayed",
        "connected",
        "factory",
        "length",
        "line_mode",
        "listener",
        "maxHeaders",
        "paused",
        "persistent",
        "timeOut",
        "totalHeadersSize",
        "transport",
    )

    def __init__(self) -> None:
        #: The listener this connection came from; None for one made inside another
        #: connection (TLS interception serves HTTP inside a CONNECT): such a one counts for
        #: the drain, not for a listener's cap.
        self.listener: Listener | None = None
        # What Twisted's classes have as class attributes (a slot hides them), the limits
        # until connectionMade sets ours.
        self.connected = 0
        self.transport: Any = None
        self.factory: Any = None
        self.timeOut = None
        self.length = 0
        self.persistent = 1
        self.line_mode = 1
        self.paused = False
        self.maxHeaders = 500
        self.totalHeadersSize = 16384
        self.MAX_LENGTH = 16384
        self._in_head = True
        self._head_lines = 0
        self._head_size = 0
        self._header_count = 0
        #: The deadlines the connection's one timer (L{expired}, on its site's L{Deadlines})
        #: serves: the head's, the body's, and the idle timeout's (C{TimeoutMixin}'s,
        #: L{setTimeout}).
        self._head_at: float | None = None
        self._body_at: float | None = None
        self._idle_at: float | None = None
        self._rejected = False
        self._discarded = 0
        #: A response head written by L{writeHeaders}, sent with the body bytes that follow it.
        self._head: bytes | None = None
        self._discard_limit: int | None = REJECT_DISCARD_BYTES
        self._linger: IDelayedCall | None = None
        self._close_after: http.Request | None = None
        self._max_request_line = 8192
        self._header_timeout = 30.0
        self._handed_to: IProtocol | None = None
        self._lost = False
        #: While a request read at once (L{_read_at_once}) is handled: the bytes the client
        #: sent after it; and the idle timeout to set again once it is done.
        self._early: list[bytes] | None = None
        self._idle_after: float | None = None
        #: The request whose response is relayed and whose head is not written yet.
        self._relayed: http.Request | None = None
        #: The connection's addresses, asked of the transport once: every request asks for
        #: both (its C{client} and C{host}), and the local one costs a system call.
        self._peer: IAddress | None = None
        self._host: IAddress | None = None
        super().__init__()

    def connectionMade(self) -> None:
        config = self.site.live.config
        self.maxHeaders = config.max_headers
        self.totalHeadersSize = config.max_header_size
        # No single line may be longer than the whole head (LineReceiver's own limit would
        # drop the connection without an answer); it counts the CR before the LF.
        self.MAX_LENGTH = max(config.max_header_size, config.max_request_line) + 1
        self._max_request_line = config.max_request_line
        self._header_timeout = config.header_timeout
        # Twisted's HTTPChannel sets TCP_NODELAY (plain and TLS listeners: the TLS wrapper
        # provides the TCP transport's interfaces): small writes (a head, an SSE event) go out
        # at once, not after the client's ACK of the previous one (Nagle against delayed ACKs
        # can hold a stream's chunk ~40 ms).  tests/test_response_write.py checks it.
        super().connectionMade()
        self.site.connections.add(self)
        self.site.recorder.connection_opened()
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
            C{protocol} provides C{IHalfCloseableProtocol} (else the connection is closed);
          - a graceful stop (L{close_when_done}) calls C{protocol.close_when_done()} if it
            has one (a tunnel decides when it is done); else the connection stays open
            until it ends or the drain deadline cuts it;
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
        self._end_body()
        self.setTimeout(None)
        self._stop_timer()
        early, self._early = self._early, None
        pipelined = b"".join(early or ()) + _twisted.take_pipelined(self) + self.clearLineBuffer()
        # A transport takes one producer: the new protocol may register its own.
        transport.unregisterProducer()  # type: ignore[attr-defined]
        if IPushProducer.providedBy(transport):
            # The channel pauses reading while it buffers pipelined bytes.
            transport.resumeProducing()
        protocol.makeConnection(transport)
        if pipelined:
            protocol.dataReceived(pipelined)

    def readConnectionLost(self) -> None:
        """
        The client half-closed (plain TCP): passed on once handed over; else the answers
        already made are sent and the connection closed, unless a request is in flight (its
        client has left: it is cancelled, as when the connection is lost).
        """
        handed = self._handed_to
        if handed is not None:
            if IHalfCloseableProtocol.providedBy(handed):
                handed.readConnectionLost()  # type: ignore[attr-defined]
                return
        elif self._rejected or not self.requests:
            self.loseConnection()
            return
        self.abort()

    def writeConnectionLost(self) -> None:
        """Our half-close completed: passed on once handed over to a half-closeable protocol."""
        handed = self._handed_to
        if IHalfCloseableProtocol.providedBy(handed):
            handed.writeConnectionLost()  # type: ignore[union-attr]

    def close_when_done(self) -> None:
        """
        For a graceful stop: close the connection now if it is idle; else let the request in
        flight finish, answered with C{Connection: close}, and close it then.  A connection
        handed over is asked to close when it is done, if its protocol can tell
        (L{hand_over}).
        """
        if self._handed_to is not None:
            stop = getattr(self._handed_to, "close_when_done", None)
            if callable(stop):
                stop()
            return
        if not self.busy:
            if not self._lost:
                self.loseConnection()
            return
        self.persistent = False
        for request in list(self.requests):
            if not request.startedWriting:
                request.responseHeaders.setRawHeaders(b"connection", [b"close"])

    def close_after(self, request: http.Request) -> None:
        """
        Answer C{request} with C{Connection: close}, and once its response is done close
        the connection, reading and discarding what the client sends meanwhile (a while, as
        after a refusal): nothing the client sent after C{request} is parsed.  For a refused
        CONNECT, whose client may have sent its first tunnel bytes already.
        """
        self.persistent = False
        self._close_after = request
        if not request.startedWriting:
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])

    @property
    def pipelined(self) -> bool:
        """Whether the client sent bytes after the request being handled (not parsed yet)."""
        return _twisted.pipelined_length(self) > 0 or bool(self._early)

    def getPeer(self) -> IAddress:
        peer = self._peer
        if peer is None:
            peer = self._peer = super().getPeer()
        return peer

    def getHost(self) -> IAddress:
        host = self._host
        if host is None:
            host = self._host = super().getHost()
        return host

    def relaying(self, request: http.Request) -> None:
        """
        The body of C{request}'s response is relayed from now on, for as long as its
        upstream sends it (a stream, maybe for minutes): the connection's timer is stopped if
        it serves no deadline (none, while a request is answered: the idle timeout is off
        until it ends) rather than kept until it fires (it is armed again for the next
        deadline set); the response headers, once L{writeHeaders} wrote them, are not kept.
        """
        if self._head_at is None and self._body_at is None and self._idle_at is None:
            self._stop_timer()
        self._relayed = request

    def abort(self) -> None:
        """Cut the connection now (a stream in flight is visibly truncated)."""
        if not self._lost and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- writing responses ---------------------------------------------------------------------

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        """
        As Twisted's (C{Request.write} always passes its C{Headers}), but the head is kept and
        sent with the body bytes that follow it in the same C{Request.write}
        (L{ProxyRequest.write} sends it alone when none follow): one send for a response.
        """
        head = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                head.extend((name, b": ", value, b"\r\n"))
        head.append(b"\r\n")
        self._head = b"".join(head)
        relayed = self._relayed
        if relayed is not None:
            # A relayed stream's headers are written: nothing reads them any more.
            self._relayed = None
            if relayed.responseHeaders is headers:
                relayed.responseHeaders = Headers()

    def write(self, data: bytes) -> None:
        """Response bytes, straight to the socket when nothing is buffered (L{write_through})."""
        head = self._head
        if head is not None:
            self._head = None
            data = head + data
        if data and self.transport is not None:
            _twisted.write_through(self.transport, data)

    def writeSequence(self, iovec: list[bytes]) -> None:
        self.write(b"".join(iovec))

    def flush_head(self) -> None:
        """Send a head kept by L{writeHeaders} that no body bytes followed."""
        if self._head is not None:
            self.write(b"")

    # -- HTTP, with limits ---------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._handed_to is not None:
            self._handed_to.dataReceived(data)
            return
        if self._rejected:
            self._discard(data)
            return
        if self._early is not None:
            self._hold(data)
            return
        if self._head_at is None:
            # Between requests, nothing of the next one buffered: it may be read at once.
            if not self.requests and not _twisted.pipelined_length(self) and self._read_at_once(data):
                return
            if self._in_head and data:
                self._start_head()
        super().dataReceived(data)

    def _read_at_once(self, data: bytes) -> bool:
        """
        The fast path of a request: a plain head whole in C{data} (L{read_head}), with its
        whole body, becomes its request as twisted.web's parser would make it (the same
        headers, persistence, length, body, and the same refusals of the head), without
        that parser; whether it did.  What follows it in C{data}, and what the client sends
        while it is handled, is held (L{_hold}) and read once it is done, as twisted.web
        holds a client's pipelined bytes.

        The parser, which never sees such a request, is left as it was between requests:
        any other head (malformed, in pieces, with a chunked body or C{Expect}, at a limit)
        goes to it, and it reads and answers it as it always has.
        """
        head = read_head(data, self.totalHeadersSize, self._max_request_line, self.maxHeaders)
        if head is None:
            return False
        end = head.size + head.length
        if len(data) < end:
            return False  # the body is not all here
        self._end_head()
        # What HTTPChannel does once a request's head and body are read: no idle timeout
        # while it is handled (set again once it is done); what the client sends meanwhile
        # is held.
        self._idle_after = self.setTimeout(None)
        self._early = [data[end:]] if len(data) > end else []
        request = ProxyRequest(self, len(self.requests))
        self.requests.append(request)
        add = request.requestHeaders.addRawHeader
        for name, value in head.headers:
            add(name, value)
        # What HTTPChannel.allHeadersReceived does; the request line is known (for
        # gotLength's judgement of the head, and a refusal's access line).
        request.parseCookies()
        self.persistent = self.checkPersistence(request, head.version)
        request.method, request.uri = head.method, head.target
        request.gotLength(head.length)
        if head.length and not self._rejected:
            request.handleContentChunk(data[head.size : end])
        if self._rejected:  # refused from its head, or its body: answered, and closing
            return True
        request.requestReceived(head.method, head.target, head.version)
        return True

    def _hold(self, data: bytes) -> None:
        """
        Bytes from a client whose request (read at once) is being handled: a CONNECT's first
        tunnel bytes, or the next requests, held; reading pauses once they pass what
        twisted.web holds of a client's pipelined bytes before it pauses (16 KiB), until the
        request is done (or the connection handed over).
        """
        early = self._early
        assert early is not None
        if not data:
            return  # (so that a held piece is never empty: L{pipelined})
        early.append(data)
        if sum(map(len, early)) > _HOLD_BEFORE_PAUSE and IPushProducer.providedBy(self.transport):
            self.transport.pauseProducing()

    def rawDataReceived(self, data: bytes) -> None:
        if self._handed_to is not None:  # handed over from inside LineReceiver's loop
            self._handed_to.dataReceived(data)
            return
        if self._rejected:  # refused from inside LineReceiver's loop
            self._discard(data)
            return
        super().rawDataReceived(data)

    def _start_head(self) -> None:
        """A request's head starts: it has L{_header_timeout} seconds to arrive."""
        self._head_at = self._arm(self._header_timeout)

    def lineReceived(self, line: bytes) -> None:
        if self._rejected:
            return
        if line[-1:] == b"\r":
            line = line[:-1]
        if not self._in_head:
            super().lineReceived(line)
            return
        # A pipelined request's lines arrive here without a new dataReceived.
        if self._head_at is None:
            self._start_head()
        lines = self._head_lines
        if line:
            if not lines and len(line) > self._max_request_line:
                self._reject(_request_line_too_long(self._max_request_line))
                return
            self._head_lines = lines + 1
            self._head_size += len(line)
            if self._head_size > self.totalHeadersSize:
                self._reject(_head_too_large(self.totalHeadersSize))
                return
        super().lineReceived(line)
        # A header line (not a continuation) counts once Twisted has taken the one before it
        # (a malformed one is its 400).
        if lines and line and line[0] not in b" \t" and not self._rejected:
            self._header_count += 1
            if self._header_count > self.maxHeaders:
                self._reject(
                    _head_error(
                        431,
                        f"Too many header fields (more than {self.maxHeaders}).",
                        "request_header_fields_too_large",
                    )
                )

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._in_head and self._head_lines == 0:
            self._reject(_request_line_too_long(self._max_request_line))
        else:
            self._reject(_head_too_large(self.totalHeadersSize))

    def allHeadersReceived(self) -> None:
        self._end_head()
        super().allHeadersReceived()
        # The body's time starts (the request may have been refused meanwhile).
        if self.length != 0 and not self._rejected and not self._lost:
            self._body_at = self._arm(BODY_TIMEOUT)

    def allContentReceived(self) -> None:
        self._end_body()
        if self._rejected:  # the end of a refused body: nothing is processed
            return
        super().allContentReceived()

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
        if request is self._close_after:
            self.requests.remove(request)
            self._stop_http(REJECT_LINGER_SECONDS, REJECT_DISCARD_BYTES)
            return
        self._relayed = None
        # The next request's head starts now (its bytes may already be buffered).
        self._in_head = True
        self._head_lines = 0
        self._head_size = 0
        self._header_count = 0
        early, self._early = self._early, None
        super().requestDone(request)
        if early is None or not self.persistent or self._lost:
            return
        # A request read at once (L{_read_at_once}) is done: the idle timeout again, then
        # what the client sent meanwhile, as twisted.web replays what it held.
        if self._idle_after is not None:
            self.setTimeout(self._idle_after)
        held = b"".join(early)
        if held:
            self.dataReceived(held)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        try:
            if self._handed_to is not None:
                self._handed_to.connectionLost(reason)
        finally:
            self._end_head()
            self._end_body()
            self._stop_timer()
            if self._linger is not None and self._linger.active():
                self._linger.cancel()
            self._linger = None
            try:
                super().connectionLost(reason)
            finally:
                self.site.connections.remove(self)
                self.site.recorder.connection_closed()
                if self.listener is not None:
                    self.listener.channels.discard(self)

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's hook for every malformed request (listed in aoaiproxy._twisted).
        self._reject(_head_error(400, "Malformed HTTP request.", "bad_request"))

    def _end_head(self) -> None:
        self._in_head = False
        self._head_at = None

    def _end_body(self) -> None:
        self._body_at = None

    # -- the connection's timer ----------------------------------------------------------------

    def setTimeout(self, period: float | None) -> float | None:
        # TimeoutMixin's idle timeout, served by the connection's one timer: Twisted turns it
        # off and on again around every request, which is a deadline to set here, not a
        # timer to cancel and make again.
        previous = self.timeOut
        self.timeOut = period  # type: ignore[assignment]  # TimeoutMixin says int; a float works
        self._idle_at = None if period is None else self._arm(period)
        return previous

    def resetTimeout(self) -> None:
        if self._idle_at is not None and self.timeOut is not None:
            self._idle_at = self.site.reactor.seconds() + self.timeOut

    def _arm(self, seconds: float) -> float:
        """
        Set a deadline C{seconds} from now, and make the timer fire then unless it fires
        sooner already (it is never moved later: when it fires, it is set again for the
        soonest deadline left, if any); the deadline.
        """
        deadlines = self.site.deadlines
        at: float = self.site.reactor.seconds() + seconds
        due = deadlines.due(self)
        if due is None or due > at:
            deadlines.add(self, seconds)
        return at

    def _stop_timer(self) -> None:
        self._head_at = self._body_at = self._idle_at = None
        self.site.deadlines.remove(self)

    def expired(self) -> None:
        """The timer fired: act on the deadline passed, if any; else fire again later."""
        now: float = self.site.reactor.seconds()
        deadlines = [at for at in (self._head_at, self._body_at, self._idle_at) if at is not None]
        if not deadlines:
            return
        first = min(deadlines)
        if first > now:
            self.site.deadlines.add(self, first - now)
        elif first == self._head_at:
            self._head_timed_out()
        elif first == self._body_at:
            self._body_timed_out()
        else:
            self._idle_at = None
            self.timeoutConnection()
            self.expired()  # the others, if any, still have their time

    def _head_timed_out(self) -> None:
        self._head_at = None
        self._reject(
            _head_error(
                408,
                f"The request head was not received within {self._header_timeout:g}s.",
                "request_timeout",
            )
        )

    def _body_timed_out(self) -> None:
        self._body_at = None
        self._reject(
            _head_error(
                408,
                f"The request body was not received within {BODY_TIMEOUT:g}s.",
                "request_timeout",
            )
        )

    def refuse(self, error: ProxyError) -> None:
        """
        Answer C{error} now instead of reading the body of the request whose head was just
        read (413, or what L{aoaiproxy.admission} decided), and close the connection; what
        the client goes on sending is read and discarded for L{LINGER_SECONDS}, so that a
        client that sends its whole body before reading reads our answer, not a reset.
        """
        self._reject(error, LINGER_SECONDS, None)

    def _reject(
        self,
        error: ProxyError,
        linger: float = REJECT_LINGER_SECONDS,
        discard_limit: int | None = REJECT_DISCARD_BYTES,
    ) -> None:
        """Answer C{error} instead of reading the request, and close the connection."""
        if self._rejected or self._lost or self.transport is None:
            return
        if self.requests and self.requests[-1].startedWriting:  # pragma: no cover - defensive
            self.abort()  # an answer was begun: another one cannot follow
            return
        self.transport.write(_answer(error))
        self._stop_http(linger, discard_limit)
        self.site.access_log.refused_head(self, error.status, sent=len(error.body()), error=error.code)

    def _stop_http(self, linger: float, discard_limit: int | None) -> None:
        """
        Parse no more HTTP on this connection, whose last answer was written: close it
        (L{close_lingering}), reading and discarding up to C{discard_limit} bytes meanwhile
        (more: cut at once).
        """
        self._rejected = True
        self._discard_limit = discard_limit
        self._end_head()
        self._end_body()
        self.setTimeout(None)
        self._stop_timer()
        self.clearLineBuffer()
        _twisted.take_pipelined(self)
        self._early = None
        # Read (and discard) until the client closes: reading may have been paused while
        # the channel held pipelined bytes or the client did not read our answers.
        if IPushProducer.providedBy(self.transport):
            self.transport.resumeProducing()
        self._linger = close_lingering(self.transport, self.site.reactor, linger)

    def _discard(self, data: bytes) -> None:
        self._discarded += len(data)
        limit = self._discard_limit
        if limit is not None and self._discarded > limit and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


def _request_line_too_long(limit: int) -> ProxyError:
    return _head_error(414, f"The request line is longer than {limit} bytes.", "request_line_too_long")


def _head_too_large(limit: int) -> ProxyError:
    return _head_error(
        431, f"The request head is larger than {limit} bytes.", "request_header_fields_too_large"
    )


#: The request headers a relayed stream keeps for its access line (L{rewrite.client_key}'s),
#: when the proxy names clients.
_KEPT_FOR_LOG = (b"authorization", b"api-key")


# No interface of its own (it has twisted.web's request's): the declaration gives the class
# its own zope specification, so that asking what it provides (twisted.web asks, of the
# class, for every request it makes) is a look-up, not a walk up to server.Request's.
@implementer()
class ProxyRequest(server.Request):
    """One request on any listener."""

    site: ProxySite

    # One per request: this class's own state, and what Twisted sets on a request as it is
    # answered, in slots, so that the instance dictionary holds only what Twisted sets at
    # first, few enough names (under CPython's 30) for it to stay a compact key-sharing one,
    # not a dictionary of its own (~1.5 KB per open stream).
    __slots__ = (
        "_body_unused",
        "_gone",
        "_received",
        "_refused",
        "_site",
        "admitted",
        "chunked",
        "code",
        "code_message",
        "defaultContentType",
        "established",
        "finished",
        "first_byte_at",
        "log_done",
        "log_info",
        "log_started",
        "postpath",
        "prepath",
        "producer",
        "sentLength",
        "sitepath",
        "startedWriting",
        "streamingProducer",
    )

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        # What twisted.web's classes have as class attributes (a slot hides them).
        self.code = 200
        self.code_message = b"OK"
        self.startedWriting = 0
        self.chunked = 0
        self.sentLength = 0
        self.producer: IPushProducer | None = None
        self.finished = 0
        self.defaultContentType: bytes | None = b"text/html"
        self.prepath: list[bytes] | None = None
        self.postpath: list[bytes] | None = None
        self._refused = False
        #: Whether the body is discarded as it arrives (a route that never reads one).
        self._body_unused = False
        self._received = 0
        #: For the access log: whether the request has been logged, and its notes.
        self.log_done = False
        self.log_info: dict[str, Any] | None = None
        #: Whether this CONNECT was answered 200 and its connection handed over (L{establish}).
        self.established = False
        #: When the first byte of the answer was written (the metrics' time to first byte).
        self.first_byte_at: float | None = None
        #: What to call if the client leaves before the response is finished (L{when_gone}).
        self._gone: list[Callable[[], object]] | None = None
        #: What the head of an API request with a body decided (L{admission.judge}), for its
        #: route to take rather than decide again.
        self.admitted: admission.Admitted | None = None
        # Never parse form bodies into request.args: Twisted does that for every POST
        # multipart/urlencoded body, in memory (a 20 MB upload cost 250 MB).  It must be
        # passed here: Request.__init__ sets the attribute, so a class attribute is ignored.
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(channel, *args, **kwargs)
        #: The channel's site (kept: Request.connectionLost drops the channel).
        self._site: ProxySite = channel.site
        #: For the access log: when the request started.
        self.log_started = self._site.reactor.seconds()

    def write(self, data: bytes) -> None:
        if _twisted.body_writable(self):
            # A body piece after the head (a stream's chunk): framed as Request.write frames it.
            self.sentLength += len(data)
            if data:
                self.channel.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
            return
        if self.startedWriting:  # finished (an error), or the client left (nothing to write)
            super().write(data)
            return
        # Twisted writes the head with the first body bytes (finish() writes b"" for a
        # response without a body): that is the first byte, a stream's first chunk.
        self.first_byte_at = self._site.reactor.seconds()
        super().write(data)
        channel = self.channel
        if isinstance(channel, ProxyChannel):
            channel.flush_head()  # a head with no body bytes after it (HEAD, 204, b"")

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        super().registerProducer(producer, streaming)
        if not self.responseHeaders.hasHeader(b"content-length"):
            self._let_go()

    def _let_go(self) -> None:
        """
        A body of no announced length (a stream) is relayed from now on, maybe for minutes:
        let go of what the request no longer needs.  Its headers were read (the route, the
        upstream request, persistence): only those the access line still reads (the client
        key that names the client, when the proxy names clients) are kept; the path segments
        are not traversed any more; the response headers are let go of once written
        (L{ProxyChannel.relaying}).
        """
        headers = self.requestHeaders
        kept = Headers()
        if self._site.live.config.client_names:
            for name in _KEPT_FOR_LOG:
                values = headers.getRawHeaders(name)
                if values is not None:
                    kept.setRawHeaders(name, values)
        self.requestHeaders = kept
        self.postpath = []
        self.admitted = None  # it holds the headers too
        channel = self.channel
        if isinstance(channel, ProxyChannel):
            channel.relaying(self)

    def when_gone(self, callback: Callable[[], object]) -> None:
        """
        Call C{callback} if the connection is lost before this request's response is
        finished (the client left, the stream was cut): what
        C{notifyFinish().addErrback(lambda _: callback())} does, without a L{Deferred} made
        and fired for every request.  What it raises is logged.
        """
        if self._gone is None:
            self._gone = [callback]
        else:
            self._gone.append(callback)

    def finish(self) -> None:
        super().finish()
        # Finished: no callback is due any more, and none keeps the request in a reference
        # cycle (a relay's callback holds its request), so that it is freed at once, not by
        # the cyclic collector.
        self._gone = None

    def connectionLost(self, reason: Failure) -> None:
        # The connection went away before the response was finished (client gone, stream
        # cut, drain deadline): still one access line, marked aborted.
        super().connectionLost(reason)
        gone, self._gone = self._gone, None
        for callback in gone or ():
            try:
                callback()
            except Exception:
                _log.failure("while a request whose client left was stopped")
        self._site.access_log.emit(self, aborted=True)

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        # The reason phrases of RFC 9110 where Twisted's are obsolete (an upstream's own
        # phrase, when it is relayed, is passed as it is).
        super().setResponseCode(code, reason(code) if message is None else message)

    @property
    def _channel(self) -> ProxyChannel:
        channel: ProxyChannel = self.channel  # type: ignore[assignment]
        return channel

    def _limit(self) -> int:
        return self._site.live.config.max_body

    def gotLength(self, length: int | None) -> None:
        # Called once the head is read, before any byte of the body (and before Twisted
        # answers "Expect: 100-continue"): the moment to refuse what the head already says.
        error = None
        if length is not None and length > (limit := self._limit()):
            error = errors.too_large(limit)
        elif length != 0:  # a body follows (chunked: None)
            error, self._body_unused = self._judge_head()
        if error is not None:
            self._refuse(error)
        super().gotLength(0 if self._refused or self._body_unused else length)

    def _judge_head(self) -> tuple[ProxyError | None, bool]:
        """What the head of a request with a body decides: its refusal, or whether its body is unused."""
        # Read at once (ProxyChannel._read_at_once), the request has its line already; else
        # the channel's parser keeps it until the request is complete.
        line = (
            (self.method, self.uri) if self.uri != http.Request.uri else _twisted.request_line(self.channel)
        )
        if line is None:  # pragma: no cover - the request line is parsed before any header
            return None, False
        method, target = line
        config = self._site.live.config
        verdict = admission.judge(config, method, target, raw_headers(self))
        if isinstance(verdict, ProxyError):
            return verdict, False
        self.admitted = verdict
        return None, admission.body_unused(method, target)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._limit():
            self._refuse(errors.too_large(self._limit()))
            return
        if not self._body_unused:
            super().handleContentChunk(data)

    def _refuse(self, error: ProxyError) -> None:
        """Answer C{error} now, before (the rest of) the body is read (L{ProxyChannel.refuse})."""
        self._refused = True
        # No "100 Continue" after our final answer.
        self.requestHeaders.removeHeader(b"expect")
        self._channel.refuse(error)

    def process(self) -> None:
        # CONNECT and absolute-form targets are the forward proxy's; it answers them, or
        # turns an API request (http://api.openai.com/v1/...) into origin-form for the tree.
        site = self._site
        if (self.method == b"CONNECT" or self.uri[:1] != b"/") and site.forwarder.handle(self):
            return
        leaf = site.leaf
        if leaf is None or self.path == b"*":
            super().process()
            return
        # What server.Request.process does for a tree that is one leaf (nothing to traverse),
        # with its Date made once a second rather than on every request.
        self.site = site
        headers = self.responseHeaders
        headers.setRawHeaders(b"Server", [server.version])
        headers.setRawHeaders(b"Date", [site.date()])
        self.prepath = []
        # unquote_to_bytes gives a segment without "%" back as it is.
        self.postpath = [unquote_to_bytes(s) if b"%" in s else s for s in self.path[1:].split(b"/")]
        self.sitepath: list[bytes] = []
        try:
            self.render(leaf)
        except BaseException:
            self.processingFailed(Failure())

    @property
    def pipelined(self) -> bool:
        """Whether the client sent bytes after this request (a CONNECT's first tunnel bytes)."""
        return self._channel.pipelined

    def close_connection_after(self) -> None:
        """
        Close the connection once this request's response is done, parsing nothing the
        client sent after it (L{ProxyChannel.close_after}).
        """
        self._channel.close_after(self)

    def establish(self, protocol: IProtocol) -> None:
        """
        Answer this CONNECT with C{200 Connection Established} and hand the connection to
        C{protocol} (L{ProxyChannel.hand_over}: a tunnel, or TLS for interception).  The
        request is never finished: its access line (status 200) is written when the
        connection closes.
        """
        # What setResponseCode(200) sets, without looking the phrase up on every CONNECT.
        self.code = 200
        self.code_message = _OK
        self.established = True
        self.first_byte_at = self._site.reactor.seconds()
        # Sent now when nothing is buffered (not on the reactor's next turn): the client waits for it.
        _twisted.write_through(self._channel.transport, b"HTTP/1.1 200 Connection Established\r\n\r\n")
        self._channel.hand_over(protocol)


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
        *,
        recorder: Recorder | None = None,
    ) -> None:
        super().__init__(resource, reactor=reactor)
        self.live = live
        self.forwarder = forwarder
        #: The metrics (SPEC §14) of every request, connection and stream of this site.
        self.recorder: Recorder = recorder if recorder is not None else NullMetrics()
        self.access_log = AccessLog(live, self.reactor, self.recorder)
        #: Open client connections, for the graceful stop (L{Connections.drain}).
        self.connections = Connections()
        #: Every connection's timer (L{ProxyChannel.expired}), on one timer.
        self.deadlines = Deadlines(self.reactor)
        #: The tree's root when it is a leaf that serves every request itself, as the API's
        #: is (L{ProxyRequest.process} then has nothing to traverse); None otherwise.
        self.leaf: Resource | None = None if not resource.isLeaf or _twisted.encodes(resource) else resource
        self._date = b""
        self._date_second = -1

    def date(self) -> bytes:
        """The value of the C{Date} header now (RFC 9110 §6.6.1), made once a second."""
        second = int(time())
        if second != self._date_second:
            self._date = http.datetimeToString(second)
            self._date_second = second
        return self._date

    def buildProtocol(self, addr: IAddress | None) -> ProxyChannel:  # type: ignore[override]
        # A ProxyChannel itself, not Twisted's private wrapper that switches to HTTP/2 (the
        # listeners offer HTTP/1.1 only): the channel is the transport's protocol.
        # The idle timeout in force when the connection is made (a reload changes new ones).
        self.timeOut = self.live.config.idle_timeout
        channel: ProxyChannel = super().buildProtocol(addr)
        return channel

    def getContentFile(self, length: int | None) -> IO[bytes]:
        """
        Where a request's body is kept as it arrives: in memory when it announces fewer than
        L{MEMORY_BODY} bytes, else (or chunked: no length) in a temporary file, twisted.web's
        own rule (C{http._getContentFile}).  twisted.web's request asks its site for this
        hook (C{server.Request.gotLength}); without it, it falls back to its own by raising
        and catching an AttributeError, for every request and every CONNECT.
        """
        if length is not None and length < MEMORY_BODY:
            return BytesIO()
        return tempfile.TemporaryFile()

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
