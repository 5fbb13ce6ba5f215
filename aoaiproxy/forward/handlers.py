"""
The forward proxy's request handling: L{Forwarder.handle} serves C{CONNECT} (a tunnel, or
TLS interception) and absolute-form requests (relayed, or handed back to the API as
origin-form).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol
from twisted.internet.ssl import CertificateOptions
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.http import Request
from twisted.web.iweb import IResponse

from aoaiproxy.config import Config, LiveConfig
from aoaiproxy.deadlines import Deadlines
from aoaiproxy.errors import ProxyError
from aoaiproxy.forward.dial import Connector, Dialer, Resolver, refusal
from aoaiproxy.forward.intercept import Interceptor
from aoaiproxy.forward.policy import Admitted, Refused, admit, forbidden, relayed_request_headers
from aoaiproxy.forward.tunnel import TargetFactory, TargetProtocol, Tunnel
from aoaiproxy.metrics import Recorder
from aoaiproxy.resource import nonempty_body, note, raw_headers, relay_response, write_error
from aoaiproxy.upstream import UpstreamClient

if TYPE_CHECKING:
    from aoaiproxy.site import ProxyChannel, ProxyRequest


class Forwarder:
    """
    Serves proxy requests for a L{aoaiproxy.site.ProxySite}.

    @param resolver: resolves names (default: the reactor's getaddrinfo resolver).
    @param connector: builds the endpoint to a checked address (default: TCP).
    @param upstream: the HTTP client for relayed absolute-form requests (default: a new one,
        closed by L{close}).
    @param interceptor: with C{--intercept}, the CA that makes the certificates of intercepted
        hosts (L{aoaiproxy.forward.intercept}); None when interception is off.
    @param recorder: the metrics its tunnels record (open tunnels, bytes).
    """

    def __init__(
        self,
        reactor: Any,
        live: LiveConfig,
        resolver: Resolver | None = None,
        *,
        connector: Connector | None = None,
        upstream: UpstreamClient | None = None,
        interceptor: Interceptor | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self._reactor = reactor
        self._recorder = recorder
        self._live = live
        self._dialer = Dialer(reactor, resolver, connector)
        self._own_upstream = upstream is None
        self._upstream = upstream or UpstreamClient(reactor)
        self._interceptor = interceptor
        #: Open tunnels.
        self.tunnels: set[Tunnel] = set()
        #: Every tunnel's idle check and every relayed body's inactivity timer, on one timer.
        self._deadlines = Deadlines(reactor)

    def handle(self, request: Request) -> bool:
        """
        Serve a proxy request.  Returns True when it is taken care of, False after rewriting
        an absolute-form API request (C{http://api.openai.com/...}) to origin-form.
        """
        config = self._live.config
        proxy_request = cast("ProxyRequest", request)
        try:
            admitted = self._admit(config, request)
        except Refused as e:
            # Bytes a client sent behind a refused CONNECT are tunnel data, not HTTP: the
            # connection closes after the answer.  A 407 with nothing behind it keeps the
            # connection, so that the client may retry with credentials (as curl does).
            close = request.method == b"CONNECT" and (e.error.status != 407 or proxy_request.pipelined)
            self._answer_error(request, e.error, close=close)
            return True
        if admitted.absolute is None:
            self._connect(config, proxy_request, admitted)
            return True
        if admitted.api:
            # As if it had been sent in origin-form.
            request.uri = admitted.absolute.origin
            request.path = admitted.absolute.path
            return False
        self._relay(config, request, admitted)
        return True

    def close(self) -> Deferred[None] | None:
        """Close every tunnel (and the HTTP client, if this forwarder made it)."""
        for tunnel in list(self.tunnels):
            tunnel.abort()
        if self._own_upstream:
            return self._upstream.close()
        return None

    # -- shared steps

    def _admit(self, config: Config, request: Request) -> Admitted:
        header = request.getHeader(b"proxy-authorization")
        if header is not None:
            request.requestHeaders.removeHeader(b"proxy-authorization")  # never relayed
        return admit(config, request.method, request.uri, header)

    def _answer_error(self, request: Request, error: ProxyError, close: bool = False) -> None:
        if request.finished or request.channel is None:  # answered, or the client is gone
            return
        request.setHeader(b"Access-Control-Allow-Origin", b"*")
        if close:
            cast("ProxyRequest", request).close_connection_after()
        write_error(request, error)

    def _failed(self, request: Request, close: bool = False) -> Callable[[Failure], None]:
        """An errback answering the client with the failure's L{refusal}."""
        timeout = self._live.config.connect_timeout

        def answer(failure: Failure) -> None:
            self._answer_error(request, refusal(failure, timeout), close=close)

        return answer

    # -- CONNECT

    def _connect(self, config: Config, request: ProxyRequest, admitted: Admitted) -> None:
        host, port = admitted.host, admitted.port
        if admitted.intercept:
            if self._interceptor is None:  # interception configured but not set up: never dial
                self._answer_error(request, forbidden(f"{host}:{port}"), close=True)
                return
            self._intercept(config, request, self._interceptor.creator(host))
            return
        connecting = _Connecting(self, config, request)
        attempt = self._dialer.dial(
            config, host, port, TargetFactory(), connecting.connected, connecting.failed
        )
        request.when_gone(attempt.cancel)

    def _intercept(self, config: Config, request: ProxyRequest, creator: CertificateOptions) -> None:
        """
        Answer 200 and serve the connection with TLS (C{creator}: the host's certificate),
        requests inside going to this same site as origin-form API requests.  The host is never
        dialled (so it need not be on the allowlist).  The HTTP connection inside counts among
        the site's connections (so the drain closes it when idle); its client sees a tunnel, so
        it may be idle (the TLS handshake included) as long as a tunnel may.
        """
        site = cast("ProxyChannel", request.channel).site
        tls = TLSMemoryBIOFactory(creator, False, site, clock=self._reactor)
        protocol = tls.buildProtocol(request.getClientAddress())
        inside = cast("ProxyChannel", protocol.wrappedProtocol)
        # Before makeConnection, which starts the timer.  (Twisted's hint says int; its own
        # HTTPFactory.timeOut takes a float.)
        inside.timeOut = config.tunnel_idle_timeout  # type: ignore[assignment]
        request.establish(protocol)
        connection: SSL.Connection = protocol.getHandle()

        def ended(_: object) -> None:
            # A client that does not trust the CA ends TLS in the handshake, without its
            # Finished message: the CONNECT's access line says so.
            if connection.get_peer_finished() is None:
                note(request, error="tls_handshake_failed")

        request.notifyFinish().addBoth(ended)

    # -- absolute-form

    def _relay(self, config: Config, request: Request, admitted: Admitted) -> None:
        target = admitted.absolute
        assert target is not None
        # RFC 9112 §3.2.2: the request-target's authority, not the client's Host header.
        headers = relayed_request_headers(raw_headers(request), target.authority)
        d = self._dialer.addresses(config, target.host, target.port)
        request.notifyFinish().addErrback(lambda _: d.cancel())

        def send(addresses: list[str]) -> Deferred[IResponse]:
            ip = addresses[0]
            netloc = f"[{ip}]:{target.port}" if ":" in ip else f"{ip}:{target.port}"
            return self._upstream.request(
                request.method,
                f"http://{netloc}".encode("ascii") + target.origin,
                headers,
                nonempty_body(request.content),
                connect_timeout=config.connect_timeout,
                header_timeout=config.upstream_timeout,
            )

        relayed = d.addCallback(send)
        relayed.addCallback(
            relay_response, request, self._reactor, config.upstream_timeout, deadlines=self._deadlines
        )
        relayed.addErrback(self._failed(request))


class _Connecting:
    """A C{CONNECT} whose target is being dialled: its tunnel once connected, or its error."""

    __slots__ = ("_config", "_forwarder", "_request")

    def __init__(self, forwarder: Forwarder, config: Config, request: ProxyRequest) -> None:
        self._forwarder = forwarder
        self._config = config
        self._request = request

    def connected(self, target: IProtocol) -> None:
        request = self._request
        if request.channel is None:  # the client left while we connected
            transport: Any = target.transport
            transport.abortConnection()
            return
        forwarder = self._forwarder
        tunnel = Tunnel(
            forwarder._reactor,
            cast(TargetProtocol, target),
            self._config.tunnel_idle_timeout,
            self.closed,
            forwarder._deadlines,
            forwarder._recorder,
        )
        forwarder.tunnels.add(tunnel)
        request.establish(tunnel)

    def failed(self, failure: Failure) -> None:
        error = refusal(failure, self._config.connect_timeout)
        self._forwarder._answer_error(self._request, error, close=True)

    def closed(self, tunnel: Tunnel) -> None:
        self._forwarder.tunnels.discard(tunnel)
        # For the access-log line the channel writes when the connection is gone.
        note(self._request, bytes=tunnel.bytes_down)
