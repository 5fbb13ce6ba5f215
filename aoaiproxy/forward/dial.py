"""
Reaching a forward proxy destination: resolve a name once, check every address it resolves
to (L{aoaiproxy.forward.policy.checked_addresses}), and connect to a checked address, never
to the name again (no DNS rebinding).

Every failure here is a L{Refused} carrying the answer for the client (L{refusal}: 403, 502
or 504).  Reaching a destination is one small state machine (L{_Dial}) with one timer for the
whole of it (the connect timeout): an IP literal is never resolved, and the default
connector (L{tcp_connector}) connects without wrapping the target's protocol and, for
L{Dialer.dial}, without a Deferred.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IProtocol,
    IProtocolFactory,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from aoaiproxy import errors
from aoaiproxy.config import Config
from aoaiproxy.connecting import Connecting, ConnectingFactory, TCPDial
from aoaiproxy.deadlines import Deadlines
from aoaiproxy.errors import ProxyError
from aoaiproxy.forward.policy import Refused, checked_addresses, forbidden, ip_literal

#: Resolves a host name to its IP addresses (as strings).
Resolver = Callable[[str], "Deferred[list[str]]"]

#: Builds the endpoint that connects to a checked address: (ip, port, timeout).
Connector = Callable[[str, int, float], IStreamClientEndpoint]

_log = Logger()

#: Failures that mean the time allowed ran out (or the wait was cancelled for it).
_TIMEOUTS = (defer.TimeoutError, ierror.TimeoutError, CancelledError, ierror.ConnectingCancelledError)


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


@implementer(IStreamClientEndpoint)
class _TCPEndpoint:
    """
    A plain TCP connection to an IP address (no name resolution), for a L{ConnectingFactory}:
    not bounded in time itself (the L{Dialer} bounds the whole attempt), so no timer of its
    own.  Any other factory goes through Twisted's own endpoint (with the C{timeout}).
    """

    __slots__ = ("_ip", "_port", "_reactor", "_timeout")

    def __init__(self, reactor: Any, ip: str, port: int, timeout: float) -> None:
        self._reactor = reactor
        self._ip = ip
        self._port = port
        self._timeout = timeout

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        if not isinstance(factory, ConnectingFactory):
            endpoint = TCP6ClientEndpoint if ":" in self._ip else TCP4ClientEndpoint
            return endpoint(self._reactor, self._ip, self._port, self._timeout).connect(factory)
        return factory.connection(lambda: self._start(factory))

    def dial(
        self,
        factory: ConnectingFactory,
        on_connected: Callable[[IProtocol], object],
        on_failed: Callable[[Failure], object],
    ) -> Connecting:
        """
        L{connect} without a Deferred: C{factory} calls C{on_connected} or C{on_failed} (never
        before this returns); C{stopConnecting()} on what is returned, after
        C{factory.stop_waiting()}, gives the attempt up.
        """
        factory.await_connection(on_connected, on_failed)
        return self._start(factory)

    def _start(self, factory: ConnectingFactory) -> Connecting:
        """
        Begin the connection for C{factory}: on Twisted's POSIX reactors on a socket of our
        own (L{TCPDial}), on another reactor with its C{connectTCP}.
        """
        if isinstance(self._reactor, PosixReactorBase):
            return TCPDial(self._reactor, self._ip, self._port, factory)
        # No timeout of its own (Twisted's connector tests None): the Dialer's bounds it.
        connector: IConnector = self._reactor.connectTCP(self._ip, self._port, factory, timeout=None)
        return connector


def tcp_connector(reactor: Any) -> Connector:
    """A L{Connector} making plain TCP connections."""

    def connect(ip: str, port: int, timeout: float) -> IStreamClientEndpoint:
        return _TCPEndpoint(reactor, ip, port, timeout)

    return connect


def refusal(failure: Failure, timeout: float) -> ProxyError:
    """
    The forward proxy's one failure classification: the answer to a client whose proxy
    request failed with C{failure} while its destination was resolved, checked, connected or
    (absolute-form) relayed.  A refusal keeps its own error (403...), an upstream client's
    L{ProxyError} is itself; running out of the C{timeout} (seconds) is 504; a failed name
    lookup, a refused or unreachable connection is 502, and so is anything unexpected (which
    is logged: it is a bug).
    """
    value = failure.value
    if isinstance(value, Refused):
        return value.error
    if isinstance(value, ProxyError):
        return value
    if failure.check(*_TIMEOUTS):
        return errors.upstream_timeout(f"could not connect within {timeout:g}s")
    if failure.check(ierror.DNSLookupError):
        return errors.upstream_unreachable("host name lookup failed")
    if failure.check(ierror.ConnectionRefusedError):
        return errors.upstream_unreachable("connection refused")
    if failure.check(ierror.ConnectError):
        return errors.upstream_unreachable(type(value).__name__)
    _log.failure("unexpected forward proxy failure", failure)
    return errors.upstream_unreachable(type(value).__name__)


class Dialer:
    """
    Resolves, checks and connects, for one forward proxy.

    @param resolver: resolves names (default: the reactor's getaddrinfo resolver).
    @param connector: builds the endpoint to a checked address (default: TCP).
    """

    def __init__(self, reactor: Any, resolver: Resolver | None = None, connector: Connector | None = None):
        self._reactor = reactor
        self._resolve = resolver or reactor_resolver(reactor)
        self._connector = connector or tcp_connector(reactor)
        #: Every attempt's connect timeout, on one timer.
        self.deadlines = Deadlines(reactor)

    def addresses(self, config: Config, host: str, port: int) -> Deferred[list[str]]:
        """
        The checked addresses of an allowed destination (never empty), found within the
        connect timeout; fails with L{Refused} (403 when a name leads to a non-public address,
        502, 504).
        """
        return _Dial(self, config, host, port, None).deferred()

    def connect(self, config: Config, host: str, port: int, factory: IProtocolFactory) -> Deferred[IProtocol]:
        """
        Resolve and check C{host} (L{addresses}), then connect to the first address that
        accepts, all within the connect timeout; fires with the connected protocol C{factory}
        built, or fails with L{Refused} (403, 502, 504).  Cancelling it stops the attempt.
        """
        return _Dial(self, config, host, port, factory).deferred()

    def dial(
        self,
        config: Config,
        host: str,
        port: int,
        factory: IProtocolFactory,
        on_connected: Callable[[IProtocol], object],
        on_failed: Callable[[Failure], object],
    ) -> Attempt:
        """
        L{connect} without a Deferred: calls C{on_connected} with the connected protocol, or
        C{on_failed} with a L{Refused} failure, once (perhaps before this returns).
        C{cancel()} on the attempt returned stops it and calls neither.
        """
        attempt = _Dial(self, config, host, port, factory)
        attempt.start(on_connected, on_failed)
        return attempt


class _Dial:
    """
    One destination being reached, in steps: resolve (a name; an IP literal is not resolved),
    check, then connect to each checked address in turn until one accepts (when there is a
    C{factory}), all bounded by the connect timeout (on its dialer's L{Deadlines}).  Once
    L{start}ed, it calls back with the connected protocol (or, without a factory, the checked
    addresses), or with a L{Refused} failure; L{cancel} stops the step in progress.

    A connection by L{tcp_connector} (to a L{ConnectingFactory}) is waited for without a
    Deferred; another connector's endpoint, and a resolver, give Deferreds.
    """

    __slots__ = (
        "_config",
        "_connecting",
        "_dialer",
        "_done",
        "_factory",
        "_host",
        "_on_done",
        "_on_failed",
        "_port",
        "_remaining",
        "_step",
        "_timeout",
    )

    def __init__(
        self, dialer: Dialer, config: Config, host: str, port: int, factory: IProtocolFactory | None
    ) -> None:
        self._dialer = dialer
        self._config = config
        self._host = host
        self._port = port
        self._factory = factory
        self._timeout = config.connect_timeout
        self._on_done: Callable[[Any], object] | None = None
        self._on_failed: Callable[[Failure], object] | None = None
        self._step: Deferred[Any] | None = None
        #: A L{tcp_connector} connection being made: its factory and connector.
        self._connecting: tuple[ConnectingFactory, Connecting] | None = None
        self._remaining: list[str] = []
        self._done = False

    def deferred(self) -> Deferred[Any]:
        """Start, firing the Deferred returned (whose cancellation L{cancel}s)."""
        result: Deferred[Any] = Deferred(self._cancelled)
        self.start(result.callback, result.errback)
        return result

    def start(self, on_done: Callable[[Any], object], on_failed: Callable[[Failure], object]) -> None:
        self._on_done = on_done
        self._on_failed = on_failed
        self._dialer.deadlines.add(self, self._timeout)
        if ip_literal(self._host) is not None:
            self._checked([self._host])
        else:
            self._wait(defer.maybeDeferred(self._dialer._resolve, self._host), self._resolved)

    def cancel(self) -> None:
        """The caller gave up (its client left): stop, and call back neither way."""
        if self._done:  # finished (connected, failed, timed out): nothing left to stop
            return
        self._done = True
        self._on_done = self._on_failed = None
        self._stop_timer()
        self._stop_step()

    def _cancelled(self, result: Deferred[Any]) -> None:
        # Deferred.cancel then fails the result itself.
        self.cancel()

    def _wait(self, step: Deferred[Any], then: Callable[[Any], None]) -> None:
        self._step = step
        step.addCallbacks(then, self._step_failed)

    def _resolved(self, addresses: list[str]) -> None:
        self._step = None
        if self._done:
            return
        good = checked_addresses(self._config, self._host, self._port, addresses)
        if not good:
            self._finish(
                Failure(
                    Refused(forbidden(f"{self._host}:{self._port} (it resolves to a non-public address)"))
                )
            )
        else:
            self._checked(good)

    def _checked(self, addresses: list[str]) -> None:
        if self._factory is None:
            self._finish(addresses)
            return
        self._remaining = addresses
        self._next_address()

    def _next_address(self) -> None:
        factory = self._factory
        assert factory is not None
        endpoint = self._dialer._connector(self._remaining.pop(0), self._port, self._timeout)
        if isinstance(endpoint, _TCPEndpoint) and isinstance(factory, ConnectingFactory):
            self._connecting = (factory, endpoint.dial(factory, self._connected, self._step_failed))
        else:
            self._wait(endpoint.connect(factory), self._connected)

    def _connected(self, protocol: IProtocol) -> None:
        self._step = self._connecting = None
        if self._done:  # cancelled or timed out meanwhile: a late connection is not used
            transport: Any = getattr(protocol, "transport", None)
            if transport is not None:
                transport.abortConnection()
            return
        self._finish(protocol)

    def _step_failed(self, failure: Failure) -> None:
        self._step = self._connecting = None
        if self._done:
            return
        if self._remaining and not failure.check(CancelledError, ierror.ConnectingCancelledError):
            self._next_address()
        else:
            self._finish(failure)

    def expired(self) -> None:
        """The connect timeout passed (L{Deadlines})."""
        self._finish(Failure(defer.TimeoutError()))
        self._stop_step()

    def _finish(self, outcome: Any) -> None:
        self._done = True
        self._stop_timer()
        on_done, on_failed = self._on_done, self._on_failed
        # Nothing kept: the callbacks lead back to the caller, which may keep this attempt.
        self._on_done = self._on_failed = None
        if isinstance(outcome, Failure):
            if on_failed is not None:
                on_failed(Failure(Refused(refusal(outcome, self._timeout))))
        elif on_done is not None:
            on_done(outcome)

    def _stop_timer(self) -> None:
        self._dialer.deadlines.remove(self)

    def _stop_step(self) -> None:
        step, self._step = self._step, None
        if step is not None:
            step.cancel()
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            factory, connector = connecting
            factory.stop_waiting()
            connector.stopConnecting()


#: A destination being reached (L{Dialer.dial}): C{cancel()} gives it up.
Attempt = _Dial
