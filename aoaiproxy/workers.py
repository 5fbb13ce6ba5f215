"""
Several worker processes on shared listening sockets (SPEC §15, C{--workers N}).

The daemon's first process, the parent (L{Supervisor}), binds every listener once
(L{SharedListener}: bound as a single process binds it, backlog included, but never accepting)
and serves nothing on the API ports.  It starts N workers (C{python -m aoaiproxy.workers}),
each a whole proxy on the same configuration, which adopt the listening sockets they were given
(L{adopted_listener}; TLS is wrapped there, with certificates each worker reloads); the kernel
hands each new connection to one of them.

- systemd hears C{READY=1} once every worker said it listens.  A worker that dies before that
  stops the daemon (exit status 1); one that dies later is restarted: at once if it ran for
  L{STABLE_SECONDS}, else after a delay that doubles from L{FIRST_RESTART_DELAY} up to
  L{MAX_RESTART_DELAY}, so that a crash loop does not spin.
- C{SIGHUP} is passed on: each worker re-reads the configuration, key files and certificates
  as a single process does; C{READY=1} again once each has.
- C{SIGTERM}/C{SIGINT}: the parent stops listening and passes the stop on; each worker drains
  as a single process does; the parent exits (status 0) once every worker has exited.  A
  second one is passed on as "cut now".
- C{--metrics-listen}: the parent serves it from the workers' files
  (L{aoaiproxy.metrics.multiprocess_registry}) in a directory of its own, which the workers
  are given in C{PROMETHEUS_MULTIPROC_DIR}.

Parent and worker talk over pipes rather than signals: the worker's standard input carries one
JSON line (L{WorkerSpec}: the command-line flags and the listeners) and then commands
(L{RELOAD}, L{STOP}, L{CUT}); its descriptor 3 carries its reports (L{READY}, L{RELOADED}).
A worker may also get a signal itself (Ctrl-C reaches the whole process group, systemd may
signal every process of a service): a command is never taken for a second C{SIGTERM}.  The
end of its standard input (the parent gone) stops a worker gracefully.  Workers write their log
lines to the parent's standard output, marked with their pid.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any, cast

import attrs
from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.address import IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol, connectionDone
from twisted.logger import ILogObserver, Logger, globalLogBeginner
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from aoaiproxy.capacity import with_backlog
from aoaiproxy.config import Config, ConfigError, LiveConfig, load_config
from aoaiproxy.log import JSONLinesObserver, text_observer
from aoaiproxy.service import DaemonService, Reloader, reloading_state, sd_notify
from aoaiproxy.tls import (
    TLSFilesError,
    TLSListenerService,
    TLSServerEndpoint,
    reloadable_tls,
    split_tls,
)

__all__ = [
    "ListenerSpec",
    "SharedListener",
    "Supervisor",
    "WorkerService",
    "WorkerSpec",
    "Workers",
    "adopted_listener",
    "main",
    "supervisor",
]

_log = Logger(namespace="aoaiproxy")

#: The worker's descriptor for its reports to the parent.
STATUS_FD = 3
#: The worker's descriptor of the first listening socket (the others follow).
FIRST_LISTENER_FD = 4

#: Reports, worker to parent: it listens; it has reloaded.
READY = b"ready"
RELOADED = b"reloaded"
#: Commands, parent to worker: reload; stop gracefully (drain); cut what is still open.
RELOAD = b"reload"
STOP = b"stop"
CUT = b"cut"

#: A worker that ran this long before it died is restarted at once.
STABLE_SECONDS = 10.0
#: The delay before restarting a worker that died sooner; it doubles with each such death.
FIRST_RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0

#: The parent's alone: systemd's notification socket, and the sockets systemd passed (the
#: workers get them as descriptors).
PARENT_ONLY_ENVIRONMENT = frozenset(
    {"NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID"}
)


# -- what the parent tells a worker ----------------------------------------------------------


@attrs.frozen
class ListenerSpec:
    """One listening socket of a worker: its description (C{--listen}), descriptor and family."""

    description: str
    fd: int
    family: int


@attrs.frozen
class WorkerSpec:
    """
    What a worker needs besides the environment: the command-line flags (as L{load_config}
    takes them) and its listening sockets.  Sent as one JSON line on its standard input (not
    on its command line, which any local user can read).
    """

    flags: Mapping[str, Any]
    listeners: tuple[ListenerSpec, ...]

    def to_line(self) -> bytes:
        listeners = [attrs.asdict(listener) for listener in self.listeners]
        return json.dumps({"flags": dict(self.flags), "listeners": listeners}).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> WorkerSpec:
        data = json.loads(line)
        return cls(data["flags"], tuple(ListenerSpec(**listener) for listener in data["listeners"]))


# -- the parent ------------------------------------------------------------------------------


class HeldForWorkers(Factory):
    """The factory of a socket held for the workers (the parent never accepts on it)."""

    noisy = False

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        return None


@implementer(IStreamServerEndpoint)
class HeldEndpoint:
    """Binds as the endpoint it wraps does, then never accepts: the socket is the workers'."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.port: Any = None

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        d: Deferred[IListeningPort] = self.inner.listen(protocolFactory)
        d.addCallback(self._hold)
        return d

    def _hold(self, port: Any) -> Any:
        port.stopReading()
        self.port = port
        return port


