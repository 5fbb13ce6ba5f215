"""
L{aoaiproxy.reactor.ProxyReactor}: the reactor C{twistd aoaiproxy} installs, which this suite
runs on too (``conftest.py``), so every behaviour test exercises it; here, what it does
differently from Twisted's epoll reactor around an event, and that it is the one in use.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from aoaiproxy.reactor import ProxyReactor

from .conftest import REPO
from .rawnet import connect, get_reactor


def test_the_suite_runs_on_it() -> None:
    assert type(get_reactor()) is ProxyReactor


def _installed(before: str) -> list[str]:
    """What L{install} returns, then the global reactor's class, in a new Python that ran
    C{before} first."""
    code = (
        f"{before}\n"
        "from aoaiproxy.reactor import install\n"
        "installed = install()\n"
        "from twisted.internet import reactor\n"
        "print(installed, type(reactor).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_install_keeps_a_reactor_already_chosen() -> None:
    # As under twistd --reactor=poll: install() does not replace it.
    assert _installed("from twisted.internet import pollreactor; pollreactor.install()") == [
        "False",
        "PollReactor",
    ]


def test_install_without_a_reactor() -> None:
    assert _installed("") == ["True", "ProxyReactor"]


class _Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class _BadLoss(Protocol):
    """Its connectionLost raises: an exception that escapes the event's handling."""

    made: Deferred[None]
    lost: Deferred[None]

    def connectionMade(self) -> None:
        self.made.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)
        raise RuntimeError("bug in connectionLost")


@pytest_twisted.ensureDeferred
async def test_an_escaping_exception_is_logged_with_the_connection_and_the_loop_goes_on() -> None:
    reactor = get_reactor()
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    bad = _BadLoss()
    bad.made, bad.lost = Deferred(), Deferred()
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(lambda: bad)
    )
    echo_port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(_Echo))
    try:
        client = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Protocol()
        )
        await bad.made
        assert bad.transport is not None
        prefix = bad.transport.logPrefix()
        assert client.transport is not None
        client.transport.loseConnection()
        await bad.lost  # fired in connectionLost, before it raises
        await _turn(reactor)
        errors = [e for e in events if e.get("isError") and "bug in connectionLost" in repr(e.get("failure"))]
        assert [e.get("system") for e in errors] == [prefix]
        # The reactor still handles events: another connection is served.
        echo_client = await connect(echo_port.getHost().port, b"ping")
        assert await echo_client.wait_for(b"ping") == b"ping"
        await echo_client.abort()
    finally:
        globalLogPublisher.removeObserver(events.append)
        await port.stopListening()
        await echo_port.stopListening()


def _turn(reactor: Any) -> Deferred[None]:
    """A Deferred fired on the reactor's next turn (after the events already pending)."""
    d: Deferred[None] = Deferred()
    reactor.callLater(0, d.callback, None)
    return d
