"""
The header and path checks of L{aoaiproxy.rewrite}, made cheaper per request, decide as the
plain forms they replaced (kept here as references): on generated headers and paths rich in
what matters (case, C{Connection} lists, blank values, dot segments, escapes).
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import unquote

from hypothesis import given, settings
from hypothesis import strategies as st

from aoaiproxy import errors, rewrite

Header = tuple[bytes, bytes]

PROPERTIES = settings(max_examples=400, deadline=None, derandomize=True)


def reference_strip(headers: Iterable[Header], drop: frozenset[bytes] = frozenset()) -> list[Header]:
    headers = list(headers)
    gone = rewrite.HOP_BY_HOP | drop if drop else rewrite.HOP_BY_HOP
    for name, value in headers:
        if name.lower() == b"connection":
            gone = gone | {token.strip().lower() for token in value.split(b",")}
    return [(name, value) for name, value in headers if name.lower() not in gone]


def reference_client_key(headers: Iterable[Header]) -> bytes | None:
    api_key = None
    for name, value in headers:
        lname = name.lower()
        if lname == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
        elif lname == b"api-key" and value.strip():
            api_key = value.strip()
    return api_key


def reference_path_ok(path: str) -> bool:
    decoded = unquote(path)
    return not (
        not path.startswith("/")
        or any(seg in (".", "..") for seg in decoded.split("/"))
        or "\\" in decoded
        or "//" in path
        or rewrite._CONTROL.search(decoded) is not None
    )


names = st.sampled_from(
    [b"Connection", b"connection", b"Keep-Alive", b"TE", b"Host", b"Content-Length", b"Authorization",
     b"AUTHORIZATION", b"api-key", b"Api-Key", b"X-Private", b"x-private", b"Accept", b"Upgrade"]
)  # fmt: skip
values = st.sampled_from(
    [b"", b" ", b"keep-alive", b"keep-alive, X-Private", b"x-private ,accept", b"Bearer k", b"bearer  k ",
     b"Bearer", b"Bearer ", b"Basic k", b" k ", b"close, te", b",,"]
)  # fmt: skip
headers = st.lists(st.tuples(names, values), max_size=8)


@PROPERTIES
@given(headers)
def test_header_functions_decide_as_before(hs: list[Header]) -> None:
    assert rewrite.strip_hop_by_hop(iter(hs)) == reference_strip(hs)
    assert rewrite.strip_hop_by_hop(hs, frozenset({b"accept"})) == reference_strip(hs, frozenset({b"accept"}))
    auth = ((b"api-key", b"server"),)
    assert rewrite.forward_headers(hs, auth) == (*reference_strip(hs, rewrite._NOT_FORWARDED), *auth)
    assert rewrite.client_key(hs) == reference_client_key(hs)


paths = st.lists(
    st.sampled_from(
        ["/", "v1", ".", "..", "%2e", "%2E%2e", "%2f", "%5c", "\\", "%00", " ", "%20", "a%", "x", "//"]
    ),
    max_size=6,
).map("".join)


@PROPERTIES
@given(paths)
def test_check_path_decides_as_before(path: str) -> None:
    try:
        rewrite.check_path(path)
        ok = True
    except errors.ProxyError:
        ok = False
    assert ok == reference_path_ok(path)