def _family(address: IAddress) -> int:
    if isinstance(address, UNIXAddress):
        return socket.AF_UNIX
    if isinstance(address, IPv6Address):
        return socket.AF_INET6
    return socket.AF_INET


class SharedListener(StreamServerEndpointService):  # type: ignore[misc]
    """
    One listener, bound by the parent for its workers (L{HeldEndpoint}), with the backlog of
    L{aoaiproxy.capacity.with_backlog}.  The TLS files of an C{ssl:} listener are checked now
    (the workers serve TLS).  As C{strports.service}: a listener that cannot bind stops start-up.
    """

    _raiseSynchronously = True

    def __init__(self, description: str, reactor: Any) -> None:
        inner, params = split_tls(description)
        if params is not None:
            reloadable_tls(params)
        self.description = description
        self.held = HeldEndpoint(serverFromString(reactor, with_backlog(inner)))
        super().__init__(self.held, HeldForWorkers())

    def fileno(self) -> int:
        """The listening socket's descriptor (once bound)."""
        fd: int = self.held.port.fileno()
        return fd

    def spec(self, fd: int) -> ListenerSpec:
        """The socket as a worker gets it, as descriptor C{fd}."""
        return ListenerSpec(self.description, fd, _family(self.held.port.getHost()))


@attrs.define(eq=False)
class _Worker:
    """One worker's place: the process in it now, and how it has been doing."""

    slot: int
    process: Any = None
    pid: int = 0
    started: float = 0.0
    ready: bool = False
    #: Deaths in a row, each before L{STABLE_SECONDS}.
    quick_deaths: int = 0
    restart: IDelayedCall | None = None


def _how_it_ended(reason: Failure) -> str:
    signal_number = getattr(reason.value, "signal", None)
    if signal_number:
        return f"was killed by signal {signal_number}"
    return f"exited with status {getattr(reason.value, 'exitCode', None)}"


def restart_delay(quick_deaths: int) -> float:
    """Seconds before restarting a worker that died C{quick_deaths} times in a row, quickly."""
    if quick_deaths <= 0:
        return 0.0
    return float(min(FIRST_RESTART_DELAY * 2 ** (quick_deaths - 1), MAX_RESTART_DELAY))


class WorkerFailed(Exception):
    """A worker died before every worker was ready: the daemon does not start."""


