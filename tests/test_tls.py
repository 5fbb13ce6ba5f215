"""
Native TLS listening (aoaiproxy.tls): one HTTPS listener serves the API (/healthz) and the
forward proxy (CONNECT), and its certificate can be replaced without a restart; bad new files
keep the old certificate serving.  Certificates are made at test time.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from cryptography import x509
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.http import Request

from aoaiproxy.config import LiveConfig, load_config
from aoaiproxy.forward import Forwarder
from aoaiproxy.resource import ApiResource
from aoaiproxy.site import ProxyRequest, ProxySite
from aoaiproxy.tls import (
    ReloadableTLS,
    TLSFilesError,
    TLSListenerService,
    TLSServerEndpoint,
    listener_service,
    split_tls,
)
from aoaiproxy.upstream import UpstreamClient

from .certs import CA, make_ca
from .conftest import free_port, get_reactor
from .rawnet import response_done

# -- blocking TLS clients (run in threads) --------------------------------------------------


def _tls_socket(port: int, cafile: Path) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(cafile))
    context.set_alpn_protocols(["h2", "http/1.1"])  # as curl and browsers offer
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def _read_until(sock: ssl.SSLSocket, predicate: Callable[[bytes], bool], limit: int = 1 << 20) -> bytes:
    data = b""
    while not predicate(data) and len(data) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def peer_serial(port: int, cafile: Path) -> int:
    with _tls_socket(port, cafile) as sock:
        der = sock.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number


def get(sock: ssl.SSLSocket, path: str) -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return _read_until(sock, response_done)


def https_get(port: int, cafile: Path, path: str) -> bytes:
    with _tls_socket(port, cafile) as sock:
        return get(sock, path)


def tunnel_exchange(port: int, cafile: Path, target: str, payload: bytes) -> bytes:
    """CONNECT through the TLS proxy, send C{payload} right after the head, read it echoed."""
    with _tls_socket(port, cafile) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode() + payload)
        return _read_until(sock, lambda d: d.endswith(payload))


class InnerTLS:
    """
    A TLS client over a socket that is already connected (plainly, or itself over TLS: TLS
    inside TLS), driven through memory BIOs, as a client does after its CONNECT.
    """

    def __init__(self, sock: socket.socket, cafile: Path, hostname: str) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        context = ssl.create_default_context(cafile=str(cafile))
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=hostname)

    def hello(self) -> bytes:
        """The ClientHello, to send (after the CONNECT head, or with it)."""
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return self.outgoing.read()

    def handshake(self, received: bytes) -> None:
        """Complete the handshake, C{received} being the server's first bytes."""
        self.incoming.write(received)
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
        self._flush()

    def request(self, raw: bytes) -> bytes:
        self.tls.write(raw)
        self._flush()
        data = b""
        while not response_done(data):
            try:
                data += self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._fill()
        return data

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("the proxy closed the connection")
        self.incoming.write(chunk)


#: The CONNECT target L{Intercepting} serves itself.
INTERCEPTED = "intercept.test:443"


def intercepted_exchange(sock: socket.socket, cafile: Path) -> tuple[bytes, list[bytes]]:
    """
    CONNECT to L{INTERCEPTED} with the ClientHello in the same write, then two requests over
    TLS inside; returns the CONNECT answer's head and the two responses.
    """
    inner = InnerTLS(sock, cafile, INTERCEPTED.rpartition(":")[0])
    sock.sendall(f"CONNECT {INTERCEPTED} HTTP/1.1\r\nHost: {INTERCEPTED}\r\n\r\n".encode() + inner.hello())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(data)
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    inner.handshake(rest)
    health = b"GET /healthz HTTP/1.1\r\nHost: api.openai.com\r\n\r\n"
    return head, [inner.request(health), inner.request(health)]


class Intercepting(Forwarder):
    """
    A forwarder that serves C{CONNECT intercept.test:443} itself, as TLS interception will:
    it answers 200, hands the connection to a TLS server with a certificate for that host
    (C{TLSMemoryBIOFactory(creator, False, site)}), and the same site serves the requests
    inside.  Any other proxy request is the forwarder's as usual.
    """

    site: ProxySite
    creator: ReloadableTLS

    def handle(self, request: Request) -> bool:
        if request.method == b"CONNECT" and request.uri == INTERCEPTED.encode():
            assert isinstance(request, ProxyRequest)
            tls = TLSMemoryBIOFactory(self.creator, False, self.site)
            request.establish(tls.buildProtocol(request.getClientAddress()))
            return True
        return super().handle(request)


