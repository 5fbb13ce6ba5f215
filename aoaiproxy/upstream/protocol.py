"""
One HTTP/1.1 connection to an upstream: it writes a request and reads its response with the
C{httptools} (llhttp) parser, one request at a time, and hands the response on as an
L{IResponse}-like L{UpstreamResponse}.

What it does as C{twisted.web.client}'s HTTP/1.1 client does: 1xx responses skipped, no body
for C{HEAD}, 204 and 304, chunked, sized and close-delimited bodies, the connection-control
headers (and those the response's C{Connection} header lists) kept out of
L{UpstreamResponse.headers}, the body delivered to a protocol with backpressure
(C{pauseProducing} stops reading the socket), a body cut short reported as a failure.  And
what it does not: the response head is bounded (header count and bytes; an upstream cannot
stall the reactor or fill memory with it), and no Deferred is made per request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, Any
from typing import Protocol as TypingProtocol

import httptools
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IPullProducer, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

from aoaiproxy._twisted import write_through

#: Headers about the connection, not the message: never in L{UpstreamResponse.headers} (as
#: in C{twisted.web.client}); nor are those a response's C{Connection} header names.
CONNECTION_CONTROL = frozenset(
    {
        b"connection",
        b"content-length",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
#: For a response to HEAD, Content-Length describes the entity: it stays.
_CONTROL_FOR_HEAD = CONNECTION_CONTROL - {b"content-length"}

#: A request body file is sent in pieces of this size, each when the socket took the last.
FILE_CHUNK = 64 * 1024
#: Bytes of a body kept for a response whose reader has not come yet; past it the socket is
#: not read until C{deliverBody}.
UNREAD_BODY_LIMIT = 64 * 1024

_DONE = Failure(ResponseDone("Response body fully received"))
#: A response's reader once it has been told the end: the reader itself is not kept (it holds
#: the response through its transport, a cycle only the cyclic collector would free).
_ENDED = Protocol()
_PARSER_ERRORS = (httptools.HttpParserError, httptools.HttpParserUpgrade)


class UpstreamClosed(Exception):
    """The connection ended before a whole response head arrived."""

    def __init__(self, reason: Failure, received: bool) -> None:
        super().__init__(reason, received)
        #: Why it ended.
        self.reason = reason
        #: Whether any byte of a response had arrived.
        self.received = received


class MalformedResponse(Exception):
    """The upstream's answer is not HTTP/1.1 we can relay."""


class HeadTooLarge(Exception):
    """The response head has more headers or bytes than allowed."""


class _SkipBody(Exception):
    """Raised from the parser's head callback: this response has no body (a HEAD request)."""


class Exchange(TypingProtocol):
    """What a connection reports a request's outcome to (until the response head)."""

    def head_received(self, response: UpstreamResponse) -> None: ...

    def failed(self, error: Exception) -> None: ...


# Connection states.
_IDLE, _HEAD, _BODY, _CLOSED = range(4)


@implementer(IPushProducer)
class _BodyTransport:
    """The transport a body protocol gets: pause, resume or stop reading the upstream."""

    __slots__ = ("_response",)

    def __init__(self, response: _Body) -> None:
        self._response = response

    def pauseProducing(self) -> None:
        conn = self._response._conn
        if conn is not None:
            conn.pause()

    def resumeProducing(self) -> None:
        conn = self._response._conn
        if conn is not None:
            conn.resume()

    def stopProducing(self) -> None:
        conn = self._response._conn
        if conn is not None:
            conn.abort()

    abortConnection = stopProducing  # what readBody calls when cancelled


