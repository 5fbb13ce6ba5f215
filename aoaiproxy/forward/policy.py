"""
The forward proxy's decisions, pure (no I/O, no reactor): parsing request-targets, the
allowlist, which addresses a name may lead to, proxy authentication, the headers a relayed
request carries, and the errors that refuse a proxy request.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

import attrs

from aoaiproxy.compare import equal_to_any
from aoaiproxy.config import Config
from aoaiproxy.errors import ProxyError
from aoaiproxy.rewrite import strip_hop_by_hop

#: Absolute-form requests to this host are API requests, not forwarded ones.
OPENAI_API_HOST = "api.openai.com"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_V4_COMPATIBLE = ipaddress.IPv6Network("::/96")
#: IPv6 ranges never reached through a name, whatever Python's C{is_global} says of them:
#: local-use NAT64 (RFC 8215: its translation is the local network's), site-local (deprecated
#: by RFC 3879, still routed inside some sites), Teredo (its IPv4 part is obfuscated).
_BLOCKED_V6 = (
    ipaddress.IPv6Network("64:ff9b:1::/48"),
    ipaddress.IPv6Network("fec0::/10"),
    ipaddress.IPv6Network("2001::/32"),
)
#: A host name's labels (RFC 1123, and the underscores some real names carry).
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_METADATA = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})


class Refused(Exception):
    """A proxy request refused with this error (the only way the forward proxy fails)."""

    def __init__(self, error: ProxyError) -> None:
        super().__init__(error.message)
        self.error = error


def forbidden(what: str) -> ProxyError:
    return ProxyError(403, f"The proxy does not forward to {what}.", code="forward_not_allowed")


def proxy_auth_required() -> ProxyError:
    return ProxyError(
        407,
        "Proxy authentication required: send 'Proxy-Authorization: Basic' credentials.",
        code="proxy_authentication_required",
        headers=((b"Proxy-Authenticate", b'Basic realm="aoaiproxy"'),),
    )


def bad_target() -> ProxyError:
    return ProxyError(400, "Malformed proxy request-target.", code="invalid_request_target")


# -- request-targets ----------------------------------------------------------------------------


def parse_authority(target: bytes) -> tuple[str, int]:
    """
    Parse C{host:port} or C{[v6]:port} (a CONNECT request-target).  Returns the host in lower
    case, without brackets and without a trailing dot.  Raises L{ValueError}.
    """
    text = target.decode("ascii")
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError("malformed IPv6 authority")
        host, port_text = text[1:end], text[end + 2 :]
        ipaddress.IPv6Address(host.split("%", 1)[0])
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError("authority without a port")
    if not port_text.isdigit():
        raise ValueError("bad port")
    return _normal_host(host), _valid_port(int(port_text))


@attrs.frozen
class AbsoluteTarget:
    """An absolute-form request-target (C{http://host[:port]/path?query})."""

    host: str
    port: int
    #: The request-target in origin-form (C{/path?query}).
    origin: bytes
    #: Its path alone.
    path: bytes
    #: The authority as the client wrote it (the C{Host} of the relayed request).
    authority: bytes


def parse_absolute(target: bytes) -> AbsoluteTarget:
    """Parse an absolute-form C{http://} request-target.  Raises L{ValueError}."""
    parts = urlsplit(target.decode("ascii"))
    if parts.scheme != "http" or parts.username is not None or parts.password is not None:
        raise ValueError("not an http URL")
    host = _normal_host(parts.hostname or "")
    port = _valid_port(80 if parts.port is None else parts.port)
    path = (parts.path or "/").encode("ascii")
    origin = path + (b"?" + parts.query.encode("ascii") if parts.query else b"")
    return AbsoluteTarget(host, port, origin, path, parts.netloc.encode("ascii"))


def _valid_port(port: int) -> int:
    if not 0 < port < 65536:
        raise ValueError("bad port")
    return port


@functools.lru_cache(maxsize=1024)  # the same few hosts, CONNECT after CONNECT
def _normal_host(host: str) -> str:
    host = host.lower().rstrip(".")
    if not host or any(c in host for c in "/\\@ ?#*%") or not host.isascii():
        raise ValueError("bad host")
    ip = ip_literal(host)
    if ip is not None:
        return ip.compressed
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in host.split(".")):
        # An empty label (a..example.test) or one too long is no name a resolver takes.
        raise ValueError("bad host name")
    return host


@functools.lru_cache(maxsize=1024)
def ip_literal(host: str) -> IPAddress | None:
    """
    C{host} as an IP address, or None for a name.  Cached: each CONNECT asks it more than
    once of the same few hosts, and C{ipaddress} parses slowly (a name raises twice).
    """
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


# -- the allowlist and addresses --------------------------------------------------------------


@attrs.frozen
class _Rules:
    exact: frozenset[tuple[str, int]]
    suffixes: tuple[tuple[str, int], ...]


@functools.lru_cache(maxsize=32)
def _rules(entries: tuple[str, ...]) -> _Rules:
    exact: set[tuple[str, int]] = set()
    suffixes: list[tuple[str, int]] = []
    for entry in entries:
        host, _, port = entry.rpartition(":")
        host = host.strip("[]")
        if host.startswith("*."):
            suffixes.append((host[1:].rstrip("."), int(port)))
        else:
            ip = ip_literal(host)
            exact.add((ip.compressed if ip is not None else host.rstrip("."), int(port)))
    return _Rules(frozenset(exact), tuple(suffixes))


def destination_allowed(config: Config, host: str, port: int) -> bool:
    """Whether C{host:port} (as returned by L{parse_authority}) is on the allowlist."""
    return _allowed(_rules(config.forward_allow), host, port)


def _allowed(rules: _Rules, host: str, port: int) -> bool:
    if (host, port) in rules.exact:
        return True
    if ip_literal(host) is not None:
        return False
    return any(p == port and host.endswith(suffix) for suffix, p in rules.suffixes)


def address_blocked(address: str) -> bool:
    """
    Whether an address is one a name may not lead to: anything not globally routable
    (loopback, RFC 1918, ULA, site-local, link-local, CGNAT, unspecified, documentation...),
    multicast, and cloud metadata addresses, also when embedded in an IPv6 address that
    carries an IPv4 one (IPv4-mapped, IPv4-compatible, NAT64, 6to4); local-use NAT64 and
    Teredo addresses are refused whole.
    """
    ip = ip_literal(address.split("%", 1)[0])
    if ip is None:
        return True
    if isinstance(ip, ipaddress.IPv6Address):
        if any(ip in network for network in _BLOCKED_V6):
            return True
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            ip = embedded
    return ip in _METADATA or not ip.is_global or ip.is_multicast or ip.is_unspecified


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one leads to, when it embeds one."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip in _V4_COMPATIBLE and int(ip) > 1):  # not :: and ::1 themselves
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def checked_addresses(config: Config, host: str, port: int, addresses: Sequence[str]) -> list[str]:
    """
    The addresses of an allowed destination that may be connected to.  For a listed IP
    literal, the literal itself; for a name, every resolved address must be public or
    itself listed (as C{ip:port}), else none may be used.
    """
    if ip_literal(host) is not None:
        return [host]
    rules = _rules(config.forward_allow)
    out: list[str] = []
    for address in addresses:
        ip = ip_literal(address.split("%", 1)[0])
        if ip is None:
            return []
        if address_blocked(address) and (ip.compressed, port) not in rules.exact:
            return []
        out.append(ip.compressed)
    return out


# -- proxy authentication -------------------------------------------------------------------


def proxy_authorized(config: Config, header: bytes | None) -> bool:
    """
    Whether a C{Proxy-Authorization} value holds valid Basic credentials.  Every configured
    user is compared, in constant time, whatever the outcome.
    """
    users = config.forward_users
    if not users:
        return True
    if header is None:
        return False
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return False
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    # The user part of Basic credentials ends at the first colon (RFC 7617), so the
    # "user:password" sent equals a "name:secret" exactly when both parts do, for every name
    # without a colon (one with a colon can never match; the users file makes none).
    known = (f"{name}:{secret}".encode() for name, secret in users.items() if ":" not in name)
    return equal_to_any(decoded, known)


# -- a proxy request's head ------------------------------------------------------------------


@attrs.frozen
class Admitted:
    """A proxy request its head does not refuse: where it goes."""

    host: str
    port: int
    #: The absolute-form request-target; None for C{CONNECT}.
    absolute: AbsoluteTarget | None = None
    #: A C{CONNECT} the proxy answers itself (TLS interception, SPEC §13): never dialled.
    intercept: bool = False

    @property
    def api(self) -> bool:
        """Whether it is an API request (C{http://api.openai.com/...}), served as origin-form."""
        return self.absolute is not None and self.host == OPENAI_API_HOST


def admit(config: Config, method: bytes, target: bytes, proxy_authorization: bytes | None) -> Admitted:
    """
    The forward proxy's decisions from a request's head alone, in order: a malformed
    request-target (400), proxy authentication (407), then the allowlist (403), which an
    absolute-form API request (L{Admitted.api}) and an intercepted C{CONNECT}
    (L{Admitted.intercept}) do not need.  Raises L{Refused}.

    A C{CONNECT}'s verdict but for authentication depends on its request-target and the
    configuration alone, so it is remembered (L{_connect_verdict}); L{admit_uncached}
    decides every request afresh, with the same verdicts.
    """
    if method != b"CONNECT":
        return admit_uncached(config, method, target, proxy_authorization)
    try:
        admitted, allowed = _connect_verdict(
            target, config.forward_allow, config.intercept, config.intercept_hosts
        )
    except (ValueError, UnicodeDecodeError):
        raise Refused(bad_target()) from None
    if config.forward_users and not proxy_authorized(config, proxy_authorization):
        raise Refused(proxy_auth_required())
    if allowed:
        return admitted
    raise Refused(forbidden(f"{admitted.host}:{admitted.port}"))


def admit_uncached(
    config: Config, method: bytes, target: bytes, proxy_authorization: bytes | None
) -> Admitted:
    """L{admit}, every step taken for every request (absolute-form requests are always)."""
    absolute = None
    try:
        if method == b"CONNECT":
            host, port = parse_authority(target)
        else:
            absolute = parse_absolute(target)
            host, port = absolute.host, absolute.port
    except (ValueError, UnicodeDecodeError):
        raise Refused(bad_target()) from None
    if not proxy_authorized(config, proxy_authorization):
        raise Refused(proxy_auth_required())
    if absolute is None and intercepted(config, host, port):
        return Admitted(host, port, None, intercept=True)
    admitted = Admitted(host, port, absolute)
    if not admitted.api and not destination_allowed(config, host, port):
        raise Refused(forbidden(f"{host}:{port}"))
    return admitted


@functools.lru_cache(maxsize=1024)  # the same few targets, CONNECT after CONNECT
def _connect_verdict(
    target: bytes, forward_allow: tuple[str, ...], intercept: bool, intercept_hosts: tuple[str, ...]
) -> tuple[Admitted, bool]:
    """
    A C{CONNECT} to C{target}, and whether it may go there (intercepted, or allowed), as
    L{admit_uncached} decides with a configuration holding these settings.  Raises
    L{ValueError} for a malformed target.
    """
    host, port = parse_authority(target)
    if intercept and (host, port) in _intercepted_hosts(intercept_hosts):
        return Admitted(host, port, None, intercept=True), True
    return Admitted(host, port, None), _allowed(_rules(forward_allow), host, port)


@functools.lru_cache(maxsize=32)
def _intercepted_hosts(entries: tuple[str, ...]) -> frozenset[tuple[str, int]]:
    # Normalised as CONNECT targets are (parse_authority), so [0::1]:443 matches [::1]:443.
    # The configuration accepts only entries that parse (intercept.hosts).
    return frozenset(parse_authority(entry.encode("ascii")) for entry in entries)


def intercepted(config: Config, host: str, port: int) -> bool:
    """Whether a CONNECT to C{host:port} (as L{parse_authority} returns it) is intercepted."""
    return config.intercept and (host, port) in _intercepted_hosts(config.intercept_hosts)


# -- relayed requests -----------------------------------------------------------------------

#: Besides hop-by-hop ones: the client's headers a relayed request sets itself.
_NOT_RELAYED = frozenset({b"host", b"content-length"})


def relayed_request_headers(
    headers: Sequence[tuple[bytes, bytes]], authority: bytes
) -> list[tuple[bytes, bytes]]:
    """
    A forwarded request's headers: the client's, less hop-by-hop ones, those its
    C{Connection} header lists and every C{Proxy-*}; C{Host} is the request-target's.
    """
    out = [
        (name, value)
        for name, value in strip_hop_by_hop(headers, _NOT_RELAYED)
        if not name.lower().startswith(b"proxy-")
    ]
    out.append((b"Host", authority))
    return out
