"""
The relay's upstream HTTP client: one request in, one response (or a L{ProxyError}) out.

A proxy's client must change nothing: no cookie jar (cookies would leak between clients), no
redirect followed (it must reach the client), no C{Accept-Encoding} added and no body decoded.
So it is neither treq (which adds all of these) nor C{twisted.web.client.Agent} (correct, but
about 40% of the proxy's CPU per request went into it): it is L{HTTP11Connection} on the
C{httptools} parser, with what a relay needs around it:

  - one pool of persistent connections per (scheme, host, port) (L{Pool});
  - a connect timeout, and a timeout for the response head (504 either way);
  - one retry on a fresh connection when a reused one closes before any byte of a response
    (it had gone stale in the pool), and only then;
  - every failure before the response head turned into a 502 or 504 (L{classify}).

The upstream URL's scheme and authority are parsed once per distinct upstream, and the
connections are made by an I{endpoints} callable, by default TCP (and TLS for https, verified
with C{tls_policy}) on the given reactor: a test can pass one that connects in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import IO, Any
from typing import Protocol as TypingProtocol
from urllib.parse import urlsplit

import attrs
from twisted.internet import error as ierror
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS, IResponse
from zope.interface import implementer

from aoaiproxy import errors
from aoaiproxy.connecting import ConnectingFactory
from aoaiproxy.deadlines import Deadlines
from aoaiproxy.errors import ProxyError
from aoaiproxy.upstream.pool import Key, Pool
from aoaiproxy.upstream.protocol import (
    FILE_CHUNK,
    HeadTooLarge,
    HTTP11Connection,
    MalformedResponse,
    UpstreamClosed,
    UpstreamResponse,
)

try:
    from OpenSSL.SSL import Error as _SSLError

    _TLS_ERRORS: tuple[type[BaseException], ...] = (_SSLError,)
except ImportError:  # pragma: no cover - no TLS support installed
    _TLS_ERRORS = ()

#: Idle pooled connections are closed after this many seconds: below the idle timeout of
#: Azure's front ends, so that a reused connection is rarely stale.
CACHED_CONNECTION_TIMEOUT = 50.0
#: Idle connections kept per upstream (not a limit on connections in use).  Above the usual
#: number of requests in flight at once: when more answers arrive together than are kept, the
#: extra connections are closed and made again for the next requests (at 32, wrk -c64 made a
#: new connection, with its name lookup in a thread, for one request in six).
MAX_PERSISTENT_PER_HOST = 256
#: Limits on a response head, the same as the daemon's defaults for request heads
#: (C{--max-headers}, C{--max-header-size}): beyond them the request fails with a 502.
MAX_RESPONSE_HEADERS = 100
MAX_RESPONSE_HEAD_BYTES = 16 * 1024
#: A request body file up to this size is read at once and sent with the head (one write).
SMALL_BODY = FILE_CHUNK
#: Parsed upstreams remembered (the forward proxy relays to arbitrary ones).
_TARGETS_CACHED = 512

#: C{endpoints(scheme, host, port, connect_timeout)}: where to connect for a new connection.
Endpoints = Callable[[str, str, int, float], IStreamClientEndpoint]


@attrs.frozen
class Target:
    """An upstream's scheme and authority, parsed once."""

    scheme: str
    #: Host name or address (no brackets), as the endpoint wants it.
    host: str
    port: int
    #: The C{Host} header line sent unless the request has one.
    host_line: bytes

    @property
    def key(self) -> Key:
        return (self.scheme, self.host, self.port)


def parse_target(prefix: bytes) -> Target:
    """C{scheme://authority} of an upstream URL; raises L{ProxyError} if it is not one."""
    try:
        parts = urlsplit(prefix.decode("ascii"))
        scheme = parts.scheme.lower()
        host = parts.hostname
        port = parts.port
    except (UnicodeDecodeError, ValueError):
        raise errors.upstream_unreachable("invalid upstream URL") from None
    if (
        scheme not in ("http", "https")
        or not host
        or parts.username is not None
        or parts.password is not None
    ):
        raise errors.upstream_unreachable("invalid upstream URL")
    default = 80 if scheme == "http" else 443
    port = default if port is None else port
    authority = f"[{host}]" if isIPv6Address(host) else host
    if port != default:
        authority = f"{authority}:{port}"
    return Target(scheme, host, port, b"Host: " + authority.encode("ascii") + b"\r\n")


