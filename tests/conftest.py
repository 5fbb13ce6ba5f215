"""
Shared fixtures: a fake Azure upstream, the proxy in this process on a loopback port, and the
proxy as a C{twistd -n aoaiproxy} subprocess, as a user runs it.
"""

from __future__ import annotations

import gc
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from aoaiproxy.config import Config, LiveConfig, load_config
from aoaiproxy.forward import Forwarder
from aoaiproxy.log import ACCESS_NAMESPACE
from aoaiproxy.resource import ApiResource
from aoaiproxy.site import ProxyChannel, ProxySite
from aoaiproxy.testing import FakeAzure
from aoaiproxy.upstream import UpstreamClient

from .rawnet import get_reactor, raw_connect  # noqa: F401 - raw_connect: a fixture

REPO = Path(__file__).resolve().parent.parent


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # Before pytest-twisted installs its default (it accepts an epoll reactor already
    # there): the in-process tests run on the reactor twistd aoaiproxy runs on.
    from aoaiproxy.reactor import install

    install()


@pytest_twisted.async_yield_fixture
async def fake() -> AsyncIterator[FakeAzure]:
    """A fake Azure OpenAI resource on 127.0.0.1."""
    f = FakeAzure(get_reactor())
    f.listen()
    yield f
    await f.stop()


@pytest_twisted.async_yield_fixture
async def regions() -> AsyncIterator[dict[str, FakeAzure]]:
    """Three fake resources, east, west and north, each with its own key."""
    reactor = get_reactor()
    fakes = {
        name: FakeAzure(reactor, name=name, region=name, api_key=f"key-{name}")
        for name in ("east", "west", "north")
    }
    for f in fakes.values():
        f.listen()
    yield fakes
    for f in fakes.values():
        await f.stop()


@pytest_twisted.async_yield_fixture
async def client() -> AsyncIterator[HTTPClient]:
    """A treq client over a plain Agent with a pool this test owns and closes."""
    reactor = get_reactor()
    pool = HTTPConnectionPool(reactor, persistent=False)
    yield HTTPClient(Agent(reactor, pool=pool))
    await pool.closeCachedConnections()


@attrs.define
class Proxy:
    """A proxy running in this process."""

    port: IListeningPort
    live: LiveConfig
    site: ProxySite
    upstream: UpstreamClient

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"

    @property
    def config(self) -> Config:
        return self.live.config


@pytest_twisted.async_yield_fixture
async def make_proxy(fake: FakeAzure) -> AsyncIterator[Callable[..., Proxy]]:
    """
    C{make_proxy(flags..., env=...)} starts a proxy whose endpoint defaults to the fake
    upstream, configured through L{load_config} exactly as the daemon is.  C{upstream_reactor}
    replaces the reactor its upstream client uses (to stub name resolution).
    """
    reactor = get_reactor()
    started: list[Proxy] = []

    def make(env: dict[str, str] | None = None, upstream_reactor: Any = None, **flags: Any) -> Proxy:
        flags.setdefault("endpoint", fake.url)
        config = load_config(flags, env or {})
        live = LiveConfig(config)
        upstream = UpstreamClient(upstream_reactor or reactor)
        site = ProxySite(
            ApiResource(live, upstream, reactor), live, reactor, Forwarder(reactor, live, upstream=upstream)
        )
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        proxy = Proxy(port, live, site, upstream)
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        await proxy.port.stopListening()
        await proxy.upstream.close()


