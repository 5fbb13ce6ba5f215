"""
Native TLS listening with certificates that can be replaced without a restart.

Twisted's own C{ssl:} endpoint reads its files once.  Here an C{ssl:PORT:privateKey=...:
certKey=...[:extraCertChain=...][:dhParameters=...][:interface=...][:backlog=...]} listener
is a plain TCP listener whose factory is wrapped in L{TLSMemoryBIOFactory}, with a connection
creator (L{ReloadableTLS}) whose certificate L{ReloadableTLS.reload} swaps.  The new files are
loaded and checked first, so bad files keep the old certificate serving; connections already
open keep theirs.

The same TLS options on another endpoint type (C{systemd:domain=INET:name=N:privateKey=...:
certKey=...}, C{tcp6:...}, C{unix:...}) wrap that endpoint the same way, which is how TLS is
served on a systemd-activated socket.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.application import service, strports
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.filepath import FilePath
from zope.interface import implementer

#: Endpoint-string parameters that belong to TLS, not to the endpoint underneath.
TLS_PARAMETERS = ("privateKey", "certKey", "extraCertChain", "dhParameters")


class TLSFilesError(Exception):
    """Certificate or key files that cannot be used.  The message names the file, never
    any key material."""


def _read(path: str, what: str) -> bytes:
    try:
        return FilePath(path).getContent()
    except OSError as e:
        raise TLSFilesError(f"cannot read {what} {path}: {e.strerror or type(e).__name__}") from None


def _certificates(path: str, what: str) -> list[x509.Certificate]:
    """The certificates in a PEM file, in order (other blocks, such as a key, are skipped)."""
    pem = _read(path, what)
    try:
        return x509.load_pem_x509_certificates(pem)
    except Exception as e:
        raise TLSFilesError(
            f"{what} {path} holds no PEM certificate that can be loaded ({type(e).__name__})"
        ) from None


def load_certificate_options(
    private_key: str,
    cert: str,
    chain: str | None = None,
    dh_parameters: str | None = None,
) -> ssl.CertificateOptions:
    """
    Read PEM files into server L{CertificateOptions}: C{cert} holds the certificate (and
    possibly its chain after it, as in a C{fullchain.pem}), C{chain} more chain certificates.
    Raises L{TLSFilesError} when a file is missing, malformed, or the key does not match.
    """
    key_pem = _read(private_key, "private key")
    leaf, *extra = _certificates(cert, "certificate")
    if chain is not None:
        extra += _certificates(chain, "certificate chain")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except Exception as e:
        raise TLSFilesError(f"private key {private_key} cannot be loaded ({type(e).__name__})") from None
    dh = None
    if dh_parameters is not None:
        _read(dh_parameters, "DH parameters")
        dh = ssl.DiffieHellmanParameters.fromFile(FilePath(dh_parameters))
    # cryptography objects: pyOpenSSL deprecates its own X509/PKey, which Twisted's hints
    # still name.
    use_key: Any = key
    use_cert: Any = leaf
    use_chain: Any = extra
    try:
        options = ssl.CertificateOptions(
            privateKey=use_key,
            certificate=use_cert,
            extraCertChain=use_chain,
            dhParameters=dh,
            # HTTP/1.1 is what every listener speaks.  Named here so that an ALPN-offering
            # client (curl offers h2,http/1.1) always finds an overlap: with none, Twisted's
            # ALPN callback fails the handshake ("internal error" alert).
            acceptableProtocols=[b"http/1.1"],
        )
        # Build the context now: a key that does not match the certificate, or a bad DH
        # file, fails here rather than on the first connection.
        options.getContext()
    except Exception as e:
        raise TLSFilesError(
            f"private key {private_key} and certificate {cert} cannot be used together ({type(e).__name__})"
        ) from None
    return options


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableTLS:
    """
    The server side of TLS for one listener; L{reload} re-reads its files.

    @ivar options: the L{CertificateOptions} new connections use.
    """

    def __init__(
        self,
        private_key: str,
        cert: str | None = None,
        chain: str | None = None,
        dh_parameters: str | None = None,
    ) -> None:
        self.private_key = private_key
        self.cert = cert or private_key
        self.chain = chain
        self.dh_parameters = dh_parameters
        self.options = self._load()

    def _load(self) -> ssl.CertificateOptions:
        return load_certificate_options(self.private_key, self.cert, self.chain, self.dh_parameters)

    def reload(self) -> None:
        """
        Re-read the files.  New connections get the new certificate; on error
        (L{TLSFilesError}) the old one stays in force.
        """
        self.options = self._load()

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        # CertificateOptions' own: it sets up ALPN for this connection.
        connection: SSL.Connection = self.options.serverConnectionForTLS(tlsProtocol)
        return connection


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """An endpoint that serves TLS over another (TCP, systemd, UNIX) endpoint."""

    def __init__(self, inner: IStreamServerEndpoint, tls: ReloadableTLS) -> None:
        self.inner = inner
        self.tls = tls

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        wrapped = TLSMemoryBIOFactory(self.tls, False, protocolFactory)
        d: Deferred[IListeningPort] = self.inner.listen(wrapped)
        return d


class TLSListenerService(StreamServerEndpointService):  # type: ignore[misc]
    """
    A listener with reloadable TLS.  Like C{strports.service}, a listener that cannot bind
    makes start-up fail (twistd exits non-zero).
    """

    _raiseSynchronously = True

    def __init__(self, endpoint: TLSServerEndpoint, factory: IProtocolFactory) -> None:
        super().__init__(endpoint, factory)
        self.tls = endpoint.tls

    def reload(self) -> None:
        """Re-read this listener's certificate files; raises L{TLSFilesError} if bad."""
        self.tls.reload()


