"""
The twistd plugin's options and service: C{twistd -n aoaiproxy ...}.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application import service
from twisted.python import usage

from aoaiproxy.config import Config, ConfigError, LiveConfig, load_config


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "An OpenAI API gateway to Azure OpenAI (or to the OpenAI API), and a forward "
        "proxy (CONNECT and absolute-form requests) for an allowlist of destinations. "
        "Precedence: command line, then environment, then --config file, then defaults."
    )

    optFlags = [
        [
            "allow-anonymous",
            None,
            "With a server key and no client keys, let anyone use the server key (open relay).",
        ],
        ["keep-filter-frames", None, "Keep Azure's filter-only SSE frames (dropped by default)."],
    ]
    optParameters = [
        ["mode", None, None, "azure or openai [env AZURE_OPENAI_PROXY_MODE; default azure]"],
        [
            "endpoint",
            None,
            None,
            "Upstream base URL: https://RESOURCE.openai.azure.com in azure mode [env "
            "AZURE_OPENAI_ENDPOINT; required in azure mode; default https://api.openai.com in "
            "openai mode]",
        ],
        [
            "api-version",
            None,
            None,
            "Azure api-version [env AZURE_OPENAI_APIVERSION or AZURE_OPENAI_API_VER; default 2024-10-21]",
        ],
        [
            "token",
            None,
            None,
            "Server key sent upstream instead of the client's [env AZURE_OPENAI_TOKEN; "
            "default none]. Prefer --token-file.",
        ],
        ["token-file", None, None, "File holding the server key [default none]"],
        [
            "client-keys",
            None,
            None,
            "File of client keys allowed to use the server key, one per line "
            "[env AOAIPROXY_CLIENT_KEYS; default none]",
        ],
        [
            "forward-users",
            None,
            None,
            "File of user:password lines for proxy authentication "
            "[env AOAIPROXY_FORWARD_USERS; default none: no proxy authentication]",
        ],
        ["config", None, None, "TOML config file [env AOAIPROXY_CONFIG; default none]"],
        ["max-body", None, None, "Largest request body in bytes [default 67108864 (64 MiB)]"],
        ["log-format", None, None, "text or json [default text]"],
        [
            "drain-timeout",
            None,
            None,
            "Seconds to let requests in flight finish on SIGTERM [default 30]",
        ],
        ["connect-timeout", None, None, "Seconds to connect upstream [default 10]"],
        [
            "upstream-timeout",
            None,
            None,
            "Longest wait for upstream response headers, and longest silence inside a body, "
            "in seconds [default 600]",
        ],
        [
            "max-request-line",
            None,
            None,
            "Longest request line in bytes; longer gets 414 [default 8192]",
        ],
        [
            "max-header-size",
            None,
            None,
            "Longest request head (request line and headers) in bytes; longer gets 431 [default 16384]",
        ],
        ["max-headers", None, None, "Most header fields in a request; more gets 431 [default 100]"],
        [
            "header-timeout",
            None,
            None,
            "Seconds a client may take to send a request head; slower gets 408 and is "
            "disconnected [default 30]",
        ],
        [
            "idle-timeout",
            None,
            None,
            "Seconds a client connection may stay silent between requests (keep-alive) or "
            "inside a request body before it is closed [default 60]",
        ],
        [
            "tunnel-idle-timeout",
            None,
            None,
            "Seconds a CONNECT tunnel may stay silent both ways before it is closed [default 300]",
        ],
        [
            "max-connections",
            None,
            None,
            "Most open client connections per listener; more get 503 and are closed [default 1024]",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["model_mapper"] = []
        self["forward_allow"] = []
        self.config: Config | None = None

    def opt_listen(self, value: str) -> None:
        """Listen on this endpoint (repeatable): tcp:8080:interface=127.0.0.1,
        ssl:8443:privateKey=key.pem:certKey=cert.pem, unix:PATH, systemd:domain=INET:name=N,
        or host:port [env AZURE_OPENAI_PROXY_ADDRESS, comma-separated; default tcp:8080]"""
        self["listen"].append(value)

    def opt_model_mapper(self, value: str) -> None:
        """model=deployment pairs, comma-separated (repeatable); extend and override the
        defaults (gpt-3.5-turbo=gpt-35-turbo, ...) [env AZURE_OPENAI_MODEL_MAPPER]"""
        self["model_mapper"].append(value)

    def opt_forward_allow(self, value: str) -> None:
        """Destination the forward proxy may reach, host:port or *.suffix:port (repeatable;
        'none' turns forwarding off) [env AOAIPROXY_FORWARD_ALLOW, comma-separated; default
        api.openai.com:443 and the Azure endpoint's host:443]"""
        self["forward_allow"].append(value)

    for _opt in (opt_listen, opt_model_mapper, opt_forward_allow):
        _opt.__doc__ = " ".join((_opt.__doc__ or "").split())

    def flags(self) -> dict[str, Any]:
        """The options given on the command line, keyed for L{load_config} (an option not
        given is None, an empty list, or 0 for a flag, and is left out)."""
        return {key.replace("-", "_"): value for key, value in self.items() if value not in (None, [], 0)}

    def postOptions(self) -> None:
        try:
            self.config = load_config(self.flags(), os.environ)
        except ConfigError as e:
            # One clear line (not twistd's whole usage text) and exit status 1.
            raise SystemExit(f"aoaiproxy: {e}") from None


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    from aoaiproxy.forward import Forwarder
    from aoaiproxy.resource import ApiResource
    from aoaiproxy.service import DaemonService, Reloader
    from aoaiproxy.site import ProxySite
    from aoaiproxy.tls import TLSFilesError, listener_service
    from aoaiproxy.upstream import UpstreamClient

    assert options.config is not None
    config = options.config
    live = LiveConfig(config)
    upstream = UpstreamClient(reactor)
    resource = ApiResource(live, upstream, reactor)
    # The tunnel idle timeout is read from the live config per tunnel, so a reload changes it.
    forwarder = Forwarder(reactor, live, upstream=upstream)
    site = ProxySite(resource, live, reactor, forwarder)
    # Graceful stop (drain), SIGHUP reload, sd_notify and the log format: aoaiproxy.service.
    reloader = Reloader(options.flags(), os.environ, live)
    top = DaemonService(live, site.connections, reactor, reloader)
    for description in config.listen:
        # strports.service semantics; ssl: listeners get reloadable certificates
        # (reloaded on SIGHUP: DaemonService.reloadables()).
        try:
            # Each listener caps its own open connections (--max-connections).
            listener_service(description, site.listener(), reactor).setServiceParent(top)
        except TLSFilesError as e:
            raise SystemExit(f"aoaiproxy: --listen: {e}") from None
    _Closing(upstream).setServiceParent(top)
    return top


class _Closing(service.Service):
    def __init__(self, upstream: Any) -> None:
        self._upstream = upstream

    def stopService(self) -> Any:
        super().stopService()
        return self._upstream.close()