class _WorkerProtocol(ProcessProtocol):
    """The parent's end of one worker process: its spec in, its reports out."""

    def __init__(self, pool: Workers, worker: _Worker, spec: bytes) -> None:
        self._pool = pool
        self._worker = worker
        self._spec = spec
        self._reports = b""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._spec)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != STATUS_FD:
            return
        *lines, self._reports = (self._reports + data).split(b"\n")
        for line in lines:
            self._pool.reported(self._worker, line)

    def processEnded(self, reason: Failure) -> None:
        self._pool.exited(self._worker, reason)


class Workers:
    """
    N worker processes: started, restarted when one dies, told to reload, stop and cut.  As
    the parent's L{aoaiproxy.service.Drainable}, L{drain} stops them and fires once all have
    exited.
    """

    def __init__(
        self,
        reactor: Any,
        count: int,
        spec: Callable[[], WorkerSpec],
        descriptors: Callable[[], Mapping[int, int]],
        environ: Mapping[str, str],
        metrics_dir: str | None = None,
        command: Sequence[str] = (sys.executable, "-m", "aoaiproxy.workers"),
    ) -> None:
        self.reactor = reactor
        self.workers = [_Worker(slot) for slot in range(1, count + 1)]
        self._spec = spec
        self._descriptors = descriptors
        self._environ = dict(environ)
        self._metrics_dir = metrics_dir
        self._command = list(command)
        self.stopping = False
        self._started: Deferred[None] | None = None
        self._reloads: list[tuple[set[int], Deferred[None]]] = []
        self._gone: Deferred[int] | None = None

    def live(self) -> list[_Worker]:
        """The workers whose process runs now."""
        return [w for w in self.workers if w.process is not None]

    def start(self) -> Deferred[None]:
        """Start every worker; fires once all are ready, fails (L{WorkerFailed}) if one dies first."""
        self._started = Deferred()
        for worker in self.workers:
            self._spawn(worker)
        return self._started

    def _spawn(self, worker: _Worker) -> None:
        worker.restart = None
        child_fds: dict[int, int | str] = {0: "w", 1: 1, 2: 2, STATUS_FD: "r"}
        child_fds.update(self._descriptors())
        protocol = _WorkerProtocol(self, worker, self._spec().to_line())
        worker.process = self.reactor.spawnProcess(
            protocol, self._command[0], self._command, env=self._environ, childFDs=child_fds
        )
        worker.pid = worker.process.pid
        worker.started = self.reactor.seconds()
        worker.ready = False
        _log.info("worker {slot} started (pid {pid})", slot=worker.slot, pid=worker.pid)

    def reported(self, worker: _Worker, report: bytes) -> None:
        if report == READY:
            worker.ready = True
            _log.info("worker {slot} (pid {pid}) is ready", slot=worker.slot, pid=worker.pid)
            if self._started is not None and not self._started.called and all(w.ready for w in self.workers):
                self._started.callback(None)
        elif report == RELOADED:
            self._reloaded(worker.pid)

    def exited(self, worker: _Worker, reason: Failure) -> None:
        pid, how = worker.pid, _how_it_ended(reason)
        lived = self.reactor.seconds() - worker.started
        worker.process, worker.ready = None, False
        if self._metrics_dir is not None:
            from aoaiproxy.metrics import worker_exited

            worker_exited(self._metrics_dir, pid)
        self._reloaded(pid)
        if self.stopping:
            _log.info("worker {slot} (pid {pid}) {how}", slot=worker.slot, pid=pid, how=how)
            self._maybe_gone()
        elif self._started is not None and not self._started.called:
            self._started.errback(WorkerFailed(f"worker {worker.slot} (pid {pid}) {how} before it was ready"))
        else:
            worker.quick_deaths = 0 if lived >= STABLE_SECONDS else worker.quick_deaths + 1
            delay = restart_delay(worker.quick_deaths)
            _log.warn(
                "worker {slot} (pid {pid}) {how}; restarting it in {delay:g}s",
                slot=worker.slot,
                pid=pid,
                how=how,
                delay=delay,
            )
            worker.restart = self.reactor.callLater(delay, self._spawn, worker)

    def _tell(self, command: bytes) -> int:
        live = self.live()
        for worker in live:
            worker.process.write(command + b"\n")
        return len(live)

    def reload(self) -> Deferred[None]:
        """Tell every worker to reload; fires once each has (or has exited)."""
        done: Deferred[None] = Deferred()
        pending = {w.pid for w in self.live()}
        self._tell(RELOAD)
        if pending:
            self._reloads.append((pending, done))
        else:
            done.callback(None)
        return done

    def _reloaded(self, pid: int) -> None:
        for pending, done in list(self._reloads):
            pending.discard(pid)
            if not pending:
                self._reloads.remove((pending, done))
                done.callback(None)

    def drain(self, reactor: Any, timeout: float) -> Deferred[int]:
        """
        Stop: no more restarts, and every worker drains its connections (each within its
        C{drain_timeout}) and exits.  Fires (with 0: the workers log what they cut) once
        all have exited.
        """
        self.stopping = True
        for worker in self.workers:
            if worker.restart is not None and worker.restart.active():
                worker.restart.cancel()
            worker.restart = None
        count = self._tell(STOP)
        _log.info("stopping {count} worker(s); each lets its requests in flight finish", count=count)
        self._gone = Deferred()
        self._maybe_gone()
        return self._gone

    def _maybe_gone(self) -> None:
        if self._gone is not None and not self._gone.called and not self.live():
            _log.info("every worker has exited")
            self._gone.callback(0)

    def cut(self) -> int:
        """Tell every worker to cut the connections it still has; returns how many were told."""
        return self._tell(CUT)


