"""
L{ConnectingFactory}: a client factory that says when its connection is made, with no wrapper
protocol; the forward proxy's target connections and the upstream client's plain-TCP ones
use it.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.base import BaseConnector
from twisted.internet.interfaces import IConnector, IProtocol
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure

__all__ = ["ConnectingFactory"]


class ConnectingFactory(ClientFactory):
    """
    A client factory whose protocols say when their connection is made (L{connected}, from
    their C{connectionMade}), so that a connection is reported without wrapping its protocol
    in another, as Twisted's endpoints do (a wrapper costs a call per
    chunk and Deferreds per connection).  Quiet: no "Starting factory" log lines.
    """

    noisy = False
    _on_connected: Callable[[IProtocol], object] | None = None
    _on_failed: Callable[[Failure], object] | None = None

    def await_connection(
        self, on_connected: Callable[[IProtocol], object], on_failed: Callable[[Failure], object]
    ) -> None:
        """Call C{on_connected} with the protocol once connected, or C{on_failed} with why not."""
        self._on_connected = on_connected
        self._on_failed = on_failed

    def stop_waiting(self) -> None:
        """Call neither of what L{await_connection} was given (the attempt was given up)."""
        self._on_connected = self._on_failed = None

    def connected(self, protocol: IProtocol) -> None:
        """Called by each protocol's C{connectionMade}."""
        on_connected = self._on_connected
        self._on_connected = self._on_failed = None
        if on_connected is not None:
            on_connected(protocol)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        on_failed = self._on_failed
        self._on_connected = self._on_failed = None
        if on_failed is not None:
            on_failed(reason)

    def clientConnectionLost(self, connector: IConnector, reason: Failure) -> None:
        # Twisted's connector keeps its (public) transport once the connection is lost, and
        # the transport keeps its connector: a reference cycle per connection, left to the
        # cyclic collector.  Dropped here, as Twisted does itself when a connection fails
        # (BaseConnector.connectionFailed; checked against Twisted 26.10).
        if isinstance(connector, BaseConnector):
            connector.transport = None
