"""
The upstream HTTP client.

It is built from the pieces treq is built on (an L{Agent} over a persistent
L{HTTPConnectionPool}), but not through C{treq.HTTPClient.request}, which always wraps the agent
in a cookie jar, a redirect follower and a gzip decoder (treq 26.7, C{client.py}).  A proxy
must do none of these: cookies would leak between clients, a redirect must reach the client,
and C{Accept-Encoding} and bodies must pass unchanged.

What it adds: one pool for every upstream, a connect timeout, a timeout for response headers,
and one retry when a pooled connection turns out to be stale before any byte of a response
arrived.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import IO, Any

from twisted.internet import error as ierror
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web._newclient import (
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    FileBodyProducer,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IPolicyForHTTPS, IResponse

from aoaiproxy import errors
from aoaiproxy.errors import ProxyError

try:
    from OpenSSL.SSL import Error as _SSLError

    _TLS_ERRORS: tuple[type[BaseException], ...] = (_SSLError,)
except ImportError:  # pragma: no cover - no TLS support installed
    _TLS_ERRORS = ()

#: Idle pooled connections are closed after this many seconds: below the idle timeout of
#: Azure's front ends, so that a reused connection is rarely stale.
CACHED_CONNECTION_TIMEOUT = 50.0
MAX_PERSISTENT_PER_HOST = 32


class _Unclosable(io.RawIOBase):
    """A view of a seekable file that L{FileBodyProducer} cannot close, so it can be re-sent."""

    def __init__(self, f: IO[bytes]) -> None:
        super().__init__()
        self._f = f

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        pass


class _QuietFactory(_HTTP11ClientFactory):
    """No "Starting factory" log line for every upstream connection."""

    noisy = False


class _Pool(HTTPConnectionPool):
    _factory = _QuietFactory


class UpstreamClient:
    """
    Sends requests upstream.  One instance serves the whole daemon; L{close} when stopping.
    """

    def __init__(
        self,
        reactor: Any,
        tls_policy: IPolicyForHTTPS | None = None,
    ) -> None:
        self._reactor = reactor
        self._pool = _Pool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = MAX_PERSISTENT_PER_HOST
        self._pool.cachedConnectionTimeout = int(CACHED_CONNECTION_TIMEOUT)
        # We retry ourselves, only when it is safe (see request).
        self._pool.retryAutomatically = False
        self._tls_policy = tls_policy or BrowserLikePolicyForHTTPS()
        self._agents: dict[float, Agent] = {}

    def _agent(self, connect_timeout: float) -> Agent:
        agent = self._agents.get(connect_timeout)
        if agent is None:
            agent = self._agents[connect_timeout] = Agent(
                self._reactor,
                contextFactory=self._tls_policy,
                connectTimeout=connect_timeout,
                pool=self._pool,
            )
        return agent

    def _pooled(self, url: bytes) -> bool:
        uri = URI.fromBytes(url)
        connections: dict[Any, list[Any]] = self._pool._connections
        return bool(connections.get((uri.scheme, uri.host, uri.port)))

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
        Send one request.  The Deferred fires with the response once its headers arrived, or
        fails with a L{ProxyError} (502 or 504).  Cancelling it cancels the request.

        @param body: bytes, a seekable file positioned at the body's start (it is re-read on
            a retry and never closed here), or None for no body.
        """
        h = Headers()
        for name, value in headers:
            h.addRawHeader(name, value)
        start = body.tell() if body is not None and not isinstance(body, bytes) else 0

        def producer() -> IBodyProducer | None:
            if body is None:
                return None
            if isinstance(body, bytes):
                return FileBodyProducer(io.BytesIO(body))
            body.seek(start)
            return FileBodyProducer(_Unclosable(body))

        agent = self._agent(connect_timeout)
        timed_out = False

        def attempt(retry: bool) -> Deferred[IResponse]:
            pooled = self._pooled(url)
            d = agent.request(method, url, h, producer())
            if retry and pooled:
                d.addErrback(_retry_stale, lambda: attempt(False))
            return d

        d = attempt(True)

        def on_timeout() -> None:
            nonlocal timed_out
            timed_out = True
            d.cancel()

        timer = self._reactor.callLater(header_timeout, on_timeout)

        def done(result: IResponse | Failure) -> IResponse | Failure:
            if timer.active():
                timer.cancel()
            if isinstance(result, Failure):
                return Failure(_classify(result, timed_out, header_timeout, connect_timeout))
            return result

        d.addBoth(done)
        return d

    def close(self) -> Deferred[None]:
        """Close every pooled connection."""
        d: Deferred[None] = self._pool.closeCachedConnections()
        return d


def _retry_stale(failure: Failure, again: Any) -> Any:
    """Retry once when a reused connection was closed before any response byte arrived."""
    if failure.check(RequestNotSent):
        return again()
    if failure.check(ResponseNeverReceived):
        reasons = getattr(failure.value, "reasons", [])
        if all(r.check(ierror.ConnectionDone, ierror.ConnectionLost) for r in reasons):
            return again()
    return failure


def _classify(failure: Failure, timed_out: bool, header_timeout: float, connect_timeout: float) -> ProxyError:
    """Turn an upstream failure into the client-visible error.  Never includes a key."""
    if isinstance(failure.value, ProxyError):
        return failure.value
    if timed_out:
        return errors.upstream_timeout(f"no response headers within {header_timeout:g}s")
    if failure.check(ierror.TimeoutError):
        return errors.upstream_timeout(f"could not connect within {connect_timeout:g}s")
    if failure.check(ierror.ConnectionRefusedError):
        return errors.upstream_unreachable("connection refused")
    if failure.check(ierror.DNSLookupError):
        return errors.upstream_unreachable("host name lookup failed")
    # The HTTP client wraps what went wrong: RequestTransmissionFailed (e.g. a failed TLS
    # handshake while sending), ResponseNeverReceived, ResponseFailed (a response began but
    # could not be parsed, or was cut before its headers ended).
    reasons: list[Failure] = getattr(failure.value, "reasons", None) or [failure]
    if any(_is_tls_failure(r) for r in reasons):
        return errors.upstream_unreachable("TLS handshake or certificate failed")
    if failure.check(ResponseFailed):
        return errors.upstream_unreachable("malformed or incomplete response")
    if failure.check(ResponseNeverReceived, RequestNotSent, RequestTransmissionFailed):
        return errors.upstream_unreachable("connection closed before a response")
    if failure.check(ierror.ConnectError):
        return errors.upstream_unreachable(type(failure.value).__name__)
    return errors.upstream_unreachable(f"failed ({type(failure.value).__name__})")


def _is_tls_failure(reason: Failure) -> bool:
    """Whether C{reason} is a TLS handshake or certificate verification failure."""
    if _TLS_ERRORS and reason.check(*_TLS_ERRORS):
        return True
    return type(reason.value).__name__ == "VerificationError"  # service_identity's