@implementer(IResponse)
class UpstreamResponse:
    """
    A response whose head has arrived.  Its body goes to the protocol given to
    L{deliverBody}: C{dataReceived} as it arrives, then C{connectionLost} with
    L{ResponseDone}, L{PotentialDataLoss} (a body delimited by the connection's close), or
    L{ResponseFailed} (cut short).  Bytes that arrive before C{deliverBody} are kept for it.

    The connection and the body's reader hold only its L{_Body}, not the head: a long
    stream does not keep the head (its headers) unless its caller does.
    """

    __slots__ = (
        "_body",
        "_headers",
        "code",
        "length",
        "phrase",
        "previousResponse",
        "raw_headers",
        "request",
        "version",
    )

    def __init__(
        self,
        version: tuple[bytes, int, int],
        code: int,
        phrase: bytes,
        raw_headers: list[tuple[bytes, bytes]],
        length: Any,
    ):
        self.request = None
        self.previousResponse: IResponse | None = None
        self.version = version
        self.code = code
        self.phrase = phrase
        #: The response's headers, as (name, value) pairs in the order received, names as the
        #: upstream spelled them, without the connection-control ones (and those its
        #: C{Connection} header names): what L{headers} holds, with no L{Headers} made.
        self.raw_headers = raw_headers
        self._headers: Headers | None = None
        self.length: int | object = length
        self._body = _Body()

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    @property
    def headers(self) -> Headers:
        """L{raw_headers} as a L{Headers} (made when first asked for: the relay reads the pairs)."""
        headers = self._headers
        if headers is None:
            headers = self._headers = Headers()
            for name, value in self.raw_headers:
                headers.addRawHeader(name, value)
        return headers

    def deliverBody(self, protocol: Any) -> None:
        self._body.deliver(protocol)


class _Body:
    """The body of an L{UpstreamResponse}, as it is delivered."""

    __slots__ = ("_conn", "_end", "_protocol", "_unread", "_unread_bytes", "_waiting")

    def __init__(self) -> None:
        #: The connection, while the body is still arriving.
        self._conn: HTTP11Connection | None = None
        self._protocol: Any = None
        #: Bytes that came before the reader (a list only when there are some).
        self._unread: list[bytes] | None = None
        self._unread_bytes = 0
        #: Whether the socket is not read until deliverBody (too much unread).
        self._waiting = False
        self._end: Failure | None = None

    def deliver(self, protocol: Any) -> None:
        if self._protocol is not None:
            raise RuntimeError("deliverBody was already called")
        self._protocol = protocol
        protocol.makeConnection(_BodyTransport(self))
        if self._waiting and self._conn is not None:
            self._conn.resume()
        self._waiting = False
        if self._unread is not None:
            data = b"".join(self._unread)
            self._unread = None
            protocol.dataReceived(data)
        if self._end is not None:
            self._protocol = _ENDED
            protocol.connectionLost(self._end)

    def _data(self, data: bytes) -> None:
        if self._protocol is not None:
            self._protocol.dataReceived(data)
            return
        if self._unread is None:
            self._unread = []
        self._unread.append(data)
        self._unread_bytes += len(data)
        if self._unread_bytes > UNREAD_BODY_LIMIT and self._conn is not None and not self._waiting:
            self._waiting = True
            self._conn.pause()

    def _finished(self, reason: Failure) -> None:
        self._conn = None
        if self._end is not None:
            return
        self._end = reason
        protocol = self._protocol
        if protocol is not None:
            self._protocol = _ENDED
            protocol.connectionLost(reason)


@implementer(IPullProducer)
class _FileSender:
    """Writes C{length} bytes of a file to the connection, a piece each time the socket drains."""

    def __init__(self, conn: HTTP11Connection, consumer: IConsumer, f: IO[bytes], length: int) -> None:
        self._conn = conn
        self._consumer = consumer
        self._file = f
        self._left = length

    def resumeProducing(self) -> None:
        if self._left <= 0:
            return
        data = self._file.read(min(FILE_CHUNK, self._left))
        if not data:
            # Shorter than announced: the request cannot be completed.
            self._left = 0
            self._consumer.unregisterProducer()
            self._conn.abort()
            return
        self._left -= len(data)
        self._consumer.write(data)
        if self._left <= 0:
            self._consumer.unregisterProducer()
            self._conn._sender = None

    def stopProducing(self) -> None:
        self._left = 0