def _exit_now(status: int) -> None:
    """Leave with C{status} once the reactor has shut down (twistd has no way to say it)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


class Supervisor(DaemonService):
    """
    The parent's top service: its children are the L{SharedListener}s (and the metrics
    listener); its connections are the L{Workers}, which L{DaemonService} drains on stop.
    """

    def __init__(
        self, live: LiveConfig, pool: Workers, reactor: Any, reloader: Reloader, scratch: str | None
    ) -> None:
        super().__init__(live, pool, reactor, reloader)
        self.pool = pool
        #: A directory of the parent's (the workers' metrics files), removed on stop.
        self.scratch = scratch

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except BaseException:
            self._remove_scratch()
            raise

    def startService(self) -> None:
        super().startService()
        _log.info("running {count} worker processes", count=len(self.pool.workers))

    def start_serving(self) -> Deferred[None]:
        ready: Deferred[None] = Deferred()

        def failed(failure: Failure) -> None:
            _log.error("{why}; stopping", why=failure.getErrorMessage())
            self.reactor.addSystemEventTrigger("after", "shutdown", _exit_now, 1)
            self.reactor.stop()

        self.pool.start().addCallbacks(ready.callback, failed)
        return ready

    def serving(self) -> None:
        _log.info("all {count} workers are ready", count=len(self.pool.workers))
        super().serving()

    def reload(self) -> bool:
        """Pass the reload on; systemd hears C{READY=1} again once every worker has reloaded."""
        sd_notify(reloading_state())
        self.pool.reload().addCallback(lambda _: sd_notify("READY=1"))
        return True

    def cut_now(self, signal_name: str) -> None:
        count = self.pool.cut()
        _log.warn(
            "{signal} again: told {count} worker(s) to cut their connections now",
            signal=signal_name,
            count=count,
        )

    def stopService(self) -> Deferred[Any]:
        stopping = self._stopping is None
        d = super().stopService()
        if stopping:
            d.addBoth(self._removed_scratch)
        return d

    def _removed_scratch(self, result: Any) -> Any:
        self._remove_scratch()
        return result

    def _remove_scratch(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def supervisor(
    config: Config, flags: Mapping[str, Any], environ: Mapping[str, str], reactor: Any
) -> Supervisor:
    """
    The daemon's top service with C{--workers} above 1: the parent that binds, starts and
    supervises the workers (given C{flags} and C{environ}, as it was), and serves
    C{--metrics-listen} for them.
    """
    from aoaiproxy.metrics import metrics_service, multiprocess_registry, prepare_multiproc_dir

    try:
        listeners = [SharedListener(description, reactor) for description in config.listen]
    except TLSFilesError as e:
        raise SystemExit(f"aoaiproxy: --listen: {e}") from None
    worker_environ = {k: v for k, v in environ.items() if k not in PARENT_ONLY_ENVIRONMENT}
    scratch = None
    if config.metrics_listen is not None:
        scratch = tempfile.mkdtemp(prefix="aoaiproxy-metrics-")
        worker_environ.update(prepare_multiproc_dir(scratch))

    def spec() -> WorkerSpec:
        return WorkerSpec(
            flags, tuple(listener.spec(FIRST_LISTENER_FD + i) for i, listener in enumerate(listeners))
        )

    def descriptors() -> dict[int, int]:
        return {FIRST_LISTENER_FD + i: listener.fileno() for i, listener in enumerate(listeners)}

    live = LiveConfig(config)
    pool = Workers(reactor, config.workers, spec, descriptors, worker_environ, scratch)
    # (The parent's Reloader is never called: Supervisor.reload passes the reload on.)
    top = Supervisor(live, pool, reactor, Reloader(flags, environ, live), scratch)
    for listener in listeners:
        listener.setServiceParent(top)
    if config.metrics_listen is not None and scratch is not None:
        registry = multiprocess_registry(scratch)
        metrics_service(config.metrics_listen, registry, reactor).setServiceParent(top)
    return top


# -- a worker --------------------------------------------------------------------------------


class AdoptedListener(StreamServerEndpointService):  # type: ignore[misc]
    """
    A listening socket a worker was given.  As C{strports.service}: one that cannot be
    adopted stops the worker.
    """

    _raiseSynchronously = True

    def stopService(self) -> Deferred[None]:
        d: Deferred[None] = super().stopService()
        # A UNIX socket's path is removed by the parent, which stops listening first: the
        # port, removing it again when it closes, finds it gone.
        d.addErrback(lambda failure: failure.trap(FileNotFoundError) and None)
        return d


def adopted_listener(spec: ListenerSpec, factory: IProtocolFactory, reactor: Any) -> service.IService:
    """The service listening on a socket the parent gave (TLS as its description says)."""
    endpoint = AdoptedStreamServerEndpoint(reactor, spec.fd, spec.family)
    _, params = split_tls(spec.description)
    if params is None:
        return AdoptedListener(endpoint, factory)
    return TLSListenerService(TLSServerEndpoint(endpoint, reloadable_tls(params)), factory)


class _Control(LineReceiver):
    """
    A worker's end of its pipes to the parent: the spec and the commands in (standard input),
    the reports out (L{STATUS_FD}).  C{start} builds the worker from the spec (None if it
    cannot); C{gone} is called when the parent goes away.
    """

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def __init__(
        self, start: Callable[[WorkerSpec, _Control], WorkerService | None], gone: Callable[[], None]
    ) -> None:
        self._start = start
        self._gone = gone
        self._started = False
        self.worker: WorkerService | None = None

    def lineReceived(self, line: bytes) -> None:
        if not self._started:
            self._started = True
            self.worker = self._start(WorkerSpec.from_line(line), self)
        elif self.worker is None:
            return
        elif line == RELOAD:
            _log.info("reloading the configuration (passed on by the parent)")
            self.worker.reload()
        elif line == STOP:
            self.worker.stop()
        elif line == CUT:
            self.worker.cut()

    def report(self, report: bytes) -> None:
        if self.transport is not None:
            self.transport.write(report + b"\n")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._gone()


class WorkerService(DaemonService):
    """A worker's top service: a whole proxy that reports to its parent and takes its commands."""

    announce = False
    #: The pipes to the parent.
    control: _Control | None = None

    def serving(self) -> None:
        # Not systemd's business (NOTIFY_SOCKET is the parent's): the parent's.
        if self.control is not None:
            self.control.report(READY)

    def reload(self) -> bool:
        ok = super().reload()
        if self.control is not None:
            self.control.report(RELOADED)
        return ok

    def stop(self, why: str = "passed on by the parent") -> None:
        """Stop gracefully (drain), unless already stopping (a signal of its own came first)."""
        if not self.running:
            return
        _log.info("shutting down gracefully ({why})", why=why)
        try:
            self.reactor.stop()
        except ReactorNotRunning:  # already on its way down
            pass

    def cut(self) -> None:
        count = self.connections.cut()
        _log.warn("cut {count} connection(s) now (a second stop, passed on by the parent)", count=count)


