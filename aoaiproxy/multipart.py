"""
Reading one small field (C{model}) of a C{multipart/form-data} body without loading the body
into memory: the file is scanned in windows of bounded size.
"""

from __future__ import annotations

import re
from typing import IO

CHUNK = 64 * 1024
#: A part's headers and value must fit in this many bytes to be found across chunk edges.
OVERLAP = 8 * 1024
MAX_VALUE = 256

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
        rb"(?:\A|\r\n)--" + b + rb"[ \t]*\r\n((?:[^\r\n]{1,1000}\r\n){1,16})\r\n"
        rb"(.{0,%d}?)\r\n--" % MAX_VALUE + b,
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