class Events(list[dict[str, Any]]):
    """Log events as they are published; L{access} waits for access lines."""

    def __init__(self) -> None:
        super().__init__()
        self._waiting: list[tuple[int, Deferred[list[str]]]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.append(event)
        if event.get("log_namespace") == ACCESS_NAMESPACE:
            lines = access_lines(self)
            waiting, self._waiting = self._waiting, []
            for count, d in waiting:
                if len(lines) >= count:
                    # On the reactor's next turn: not inside the logging call (the test
                    # would go on, and may end, while the log publisher is still at work).
                    get_reactor().callLater(0, d.callback, lines)
                else:
                    self._waiting.append((count, d))

    def access(self, count: int, timeout: float = 10.0) -> Deferred[list[str]]:
        """Fires with the access lines once there are C{count} of them (a bounded wait)."""
        lines = access_lines(self)
        if len(lines) >= count:
            return succeed(lines)
        d: Deferred[list[str]] = Deferred()
        self._waiting.append((count, d))
        return d.addTimeout(timeout, get_reactor())


@pytest.fixture
def events() -> Iterator[Events]:
    """Every log event published while the test runs."""
    seen = Events()
    globalLogPublisher.addObserver(seen)
    yield seen
    globalLogPublisher.removeObserver(seen)


def access_lines(events: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_namespace") == ACCESS_NAMESPACE]


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll C{predicate} on the reactor (bounded) until it holds."""
    reactor = get_reactor()
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)


@pytest.fixture
def cyclic_garbage() -> Iterator[Callable[[Callable[[object], bool]], list[str]]]:
    """
    The cyclic collector off and every unreachable object kept (C{gc.DEBUG_SAVEALL}).  The
    fixture's value, C{found(keep)}, names (sorted) the objects for which C{keep} is true
    that only the collector would have freed since the previous call (or the start).
    """
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.garbage.clear()

    def found(keep: Callable[[object], bool]) -> list[str]:
        gc.collect()
        names = sorted(type(o).__name__ for o in gc.garbage if keep(o))
        gc.garbage.clear()
        return names

    try:
        yield found
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Wait until something accepts on 127.0.0.1:port (the daemon is up), or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"twistd exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            select.select([], [], [], 0.05)  # poll interval while the daemon starts
    raise AssertionError(f"nothing listens on port {port} after {timeout}s")


@attrs.define
class Daemon:
    """A C{twistd -n aoaiproxy} subprocess."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = 15, timeout: float = 40.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def stop_cleanly(self, timeout: float = 10.0) -> None:
        """SIGTERM, and fail unless it exits with 0 within C{timeout} (its log's tail shown)."""
        try:
            code = self.stop(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"twistd did not stop on SIGTERM\n{self.log()[-3000:]}") from None
        assert code == 0, self.log()[-3000:]


def twistd_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a daemon subprocess: this source tree first on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_OPENAI", "AOAIPROXY"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def twistd_command(*args: str) -> list[str]:
    twistd = Path(sys.executable).parent / "twistd"
    return [str(twistd), "--nodaemon", "--pidfile=", "aoaiproxy", *args]


@contextmanager
def spawned(
    command: list[str], log_path: Path, *ports: int, env: dict[str, str] | None = None
) -> Iterator[Daemon]:
    """
    Runs C{command} (in C{log_path}'s folder, output to C{log_path}, with L{twistd_env}(C{env}))
    and waits until something listens on each of C{ports}, or fails with the log; kills it at
    the end if it still runs.
    """
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=twistd_env(env),
            cwd=log_path.parent,
        )
    daemon = Daemon(proc, ports[0], log_path)
    try:
        for port in ports:
            try:
                wait_for_port(port, proc)
            except AssertionError as e:
                raise AssertionError(f"{e}\n{daemon.log()}") from None
        yield daemon
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """
    C{start_daemon(*args, env={...}, port=None)} runs C{twistd -n aoaiproxy --listen
    tcp:PORT:interface=127.0.0.1 ARGS} from the source tree and waits until it listens.
    """
    with ExitStack() as daemons:

        def start(
            *args: str, env: dict[str, str] | None = None, port: int | None = None, listen: bool = True
        ) -> Daemon:
            port = port or free_port()
            listen_args = ["--listen", f"tcp:{port}:interface=127.0.0.1"] if listen else []
            command = twistd_command(*listen_args, *args)
            return daemons.enter_context(spawned(command, tmp_path / f"twistd-{port}.log", port, env=env))

        yield start


class Holding(Resource):
    """Keeps each request unanswered (its body as the channel stored it), for the test."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Any] = []

    def render(self, request: Any) -> Any:
        self.requests.append(request)
        return NOT_DONE_YET


class ParsedLines(ProxyChannel):
    """
    A channel that counts the lines twisted.web's parser is given: none for a request read
    at once (L{ProxyChannel}'s fast path).  A site uses it with C{site.protocol = ParsedLines}.
    """

    parsed_lines = 0

    def lineReceived(self, line: bytes) -> None:
        self.parsed_lines += 1
        super().lineReceived(line)
