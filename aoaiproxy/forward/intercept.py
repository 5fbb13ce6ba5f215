"""
TLS interception (SPEC §13): which CONNECT destinations are intercepted, the CA in force with
the leaf certificates it signs for them, and the route that publishes its certificate.

With C{--intercept}, a C{CONNECT api.openai.com:443} (or to a host of C{[intercept] hosts}) is
answered 200 and the connection is handed to a TLS server (L{Interceptor.creator}: a leaf
certificate for that host) wrapping the same site that serves origin-form API requests
(L{aoaiproxy.forward.handlers.Forwarder}).  The host is never dialled.

L{Interceptor} keeps one leaf per host, made on first use and replaced when less than
L{aoaiproxy.forward.ca.LEAF_RENEW_BEFORE} of it is left.  L{Interceptor.reload} (on
C{SIGHUP}) re-reads the CA files if they changed: new leaves come from the new CA, and a bad
file keeps the old CA in force (one line in the log).  L{CARoute} serves the CA certificate at
C{GET /aoaiproxy/ca.pem}, to anyone (it is public), on every listener.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import Any

from twisted.internet import ssl
from twisted.logger import Logger
from twisted.web.http import Request
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from aoaiproxy import errors
from aoaiproxy.config import Config, LiveConfig
from aoaiproxy.forward.ca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    Authority,
    CAFilesError,
    Leaf,
    files_digest,
    in_state_dir,
    load,
)
from aoaiproxy.forward.policy import intercepted
from aoaiproxy.resource import write_error

__all__ = ["CA_PATH", "CARoute", "Interceptor", "authority_for", "ca_paths", "intercepted"]

#: Where the CA certificate is served.
CA_PATH = b"/aoaiproxy/ca.pem"

_log = Logger(namespace="aoaiproxy.intercept")


def ca_paths(config: Config) -> tuple[str, str]:
    """The files of the CA C{config} names: the certificate's and the key's."""
    if config.intercept_ca_cert is not None and config.intercept_ca_key is not None:
        return config.intercept_ca_cert, config.intercept_ca_key
    return os.path.join(config.state_dir, CA_CERT_FILE), os.path.join(config.state_dir, CA_KEY_FILE)


def authority_for(config: Config, now: datetime.datetime) -> tuple[Authority, bool]:
    """
    The CA C{config} names: C{[intercept] ca_cert}/C{ca_key}, else the one kept in the state
    directory (generated there if there is none yet).  Returns it and whether it was generated
    now; raises L{CAFilesError}.
    """
    if config.intercept_ca_cert is not None and config.intercept_ca_key is not None:
        return load(config.intercept_ca_cert, config.intercept_ca_key), False
    return in_state_dir(config.state_dir, now)


def _server_options(leaf: Leaf) -> ssl.CertificateOptions:
    # cryptography objects: pyOpenSSL deprecates its own, which Twisted's hints still name.
    key: Any = leaf.key
    cert: Any = leaf.cert
    # TLS 1.2 and later (CertificateOptions' default minimum); HTTP/1.1 only, so that a client
    # offering h2 and http/1.1 (curl, browsers) settles on the protocol the channel speaks.
    return ssl.CertificateOptions(privateKey=key, certificate=cert, acceptableProtocols=[b"http/1.1"])


class Interceptor:
    """
    The CA in force and the leaf certificates it signed, for one daemon.

    @param clock: the time, in seconds since the epoch (C{reactor.seconds}).
    @ivar authority: the CA in force.
    """

    def __init__(self, authority: Authority, live: LiveConfig, clock: Callable[[], float]) -> None:
        self.authority = authority
        self._live = live
        self._clock = clock
        self._leaves: dict[str, tuple[Leaf, ssl.CertificateOptions]] = {}

    @classmethod
    def start(cls, live: LiveConfig, clock: Callable[[], float]) -> Interceptor:
        """
        The CA the configuration names, loaded or generated, with its path logged.  Raises
        L{CAFilesError}.
        """
        authority, generated = authority_for(live.config, _utc(clock()))
        _log.info(
            "interception CA {how} {path}: clients trust it to reach intercepted hosts through "
            "this proxy (served at GET {url})",
            how="generated in" if generated else "from",
            path=authority.cert_path,
            url=CA_PATH.decode(),
        )
        return cls(authority, live, clock)

    def creator(self, host: str) -> ssl.CertificateOptions:
        """The TLS server options for C{host}: its leaf certificate, made or renewed if due."""
        now = _utc(self._clock())
        cached = self._leaves.get(host)
        if cached is None or cached[0].due(now):
            leaf = self.authority.issue(host, now)
            cached = (leaf, _server_options(leaf))
            self._leaves[host] = cached
        return cached[1]

    def leaf(self, host: str) -> Leaf:
        """C{host}'s leaf certificate as L{creator} serves it now."""
        self.creator(host)
        return self._leaves[host][0]

    def reload(self) -> bool:
        """
        Re-read the CA the configuration in force names, if its files (or their paths) changed:
        leaves made from then on are signed by the new CA.  A CA that cannot be loaded keeps
        the old one in force, with one line in the log.  Returns whether the CA in force is
        the one configured.
        """
        config = self._live.config
        old = self.authority
        paths = ca_paths(config)
        if paths == (old.cert_path, old.key_path) and files_digest(*paths) == old.digest:
            return True
        try:
            new, generated = authority_for(config, _utc(self._clock()))
        except CAFilesError as e:
            _log.error(
                "the interception CA was not reloaded, the old one stays in force: {error}", error=str(e)
            )
            return False
        self.authority = new
        self._leaves.clear()
        _log.info(
            "interception CA {how} {path}: new leaf certificates are signed by it",
            how="generated in" if generated else "reloaded from",
            path=new.cert_path,
        )
        return True


def _utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)


class CARoute(Resource):
    """
    The site's root resource with interception on: C{GET} (and C{HEAD})
    C{/aoaiproxy/ca.pem} answers the CA certificate in force, no key needed; every other
    request (a CORS preflight to that path too) is the API resource's.
    """

    isLeaf = True

    def __init__(self, interceptor: Interceptor, api: Resource) -> None:
        super().__init__()
        self._interceptor = interceptor
        self._api = api

    def render(self, request: Request) -> bytes | int:
        if request.path != CA_PATH or request.method == b"OPTIONS":
            served: bytes | int = self._api.render(request)
            return served
        request.setHeader(b"Access-Control-Allow-Origin", b"*")
        request.setHeader(b"Server", b"aoaiproxy")
        if request.method not in (b"GET", b"HEAD"):
            write_error(
                request,
                errors.method_not_allowed(
                    request.method.decode("latin-1"), CA_PATH.decode(), ("GET", "HEAD")
                ),
            )
            return NOT_DONE_YET
        request.setHeader(b"Content-Type", b"application/x-pem-file")
        # It changes when the CA is reloaded.
        request.setHeader(b"Cache-Control", b"no-cache")
        return self._interceptor.authority.pem
