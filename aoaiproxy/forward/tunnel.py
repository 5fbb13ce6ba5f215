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

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import (
    IHalfCloseableDescriptor,
    IHalfCloseableProtocol,
    IPushProducer,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from zope.interface import implementer

from aoaiproxy._twisted import close_through, half_close_through, pending_write_bytes, write_through
from aoaiproxy.connecting import ConnectingFactory
from aoaiproxy.deadlines import Deadlines
from aoaiproxy.metrics import NullMetrics, Recorder

#: On a graceful stop: how long a tunnel must have been silent, its target having spoken
#: last (or nobody), to count as at rest and be closed.
REST_SECONDS = 5.0

#: How much a tunnel's connection reads at once: Twisted's 64 KiB, and L{BULK_READ} while
#: bulk flows (a read filled 64 KiB: four times fewer reactor turns per byte).  Back to
#: 64 KiB once reads are small (below L{SMALL_DATA}): a read into a larger buffer costs more
#: for a few bytes (an allocation above malloc's mmap threshold).  A connection's buffer
#: size is also how much it buffers for writing before it pauses its producer.
READ_SIZE = 64 * 1024
BULK_READ = 256 * 1024
SMALL_DATA = 8 * 1024


def half_closeable(transport: Any) -> bool:
    """
    Whether a connection can be half-closed: a socket's transport (plain TCP), not one that
    wraps another (TLS: a wrapper copies the interfaces of the transport it wraps).
    """
    return IHalfCloseableDescriptor.providedBy(transport) and not isinstance(transport, ProtocolWrapper)


def _read_size(transport: Any, size: int) -> None:
    """Read up to C{size} bytes at once from C{transport} (a socket's; see L{READ_SIZE})."""
    if isinstance(transport, FileDescriptor) and transport.bufferSize != size:
        transport.bufferSize = size


@implementer(IHalfCloseableProtocol)
class TargetProtocol(Protocol):
    """The connection to a CONNECT target; hands everything to its L{Tunnel}."""

    tunnel: Tunnel | None = None
    _early: bytes = b""
    #: No adapter of its own (as L{aoaiproxy.site.ProxyChannel.__conform__}).
    __conform__ = None

    def connectionMade(self) -> None:
        # What the client sends goes on at once, as on the client's own connection (twisted.web
        # sets TCP_NODELAY there): with Nagle's algorithm here, a client's second small write
        # (a TLS record after another) waits for the target's ACK of the first, which the
        # target delays by up to 40 ms while it waits for the rest.
        setTcpNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setTcpNoDelay is not None:
            setTcpNoDelay(True)
        factory = getattr(self, "factory", None)
        if isinstance(factory, ConnectingFactory):
            factory.connected(self)

    def dataReceived(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is None:  # pragma: no cover - targets speak after the tunnel starts
            self._early += data
        else:
            tunnel.to_client(data)

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
        # Unlinked from its tunnel (which links back), so that both are freed by reference
        # counting, not left for the cyclic garbage collector.
        tunnel, self.tunnel = self.tunnel, None
        if tunnel is not None:
            tunnel.target_lost()


class TargetFactory(ConnectingFactory):
    """Builds the L{TargetProtocol} of one CONNECT, quietly (no "Starting factory" lines)."""

    protocol = TargetProtocol


@implementer(IHalfCloseableProtocol)
class Tunnel(Protocol):
    """
    Relays bytes between a client connection that sent CONNECT and its target, with
    backpressure both ways (a slow side pauses reading from the other, as
    C{twisted.protocols.portforward} does), half-close (plain TCP), and an idle timeout
    (C{idle_timeout} seconds with no byte either way: both are cut).

    Each chunk is written on as it was read (no copy, no join) and only stamped with the
    time; the idle timeout and the drain's rest are one timer that, when it fires, compares
    that stamp with the clock and sets itself again for what is left (a timer reset per
    chunk, as C{TimeoutMixin} does, costs more than the relay itself).

    This is the client's side: the client's channel is handed to it, and the bytes the
    client sent after the CONNECT head arrive first.  C{on_close} is called once, when the
    tunnel closes, just before both connections are closed (one may be lost, and its access
    line written, before the close returns).  C{recorder} counts it among the open
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
        deadlines: Deadlines,
        recorder: Recorder | None = None,
    ) -> None:
        self._reactor = reactor
        #: Where the tunnel's one timer is kept (its forwarder's, shared by every tunnel).
        self._deadlines = deadlines
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
        self._seconds: Callable[[], float] = reactor.seconds
        #: When bytes were last relayed either way, and whether the client sent them.
        self._last_relay = self._seconds()
        self._client_spoke_last = False
        #: Bytes relayed to the client (for the access log).
        self.bytes_down = 0

    @property
    def client(self) -> Any:
        """The client's transport."""
        return self.transport

    def connectionMade(self) -> None:
        client = self.client
        self._target_protocol.tunnel = self
        client.registerProducer(self.target, True)
        if IPushProducer.providedBy(client):
            self.target.registerProducer(client, True)
        self._set_timer(self._idle_timeout)
        self._opened = True
        self._recorder.tunnel_opened()
        early = self._target_protocol.take_early()
        if early:
            self.to_client(early)

    def _set_timer(self, delay: float | None) -> None:
        """Check the tunnel's silence in C{delay} seconds (None: never)."""
        if delay is None:
            self._deadlines.remove(self)
        else:
            self._deadlines.add(self, delay)

    def expired(self) -> None:
        """The timer fired (L{Deadlines}): check the tunnel's silence."""
        quiet = self._seconds() - self._last_relay
        if not self._draining:
            if quiet >= self._idle_timeout:
                self.abort()  # idle for the tunnel idle timeout
            else:
                self._set_timer(self._idle_timeout - quiet)
        else:
            self._close_if_at_rest(quiet)

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
        # The timer now measures rest (the tunnel idle timeout no longer matters).
        self._close_if_at_rest(self._seconds() - self._last_relay)

    def _close_if_at_rest(self, quiet: float) -> None:
        """Draining: close the tunnel if at rest, else look again once it may be."""
        if self._at_rest(quiet):
            self._close()
        else:
            # Not silent for long enough yet, or busy (the drain deadline bounds it).
            self._set_timer(self.rest_seconds - quiet if quiet < self.rest_seconds else self.rest_seconds)

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
        size = len(data)
        self._recorder.tunnel_bytes("up" if from_client else "down", size)
        self._last_relay = self._seconds()
        self._client_spoke_last = from_client
        write_through(out, data)
        if size >= READ_SIZE or size < SMALL_DATA:
            _read_size(
                self.client if from_client else self.target, BULK_READ if size >= READ_SIZE else READ_SIZE
            )

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
            half_close_through(other)  # nothing is written on it after this

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
        self._set_timer(None)
        # First: a connection may be lost before close_through returns (its access line
        # is written then, with what on_close noted).
        self._on_close(self)
        for transport in (self.client, self.target):
            transport.unregisterProducer()
            if abort:
                transport.abortConnection()
            else:
                # Writes what is still buffered, then closes.
                close_through(transport)
