"""
The forward proxy: C{CONNECT host:port} tunnels and absolute-form requests
(C{GET http://host/path}), for an allowlist of destinations.

L{Forwarder.handle} is called by L{aoaiproxy.site.ProxyRequest.process} for every proxy
request.  In order it checks:

 1. the request-target (a malformed one gets 400);
 2. proxy authentication, when C{forward_users} is set (407 with C{Proxy-Authenticate});
 3. C{http://api.openai.com/...}: rewritten to origin-form and handed back (C{False}) so the
    reverse API serves it (and azure mode converts it);
 4. the allowlist (403);
 5. the destination's addresses: a name is resolved here, every address is checked (a name
    never reaches a loopback, private, link-local, CGNAT, multicast or metadata address unless
    that address is itself listed as C{ip:port}), and the connection goes to the checked
    address, never to the name again (no DNS rebinding);
 6. connect (502 refused or unreachable, 504 timed out), then tunnel or relay.

Errors are OpenAI-shaped JSON with C{Access-Control-Allow-Origin: *}.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import ipaddress
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableDescriptor,
    IHalfCloseableProtocol,
    IPushProducer,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.http import Request
from twisted.web.iweb import IResponse
from zope.interface import alsoProvides, implementer

from aoaiproxy import errors
from aoaiproxy.config import Config, LiveConfig
from aoaiproxy.errors import ProxyError
from aoaiproxy.resource import nonempty_body, note, raw_headers, relay_response, write_error
from aoaiproxy.rewrite import strip_hop_by_hop
from aoaiproxy.upstream import UpstreamClient

#: Absolute-form requests to this host are API requests, not forwarded ones.
OPENAI_API_HOST = "api.openai.com"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Resolves a host name to its IP addresses (as strings).
Resolver = Callable[[str], "Deferred[list[str]]"]

#: Builds the endpoint that connects to a checked address: (ip, port, timeout).
Connector = Callable[[str, int, float], IStreamClientEndpoint]

_log = Logger()

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_METADATA = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})


# -- destinations ---------------------------------------------------------------------------


def parse_authority(target: bytes) -> tuple[str, int]:
    """
    Parse C{host:port} or C{[v6]:port} (a CONNECT request-target).  Returns the host in lower
    case, without brackets and without a trailing dot.  Raises L{ValueError}.
    """
    text = target.decode("ascii")
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError("malformed IPv6 authority")
        host, port_text = text[1:end], text[end + 2 :]
        ipaddress.IPv6Address(host.split("%", 1)[0])
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError("authority without a port")
    if not port_text.isdigit():
        raise ValueError("bad port")
    return _normal_host(host), _valid_port(int(port_text))


def _valid_port(port: int) -> int:
    if not 0 < port < 65536:
        raise ValueError("bad port")
    return port


def _normal_host(host: str) -> str:
    host = host.lower().rstrip(".")
    if not host or any(c in host for c in "/\\@ ?#*%") or not host.isascii():
        raise ValueError("bad host")
    ip = _ip(host)
    return ip.compressed if ip is not None else host


def _ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@attrs.frozen
class _Rules:
    exact: frozenset[tuple[str, int]]
    suffixes: tuple[tuple[str, int], ...]


@functools.lru_cache(maxsize=32)
def _rules(entries: tuple[str, ...]) -> _Rules:
    exact: set[tuple[str, int]] = set()
    suffixes: list[tuple[str, int]] = []
    for entry in entries:
        host, _, port = entry.rpartition(":")
        host = host.strip("[]")
        if host.startswith("*."):
            suffixes.append((host[1:].rstrip("."), int(port)))
        else:
            ip = _ip(host)
            exact.add((ip.compressed if ip is not None else host.rstrip("."), int(port)))
    return _Rules(frozenset(exact), tuple(suffixes))


def destination_allowed(config: Config, host: str, port: int) -> bool:
    """Whether C{host:port} (as returned by L{parse_authority}) is on the allowlist."""
    rules = _rules(config.forward_allow)
    if (host, port) in rules.exact:
        return True
    if _ip(host) is not None:
        return False
    return any(p == port and host.endswith(suffix) for suffix, p in rules.suffixes)


def address_blocked(address: str) -> bool:
    """
    Whether an address is one a name may not lead to: anything not globally routable
    (loopback, RFC 1918, ULA, link-local, CGNAT, unspecified, documentation...), multicast,
    and cloud metadata addresses, also when embedded in IPv4-mapped or NAT64 addresses.
    """
    ip = _ip(address.split("%", 1)[0])
    if ip is None:
        return True
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip in _METADATA or not ip.is_global or ip.is_multicast or ip.is_unspecified


def checked_addresses(config: Config, host: str, port: int, addresses: Sequence[str]) -> list[str]:
    """
    The addresses of an allowed destination that may be connected to.  For a listed IP
    literal, the literal itself; for a name, every resolved address must be public or
    itself listed (as C{ip:port}), else none may be used.
    """
    if _ip(host) is not None:
        return [host]
    rules = _rules(config.forward_allow)
    out: list[str] = []
    for address in addresses:
        ip = _ip(address.split("%", 1)[0])
        if ip is None:
            return []
        if address_blocked(address) and (ip.compressed, port) not in rules.exact:
            return []
        out.append(ip.compressed)
    return out


# -- proxy authentication -------------------------------------------------------------------


def proxy_authorized(config: Config, header: bytes | None) -> bool:
    """
    Whether a C{Proxy-Authorization} value holds valid Basic credentials.  Every configured
    user is compared, in constant time, whatever the outcome.
    """
    users = config.forward_users
    if not users:
        return True
    if header is None:
        return False
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return False
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    user, sep, password = decoded.partition(b":")
    found = False
    for name, secret in users.items():
        same_user = hmac.compare_digest(user, name.encode("utf-8"))
        same_password = hmac.compare_digest(password, secret.encode("utf-8"))
        found |= same_user & same_password
    return found and bool(sep)


# -- resolving ------------------------------------------------------------------------------


@implementer(IResolutionReceiver)
class _Collect:
    def __init__(self, d: Deferred[list[str]]) -> None:
        self._d = d
        self._addresses: list[str] = []

    def resolutionBegan(self, resolution: Any) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        host = getattr(address, "host", None)
        if isinstance(host, str):
            self._addresses.append(host)

    def resolutionComplete(self) -> None:
        if self._addresses:
            self._d.callback(self._addresses)
        else:
            self._d.errback(ierror.DNSLookupError("no address"))


def reactor_resolver(reactor: Any) -> Resolver:
    """A L{Resolver} using the reactor's name resolver (getaddrinfo in a thread)."""

    def resolve(host: str) -> Deferred[list[str]]:
        d: Deferred[list[str]] = Deferred()
        reactor.nameResolver.resolveHostName(_Collect(d), host, 0)
        return d

    return resolve