class HTTP11Connection(Protocol):
    """
    A persistent HTTP/1.1 client connection: L{send} one request at a time; between requests
    it is idle (and C{on_idle} is called to pool it).

    @ivar on_idle: called once a response ended and the connection can carry another request.
    @ivar on_lost: called when the connection has closed.
    @ivar on_made: called once the connection is made (then forgotten): for a dialler whose
        connection is this protocol itself, with no wrapper to tell it (L{aoaiproxy.upstream.client}).
    """

    # One per open stream: slots, not a dict of two dozen members.
    __slots__ = (
        "_answer",
        "_closed_waiters",
        "_complete",
        "_exchange",
        "_head_bytes",
        "_headers",
        "_keep_alive",
        "_max_head_bytes",
        "_max_headers",
        "_no_body",
        "_parser",
        "_parts",
        "_paused",
        "_phrase",
        "_received",
        "_response",
        "_sender",
        "_state",
        "_until_close",
        "idle_since",
        "on_idle",
        "on_lost",
        "on_made",
        "pool_key",
    )

    def __init__(self, max_headers: int, max_head_bytes: int) -> None:
        self._max_headers = max_headers
        self._max_head_bytes = max_head_bytes
        self.on_idle: Callable[[HTTP11Connection], None] | None = None
        self.on_lost: Callable[[HTTP11Connection], None] | None = None
        self.on_made: Callable[[HTTP11Connection], None] | None = None
        #: When it last became idle (set by the pool).
        self.idle_since = 0.0
        #: The key of the pool it belongs to, for C{on_idle} and C{on_lost} (set by the client).
        self.pool_key: Any = None
        self._state = _IDLE
        self._parser = httptools.HttpResponseParser(self)
        self._exchange: Exchange | None = None
        #: The body of the response being read (from its head to its end).
        self._response: _Body | None = None
        #: The response whose head has arrived, until it is handed on (L{_deliver}).
        self._answer: UpstreamResponse | None = None
        self._sender: _FileSender | None = None
        self._paused = False
        self._received = False
        self._head_bytes = 0
        self._no_body = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._phrase = b""
        self._parts: list[bytes] = []
        self._complete = False
        self._keep_alive = False
        self._until_close = False
        self._closed_waiters: list[Deferred[None]] | None = None

    def connectionMade(self) -> None:
        # A request goes out at once, not after the upstream's ACK of the previous one.
        setTcpNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setTcpNoDelay is not None:
            setTcpNoDelay(True)
        made, self.on_made = self.on_made, None
        if made is not None:
            made(self)

    @property
    def reusable(self) -> bool:
        """Whether it can carry a request now: idle, and neither closing nor closed."""
        return self._state == _IDLE and self.transport is not None

    # -- sending ---------------------------------------------------------------------------

    def send(
        self, head: bytes, body: bytes | IO[bytes] | None, length: int, method: bytes, exchange: Exchange
    ) -> None:
        """
        Send a request: C{head} (request line and headers, with the blank line), then
        C{body} (bytes, or a file positioned at the body's start, of C{length} bytes).
        C{exchange} hears of the response head or of the failure.
        """
        assert self._state == _IDLE and self.transport is not None
        self._state = _HEAD
        self._exchange = exchange
        self._received = False
        self._head_bytes = 0
        self._no_body = method == b"HEAD"
        self._response = self._answer = None
        self._complete = False
        transport: Any = self.transport
        if body is None:
            write_through(transport, head)
        elif isinstance(body, bytes):
            if len(body) <= FILE_CHUNK:
                write_through(transport, head + body)
            else:
                transport.writeSequence((head, body))
        else:
            transport.write(head)
            if length:
                self._sender = _FileSender(self, transport, body, length)
                transport.registerProducer(self._sender, False)

    def abort(self) -> None:
        """Close at once; a request in flight is not reported to its exchange, a body is cut."""
        self._exchange = None
        self._state = _CLOSED
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def close(self) -> Deferred[None]:
        """Close an idle connection; fires once it is closed."""
        d: Deferred[None] = Deferred()
        if self._state == _CLOSED and self.transport is None:
            d.callback(None)
            return d
        if self._closed_waiters is None:
            self._closed_waiters = []
        self._closed_waiters.append(d)
        if self._state == _IDLE:
            self._state = _CLOSED
            if self.transport is not None:
                self.transport.loseConnection()
        return d

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    # -- receiving -------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state == _BODY:
            # The per-chunk path: L{_parse} and L{_deliver} inlined for a body piece that
            # goes straight to the reader.
            try:
                self._parser.feed_data(data)
            except _PARSER_ERRORS as e:
                if not self._parse_failed(e):
                    return
            parts = self._parts
            response = self._response
            if parts and not self._complete and response is not None:
                protocol = response._protocol
                if protocol is not None:
                    if len(parts) == 1:
                        protocol.dataReceived(parts.pop())
                    else:  # a read that carried several chunks
                        body = b"".join(parts)
                        parts.clear()
                        protocol.dataReceived(body)
                    return
            self._deliver(state)
        elif state == _HEAD:
            self._received = True
            room = self._max_head_bytes - self._head_bytes
            if len(data) <= room:
                self._head_bytes += len(data)
                if self._parse(data):
                    self._deliver(state)
                return
            # The head must end within the limit: parse up to it, and the rest only if it
            # did (llhttp has no limit of its own, and httptools gathers a header's bytes
            # without bound).
            self._head_bytes = self._max_head_bytes
            if not self._parse(data[:room]):
                return
            if self._response is None:
                self._fail(HeadTooLarge(f"response head over {self._max_head_bytes} bytes"))
                return
            if self._complete:
                self._keep_alive = False  # bytes after the response: nobody asked for them
            elif not self._parse(data[room:]):
                return
            self._deliver(state)
        elif state == _IDLE:
            # Nothing was asked: an upstream that talks out of turn is not to be trusted.
            self.abort()

    def _parse(self, data: bytes) -> bool:
        """Parse C{data}; False if the response failed (the connection is then closed)."""
        try:
            self._parser.feed_data(data)
        except _PARSER_ERRORS as e:
            return self._parse_failed(e)
        return True

    def _parse_failed(self, e: Exception) -> bool:
        """The parser raised C{e}: False if the response failed (the connection is closed)."""
        error: Exception
        if isinstance(e, httptools.HttpParserCallbackError):
            cause = e.__context__
            if isinstance(cause, _SkipBody):
                self._complete = True
                self._keep_alive = False  # what follows a HEAD head cannot be told apart
                return True
            error = (
                cause
                if isinstance(cause, (HeadTooLarge, MalformedResponse))
                else MalformedResponse(f"invalid response ({type(cause).__name__})")
            )
        elif isinstance(e, httptools.HttpParserUpgrade):
            error = MalformedResponse("unexpected protocol switch")
        else:
            error = MalformedResponse(f"invalid response ({e})")
        if self._complete:
            # After the whole response: bytes nobody asked for.  Not reusable.
            self._keep_alive = False
            return True
        self._fail(error)
        return False

    def _deliver(self, state: int) -> None:
        """After parsing: hand the head on (in state C{_HEAD}), the body bytes, the end."""
        response = self._response
        if response is None:
            return
        parts = self._parts
        if parts:
            body = parts[0] if len(parts) == 1 else b"".join(parts)
            parts.clear()
            response._data(body)
        if state == _HEAD:
            exchange, answer = self._exchange, self._answer
            self._exchange = self._answer = None
            if self._complete:
                self._message_done(response)
            else:
                self._state = _BODY
                response._conn = self
            if exchange is not None and answer is not None:
                exchange.head_received(answer)
        elif self._complete:
            self._message_done(response)

    def _message_done(self, response: _Body) -> None:
        """The response ended: pool the connection (or close it), then end its body."""
        self._response = None
        if self._state != _CLOSED:
            if self._keep_alive and self._sender is None:
                self._state = _IDLE
                self.resume()
                if self.on_idle is not None:
                    self.on_idle(self)
            else:
                self._state = _CLOSED
                if self._sender is not None:
                    self._sender.stopProducing()
                    self.transport.unregisterProducer()  # type: ignore[union-attr]
                    self._sender = None
                self.transport.loseConnection()  # type: ignore[union-attr]
        response._finished(_DONE)

    def _fail(self, error: Exception) -> None:
        """The response cannot be read: tell whoever waits for it, and close."""
        exchange = self._exchange
        response = self._response
        self._exchange = self._response = self._answer = None
        self._state = _CLOSED
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        if exchange is not None:
            exchange.failed(error)
        elif response is not None:
            response._finished(Failure(ResponseFailed([Failure(error)])))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._state = _CLOSED
        self._sender = None
        exchange = self._exchange
        response = self._response
        self._exchange = self._response = self._answer = None
        if exchange is not None:
            exchange.failed(UpstreamClosed(reason, self._received))
        elif response is not None:
            if self._until_close and reason.check(ierror.ConnectionDone):
                response._finished(Failure(PotentialDataLoss()))
            else:
                response._finished(Failure(ResponseFailed([reason])))
        if self.on_lost is not None:
            self.on_lost(self)
        waiters, self._closed_waiters = self._closed_waiters or [], None
        for d in waiters:
            d.callback(None)
        self.transport = None
        # The parser holds this protocol (its callbacks): without it, a closed connection is
        # freed without the cyclic collector.  Nothing is parsed after the connection is lost.
        del self._parser

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            raise MalformedResponse("a second response")
        self._headers.clear()
        self._phrase = b""

    def on_status(self, status: bytes) -> None:
        self._phrase += status

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        headers.append((name, value))
        if len(headers) > self._max_headers:
            raise HeadTooLarge(f"more than {self._max_headers} response headers")

    def on_headers_complete(self) -> None:
        parser = self._parser
        code = parser.get_status_code()
        if code < 200:
            if code == 101:
                raise MalformedResponse("unexpected protocol switch")
            return  # 1xx: informational, skipped (its message ends next)
        control = _CONTROL_FOR_HEAD if self._no_body else CONNECTION_CONTROL
        length: int | object = UNKNOWN_LENGTH
        chunked = False
        listed: set[bytes] | None = None
        kept = []
        for header in self._headers:
            lower = header[0].lower()
            if lower in control:
                value = header[1]
                if lower == b"content-length":
                    length = _content_length(value)
                elif lower == b"transfer-encoding":
                    chunked = value.rpartition(b",")[2].strip().lower() == b"chunked"
                elif lower == b"connection":
                    listed = listed or set()
                    listed.update(token.strip().lower() for token in value.split(b","))
            else:
                kept.append(header)
        if listed is not None:
            kept = [header for header in kept if header[0].lower() not in listed]
        self._headers.clear()
        version = parser.get_http_version()
        response = UpstreamResponse(
            (b"HTTP", int(version[0]), int(version[-1])), code, self._phrase, kept, length
        )
        self._answer = response
        self._response = response._body
        if self._no_body or code == 204 or code == 304:
            response.length = 0
            self._until_close = False
        else:
            if chunked:
                response.length = UNKNOWN_LENGTH
            self._until_close = response.length is UNKNOWN_LENGTH and not chunked
        if self._no_body:
            raise _SkipBody()

    def on_body(self, body: bytes) -> None:
        self._parts.append(body)

    def on_message_complete(self) -> None:
        if self._response is not None:
            self._complete = True
            self._keep_alive = self._parser.should_keep_alive()


def _content_length(value: bytes) -> int:
    try:
        length = int(value)
    except ValueError:
        raise MalformedResponse("invalid Content-Length") from None
    if length < 0:
        raise MalformedResponse("invalid Content-Length")
    return length
