"""
L{connect_head}: the CONNECT heads the channel reads at once (its fast path), directly, and
against twisted.web's parser: every head it takes, the parser reads to the same request
without an answer of its own.  Over real sockets: tests/test_forward.py
(C{test_a_connect_read_at_once_is_served_as_a_parsed_one}).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.http import Request
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from aoaiproxy.config import LiveConfig, load_config
from aoaiproxy.forward import Forwarder
from aoaiproxy.forward.head import ConnectHead, connect_head
from aoaiproxy.site import ProxySite

LIMITS = (16384, 8192, 100)  # the channel's defaults: head size, request line, header fields


def head(data: bytes) -> ConnectHead | None:
    return connect_head(data, *LIMITS)


def test_a_plain_connect_is_read_with_its_headers_and_first_tunnel_bytes() -> None:
    data = (
        b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n"
        b"Proxy-Authorization: Basic one\r\nUser-Agent:  curl/8 \t\r\n"
        b"proxy-authorization: Basic two\r\n\r\n\x16\x03\x01"
    )
    assert head(data) == ConnectHead(
        b"api.openai.com:443",
        b"HTTP/1.1",
        [(b"Host", b"api.openai.com:443"), (b"User-Agent", b"curl/8")],
        b"Basic two",  # the last, as Request.getHeader gives it
        len(data) - 3,
    )
    assert head(b"CONNECT [::1]:8443 HTTP/1.0\r\n\r\n") == ConnectHead(
        b"[::1]:8443", b"HTTP/1.0", [], None, 31
    )


@pytest.mark.parametrize(
    "data",
    [
        b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n",  # not complete yet
        b"CONNECT a:443 HTTP/1.1\nHost: a:443\n\n",  # bare LF ends
        b"connect a:443 HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"CONNECT  a:443 HTTP/1.1\r\n\r\n",
        b"CONNECT a:443 HTTP/2.0\r\n\r\n",
        b"CONNECT a:443\r\n\r\n",
        b"CONNECT a\x7f:443 HTTP/1.1\r\n\r\n",
        b"CONNECT a:443 HTTP/1.1\r\nHost : a\r\n\r\n",  # space before the colon
        b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n continued\r\n\r\n",  # a folded line
        b"CONNECT a:443 HTTP/1.1\r\nno colon\r\n\r\n",
        b"CONNECT a:443 HTTP/1.1\r\n: empty name\r\n\r\n",
        b"CONNECT a:443 HTTP/1.1\r\nX: a\x00b\r\n\r\n",
        b"CONNECT a:443 HTTP/1.1\r\nX: a\rb\r\n\r\n",
        b"CONNECT a:443 HTTP/1.1\r\nX: a\nY: b\r\n\r\n",
        b"CONNECT a:443 HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        b"CONNECT a:443 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"CONNECT a:443 HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
    ],
)
def test_anything_else_is_left_to_the_parser(data: bytes) -> None:
    assert head(data) is None


def test_the_limits_are_the_channels() -> None:
    data = b"CONNECT a:443 HTTP/1.1\r\nA: 1\r\nB: 2\r\n\r\n"
    assert connect_head(data, 34, 22, 2) is not None
    assert connect_head(data, 33, 22, 2) is None  # head size (before its empty line)
    assert connect_head(data, 34, 21, 2) is None  # request line
    assert connect_head(data, 34, 22, 1) is None  # header fields


class Parsed(Forwarder):
    """Keeps every request the parser made, unanswered; never admits a CONNECT at once."""

    def __init__(self) -> None:  # nothing dialled, nothing relayed
        self.requests: list[Request] = []

    def tunnel_verdict(self, target: bytes, proxy_authorization: bytes | None) -> None:
        return None

    def handle(self, request: Request) -> bool:
        self.requests.append(request)
        return True


def parsed(data: bytes) -> tuple[list[Request], bytes]:
    """What twisted.web's parser (the channel's) makes of C{data}: its requests, and its answer."""
    live = LiveConfig(load_config({"endpoint": "https://r.openai.azure.com"}, {}))
    forwarder = Parsed()
    site = ProxySite(Resource(), live, MemoryReactorClock(), forwarder)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(data)
    return forwarder.requests, transport.value()


def test_the_parser_is_what_the_property_compares_with() -> None:
    [request], answer = parsed(b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (request.method, request.uri, answer) == (b"CONNECT", b"a:443", b"")
    assert parsed(b"CONNECT a:443 HTTP/1.1\r\nHost : a\r\n\r\n")[1].startswith(b"HTTP/1.1 400 ")


_LINES = st.sampled_from(
    [
        b"Host: a:443",
        b"Host:a:443",
        b"User-Agent:   x y \t",
        b"Proxy-Authorization: Basic YTpi",
        b"proxy-authorization:Basic Yw==",
        b"X-Empty:",
        b"X-Tab:\tv",
        b"Cookie: a=b",
        b"Connection: close",
        b"Host : a",
        b" folded",
        b"\tfolded",
        b"no colon",
        b": v",
        b"X: a\x00b",
        b"X: a\rb",
        b"X\x01: v",
        b"Content-Length: 0",
        b"Expect: 100-continue",
        b"K\xc3\xa9: v",
        b"X: \xc3\xa9",
    ]
)
_TARGETS = st.sampled_from(
    [b"a:443", b"[::1]:443", b"127.0.0.1:1", b"a\x7fb:1", b"a:b:c", b"", b"a\xc3\xa9:1"]
)


@settings(max_examples=400, deadline=None)
@given(
    method=st.sampled_from([b"CONNECT", b"connect", b"GET"]),
    target=_TARGETS,
    version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"http/1.1"]),
    lines=st.lists(_LINES, max_size=5),
    eol=st.sampled_from([b"\r\n", b"\n"]),
    after=st.sampled_from([b"", b"\x16\x03\x01", b"GET / HTTP/1.1\r\n\r\n"]),
)
def test_every_head_read_at_once_is_the_request_the_parser_makes(
    method: bytes, target: bytes, version: bytes, lines: list[bytes], eol: bytes, after: bytes
) -> None:
    data = (
        b"%s %s %s%s" % (method, target, version, eol) + b"".join(line + eol for line in lines) + eol + after
    )
    taken = head(data)
    if taken is None:
        return
    requests, answer = parsed(data)
    assert answer == b""  # no answer of its own
    [request] = requests  # what follows the head is not parsed while the request is handled
    assert (request.method, request.uri, request.clientproto) == (b"CONNECT", taken.target, taken.version)
    assert request.getHeader(b"proxy-authorization") == taken.proxy_authorization
    request.requestHeaders.removeHeader(b"proxy-authorization")
    ours = Headers()
    for name, value in taken.headers:
        ours.addRawHeader(name, value)
    assert list(request.requestHeaders.getAllRawHeaders()) == list(ours.getAllRawHeaders())
    assert data[taken.size :] == after