# -- fixtures ---------------------------------------------------------------------------------


class Echo(Protocol):
    closed: list[Deferred[None]] = []

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: object = None) -> None:
        waiting, Echo.closed = Echo.closed, []
        for d in waiting:
            d.callback(None)


@attrs.define
class TLSProxy:
    port: IListeningPort
    plain: IListeningPort
    tls: ReloadableTLS
    ca: CA
    cafile: Path
    directory: Path
    echo_port: int
    forwarder: Forwarder
    site: ProxySite

    @property
    def number(self) -> int:
        return int(self.port.getHost().port)


@pytest_twisted.async_yield_fixture
async def tls_proxy(tmp_path: Path) -> AsyncIterator[TLSProxy]:
    reactor = get_reactor()
    ca = make_ca()
    cafile = ca.write(tmp_path / "ca.pem")
    key, cert = ca.issue(tmp_path, "server1", serial=1001)
    echo = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
    echo_port = echo.getHost().port
    live = LiveConfig(
        load_config(
            {"endpoint": "https://example.openai.azure.com", "forward_allow": [f"127.0.0.1:{echo_port}"]},
            {},
        )
    )
    upstream = UpstreamClient(reactor)
    forwarder = Intercepting(reactor, live, upstream=upstream)
    site = ProxySite(ApiResource(live, upstream, reactor), live, reactor, forwarder)
    forwarder.site = site
    intercept_key, intercept_cert = ca.issue(tmp_path, "intercept", serial=4004, hosts=("intercept.test",))
    forwarder.creator = ReloadableTLS(str(intercept_key), str(intercept_cert))
    tls = ReloadableTLS(str(key), str(cert))
    endpoint = TLSServerEndpoint(serverFromString(reactor, "tcp:0:interface=127.0.0.1"), tls)
    # As tap.py listens: the listener's factory offers no ALPN protocols of its own, and the
    # handshake must still succeed with a client that offers h2.
    port = await endpoint.listen(site.listener())
    plain = reactor.listenTCP(0, site.listener(), interface="127.0.0.1")
    yield TLSProxy(port, plain, tls, ca, cafile, tmp_path, echo_port, forwarder, site)
    forwarder.close()
    await port.stopListening()
    await plain.stopListening()
    await echo.stopListening()
    await upstream.close()


# -- tests ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_https_listener_serves_api_and_connect(tls_proxy: TLSProxy) -> None:
    health = await deferToThread(https_get, tls_proxy.number, tls_proxy.cafile, "/healthz")
    assert health.startswith(b"HTTP/1.1 200 ")
    assert health.endswith(b'{"status": "ok"}')
    echoed = await deferToThread(
        tunnel_exchange,
        tls_proxy.number,
        tls_proxy.cafile,
        f"127.0.0.1:{tls_proxy.echo_port}",
        b"through a TLS proxy",
    )
    assert echoed == b"HTTP/1.1 200 Connection Established\r\n\r\nthrough a TLS proxy"


@pytest_twisted.ensureDeferred
async def test_tls_client_close_ends_the_tunnel(tls_proxy: TLSProxy) -> None:
    """A TLS client that closes (close_notify, then FIN) closes the tunnel and its target."""
    target_closed: Deferred[None] = Deferred()
    Echo.closed.append(target_closed)
    await deferToThread(
        tunnel_exchange, tls_proxy.number, tls_proxy.cafile, f"127.0.0.1:{tls_proxy.echo_port}", b"bye"
    )
    await target_closed.addTimeout(10, get_reactor())
    assert not tls_proxy.forwarder.tunnels


@pytest.mark.parametrize("outer", ["tcp", "tls"])
@pytest_twisted.ensureDeferred
async def test_connection_handed_to_tls_serves_http_inside(tls_proxy: TLSProxy, outer: str) -> None:
    """
    The mechanism of TLS interception: a connection handed over after CONNECT to a TLS
    server wrapping the same site serves HTTP inside TLS, through a plain listener and
    through a TLS one (TLS inside TLS).  The ClientHello rides with the CONNECT head.
    """

    def exchange() -> tuple[bytes, list[bytes]]:
        if outer == "tls":
            sock: socket.socket = _tls_socket(tls_proxy.number, tls_proxy.cafile)
        else:
            sock = socket.create_connection(("127.0.0.1", tls_proxy.plain.getHost().port), timeout=10)
        with sock:
            return intercepted_exchange(sock, tls_proxy.cafile)

    head, responses = await deferToThread(exchange)
    assert head == b"HTTP/1.1 200 Connection Established"
    for response in responses:  # keep-alive inside the TLS
        assert response.startswith(b"HTTP/1.1 200 ")
        assert response.endswith(b'{"status": "ok"}')
    # The connection handed over and the one inside it both leave the site's count.
    await tls_proxy.site.connections.wait_closed().addTimeout(10, get_reactor())


