"""
L{read_head}: the request heads the channel reads at once (its fast path), directly, and
against twisted.web's parser: every head it takes, the parser reads to the same request
(method, target, version, headers, body length) without an answer of its own.  Through the
channel, in memory and over real sockets: tests/test_channel.py, tests/test_forward.py
(C{test_a_connect_read_at_once_is_served_as_a_parsed_one}), tests/test_reverse.py
(C{test_a_request_read_at_once_is_served_as_a_parsed_one}).
"""

from __future__ import annotations

import re
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.http import Request

from aoaiproxy.config import LiveConfig, load_config
from aoaiproxy.forward import Forwarder
from aoaiproxy.head import RequestHead, read_head
from aoaiproxy.site import ProxySite

from .conftest import Holding, ParsedLines

LIMITS = (16384, 8192, 100)  # the channel's defaults: head size, request line, header fields


def head(data: bytes) -> RequestHead | None:
    return read_head(data, *LIMITS)


def test_a_head_is_read_with_its_headers_and_body_length() -> None:
    data = (
        b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: p\r\napi-key:  k \t\r\n"
        b"Content-Length: 2\r\n\r\n{}GET / HTTP/1.1\r\n"
    )
    assert head(data) == RequestHead(
        b"POST",
        b"/v1/chat/completions?x=1",
        b"HTTP/1.1",
        [(b"Host", b"p"), (b"api-key", b"k"), (b"Content-Length", b"2")],
        2,
        data.index(b"{}"),
    )
    data = b"CONNECT [::1]:8443 HTTP/1.0\r\nProxy-Authorization: Basic x\r\n\r\n\x16"
    assert head(data) == RequestHead(
        b"CONNECT", b"[::1]:8443", b"HTTP/1.0", [(b"Proxy-Authorization", b"Basic x")], 0, len(data) - 1
    )


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\n",  # not complete yet
        b"GET / HTTP/1.1\nHost: a\n\n",  # bare LF ends
        b"GET  / HTTP/1.1\r\n\r\n",
        b"G(T / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/2.0\r\n\r\n",
        b"GET /\r\n\r\n",
        b"\r\nGET / HTTP/1.1\r\n\r\n",  # a stray empty line first
        b"GET /\x7f HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",  # space before the colon
        b"GET / HTTP/1.1\r\nHost: a\r\n continued\r\n\r\n",  # a folded line
        b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
        b"GET / HTTP/1.1\r\n: empty name\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\nY: b\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 1 \r\nContent-Length: 1\r\n\r\nx",
        b"POST / HTTP/1.1\r\nContent-Length: 0x1\r\n\r\nx",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
    ],
)
def test_anything_else_is_left_to_the_parser(data: bytes) -> None:
    assert head(data) is None


def test_the_limits_are_the_channels() -> None:
    data = b"CONNECT a:443 HTTP/1.1\r\nA: 1\r\nB: 2\r\n\r\n"
    assert read_head(data, 34, 22, 2) is not None
    assert read_head(data, 33, 22, 2) is None  # head size (before its empty line)
    assert read_head(data, 34, 21, 2) is None  # request line
    assert read_head(data, 34, 22, 1) is None  # header fields


class Parsed(Forwarder):
    """Keeps every proxy request it is given, unanswered."""

    def __init__(self) -> None:  # nothing dialled, nothing relayed
        self.requests: list[Request] = []

    def handle(self, request: Request) -> bool:
        self.requests.append(request)
        return True