def _split(description: str) -> list[str]:
    """Split an endpoint string on the colons that are not escaped (escapes are kept)."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(description):
        c = description[i]
        if c == "\\" and i + 1 < len(description):
            current.append(description[i : i + 2])
            i += 2
            continue
        if c == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
        i += 1
    parts.append("".join(current))
    return parts


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", r"\1", value)


def split_tls(description: str) -> tuple[str, dict[str, str] | None]:
    """
    Separate the TLS parameters from an endpoint string.  Returns the endpoint underneath
    (C{ssl:} becomes C{tcp:}) and the TLS parameters, or the description unchanged and None
    when it asks for no TLS.
    """
    parts = _split(description)
    kind = parts[0]
    tls: dict[str, str] = {}
    rest: list[str] = []
    for part in parts[1:]:
        name, sep, value = part.partition("=")
        if sep and name in TLS_PARAMETERS:
            tls[name] = _unescape(value)
        elif sep and name == "sslmethod":
            raise TLSFilesError("sslmethod is not supported: TLS 1.2 and later are used")
        else:
            rest.append(part)
    if kind == "ssl":
        tls.setdefault("privateKey", "server.pem")
        return ":".join(["tcp", *rest]), tls
    if not tls:
        return description, None
    return ":".join([kind, *rest]), tls


def listener_service(description: str, factory: IProtocolFactory, reactor: Any) -> service.IService:
    """
    The service listening on one endpoint string: C{strports.service} semantics, with
    reloadable TLS for C{ssl:} strings and for other endpoints given C{privateKey=}.
    Raises L{TLSFilesError} when the TLS files cannot be used.
    """
    inner, params = split_tls(description)
    if params is None:
        listening: service.IService = strports.service(description, factory)
        return listening
    endpoint = TLSServerEndpoint(serverFromString(reactor, inner), reloadable_tls(params))
    return TLSListenerService(endpoint, factory)


def reloadable_tls(params: Mapping[str, str]) -> ReloadableTLS:
    """
    The TLS of a listener from its TLS parameters (as L{split_tls} returns them).  Raises
    L{TLSFilesError} when the files cannot be used.
    """
    return ReloadableTLS(
        params["privateKey"],
        params.get("certKey"),
        params.get("extraCertChain"),
        params.get("dhParameters"),
    )
