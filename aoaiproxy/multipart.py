"""
Reading one small field (C{model}) of a C{multipart/form-data} body without loading the body
into memory: the file is scanned in windows of bounded size.
"""

from __future__ import annotations

import re
from typing import IO

CHUNK = 64 * 1024
MAX_VALUE = 256
#: Longest part the scan recognises: delimiters (boundary at most 200 bytes) around at most
#: 16 header lines of at most 1000 bytes and a value of at most MAX_VALUE bytes.
_MAX_PART = 2 * (4 + 200 + 16 + 2) + 16 * 1002 + 2 + MAX_VALUE
#: Bytes of one window carried into the next, so that a part cut by a chunk edge is seen
#: whole in the next window.  Memory stays bounded by CHUNK + OVERLAP.
OVERLAP = 32 * 1024
assert OVERLAP > _MAX_PART

_BOUNDARY = re.compile(rb'boundary=(?:"([^"]{1,200})"|([^\s;,]{1,200}))', re.IGNORECASE)


def boundary_of(content_type: bytes) -> bytes | None:
    m = _BOUNDARY.search(content_type)
    if m is None:
        return None
    return m.group(1) or m.group(2)


def form_field(f: IO[bytes], content_type: bytes, name: bytes) -> str | None:
    """
    The value of the first form field called C{name}, or None if there is none (or it is
    not short UTF-8 text).  Reads C{f} from its start in chunks; leaves it at an unspecified
    position.
    """
    boundary = boundary_of(content_type)
    if boundary is None:
        return None
    b = re.escape(boundary)
    part = re.compile(
        rb"(?:\A|\r\n)--" + b + rb"[ \t]{0,16}\r\n((?:[^\r\n]{1,1000}\r\n){1,16})\r\n"
        # The closing delimiter is only looked at, not consumed: it opens the next part.
        rb"(.{0,%d}?)(?=\r\n--" % MAX_VALUE + b + rb")",
        re.DOTALL,
    )
    disposition = re.compile(
        rb'(?im)^content-disposition:[^\r\n]*;\s*name="?' + re.escape(name) + rb'"?\s*(?:;|\r?$)'
    )
    f.seek(0)
    window = b""
    first = True
    while True:
        chunk = f.read(CHUNK)
        if not chunk:
            return None
        window = window + chunk
        for m in part.finditer(window):
            if m.start() == 0 and not first and not window.startswith(b"\r\n"):
                continue  # \A only means the body's start in the first window
            if disposition.search(m.group(1)):
                try:
                    return m.group(2).decode("utf-8")
                except UnicodeDecodeError:
                    return None
        first = False
        window = window[-OVERLAP:]
