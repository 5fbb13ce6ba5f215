"""
Reaching a forward proxy destination: resolve a name once, check every address it resolves
to (L{aoaiproxy.forward.policy.checked_addresses}), and connect to a checked address, never
to the name again (no DNS rebinding).

Every failure here is a L{Refused} carrying the answer for the client (L{refusal}: 403, 502
or 504); a wait is bounded with C{Deferred.addTimeout}, the forward proxy's one way to time
out an operation (a tunnel's idleness uses C{TimeoutMixin}, as the HTTP channel does).
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
    IProtocol,
    IProtocolFactory,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from aoaiproxy import errors
from aoaiproxy.config import Config
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


def tcp_connector(reactor: Any) -> Connector:
    """A L{Connector} making plain TCP connections."""

    def connect(ip: str, port: int, timeout: float) -> IStreamClientEndpoint:
        if ":" in ip:
            return TCP6ClientEndpoint(reactor, ip, port, timeout=timeout)
        return TCP4ClientEndpoint(reactor, ip, port, timeout=timeout)

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

    def addresses(self, config: Config, host: str, port: int) -> Deferred[list[str]]:
        """
        The checked addresses of an allowed destination (never empty), found within the
        connect timeout; fails with L{Refused} (403 when a name leads to a non-public address,
        502, 504).
        """
        return self._bounded(self._checked(config, host, port), config.connect_timeout)

    def connect(self, config: Config, host: str, port: int, factory: IProtocolFactory) -> Deferred[IProtocol]:
        """
        Resolve and check C{host} (L{addresses}), then connect to the first address that
        accepts, all within the connect timeout; fires with the connected protocol C{factory}
        built, or fails with L{Refused} (403, 502, 504).
        """
        d = self._checked(config, host, port)
        d.addCallback(self._first_accepting, port, config.connect_timeout, factory)
        return self._bounded(d, config.connect_timeout)

    def _checked(self, config: Config, host: str, port: int) -> Deferred[list[str]]:
        if ip_literal(host) is not None:
            return defer.succeed([host])

        def check(addresses: list[str]) -> list[str]:
            good = checked_addresses(config, host, port, addresses)
            if not good:
                raise Refused(forbidden(f"{host}:{port} (it resolves to a non-public address)"))
            return good

        return self._resolve(host).addCallback(check)

    def _bounded(self, d: Deferred[Any], timeout: float) -> Deferred[Any]:
        d.addTimeout(timeout, self._reactor)

        def refuse(failure: Failure) -> None:
            raise Refused(refusal(failure, timeout))

        return d.addErrback(refuse)

    def _first_accepting(
        self, addresses: list[str], port: int, timeout: float, factory: IProtocolFactory
    ) -> Deferred[IProtocol]:
        """Connect to each address in turn until one accepts; cancelling stops the attempt."""
        remaining = list(addresses)
        attempt: Deferred[IProtocol] = Deferred()
        result: Deferred[IProtocol] = Deferred(lambda _: attempt.cancel())

        def next_address() -> None:
            nonlocal attempt
            attempt = self._connector(remaining.pop(0), port, timeout).connect(factory)
            attempt.addCallbacks(done, retry)

        def retry(failure: Failure) -> None:
            if failure.check(CancelledError, ierror.ConnectingCancelledError) or not remaining:
                done(failure)
            else:
                next_address()

        def done(outcome: IProtocol | Failure) -> None:
            if result.called:  # cancelled meanwhile: a late connection is not used
                if not isinstance(outcome, Failure) and outcome.transport is not None:  # type: ignore[attr-defined]
                    outcome.transport.abortConnection()  # type: ignore[attr-defined]
                return
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)

        next_address()
        return result
