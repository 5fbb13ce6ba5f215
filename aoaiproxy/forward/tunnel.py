"""
The CONNECT tunnel: bytes relayed both ways between the client and the target, with
backpressure both ways, half-close (plain TCP), and an idle timeout.

The client's side is a L{Tunnel}, the protocol the client's connection is handed to
(L{aoaiproxy.site.ProxyRequest.establish}); the target's side is a L{TargetProtocol}, built
by L{TargetFactory} when the target connects.

On a graceful stop (L{Tunnel.close_when_done}), a tunnel at rest is closed at once and a busy
one when it comes to rest (or at the drain deadline).  A tunnel is opaque (TLS, mostly), so
"at rest" is read from its traffic: nothing relayed for L{REST_SECONDS}, nothing waiting in
either side's buffers, and the last bytes came from the target, or none came at all.  That
is a client's pooled connection after its last response; a request sent and still awaiting
its answer (the client spoke last) keeps the drain window, however long its upstream takes,
and so does an answer a slow client is still reading.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableDescriptor,
    IHalfCloseableProtocol,
    IPushProducer,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.policies import ProtocolWrapper, TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from aoaiproxy._twisted import pending_write_bytes
from aoaiproxy.metrics import NullMetrics, Recorder

#: On a graceful stop: how long a tunnel must have been silent, its target having spoken
#: last (or nobody), to count as at rest and be closed.
REST_SECONDS = 5.0


def half_closeable(transport: Any) -> bool:
    """
    Whether a connection can be half-closed: a socket's transport (plain TCP), not one that
    wraps another (TLS: a wrapper copies the interfaces of the transport it wraps).
    """
    return IHalfCloseableDescriptor.providedBy(transport) and not isinstance(transport, ProtocolWrapper)


@implementer(IHalfCloseableProtocol)
class TargetProtocol(Protocol):
    """The connection to a CONNECT target; hands everything to its L{Tunnel}."""

    tunnel: Tunnel | None = None
    _early: bytes = b""

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel is None:  # pragma: no cover - targets speak after the tunnel starts
            self._early += data
        else:
            self.tunnel.to_client(data)

    def take_early(self) -> bytes:
        """What the target sent before its tunnel started."""
        early, self._early = self._early, b""
        return early

    def readConnectionLost(self) -> None:
        if self.tunnel is not None:
            self.tunnel.target_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.tunnel is not None:
            self.tunnel.target_lost()


class TargetFactory(Factory):
    """Builds the L{TargetProtocol} of one CONNECT, quietly (no "Starting factory" lines)."""

    protocol = TargetProtocol
    noisy = False


@implementer(IHalfCloseableProtocol)
class Tunnel(Protocol, TimeoutMixin):
    """
    Relays bytes between a client connection that sent CONNECT and its target, with
    backpressure both ways (a slow side pauses reading from the other, as
    C{twisted.protocols.portforward} does), half-close (plain TCP), and an idle timeout
    (C{idle_timeout} seconds with no byte either way: both are cut).

    This is the client's side: the client's channel is handed to it, and the bytes the
    client sent after the CONNECT head arrive first.  C{on_close} is called once, when the
    tunnel closes (both connections are then closing).  C{recorder} counts it among the open
    tunnels from its start to its close, and the bytes it relays each way.
    """

    #: See L{REST_SECONDS} (a test may shorten it).
    rest_seconds = REST_SECONDS

    def __init__(
        self,
        reactor: Any,
        target: TargetProtocol,
        idle_timeout: float,
        on_close: Callable[[Tunnel], None],
        recorder: Recorder | None = None,
    ) -> None:
        self._reactor = reactor
        self._recorder: Recorder = recorder if recorder is not None else NullMetrics()
        self._opened = False
        self._target_protocol = target
        self.target: Any = target.transport
        self._idle_timeout = idle_timeout
        self._on_close = on_close
        self._client_eof = False
        self._target_eof = False
        self._closed = False
        self._draining = False
        #: When bytes were last relayed either way, and whether the client sent them.
        self._last_relay = reactor.seconds()
        self._client_spoke_last = False
        #: Bytes relayed to the client (for the access log).
        self.bytes_down = 0

    @property
    def client(self) -> Any:
        """The client's transport."""
        return self.transport

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:  # TimeoutMixin's clock
        call: IDelayedCall = self._reactor.callLater(period, func)
        return call

    def connectionMade(self) -> None:
        client = self.client
        self._target_protocol.tunnel = self
        client.registerProducer(self.target, True)
        producer = IPushProducer(client, None)
        if producer is not None:
            self.target.registerProducer(producer, True)
        self.setTimeout(self._idle_timeout)
        self._opened = True
        self._recorder.tunnel_opened()
        early = self._target_protocol.take_early()
        if early:
            self.to_client(early)

    def timeoutConnection(self) -> None:
        if not self._draining:
            self.abort()  # idle for the tunnel idle timeout
        elif self._at_rest(quiet=self.rest_seconds):
            self._close()
        else:
            self.setTimeout(self.rest_seconds)  # still busy: the drain deadline bounds it

    def _at_rest(self, quiet: float) -> bool:
        """Whether the tunnel is at rest (the module's docstring), silent for C{quiet} seconds."""
        if self._client_spoke_last or quiet < self.rest_seconds:
            return False
        return pending_write_bytes(self.client) == 0 and pending_write_bytes(self.target) == 0

    def close_when_done(self) -> None:
        """
        For a graceful stop: close the tunnel now if it is at rest, else once it comes to
        rest (see the module's docstring); the drain deadline cuts it otherwise.
        """
        if self._closed:
            return
        self._draining = True
        if self._at_rest(quiet=self._reactor.seconds() - self._last_relay):
            self._close()
        else:
            # The idle timer now measures rest (the tunnel idle timeout no longer matters).
            self.setTimeout(self.rest_seconds)

    # -- bytes

    def dataReceived(self, data: bytes) -> None:
        """From the client, to the target."""
        self._relay(data, self.target, from_client=True)

    def to_client(self, data: bytes) -> None:
        """From the target, to the client."""
        self.bytes_down += len(data)
        self._relay(data, self.client, from_client=False)

    def _relay(self, data: bytes, out: Any, from_client: bool) -> None:
        if self._closed:
            return
        self._recorder.tunnel_bytes("up" if from_client else "down", len(data))
        self.resetTimeout()
        self._last_relay = self._reactor.seconds()
        self._client_spoke_last = from_client
        out.write(data)

    # -- ends

    def readConnectionLost(self) -> None:
        """The client half-closed (and awaits the rest of the target's answer)."""
        self._client_eof = True
        self._client_spoke_last = True
        self._pass_eof(self._target_eof, self.target)

    def writeConnectionLost(self) -> None:
        pass

    def target_eof(self) -> None:
        self._target_eof = True
        self._client_spoke_last = False
        self._pass_eof(self._client_eof, self.client)

    def _pass_eof(self, ended: bool, other: Any) -> None:
        """
        One side ended: half-close the C{other} side, or close the tunnel when that one has
        C{ended} too or cannot be half-closed (TLS).
        """
        if ended or not half_closeable(other):
            self._close()
        else:
            other.loseWriteConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """The client's connection is gone."""
        self._client_eof = True
        self._close()

    def target_lost(self) -> None:
        self._target_eof = True
        self._close()

    def abort(self) -> None:
        """Cut both connections now."""
        self._close(abort=True)

    def _close(self, abort: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        if self._opened:
            self._recorder.tunnel_closed()
        self.setTimeout(None)
        for transport in (self.client, self.target):
            transport.unregisterProducer()
            if abort:
                transport.abortConnection()
            else:
                # Writes what is still buffered, then closes.
                transport.loseConnection()
        self._on_close(self)
