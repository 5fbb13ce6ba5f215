"""
A request head read at once, from the bytes that carry it whole (a client's segment, nearly
always): L{read_head}.

It is the channel's fast path (L{aoaiproxy.site.ProxyChannel}): such a head, with its whole
body, is turned into its request without twisted.web's line parser (a split, a dozen calls
and a header-name encoding per line).  It takes only what that parser takes as it is:
anything else (a malformed or unusual head, a chunked body, C{Expect}, a limit reached, a
head not complete in these bytes) is None, and twisted.web's parser reads it, and answers
it, as before.
"""

from __future__ import annotations

from typing import NamedTuple

#: RFC 9110 §5.6.2 tchar: a method and a header name are one or more of these.
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
#: What twisted.web accepts in a request-target: printable ASCII, no space.
_VISIBLE = bytes(range(0x21, 0x7F))
#: What twisted.web refuses in a header value (RFC 9110 §5.5).
_VALUE_NOT = b"\x00\r\n"
#: Headers that frame a body in chunks or ask for an interim answer: the line parser's.
_NOT_AT_ONCE = frozenset((b"transfer-encoding", b"expect"))
_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")


class RequestHead(NamedTuple):
    """A request head, as twisted.web's parser would have read it."""

    method: bytes
    #: The request-target, as sent.
    target: bytes
    version: bytes
    #: The header fields in order; each name as sent, each value stripped of spaces and tabs
    #: around it.
    headers: list[tuple[bytes, bytes]]
    #: The body's length (its one C{Content-Length}; 0 without one).
    length: int
    #: How many bytes the head took: the body follows.
    size: int


def read_head(data: bytes, max_head: int, max_request_line: int, max_headers: int) -> RequestHead | None:
    """
    The request head at the start of C{data}, ending with an empty line in C{data}, with
    CRLF line ends, no more than C{max_head} bytes before its empty line, a request line of
    at most C{max_request_line} bytes and at most C{max_headers} header fields; None for
    any other bytes (twisted.web's parser then reads them, with the channel's limits).

    Every head it takes is one twisted.web would parse to the same method, request-target,
    version, header fields and body length, without an answer of its own (400, 414, 431,
    100 Continue): its body, if any, has one C{Content-Length} of digits, and no
    C{Transfer-Encoding}.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0 or end > max_head:
        return None
    lines = data[:end].split(b"\r\n")
    first = lines[0]
    if len(first) > max_request_line or len(lines) > max_headers + 1:
        return None
    parts = first.split(b" ")
    if len(parts) != 3:
        return None
    method, target, version = parts
    if (
        version not in _VERSIONS
        or not method
        or method.translate(None, _TCHAR)
        or not target
        or target.translate(None, _VISIBLE)
    ):
        return None
    headers: list[tuple[bytes, bytes]] = []
    length = None
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name.translate(None, _TCHAR):
            return None  # no colon, an empty name, a space before the colon, a folded line
        value = value.strip(b" \t")
        if len(value.translate(None, _VALUE_NOT)) != len(value):
            return None
        lower = name.lower()
        if lower == b"content-length":
            if length is not None or not value.isdigit():
                return None  # twisted.web answers 400
            length = int(value)
        elif lower in _NOT_AT_ONCE:
            return None
        headers.append((name, value))
    return RequestHead(method, target, version, headers, length or 0, end + 4)