class _OneConnection(Factory):
    """Builds the one connection it was made for; no log line per connection."""

    noisy = False

    def __init__(self, conn: HTTP11Connection) -> None:
        self._conn = conn

    def buildProtocol(self, addr: Any) -> HTTP11Connection:
        return self._conn


@implementer(IStreamClientEndpoint)
class _Dial:
    """
    A TCP connection to an IP address whose protocol is the factory's own L{HTTP11Connection},
    with no wrapper protocol between the transport and it (as C{TCP4ClientEndpoint} and
    C{TCP6ClientEndpoint} put one: a call more for every read of the upstream, each chunk of a
    stream).  Otherwise as they are: C{connect} fires with the protocol once it is connected,
    or fails with the connector's error (refused, timed out...), or with
    C{ConnectingCancelledError} when cancelled.
    """

    def __init__(self, reactor: Any, host: str, port: int, timeout: float) -> None:
        self._reactor = reactor
        self._host = host
        self._port = port
        self._timeout = timeout

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        dialling = _Dialling(protocolFactory)
        try:
            return dialling.connection(
                lambda: self._reactor.connectTCP(self._host, self._port, dialling, timeout=self._timeout)
            )
        except BaseException:
            return fail()


class _Dialling(ConnectingFactory):
    """
    The factory of one L{_Dial}: its protocol is the L{HTTP11Connection} C{factory} builds,
    which says when it is connected (C{on_made}).
    """

    def __init__(self, factory: IProtocolFactory) -> None:
        self._factory = factory

    def buildProtocol(self, addr: Any) -> HTTP11Connection | None:
        try:
            conn = self._factory.buildProtocol(addr)
            if not isinstance(conn, HTTP11Connection):
                raise ierror.NoProtocol()
        except BaseException:
            self.failed(Failure())
            return None
        conn.on_made = self.connected
        return conn


