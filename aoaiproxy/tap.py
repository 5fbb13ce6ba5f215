"""
The twistd plugin's options and service: C{twistd -n aoaiproxy ...}.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application import service
from twisted.python import usage

from aoaiproxy.config import OPTIONS, Config, ConfigError, LiveConfig, load_config
from aoaiproxy.options import flag_table, given_flags, parameter_table, repeatable_handlers
from aoaiproxy.service import Reloader

if TYPE_CHECKING:
    from aoaiproxy.forward.intercept import Interceptor


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


# The repeatable options' handlers (opt_listen, opt_model_mapper, ...), one per declaration.
for _name, _handler in repeatable_handlers(OPTIONS).items():
    setattr(Options, _name, _handler)


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor
    from twisted.web.resource import Resource

    from aoaiproxy.forward import Forwarder
    from aoaiproxy.forward.ca import CAFilesError
    from aoaiproxy.forward.intercept import CARoute, Interceptor
    from aoaiproxy.metrics import Metrics, NullMetrics, Recorder, metrics_service
    from aoaiproxy.resource import ApiResource
    from aoaiproxy.service import DaemonService
    from aoaiproxy.site import ProxySite
    from aoaiproxy.tls import TLSFilesError, listener_service
    from aoaiproxy.upstream import UpstreamClient

    assert options.config is not None
    config = options.config
    live = LiveConfig(config)
    # One recorder for the whole proxy (site, resource, forwarder, relays); none without
    # --metrics-listen, so that metrics cost nothing then.
    metrics = Metrics() if config.metrics_listen is not None else None
    recorder: Recorder = metrics if metrics is not None else NullMetrics()
    upstream = UpstreamClient(reactor)
    resource: Resource = ApiResource(live, upstream, reactor)
    interceptor = None
    if config.intercept:
        # TLS interception: the CA (loaded, or generated in the state directory), whose
        # certificate the site serves at /aoaiproxy/ca.pem, and which SIGHUP reloads.
        try:
            interceptor = Interceptor.start(live, reactor.seconds)
        except CAFilesError as e:
            option = "intercept.ca_cert" if config.intercept_ca_cert else "--state-dir"
            raise SystemExit(f"aoaiproxy: {option}: {e}") from None
        resource = CARoute(interceptor, resource)
    # The tunnel idle timeout is read from the live config per tunnel, so a reload changes it.
    forwarder = Forwarder(reactor, live, upstream=upstream, interceptor=interceptor, recorder=recorder)
    site = ProxySite(resource, live, reactor, forwarder, recorder=recorder)
    # Graceful stop (drain), SIGHUP reload, sd_notify and the log format: aoaiproxy.service.
    reloader = _Reloader(options.flags(), options.environ, live, interceptor=interceptor)
    top = DaemonService(live, site.connections, reactor, reloader)
    for description in config.listen:
        # strports.service semantics; ssl: listeners get reloadable certificates
        # (reloaded on SIGHUP: DaemonService.reloadables()).
        try:
            # Each listener caps its own open connections (--max-connections).
            listener_service(description, site.listener(), reactor).setServiceParent(top)
        except TLSFilesError as e:
            raise SystemExit(f"aoaiproxy: --listen: {e}") from None
    if metrics is not None and config.metrics_listen is not None:
        # /metrics on its own listener, never on the API's (SPEC §14).
        metrics_service(config.metrics_listen, metrics.registry, reactor).setServiceParent(top)
    _Closing(upstream).setServiceParent(top)
    return top


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
