"""
The twistd plugin's options and service: C{twistd -n aoaiproxy ...}.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from aoaiproxy.config import OPTIONS, Config, ConfigError, LiveConfig, load_config
from aoaiproxy.options import flag_table, given_flags, parameter_table, repeatable_handlers
from aoaiproxy.service import Reloader

if TYPE_CHECKING:
    from aoaiproxy.forward.intercept import Interceptor
    from aoaiproxy.metrics import Metrics
    from aoaiproxy.service import DaemonService
    from aoaiproxy.site import ProxySite

_log = Logger(namespace="aoaiproxy")


class Options(usage.Options):
    """
    C{twistd aoaiproxy}'s options, generated from the option declarations
    (L{aoaiproxy.config.OPTIONS}): flags, parameters, repeatable options and C{--help}.
    """

    synopsis = "[options]"
    longdesc = (
        "An OpenAI API gateway to Azure OpenAI (or to the OpenAI API), and a forward "
        "proxy (CONNECT and absolute-form requests) for an allowlist of destinations. "
        "Precedence: command line, then environment, then --config file, then defaults."
    )

    optFlags = flag_table(OPTIONS)
    optParameters = parameter_table(OPTIONS)

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        #: The environment the configuration is read from (the process's by default).
        self.environ: Mapping[str, str] = os.environ if environ is None else environ
        self.config: Config | None = None

    def flags(self) -> dict[str, Any]:
        """The options given on the command line, keyed for L{load_config} (a set flag is
        True; an option not given is left out)."""
        return given_flags(OPTIONS, self)

    def postOptions(self) -> None:
        try:
            self.config = load_config(self.flags(), self.environ)
        except ConfigError as e:
            # One clear line (not twistd's whole usage text) and exit status 1.
            raise SystemExit(f"aoaiproxy: {e}") from None


def _install_reactor() -> None:
    """
    Run on L{aoaiproxy.reactor.ProxyReactor}, unless twistd's C{--reactor} chose a reactor
    (twistd installs its default only when it first needs one, after this) or this platform
    has no epoll.
    """
    try:
        from aoaiproxy.reactor import install
    except ImportError:  # no epoll here: Twisted's default reactor
        return
    install()


# The repeatable options' handlers (opt_listen, opt_model_mapper, ...), one per declaration.
for _name, _handler in repeatable_handlers(OPTIONS).items():
    setattr(Options, _name, _handler)


def makeService(options: Options) -> service.IService:
    _install_reactor()
    from twisted.internet import reactor

    from aoaiproxy.capacity import with_backlog
    from aoaiproxy.metrics import metrics_service
    from aoaiproxy.tls import TLSFilesError, listener_service

    assert options.config is not None
    config = options.config
    open_files(config)
    if config.workers > 1:
        # Several processes (SPEC §15): this one binds and supervises, the workers serve.
        from aoaiproxy.workers import supervisor

        if config.intercept:
            # The CA made (or checked) once, here: each worker then loads the same one.
            interceptor(LiveConfig(config), reactor)
        parent = supervisor(config, options.flags(), options.environ, reactor)
        parent.text_log = logs_to_stdout(options.parent)
        return parent
    top, site, metrics = proxy_service(config, options.flags(), options.environ, reactor)
    top.text_log = logs_to_stdout(options.parent)
    for description in config.listen:
        # strports.service semantics; ssl: listeners get reloadable certificates
        # (reloaded on SIGHUP: DaemonService.reloadables()); a backlog of at least 1024.
        try:
            # Each listener refuses connections over the process's cap (--max-connections).
            listener_service(with_backlog(description), site.listener(), reactor).setServiceParent(top)
        except TLSFilesError as e:
            raise SystemExit(f"aoaiproxy: --listen: {e}") from None
    if metrics is not None and config.metrics_listen is not None:
        # /metrics on its own listener, never on the API's (SPEC §14).
        metrics_service(config.metrics_listen, metrics.registry, reactor).setServiceParent(top)
    return top


def logs_to_stdout(twistd: Mapping[str, Any] | None) -> bool:
    """
    Whether twistd (its options: C{twistd}) writes its text log to standard output: in the
    foreground (C{-n}) with no C{--logfile} (or C{--logfile=-}), C{--syslog} or C{--logger}.
    """
    if twistd is None:
        return False
    return (
        bool(twistd.get("nodaemon"))
        and twistd.get("logfile") in (None, "", "-")
        and not twistd.get("syslog")
        and not twistd.get("logger")
    )


def proxy_service(
    config: Config,
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    reactor: Any,
    top: type[DaemonService] | None = None,
) -> tuple[DaemonService, ProxySite, Metrics | None]:
    """
    A whole proxy but its listeners: the daemon's top service (C{top}, L{DaemonService} by
    default) holding the upstream client and the backends, and the site every listener
    serves.  The single process adds its listeners; a worker of several adds the sockets its
    parent gave it.
    """
    from twisted.web.resource import Resource

    from aoaiproxy.forward import Forwarder
    from aoaiproxy.forward.intercept import CARoute
    from aoaiproxy.gateway import Backends
    from aoaiproxy.metrics import Metrics, NullMetrics, Recorder
    from aoaiproxy.resource import ApiResource
    from aoaiproxy.service import DaemonService
    from aoaiproxy.site import ProxySite
    from aoaiproxy.upstream import UpstreamClient

    live = LiveConfig(config)
    # One recorder for the whole proxy (site, resource, backends, forwarder, relays); none
    # without --metrics-listen, so that metrics cost nothing then.  With --workers each worker
    # records into the parent's multiprocess directory, and the parent serves /metrics.
    metrics = Metrics() if config.metrics_listen is not None else None
    recorder: Recorder = metrics if metrics is not None else NullMetrics()
    # The same head limits for upstream responses as for clients' requests (as at start-up).
    upstream = UpstreamClient(reactor, max_headers=config.max_headers, max_head_bytes=config.max_header_size)
    # The backend pool and Entra ID token sources; they follow the live config on SIGHUP.
    backends = Backends(live, reactor, recorder=recorder)
    resource: Resource = ApiResource(live, upstream, reactor, backends=backends, recorder=recorder)
    intercepting = None
    if config.intercept:
        # TLS interception: the CA (loaded, or generated in the state directory), whose
        # certificate the site serves at /aoaiproxy/ca.pem, and which SIGHUP reloads.
        intercepting = interceptor(live, reactor)
        resource = CARoute(intercepting, resource)
    # The tunnel idle timeout is read from the live config per tunnel, so a reload changes it.
    forwarder = Forwarder(reactor, live, upstream=upstream, interceptor=intercepting, recorder=recorder)
    site = ProxySite(resource, live, reactor, forwarder, recorder=recorder)
    # Graceful stop (drain), SIGHUP reload, sd_notify and the log format: aoaiproxy.service.
    reloader = _Reloader(flags, environ, live, interceptor=intercepting)
    daemon = (top or DaemonService)(live, site.connections, reactor, reloader)
    _Closing(upstream).setServiceParent(daemon)
    _Tokens(backends).setServiceParent(daemon)
    return daemon, site, metrics


def interceptor(live: LiveConfig, reactor: Any) -> Interceptor:
    """The interception CA the configuration names, loaded or generated; one line if it cannot be."""
    from aoaiproxy.forward.ca import CAFilesError
    from aoaiproxy.forward.intercept import Interceptor

    try:
        return Interceptor.start(live, reactor.seconds)
    except CAFilesError as e:
        option = "intercept.ca_cert" if live.config.intercept_ca_cert else "--state-dir"
        raise SystemExit(f"aoaiproxy: {option}: {e}") from None


def open_files(config: Config) -> None:
    """Raise the soft open-file limit to the hard one (SPEC §15), and say so in one line."""
    from aoaiproxy.capacity import open_file_limit, raise_open_file_limit

    before, after = raise_open_file_limit()
    target = open_file_limit()
    if after == before and after < target:
        what = f"soft limit {after} (could not raise it to {target})"
    elif after != before:
        what = f"soft limit raised from {before} to {after}"
    else:
        what = f"limit {after}"
    _log.info(
        "open files: {what}; at most {count} client connections per process",
        what=what,
        count=config.max_connections,
    )


@attrs.define
class _Reloader(Reloader):
    """Reloads the interception CA too, after the configuration (which names its files)."""

    interceptor: Interceptor | None = None

    def reload(self) -> bool:
        ok = super().reload()
        if self.interceptor is not None:
            ok = self.interceptor.reload() and ok
        return ok


class _Closing(service.Service):
    def __init__(self, upstream: Any) -> None:
        self._upstream = upstream

    def stopService(self) -> Any:
        super().stopService()
        return self._upstream.close()


class _Tokens(service.Service):
    """
    Starts the Entra ID token sources once the reactor runs (the first token is sought in a
    thread, for up to 10 s, while the daemon already serves; requests that need it wait for
    it meanwhile) and stops them after the drain.
    """

    def __init__(self, backends: Any) -> None:
        self._backends = backends

    def startService(self) -> None:
        super().startService()
        self._backends.start()

    def stopService(self) -> Any:
        super().stopService()
        self._backends.stop()