class _PidLines:
    """Writes JSON lines with the worker's C{pid} as their first member."""

    def __init__(self, out: IO[str], pid: int) -> None:
        self._out = out
        self._prefix = f'{{"pid": {pid}, '

    def write(self, text: str) -> int:
        if text.startswith("{"):
            text = self._prefix + text[1:]
        return self._out.write(text)

    def flush(self) -> None:
        self._out.flush()


def _observer(config: Config, pid: int) -> ILogObserver:
    """The worker's log: to standard output as the parent's, each line marked with the pid."""
    if config.log_format == "json":
        return JSONLinesObserver(cast(IO[str], _PidLines(sys.stdout, pid)))
    text = text_observer(sys.stdout)

    @implementer(ILogObserver)
    def marked(event: Mapping[str, Any]) -> None:
        level = getattr(event.get("log_level"), "name", "-")
        system = event.get("log_system") or f"{event.get('log_namespace', '-')}#{level}"
        text({**event, "log_system": f"{system} worker {pid}"})

    return cast(ILogObserver, marked)


def _start_worker(spec: WorkerSpec, control: _Control, reactor: Any) -> WorkerService:
    """Build and start the worker's proxy on the sockets in C{spec}, configured as its parent."""
    from aoaiproxy.tap import proxy_service

    config = load_config(spec.flags, os.environ)
    globalLogBeginner.beginLoggingTo([_observer(config, os.getpid())], redirectStandardIO=False)
    top, site, _ = proxy_service(config, spec.flags, os.environ, reactor, top=WorkerService)
    assert isinstance(top, WorkerService)
    top.control = control
    for listener in spec.listeners:
        adopted_listener(listener, site.listener(), reactor).setServiceParent(top)
    top.privilegedStartService()
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    return top