def served(data: bytes, *, whole: bool) -> tuple[list[tuple[object, ...]], bytes, int]:
    """
    What the channel makes of C{data}, given C{whole} (it may then be read at once) or its
    first byte alone first (the head is not whole in it: the parser reads it all): each
    request (method, target, version, headers, body), the answer, and the lines parsed.
    """
    live = LiveConfig(load_config({"endpoint": "https://r.openai.azure.com"}, {}))
    forwarder, tree = Parsed(), Holding()
    site = ProxySite(tree, live, MemoryReactorClock(), forwarder)
    site.protocol = ParsedLines  # type: ignore[assignment]
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    for piece in (data,) if whole else (data[:1], data[1:]):
        channel.dataReceived(piece)
    requests = []
    for request in forwarder.requests + tree.requests:
        assert request.content is not None
        headers = list(request.requestHeaders.getAllRawHeaders())
        requests.append((request.method, request.uri, request.clientproto, headers, request.content.read()))
    answer = re.sub(rb"Date: [^\r]*", b"", transport.value())
    return requests, answer, cast(ParsedLines, channel).parsed_lines


def test_the_parser_is_what_the_property_compares_with() -> None:
    data = b"POST /v1/chat/completions HTTP/1.1\r\napi-key: k\r\nContent-Length: 2\r\n\r\n{}"
    parsed = served(data, whole=False)
    [(method, uri, _, _, body)], answer, lines = parsed
    assert (method, uri, body, answer, lines) == (b"POST", b"/v1/chat/completions", b"{}", b"", 4)
    at_once = served(data, whole=True)
    assert at_once[:2] == parsed[:2] and at_once[2] == 0  # read at once: no line parsed
    [(method, *_)], answer, _ = served(b"CONNECT a:443 HTTP/1.1\r\n\r\n", whole=True)
    assert (method, answer) == (b"CONNECT", b"")
    assert served(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", whole=False)[1].startswith(b"HTTP/1.1 400 ")


_LINES = st.sampled_from(
    [
        b"Host: a:443",
        b"Host:a:443",
        b"User-Agent:   x y \t",
        b"Proxy-Authorization: Basic YTpi",
        b"api-key: k",
        b"X-Empty:",
        b"X-Tab:\tv",
        b"Cookie: a=b",
        b"Connection: close",
        b"Content-Length: 3",
        b"content-length:3",
        b"Content-Length: 0",
        b"Content-Length: +3",
        b"Content-Type: application/json",
        b"Host : a",
        b" folded",
        b"\tfolded",
        b"no colon",
        b": v",
        b"X: a\x00b",
        b"X: a\rb",
        b"X\x01: v",
        b"Transfer-Encoding: identity",
        b"Expect: 100-continue",
        b"K\xc3\xa9: v",
        b"X: \xc3\xa9",
    ]
)
_TARGETS = st.sampled_from(
    [b"a:443", b"/v1/chat/completions", b"/v1/models", b"/a?b=c", b"*", b"a\x7fb:1", b"", b"/\xc3\xa9"]
)


@settings(max_examples=400, deadline=None)
@given(
    method=st.sampled_from([b"CONNECT", b"POST", b"GET", b"connect", b"G@T"]),
    target=_TARGETS,
    version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"http/1.1"]),
    lines=st.lists(_LINES, max_size=5),
    eol=st.sampled_from([b"\r\n", b"\n"]),
    after=st.sampled_from([b"abc", b"abc\x16\x03\x01", b"abcGET / HTTP/1.1\r\n\r\n"]),
)
def test_every_head_read_at_once_is_served_as_the_parser_serves_it(
    method: bytes, target: bytes, version: bytes, lines: list[bytes], eol: bytes, after: bytes
) -> None:
    """
    Every head L{read_head} takes: the channel, given it whole, serves the requests the
    parser makes of it (the same fields, headers and body, the same refusal if any, nothing
    parsed after it while it is handled), and reads it at once (its body is whole in it).
    """
    data = (
        b"%s %s %s%s" % (method, target, version, eol) + b"".join(line + eol for line in lines) + eol + after
    )
    taken = head(data)
    if taken is None:
        return
    requests, answer, _ = served(data, whole=False)
    at_once, at_once_answer, parsed_lines = served(data, whole=True)
    assert (at_once, at_once_answer) == (requests, answer)
    assert parsed_lines == 0
    for got in requests:
        assert got[:3] == (taken.method, taken.target, taken.version)