class UpstreamClient:
    """
    Sends requests upstream.  One instance serves the whole daemon; L{close} when stopping.

    @param tls_policy: verifies https upstreams (default: the system's trust roots, as a
        browser does).
    @param endpoints: makes the endpoint for each new connection (default: a
        L{HostnameEndpoint} on C{reactor}, or a TCP one for an IP address, wrapped in TLS
        for https; for http to an IP address, L{_Dial}).
    @param max_headers: most headers in a response head (each 1xx head counted alone).
    @param max_head_bytes: longest response head, 1xx heads included.
    @param max_idle_per_host: idle connections kept per upstream.
    @param idle_timeout: seconds an idle connection is kept.
    """

    def __init__(
        self,
        reactor: Any,
        tls_policy: IPolicyForHTTPS | None = None,
        *,
        endpoints: Endpoints | None = None,
        max_headers: int = MAX_RESPONSE_HEADERS,
        max_head_bytes: int = MAX_RESPONSE_HEAD_BYTES,
        max_idle_per_host: int = MAX_PERSISTENT_PER_HOST,
        idle_timeout: float = CACHED_CONNECTION_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self._tls_policy = tls_policy or BrowserLikePolicyForHTTPS()
        self._endpoints = endpoints or self._tcp_endpoint
        self._max_headers = max_headers
        self._max_head_bytes = max_head_bytes
        self._pool = Pool(reactor, max_idle_per_host, idle_timeout)
        #: Every connection's C{on_idle} and C{on_lost} (bound once, shared).
        self._pool_callbacks = (self._pooled, self._unpooled)
        #: The response head timeouts of the requests in flight.
        self._deadlines = Deadlines(reactor)
        self._targets: dict[bytes, Target] = {}
        self._creators: dict[tuple[str, int], IOpenSSLClientConnectionCreator] = {}

    def request(
        self,
        method: bytes,
        url: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes | IO[bytes] | None,
        *,
        connect_timeout: float,
        header_timeout: float,
    ) -> Deferred[IResponse]:
        """
        Send one request.  The Deferred fires with the response once its head arrived, or
        fails with a L{ProxyError} (502 or 504).  Cancelling it cancels the request (it then
        fails with C{CancelledError}); once it has fired, the body's transport's
        C{stopProducing} does.  (L{send} is the same without a Deferred.)

        @param headers: sent as they are, but for C{Content-Length} (set from C{body}) and
            C{Host} (added from C{url} unless there).
        @param body: bytes, a seekable file positioned at the body's start (it is re-read on
            a retry and never closed here), or None for no body.
        """
        receiver = _Deferring()
        d: Deferred[IResponse] = Deferred(receiver.cancel)
        receiver.deferred = d
        receiver.pending = self.send(
            method,
            url,
            headers,
            body,
            receiver,
            connect_timeout=connect_timeout,
            header_timeout=header_timeout,
        )
        return d

    def send(
        self,
        method: bytes,
        url: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes | IO[bytes] | None,
        receiver: Receiver,
        *,
        connect_timeout: float,
        header_timeout: float,
    ) -> Pending:
        """
        Send one request (as L{request}), telling C{receiver} of its outcome: C{answered}
        with the response once its head arrived, or C{failed} with a L{ProxyError} (502 or
        504); once, and perhaps before this returns (a request that cannot be made, a
        connection refused at once).  L{Pending.cancel} cancels it: the receiver then hears
        nothing.
        """
        length: int | None = None
        if body is not None:
            if isinstance(body, bytes):
                length = len(body)
            else:
                start = body.tell()
                length = body.seek(0, 2) - start
                body.seek(start)
                if length <= SMALL_BODY:
                    # Sent with the head in one write, and kept for a retry.
                    body = body.read(length)
        try:
            target, path = self._target(url)
            head = _head(method, path, target, headers, length)
        except ProxyError as e:
            receiver.failed(e)
            return _NOTHING_PENDING
        exchange = _Exchange(
            self, receiver, target, method, head, body, length or 0, connect_timeout, header_timeout
        )
        exchange.start()
        return exchange

    def close(self) -> Deferred[None]:
        """Close every idle pooled connection (and those that become idle later)."""
        return self._pool.close()

    # -- internals -------------------------------------------------------------------------

    def _target(self, url: bytes) -> tuple[Target, bytes]:
        """The parsed upstream of C{url}, and the request target (path and query)."""
        cut = url.find(b"/", url.find(b"//") + 2)
        prefix, path = (url, b"/") if cut < 0 else (url[:cut], url[cut:])
        target = self._targets.get(prefix)
        if target is None:
            if b"?" in prefix:  # no path, but a query: rare, not cached
                prefix, _, query = prefix.partition(b"?")
                return parse_target(prefix), b"/?" + query
            target = parse_target(prefix)
            if len(self._targets) >= _TARGETS_CACHED:
                self._targets.clear()
            self._targets[prefix] = target
        return target, path

    def _tcp_endpoint(self, scheme: str, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
        endpoint: IStreamClientEndpoint
        # An address: no name to look up (in a thread, as HostnameEndpoint would); an IPv6
        # scope needs getaddrinfo.
        address = isIPAddress(host) or (isIPv6Address(host) and "%" not in host)
        if address and scheme == "http":
            return _Dial(self._reactor, host, port, timeout)
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self._reactor, host, port, timeout=timeout)
        elif address:
            endpoint = TCP6ClientEndpoint(self._reactor, host, port, timeout=timeout)
        else:
            endpoint = HostnameEndpoint(self._reactor, host, port, timeout=timeout)
        if scheme == "https":
            creator = self._creators.get((host, port))
            if creator is None:
                if len(self._creators) >= _TARGETS_CACHED:
                    self._creators.clear()
                creator = self._creators[(host, port)] = self._tls_policy.creatorForNetloc(
                    host.encode("idna"), port
                )
            endpoint = wrapClientTLS(creator, endpoint)
        return endpoint

    def _connection(self, key: Key) -> HTTP11Connection:
        conn = HTTP11Connection(self._max_headers, self._max_head_bytes)
        # The pool's callbacks are the same for every connection (no closure per connection,
        # which an open stream would keep): the connection carries its key.
        conn.pool_key = key
        conn.on_idle, conn.on_lost = self._pool_callbacks
        return conn

    def _pooled(self, conn: HTTP11Connection) -> None:
        self._pool.put(conn.pool_key, conn)

    def _unpooled(self, conn: HTTP11Connection) -> None:
        self._pool.lost(conn.pool_key, conn)


def _head(
    method: bytes,
    path: bytes,
    target: Target,
    headers: Sequence[tuple[bytes, bytes]],
    length: int | None,
) -> bytes:
    """The request head, for a body of C{length} bytes (None: no body)."""
    parts = [method, b" ", path, b" HTTP/1.1\r\n"]
    lines = 2  # the request line and the blank line
    host = False
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length":
            continue
        if lower == b"host":
            host = True
        parts += (name, b": ", value, b"\r\n")
        lines += 1
    if not host:
        parts.append(target.host_line)
        lines += 1
    if length is not None:
        parts.append(b"Content-Length: %d\r\n" % length)
        lines += 1
    elif method in (b"POST", b"PUT"):
        parts.append(b"Content-Length: 0\r\n")
        lines += 1
    parts.append(b"\r\n")
    head = b"".join(parts)
    # No header may add a line (a CR or LF in a name or value), nor the path a word.
    if head.count(b"\n") != lines or head.count(b"\r") != lines or b" " in path:
        raise errors.upstream_unreachable("invalid character in the upstream request")
    return head


class Receiver(TypingProtocol):
    """Who hears of a request's outcome (L{UpstreamClient.send}): one of these, once."""

    def answered(self, response: UpstreamResponse) -> None:
        """The response head arrived."""

    def failed(self, error: ProxyError) -> None:
        """The request failed before a response head (a 502 or 504)."""


class Pending(TypingProtocol):
    """A request sent with L{UpstreamClient.send}."""

    def cancel(self) -> None:
        """Stop waiting for its response: close its connection; its receiver hears nothing."""


class _NothingPending:
    """A request that failed at once: nothing to cancel."""

    def cancel(self) -> None:
        pass


_NOTHING_PENDING = _NothingPending()


class _Deferring:
    """The receiver of L{UpstreamClient.request}: fires its Deferred."""

    __slots__ = ("deferred", "pending")

    def __init__(self) -> None:
        self.deferred: Deferred[IResponse] | None = None
        self.pending: Pending = _NOTHING_PENDING

    def answered(self, response: UpstreamResponse) -> None:
        assert self.deferred is not None
        self.deferred.callback(response)

    def failed(self, error: ProxyError) -> None:
        assert self.deferred is not None
        self.deferred.errback(Failure(error))

    def cancel(self, d: Deferred[IResponse]) -> None:
        self.pending.cancel()  # the Deferred then fails with CancelledError


class _Exchange:
    """
    One request: its connection attempts (two at most), its head timeout (on the client's
    L{Deadlines}), its receiver.
    """

    __slots__ = (
        "_body",
        "_client",
        "_conn",
        "_connect_timeout",
        "_connecting",
        "_done",
        "_head",
        "_header_timeout",
        "_length",
        "_method",
        "_receiver",
        "_retried",
        "_reused",
        "_start",
        "_target",
    )

    def __init__(
        self,
        client: UpstreamClient,
        receiver: Receiver,
        target: Target,
        method: bytes,
        head: bytes,
        body: bytes | IO[bytes] | None,
        length: int,
        connect_timeout: float,
        header_timeout: float,
    ) -> None:
        self._client = client
        self._receiver = receiver
        self._target = target
        self._method = method
        self._head = head
        self._body = body
        self._start = body.tell() if body is not None and not isinstance(body, bytes) else 0
        self._length = length
        self._connect_timeout = connect_timeout
        self._header_timeout = header_timeout
        self._conn: HTTP11Connection | None = None
        self._connecting: Deferred[Any] | None = None
        self._done = False
        self._retried = False
        self._reused = False

    def start(self) -> None:
        self._client._deadlines.add(self, self._header_timeout)
        self._attempt(True)

    def _attempt(self, reuse: bool) -> None:
        client = self._client
        conn = client._pool.take(self._target.key) if reuse else None
        if conn is not None:
            self._reused = True
            self._send(conn)
            return
        self._reused = False
        target = self._target
        conn = client._connection(target.key)
        endpoint = client._endpoints(target.scheme, target.host, target.port, self._connect_timeout)
        self._connecting = endpoint.connect(_OneConnection(conn))
        self._connecting.addCallbacks(self._connected, self._connect_failed)

    def _send(self, conn: HTTP11Connection) -> None:
        self._conn = conn
        body = self._body
        if body is not None and not isinstance(body, bytes):
            body.seek(self._start)
        conn.send(self._head, body, self._length, self._method, self)

    def _connected(self, conn: HTTP11Connection) -> None:
        self._connecting = None
        if self._done:
            # Too late for this request (it was cancelled as the connection came up).
            conn.close()
            return
        self._send(conn)

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if not self._done:
            self._fail(failure.value or Exception("connect failed"))

    # -- from the connection ---------------------------------------------------------------

    def head_received(self, response: UpstreamResponse) -> None:
        if self._done:
            return
        self._finish()
        self._receiver.answered(response)

    def failed(self, error: Exception) -> None:
        if self._done:
            return
        if (
            self._reused
            and not self._retried
            and isinstance(error, UpstreamClosed)
            and not error.received
            and not _is_tls_failure(error.reason)
        ):
            # A pooled connection had gone stale: once more, on a new one.
            self._retried = True
            self._conn = None
            self._attempt(False)
            return
        self._fail(error)

    # -- ending ----------------------------------------------------------------------------

    def _finish(self) -> None:
        self._done = True
        self._conn = None
        self._client._deadlines.remove(self)

    def _fail(self, error: BaseException) -> None:
        self._finish()
        self._receiver.failed(classify(error, self._connect_timeout))

    def expired(self) -> None:
        """No response head within the header timeout."""
        if self._done:  # pragma: no cover - removed from the deadlines when done
            return
        self._stop()
        self._receiver.failed(
            errors.upstream_timeout(f"no response headers within {self._header_timeout:g}s")
        )

    def cancel(self) -> None:
        if not self._done:
            self._stop()

    def _stop(self) -> None:
        """End the request where it is: the connection being made, or the one in use."""
        conn, connecting = self._conn, self._connecting
        self._finish()
        self._connecting = None
        if connecting is not None:
            connecting.cancel()
        if conn is not None:
            conn.abort()


def classify(error: BaseException, connect_timeout: float) -> ProxyError:
    """Turn an upstream failure into the client-visible error.  Never includes a key."""
    if isinstance(error, ProxyError):
        return error
    if isinstance(error, ierror.TimeoutError):
        return errors.upstream_timeout(f"could not connect within {connect_timeout:g}s")
    if isinstance(error, ierror.ConnectionRefusedError):
        return errors.upstream_unreachable("connection refused")
    if isinstance(error, ierror.DNSLookupError):
        return errors.upstream_unreachable("host name lookup failed")
    if isinstance(error, UpstreamClosed):
        if _is_tls_failure(error.reason):
            return errors.upstream_unreachable("TLS handshake or certificate failed")
        if error.received:
            return errors.upstream_unreachable("malformed or incomplete response")
        return errors.upstream_unreachable("connection closed before a response")
    if isinstance(error, HeadTooLarge):
        return errors.upstream_unreachable(f"response head too large ({error})")
    if isinstance(error, MalformedResponse):
        return errors.upstream_unreachable("malformed or incomplete response")
    if isinstance(error, ierror.ConnectError):
        return errors.upstream_unreachable(type(error).__name__)
    return errors.upstream_unreachable(f"failed ({type(error).__name__})")


def _is_tls_failure(reason: Failure) -> bool:
    """Whether C{reason} is a TLS handshake or certificate verification failure."""
    if _TLS_ERRORS and reason.check(*_TLS_ERRORS):
        return True
    return type(reason.value).__name__ == "VerificationError"  # service_identity's
