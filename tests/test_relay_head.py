"""
The relayed head of an upstream response (L{aoaiproxy.resource.relayed_head}) read from the
upstream client's raw pairs (L{UpstreamResponse.raw_headers}, no C{Headers} made) is what it
was read from a C{Headers} of them: the same headers relayed, in the same order, the same
content type and encoding verdicts.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.web.http_headers import Headers

from aoaiproxy import rewrite
from aoaiproxy.resource import relayed_head
from aoaiproxy.upstream.protocol import UpstreamResponse

Relayed = tuple[list[tuple[bytes, list[bytes]]], bytes, bool]


def listed(relayed: tuple[dict[bytes, tuple[bytes, list[bytes]]], bytes, bool]) -> Relayed:
    return list(relayed[0].values()), relayed[1], relayed[2]


NAMES = st.sampled_from(
    [b"Content-Type", b"content-type", b"CONTENT-TYPE", b"Content-Encoding", b"content-encoding",
     b"X-Request-Id", b"x-request-id", b"Set-Cookie", b"set-cookie", b"Proxy-Authenticate",
     b"proxy-authorization", b"ETag", b"etag", b"WWW-Authenticate", b"apim-request-id", b"Date"]
)  # fmt: skip
VALUES = st.sampled_from(
    [b"", b"application/json", b"Text/Event-Stream; charset=utf-8", b"gzip", b"identity",
     b" identity , ", b"gzip, identity", b"a,b", b"x  y", b"\xe9t\xe9"]
)  # fmt: skip


def through_headers(pairs: list[tuple[bytes, bytes]]) -> Relayed:
    """What relay_response read before: the pairs in a Headers, its Content-Type and codings."""
    upstream = Headers()
    for name, value in pairs:
        upstream.addRawHeader(name, value)
    kept = rewrite.strip_hop_by_hop((n, v) for n, vs in upstream.getAllRawHeaders() for v in vs)
    grouped: dict[bytes, list[bytes]] = {}
    for name, value in kept:
        grouped.setdefault(name, []).append(value)
    content_type = upstream.getRawHeaders(b"content-type", [b""])[0].lower()
    codings = b",".join(upstream.getRawHeaders(b"content-encoding", [])).lower()
    encoded = bool(codings) and any(c.strip() not in (b"", b"identity") for c in codings.split(b","))
    return list(grouped.items()), content_type, encoded


def as_sent(relayed: Relayed) -> Relayed:
    """The relayed headers as the client's response head holds them (names canonical)."""
    out = Headers()
    for name, values in relayed[0]:
        out.setRawHeaders(name, values)
    return [(n, list(vs)) for n, vs in out.getAllRawHeaders()], relayed[1], relayed[2]


@settings(max_examples=500, deadline=None, derandomize=True)
@given(st.lists(st.tuples(NAMES, VALUES), max_size=8))
def test_raw_pairs_relay_what_a_headers_object_did(pairs: list[tuple[bytes, bytes]]) -> None:
    response = UpstreamResponse((b"HTTP", 1, 1), 200, b"OK", pairs, 0)
    assert as_sent(listed(relayed_head(response.raw_headers))) == as_sent(through_headers(pairs))
    # A Headers made from a response's pairs (its headers attribute) relays the same too.
    from_headers = [(n, v) for n, vs in response.headers.getAllRawHeaders() for v in vs]
    assert as_sent(listed(relayed_head(from_headers))) == as_sent(through_headers(pairs))
