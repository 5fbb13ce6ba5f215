"""
Running as a system service: graceful stop (drain), reload on C{SIGHUP}, and C{sd_notify}.

- The site's open connections (L{aoaiproxy.site.Connections}) are drained on stop: idle
  keep-alive connections close at once, the ones with a request in flight (a stream, a
  tunnel) finish and close, and whatever is still open at the deadline is cut, so that a
  cut stream is visibly truncated.
- L{Reloader} re-reads the configuration (config file, key files, users file) and TLS
  certificates, and swaps L{LiveConfig.config} whole; a bad configuration is logged in one
  line and the old one stays in force.
- L{DaemonService} is the daemon's top service: it stops the listeners first, then drains,
  then stops everything else; it installs the C{SIGTERM}/C{SIGINT}/C{SIGHUP} handlers once
  the reactor runs, tells systemd C{READY=1} (C{Type=notify}), and with C{--log-format json}
  makes twistd log JSON lines (and its text lines, on standard output, through a cheaper
  observer: L{DaemonService.text_log}).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import attrs
from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized

from aoaiproxy.config import RESTART_ONLY, Config, ConfigError, LiveConfig, load_config
from aoaiproxy.log import json_observer, log_startup, text_observer

__all__ = ["DaemonService", "Drainable", "Reloader", "sd_notify"]

_log = Logger(namespace="aoaiproxy")


def sd_notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """
    Send C{state} (C{READY=1}, C{STOPPING=1}, C{RELOADING=1}, C{STATUS=...}) to systemd's
    notification socket, if C{$NOTIFY_SOCKET} is set.  A leading C{@} means the abstract
    namespace.  Returns whether a datagram was sent; never raises.
    """
    path = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not path or path[0] not in "/@":
        return False
    address = "\0" + path[1:] if path[0] == "@" else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode())
    except OSError as e:
        _log.warn("sd_notify {state} failed: {reason}", state=state, reason=e.strerror or str(e))
        return False
    return True


def reloading_state() -> str:
    """
    The C{sd_notify} state that starts a reload: C{RELOADING=1} with the C{CLOCK_MONOTONIC}
    time in microseconds (C{MONOTONIC_USEC=}), which systemd 253 and later expect with it
    (C{Type=notify-reload}; sd_notify(3)).
    """
    return f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


class Drainable(Protocol):
    """The site's open connections, as the daemon stops them (L{aoaiproxy.site.Connections})."""

    def drain(self, reactor: Any, timeout: float) -> Deferred[int]: ...

    def cut(self) -> int: ...


def _shown(value: object) -> str:
    return ", ".join(value) if isinstance(value, tuple) else str(value)


class Reloadable(Protocol):
    """Something with certificates or files to re-read on SIGHUP (a TLS listener)."""

    def reload(self) -> object: ...


@attrs.define
class Reloader:
    """
    Re-reads the configuration as at start-up (same flags, the given environment) and swaps
    it into C{live}; reloads each of C{reloadables()} (TLS listeners) too.  A failure keeps
    what is in force and is logged in one line (a L{ConfigError} never holds a key).
    """

    flags: Mapping[str, Any]
    environ: Mapping[str, str]
    live: LiveConfig
    reloadables: Callable[[], Iterable[Reloadable]] = lambda: ()
    log: Logger = attrs.field(factory=lambda: Logger(namespace="aoaiproxy.reload"))

    def reload(self) -> bool:
        """Reload; returns whether the new configuration (and every reloadable) is in force."""
        # Certificates are files of their own: renewed ones are taken even if the config is bad.
        ok = self._reload_others()
        old = self.live.config
        try:
            new = load_config(self.flags, self.environ)
        except ConfigError as e:
            self.log.error("reload failed, keeping the running configuration: {error}", error=str(e))
            return False
        except Exception as e:  # an unexpected bug must not take the daemon down
            self.log.failure(
                "reload failed, keeping the running configuration: {error}", error=type(e).__name__
            )
            return False
        for name in RESTART_ONLY:
            if getattr(new, name) != getattr(old, name):
                self.log.warn(
                    "{name} changed from {old} to {new}: it changes only on restart",
                    name=name,
                    old=_shown(getattr(old, name)),
                    new=_shown(getattr(new, name)),
                )
                new = attrs.evolve(new, **{name: getattr(old, name)})
        self.live.config = new
        self.log.info("configuration reloaded: {changes}", changes=describe_changes(old, new))
        return ok

    def _reload_others(self) -> bool:
        ok = True
        for item in self.reloadables():
            try:
                item.reload()
            except Exception as e:
                ok = False
                self.log.error(
                    "reloading {item} failed, it keeps its old certificate: {error}",
                    item=type(item).__name__,
                    error=str(e) or type(e).__name__,
                )
        return ok