@pytest_twisted.ensureDeferred
async def test_reload_serves_new_certificate_to_new_connections(tls_proxy: TLSProxy) -> None:
    assert await deferToThread(peer_serial, tls_proxy.number, tls_proxy.cafile) == 1001
    # A connection open across the reload keeps working.
    old = await deferToThread(_tls_socket, tls_proxy.number, tls_proxy.cafile)
    try:
        assert (await deferToThread(get, old, "/healthz")).startswith(b"HTTP/1.1 200 ")
        key, cert = tls_proxy.ca.issue(tls_proxy.directory, "server2", serial=2002)
        # Replace the files in place, as certbot or an operator does, then reload.
        (tls_proxy.directory / "server1.key").write_bytes(key.read_bytes())
        (tls_proxy.directory / "server1.pem").write_bytes(cert.read_bytes())
        tls_proxy.tls.reload()
        assert await deferToThread(peer_serial, tls_proxy.number, tls_proxy.cafile) == 2002
        assert (await deferToThread(get, old, "/healthz")).startswith(b"HTTP/1.1 200 ")
    finally:
        old.close()


@pytest.mark.parametrize("breakage", ["garbage-cert", "garbage-key", "mismatch", "missing", "empty"])
@pytest_twisted.ensureDeferred
async def test_reload_with_bad_files_keeps_old_certificate(tls_proxy: TLSProxy, breakage: str) -> None:
    directory = tls_proxy.directory
    key_path, cert_path = directory / "server1.key", directory / "server1.pem"
    if breakage == "garbage-cert":
        cert_path.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    elif breakage == "garbage-key":
        key_path.write_bytes(b"this is no key")
    elif breakage == "mismatch":
        other_key, _ = tls_proxy.ca.issue(directory, "other", serial=3003)
        key_path.write_bytes(other_key.read_bytes())
    elif breakage == "missing":
        cert_path.unlink()
    else:
        cert_path.write_bytes(b"")
    with pytest.raises(TLSFilesError) as info:
        tls_proxy.tls.reload()
    assert "PRIVATE KEY" not in str(info.value)
    assert await deferToThread(peer_serial, tls_proxy.number, tls_proxy.cafile) == 1001
    health = await deferToThread(https_get, tls_proxy.number, tls_proxy.cafile, "/healthz")
    assert health.startswith(b"HTTP/1.1 200 ")


def test_fullchain_and_extra_chain(tmp_path: Path) -> None:
    """A certKey holding the chain after the certificate, extraCertChain, and a file holding
    the key and the certificates all load."""
    ca = make_ca()
    key, cert = ca.issue(tmp_path, "leaf", serial=7)
    fullchain = tmp_path / "fullchain.pem"
    fullchain.write_bytes(cert.read_bytes() + ca.pem)
    ReloadableTLS(str(key), str(fullchain))
    ReloadableTLS(str(key), str(cert), str(ca.write(tmp_path / "chain.pem")))
    with pytest.raises(TLSFilesError) as info:
        ReloadableTLS(str(key), str(cert), str(key))  # a "chain" without certificates
    assert str(info.value).startswith(f"certificate chain {key} ")
    assert "PRIVATE KEY" not in str(info.value)
    # One file holding key and certificate (ssl:PORT:privateKey=server.pem, no certKey).
    combined = tmp_path / "server.pem"
    combined.write_bytes(key.read_bytes() + fullchain.read_bytes())
    ReloadableTLS(str(combined))