def tcp_connector(reactor: Any) -> Connector:
    """A L{Connector} making plain TCP connections."""

    def connect(ip: str, port: int, timeout: float) -> IStreamClientEndpoint:
        if ":" in ip:
            return TCP6ClientEndpoint(reactor, ip, port, timeout=timeout)
        return TCP4ClientEndpoint(reactor, ip, port, timeout=timeout)

    return connect


class _Refused(Exception):
    """A proxy request refused with this error."""

    def __init__(self, error: ProxyError) -> None:
        super().__init__(error.message)
        self.error = error


def _forbidden(what: str) -> ProxyError:
    return ProxyError(
        403,
        f"The proxy does not forward to {what}.",
        code="forward_not_allowed",
    )


def _proxy_auth_required() -> ProxyError:
    return ProxyError(
        407,
        "Proxy authentication required: send 'Proxy-Authorization: Basic' credentials.",
        code="proxy_authentication_required",
        headers=((b"Proxy-Authenticate", b'Basic realm="aoaiproxy"'),),
    )


def _bad_target() -> ProxyError:
    return ProxyError(400, "Malformed proxy request-target.", code="invalid_request_target")


# -- the forwarder --------------------------------------------------------------------------


class Forwarder:
    """
    Serves proxy requests for a L{aoaiproxy.site.ProxySite}.

    @param resolver: resolves names (default: the reactor's getaddrinfo resolver).
    @param connector: builds the endpoint to a checked address (default: TCP).
    @param upstream: the HTTP client for relayed absolute-form requests (default: a new one,
        closed by L{close}).
    """

    def __init__(
        self,
        reactor: Any,
        live: LiveConfig,
        resolver: Resolver | None = None,
        *,
        connector: Connector | None = None,
        upstream: UpstreamClient | None = None,
    ) -> None:
        self._reactor = reactor
        self._live = live
        self._resolve = resolver or reactor_resolver(reactor)
        self._connector = connector or tcp_connector(reactor)
        self._own_upstream = upstream is None
        self._upstream = upstream or UpstreamClient(reactor)
        #: Open tunnels.
        self.tunnels: set[Tunnel] = set()

    def handle(self, request: Request) -> bool:
        """
        Serve a proxy request.  Returns True when it is taken care of, False after rewriting
        an absolute-form API request (C{http://api.openai.com/...}) to origin-form.
        """
        config = self._live.config
        try:
            if request.method == b"CONNECT":
                self._connect(config, request)
                return True
            return self._absolute(config, request)
        except _Refused as e:
            close = request.method == b"CONNECT" and e.error.status != 407
            self._answer_error(request, e.error, close=close)
            return True

    def close(self) -> Deferred[None] | None:
        """Close every tunnel (and the HTTP client, if this forwarder made it)."""
        for tunnel in list(self.tunnels):
            tunnel.abort()
        if self._own_upstream:
            return self._upstream.close()
        return None

    # -- shared steps

    def _check_auth(self, config: Config, request: Request) -> None:
        header = request.getHeader(b"proxy-authorization")
        request.requestHeaders.removeHeader(b"proxy-authorization")
        if not proxy_authorized(config, header):
            raise _Refused(_proxy_auth_required())

    def _addresses(self, config: Config, host: str, port: int) -> Deferred[list[str]]:
        """Resolve and check; fails with L{_Refused} (403, 502 or 504)."""
        if _ip(host) is not None:
            d: Deferred[list[str]] = Deferred()
            d.callback([host])
            return d
        d = self._resolve(host)
        timer = self._reactor.callLater(config.connect_timeout, d.cancel)

        def check(addresses: list[str]) -> list[str]:
            good = checked_addresses(config, host, port, addresses)
            if not good:
                raise _Refused(_forbidden(f"{host}:{port} (it resolves to a non-public address)"))
            return good

        def failed(failure: Failure) -> Failure:
            if failure.check(CancelledError):
                raise _Refused(errors.upstream_timeout(f"could not resolve {host}"))
            if failure.check(_Refused):
                return failure
            raise _Refused(errors.upstream_unreachable("host name lookup failed"))

        def stop_timer(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        d.addBoth(stop_timer)
        d.addCallbacks(check, failed)
        return d

    def _answer_error(self, request: Request, error: ProxyError, close: bool = False) -> None:
        if request.finished or getattr(request, "_disconnected", False):
            return
        request.setHeader(b"Access-Control-Allow-Origin", b"*")
        if close:
            # Bytes a client pipelined after a refused CONNECT are not HTTP: don't parse them.
            request.requestHeaders.setRawHeaders(b"connection", [b"close"])
        write_error(request, error)

    # -- CONNECT

    def _connect(self, config: Config, request: Request) -> None:
        try:
            host, port = parse_authority(request.uri)
        except (ValueError, UnicodeDecodeError):
            raise _Refused(_bad_target()) from None
        self._check_auth(config, request)
        if not destination_allowed(config, host, port):
            raise _Refused(_forbidden(f"{host}:{port}"))
        started = self._reactor.seconds()
        d = self._addresses(config, host, port)
        d.addCallback(self._dial, port, config.connect_timeout, started)
        request.notifyFinish().addErrback(lambda _: d.cancel())

        def connected(target: _TargetProtocol) -> None:
            if request._disconnected:  # type: ignore[attr-defined]
                transport: Any = target.transport
                transport.abortConnection()
                return
            tunnel = Tunnel(self._reactor, request, target, config.tunnel_idle_timeout, self.tunnels)
            tunnel.start()

        def failed(failure: Failure) -> None:
            error = failure.value.error if isinstance(failure.value, _Refused) else None
            if error is None:
                error = _connect_error(failure, config.connect_timeout)
            self._answer_error(request, error, close=True)

        d.addCallbacks(connected, failed)

    def _dial(
        self, addresses: list[str], port: int, timeout: float, started: float
    ) -> Deferred[_TargetProtocol]:
        """
        Connect to the first address that accepts, within the connect timeout counted from
        C{started} (reactor time).  C{addresses} is never empty (L{_addresses} refuses first).
        """
        factory = Factory.forProtocol(_TargetProtocol)
        result: Deferred[_TargetProtocol] = Deferred(lambda _: attempt.cancel())
        deadline = self._reactor.callLater(
            max(0.0, timeout - (self._reactor.seconds() - started)), lambda: result.cancel()
        )
        remaining = list(addresses)
        attempt: Deferred[Any] = Deferred()

        def next_address() -> None:
            nonlocal attempt
            ip = remaining.pop(0)
            attempt = self._connector(ip, port, timeout).connect(factory)
            attempt.addCallbacks(done, retry)

        def retry(failure: Failure) -> None:
            if failure.check(CancelledError, ierror.ConnectingCancelledError) or not remaining:
                done(failure)
            else:
                next_address()

        def done(outcome: Any) -> None:
            if deadline.active():
                deadline.cancel()
            if result.called:
                if not isinstance(outcome, Failure):
                    outcome.transport.abortConnection()
                return
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)

        def timed_out(failure: Failure) -> Failure:
            if failure.check(CancelledError, ierror.ConnectingCancelledError) and not deadline.active():
                return Failure(ierror.TimeoutError())
            return failure

        result.addErrback(timed_out)
        next_address()
        return result

    # -- absolute-form

    def _absolute(self, config: Config, request: Request) -> bool:
        try:
            parts = urlsplit(request.uri.decode("ascii"))
            if parts.scheme != "http" or parts.username is not None or parts.password is not None:
                raise ValueError("not an http URL")
            host = _normal_host(parts.hostname or "")
            port = _valid_port(80 if parts.port is None else parts.port)
        except (ValueError, UnicodeDecodeError):
            raise _Refused(_bad_target()) from None
        self._check_auth(config, request)
        path = parts.path or "/"
        origin = path.encode("ascii") + (b"?" + parts.query.encode("ascii") if parts.query else b"")
        if host == OPENAI_API_HOST:
            _to_origin_form(request, origin, path.encode("ascii"))
            return False
        if not destination_allowed(config, host, port):
            raise _Refused(_forbidden(f"{host}:{port}"))
        # RFC 9112 §3.2.2: the request-target's authority, not the client's Host header.
        authority = parts.netloc.encode("ascii")
        headers = relayed_request_headers(raw_headers(request), authority)
        d = self._addresses(config, host, port)
        request.notifyFinish().addErrback(lambda _: d.cancel())

        def send(addresses: list[str]) -> Deferred[IResponse]:
            ip = addresses[0]
            netloc = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
            return self._upstream.request(
                request.method,
                f"http://{netloc}".encode("ascii") + origin,
                headers,
                nonempty_body(request.content),
                connect_timeout=config.connect_timeout,
                header_timeout=config.upstream_timeout,
            )

        def failed(failure: Failure) -> None:
            error = failure.value.error if isinstance(failure.value, _Refused) else failure.value
            if not isinstance(error, ProxyError):
                # Not from the upstream client (its failures are ProxyErrors): a bug in relaying.
                error = errors.upstream_unreachable(type(failure.value).__name__)
            self._answer_error(request, error)

        relayed = d.addCallback(send)
        relayed.addCallback(relay_response, request, self._reactor, config.upstream_timeout)
        relayed.addErrback(failed)
        return True