def main() -> None:
    """C{python -m aoaiproxy.workers}: one worker, as its parent starts it."""
    from twisted.internet import reactor
    from twisted.internet.stdio import StandardIO

    status = 0

    def start(spec: WorkerSpec, control: _Control) -> WorkerService | None:
        nonlocal status
        try:
            return _start_worker(spec, control, reactor)
        except BaseException as e:
            # One line for what the operator can fix (a config file broken since the parent
            # started), a traceback for a bug.
            if isinstance(e, (SystemExit, ConfigError, TLSFilesError)):
                print(f"aoaiproxy worker {os.getpid()}: {e}", file=sys.stderr, flush=True)
            else:
                traceback.print_exc()
            status = 1
            reactor.stop()
            return None

    def gone() -> None:
        # The parent is gone (or closed our pipes): stop as on SIGTERM.
        if control.worker is not None:
            control.worker.stop("the parent is gone")
        elif reactor.running:
            reactor.stop()

    control = _Control(start, gone)
    # (mypy sees the Windows StandardIO, which has no stdin/stdout arguments.)
    StandardIO(control, stdin=0, stdout=STATUS_FD, reactor=reactor)  # type: ignore[call-arg]
    reactor.run()
    sys.exit(status)


if __name__ == "__main__":
    main()