@pytest.mark.parametrize(
    ("description", "inner", "params"),
    [
        (
            "ssl:8443:privateKey=k.pem:certKey=c.pem",
            "tcp:8443",
            {"privateKey": "k.pem", "certKey": "c.pem"},
        ),
        (
            "ssl:8443:interface=127.0.0.1:privateKey=/etc/a\\:b/k.pem:extraCertChain=ch.pem",
            "tcp:8443:interface=127.0.0.1",
            {"privateKey": "/etc/a:b/k.pem", "extraCertChain": "ch.pem"},
        ),
        ("ssl:8443", "tcp:8443", {"privateKey": "server.pem"}),
        (
            "systemd:domain=INET:name=aoaiproxy:privateKey=k.pem:certKey=c.pem",
            "systemd:domain=INET:name=aoaiproxy",
            {"privateKey": "k.pem", "certKey": "c.pem"},
        ),
        ("tcp:8080:interface=\\:\\:1", "tcp:8080:interface=\\:\\:1", None),
        ("unix:/run/a.sock", "unix:/run/a.sock", None),
    ],
)
def test_split_tls(description: str, inner: str, params: dict[str, str] | None) -> None:
    assert split_tls(description) == (inner, params)


def test_listener_service_plain_is_strports(tmp_path: Path) -> None:
    svc = listener_service("tcp:0:interface=127.0.0.1", Factory.forProtocol(Echo), get_reactor())
    assert not isinstance(svc, TLSListenerService)


def test_listener_service_bad_files_raise(tmp_path: Path) -> None:
    with pytest.raises(TLSFilesError) as info:
        listener_service(
            f"ssl:0:privateKey={tmp_path}/nope.key:certKey={tmp_path}/nope.pem",
            Factory.forProtocol(Echo),
            get_reactor(),
        )
    assert "nope.key" in str(info.value)


@pytest_twisted.ensureDeferred
async def test_tls_listener_bind_failure_raises_at_start(tmp_path: Path) -> None:
    """As with strports.service, a listener that cannot bind fails start-up (twistd exits 1)."""
    ca = make_ca()
    key, cert = ca.issue(tmp_path, "s", serial=5)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    try:
        port = blocker.getsockname()[1]
        svc = listener_service(
            f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}",
            Factory.forProtocol(Echo),
            get_reactor(),
        )
        assert isinstance(svc, TLSListenerService)
        with pytest.raises(CannotListenError):
            svc.privilegedStartService()
    finally:
        blocker.close()
    # And one that can bind serves TLS, and reloads through the service.
    free = free_port()
    svc = listener_service(
        f"ssl:{free}:interface=127.0.0.1:privateKey={key}:certKey={cert}",
        Factory.forProtocol(Echo),
        get_reactor(),
    )
    assert isinstance(svc, TLSListenerService)
    svc.startService()
    try:
        cafile = ca.write(tmp_path / "ca.pem")
        assert await deferToThread(peer_serial, free, cafile) == 5
        key2, cert2 = ca.issue(tmp_path, "s2", serial=6)
        svc.tls.private_key, svc.tls.cert = str(key2), str(cert2)
        svc.reload()
        assert await deferToThread(peer_serial, free, cafile) == 6
    finally:
        await svc.stopService()


def _refused_over_tls(port: int, cafile: Path, data: bytes) -> bytes:
    """Send C{data} over TLS and read until the proxy closes (its answer, then the end)."""
    with _tls_socket(port, cafile) as sock:
        sock.sendall(data)
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (ssl.SSLError, OSError):
                break
            if not chunk:
                break
            received += chunk
        return received


@pytest.mark.parametrize(
    "data",
    [
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: p\r\n\r\n",  # 414, refused in the head
        b"GARBAGE\r\n\r\n",  # 400
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: 100000000\r\n\r\n",  # 413
    ],
)
@pytest_twisted.ensureDeferred
async def test_refusals_over_tls_log_no_error(tls_proxy: TLSProxy, data: bytes) -> None:
    """
    A refused request on a TLS listener is answered and closed like one on TCP, and logs its
    access line only: no "Unhandled Error" (anyone could flood the log with them).
    """
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        received = await deferToThread(_refused_over_tls, tls_proxy.number, tls_proxy.cafile, data)
        assert received.startswith(b"HTTP/1.1 4")
        assert b"\r\nConnection: close\r\n" in received
        # Every connection is gone (its linger timer included) before the log is read.
        await tls_proxy.site.connections.wait_closed().addTimeout(10, get_reactor())
    finally:
        globalLogPublisher.removeObserver(events.append)
    failures = [formatEvent(e) for e in events if e.get("log_failure") is not None or e.get("isError")]
    assert failures == []
    assert [e["access"]["status"] for e in events if "access" in e] == [int(received[9:12])]