def _to_origin_form(request: Request, uri: bytes, path: bytes) -> None:
    """Make an absolute-form API request look as if it had been sent in origin-form."""
    request.uri = uri
    request.path = path


#: Besides hop-by-hop ones: the client's headers a relayed request sets itself.
_NOT_RELAYED = frozenset({b"host", b"content-length"})


def relayed_request_headers(
    headers: Sequence[tuple[bytes, bytes]], authority: bytes
) -> list[tuple[bytes, bytes]]:
    """
    A forwarded request's headers: the client's, less hop-by-hop ones, those its
    C{Connection} header lists and every C{Proxy-*}; C{Host} is the request-target's.
    """
    out = [
        (name, value)
        for name, value in strip_hop_by_hop(headers, _NOT_RELAYED)
        if not name.lower().startswith(b"proxy-")
    ]
    out.append((b"Host", authority))
    return out


def _connect_error(failure: Failure, timeout: float) -> ProxyError:
    if failure.check(ierror.TimeoutError, CancelledError, ierror.ConnectingCancelledError):
        return errors.upstream_timeout(f"could not connect within {timeout:g}s")
    if failure.check(ierror.ConnectionRefusedError):
        return errors.upstream_unreachable("connection refused")
    if failure.check(ierror.ConnectError):
        return errors.upstream_unreachable(type(failure.value).__name__)
    _log.failure("unexpected CONNECT failure", failure)
    return errors.upstream_unreachable("connect failed")