def describe_changes(old: Config, new: Config) -> str:
    """Which settings a reload changed, by name only (never a key)."""
    changed = [
        field.name for field in attrs.fields(Config) if getattr(old, field.name) != getattr(new, field.name)
    ]
    return ", ".join(changed) if changed else "no changes"


class DaemonService(service.MultiService):
    """
    The daemon's top service.

    On stop: stop the listeners (so new connections are refused), drain the site's
    connections for C{drain_timeout} seconds, then stop the other children (closing the
    upstream pool).  twistd waits for the returned Deferred before the reactor stops.

    Hooks for the processes of C{--workers} (L{aoaiproxy.workers}): L{start_serving},
    L{serving}, L{cut_now} and L{announce}.
    """

    #: Whether start-up logs the configuration (a worker of several leaves it to its parent).
    announce = True

    #: Whether twistd would write its text log to standard output (C{-n} without C{--logfile},
    #: C{--syslog} or C{--logger}): then the same lines are written by a cheaper observer
    #: (L{aoaiproxy.log.text_observer}).  Set by L{aoaiproxy.tap.makeService}.
    text_log = False

    def __init__(
        self,
        live: LiveConfig,
        connections: Drainable,
        reactor: Any,
        reloader: Reloader,
    ) -> None:
        super().__init__()
        self.live = live
        self.connections = connections
        self.reactor = reactor
        self.reloader = reloader
        self._stopping: Deferred[Any] | None = None
        reloader.reloadables = self.reloadables

    def reloadables(self) -> list[Reloadable]:
        """The listeners with certificates to reload on SIGHUP (those with C{reload()})."""
        return [s for s in self._listeners() if callable(getattr(s, "reload", None))]

    # -- twistd integration -----------------------------------------------------------------

    def setServiceParent(self, parent: Any) -> None:
        # twistd hands us its Application: with --log-format json, its log observer (which
        # twistd looks up on the Application) writes JSON lines, twistd's own lines included;
        # text lines to standard output are written by a cheaper observer than twistd's.
        if isinstance(parent, Componentized):
            if self.live.config.log_format == "json":
                parent.setComponent(ILogObserver, json_observer())
            elif self.text_log:
                parent.setComponent(ILogObserver, text_observer())
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        # The listeners bind here: one that cannot stops start-up with one line naming the
        # option (SPEC §2), not twistd's traceback.
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise SystemExit(f"aoaiproxy: --listen: {e}") from None

    def startService(self) -> None:
        super().startService()
        if self.announce:
            log_startup(self.live.config)
        self.reactor.callWhenRunning(self._running)

    def _running(self) -> None:
        self._install_signal_handlers()
        self.start_serving().addCallback(lambda _: self.serving())

    def start_serving(self) -> Deferred[None]:
        """Fires once the daemon serves: at once, its listeners are bound (a parent of
        workers waits for them)."""
        return succeed(None)

    def serving(self) -> None:
        """The daemon serves: tell systemd C{READY=1}."""
        if sd_notify("READY=1\nSTATUS=serving"):
            _log.info("told systemd READY=1")

    def _install_signal_handlers(self) -> None:
        def on_signal(number: int, frame: Any) -> None:
            self.reactor.callFromThread(self._signalled, number)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_signal)

    def _signalled(self, number: int) -> None:
        name = signal.Signals(number).name
        if number == signal.SIGHUP:
            _log.info("{signal}: reloading the configuration", signal=name)
            self.reload()
        elif self._stopping is None:
            _log.info("{signal}: shutting down gracefully", signal=name)
            self.reactor.stop()
        else:
            self.cut_now(name)

    def cut_now(self, signal_name: str) -> None:
        """A second stop signal during the drain: cut every connection still open."""
        count = self.connections.cut()
        _log.warn("{signal} again: cut {count} connection(s) now", signal=signal_name, count=count)

    def reload(self) -> bool:
        sd_notify(reloading_state())
        try:
            return self.reloader.reload()
        finally:
            sd_notify("READY=1")

    # -- graceful stop ------------------------------------------------------------------------

    def _listeners(self) -> list[Any]:
        return [s for s in self if isinstance(s, StreamServerEndpointService)]

    def stopService(self) -> Deferred[Any]:
        if self._stopping is not None:
            return self._stopping
        sd_notify("STOPPING=1")
        service.Service.stopService(self)
        listeners = self._listeners()
        others = [s for s in reversed(list(self)) if s not in listeners]
        stopped = DeferredList([maybeDeferred(s.stopService) for s in listeners])
        _log.info("stopped listening")
        d: Deferred[Any] = self.connections.drain(self.reactor, self.live.config.drain_timeout)
        d.addCallback(lambda _: stopped)
        d.addCallback(lambda _: DeferredList([maybeDeferred(s.stopService) for s in others]))
        self._stopping = d
        return d