# -- tunnels --------------------------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class _TargetProtocol(Protocol):
    """The connection to a CONNECT target; hands everything to its L{Tunnel}."""

    tunnel: Tunnel | None = None
    _early: bytes = b""

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel is None:  # pragma: no cover - targets speak after the tunnel starts
            self._early += data
        else:
            self.tunnel._pass(data, self.tunnel.client)

    def readConnectionLost(self) -> None:
        if self.tunnel is not None:
            self.tunnel.target_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ierror.ConnectionDone())) -> None:  # noqa: B008
        if self.tunnel is not None:
            self.tunnel.target_lost()


def _push_producer(transport: Any) -> IPushProducer | None:
    """The transport that can pause reading: TLS wrappers pause their TCP transport."""
    while transport is not None and not IPushProducer.providedBy(transport):
        transport = getattr(transport, "transport", None)
    return transport


def _socket_transport(transport: Any) -> Any:
    """
    The socket-level transport under any protocol wrappers (which copy the interfaces of
    the transport they wrap), or None when a TLS layer is in between.
    """
    while transport is not None:
        if isinstance(transport, TLSMemoryBIOProtocol):
            return None
        inner = getattr(transport, "__dict__", {}).get("transport")
        if inner is None:
            return transport
        transport = inner
    return None


def _half_closeable(transport: Any) -> bool:
    """Whether a connection can be half-closed: plain TCP, not TLS."""
    sock = _socket_transport(transport)
    return IHalfCloseableDescriptor.providedBy(sock) and hasattr(sock, "loseWriteConnection")


def pending_write_bytes(transport: Any) -> int:
    """
    Bytes a transport holds that the kernel has not taken yet, through any wrappers (TLS,
    protocol wrappers) down to the socket.
    """
    total = 0
    while transport is not None:
        own = getattr(transport, "__dict__", {})
        total += len(own.get("dataBuffer", b"")) - own.get("offset", 0)
        total += own.get("_tempDataLen", 0)
        total += sum(len(b) for b in own.get("_appSendBuffer", ()) or ())
        transport = own.get("transport")
    return total


class Tunnel:
    """
    Relays bytes between a client connection that sent CONNECT and the target, with
    backpressure both ways, half-close (plain TCP clients), and an idle timeout.

    The client's L{HTTPChannel} is taken over: its C{dataReceived}, C{rawDataReceived} and
    C{connectionLost} now lead here, the channel no longer produces for its transport, and
    the bytes the client sent after the CONNECT head (buffered by the channel) are relayed
    first.
    """

    def __init__(
        self,
        reactor: Any,
        request: Request,
        target: _TargetProtocol,
        idle_timeout: float,
        registry: set[Tunnel],
    ) -> None:
        self._reactor = reactor
        self._request = request
        self._channel: Any = request.channel
        self.client: Any = self._channel.transport
        self.target: Any = target.transport
        self._target_protocol = target
        self._idle_timeout = idle_timeout
        self._registry = registry
        self._timer: IDelayedCall | None = None
        self._client_eof = False
        self._target_eof = False
        self._closed = False
        self._channel_lost: Callable[[Failure], None] = lambda reason: None
        #: Bytes relayed to the client (for the access log).
        self.bytes_down = 0

    def start(self) -> None:
        channel = self._channel
        self._registry.add(self)
        channel.setTimeout(None)
        channel._savedTimeOut = None
        # The channel stops producing for the transport (a second registration raises).
        channel._networkProducer.unregisterProducer()
        pipelined = b"".join(channel._dataBuffer) + bytes(channel._buffer)
        channel._dataBuffer = []
        channel._buffer = b""
        to_target = functools.partial(self._pass, out=self.target)
        channel.dataReceived = to_target
        channel.rawDataReceived = to_target
        self._channel_lost = channel.connectionLost
        channel.connectionLost = self._client_lost
        self._enable_client_half_close()
        self._target_protocol.tunnel = self
        self.client.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        self._request.code = 200
        # A slow side pauses the other (as twisted.protocols.portforward does).
        self.client.registerProducer(self.target, True)
        producer = _push_producer(self.client)
        self.target.registerProducer(producer, True)
        if producer is not None:
            # The channel may have paused reading while it buffered pipelined bytes.
            producer.resumeProducing()
        self._timer = self._reactor.callLater(self._idle_timeout, self._idle)
        if pipelined:
            self._pass(pipelined, self.target)
        early, self._target_protocol._early = self._target_protocol._early, b""
        if early:
            self._pass(early, self.client)

    def _enable_client_half_close(self) -> None:
        """Let a plain TCP client's FIN reach us as a half-close, not a full close."""
        if not _half_closeable(self.client):
            return
        protocol = getattr(_socket_transport(self.client), "protocol", None)
        if protocol is None:
            return
        alsoProvides(protocol, IHalfCloseableProtocol)
        protocol.readConnectionLost = self.client_eof
        protocol.writeConnectionLost = lambda: None

    def _touch(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._idle_timeout)

    def _pass(self, data: bytes, out: Any) -> None:
        """Relay bytes from one side to the other: C{out} is the client or the target."""
        if self._closed:
            return
        self._touch()
        if out is self.client:
            self.bytes_down += len(data)
        out.write(data)

    def client_eof(self) -> None:
        self._client_eof = True
        if self._target_eof or not _half_closeable(self.target):
            self._close()
        else:
            _socket_transport(self.target).loseWriteConnection()

    def target_eof(self) -> None:
        self._target_eof = True
        if self._client_eof or not _half_closeable(self.client):
            self._close()
        else:
            _socket_transport(self.client).loseWriteConnection()

    def _client_lost(self, reason: Failure) -> None:
        self._client_eof = True
        self._close()
        # The channel's own bookkeeping: the CONNECT request is over (notifyFinish fires).
        self._channel_lost(reason)

    def target_lost(self) -> None:
        self._target_eof = True
        self._close()

    def _idle(self) -> None:
        self._timer = None
        self.abort()

    def abort(self) -> None:
        """Cut both connections now."""
        self._close(abort=True)

    def _close(self, abort: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        self._registry.discard(self)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for transport in (self.client, self.target):
            transport.unregisterProducer()
            if abort:
                transport.abortConnection()
            else:
                # Writes what is still buffered, then closes.
                transport.loseConnection()
        # For the access-log line the channel writes when the connection is gone.
        note(self._request, bytes=self.bytes_down)
