"""
The top level of a JSON object body, read without parsing what is nested in it.

The proxy needs little from a request body: its top-level C{model} (and C{stream}), and, to
map a model or ask for usage, to replace or add one top-level member while every other byte
stays as the client sent it.  Parsing the whole body (C{json.loads}) builds every nested
value: 60 MiB of C{[{},{},...]} took 1.6 GB and blocked the reactor for seconds, a body
nested 5,000 deep raised C{RecursionError}, and re-encoding it changed numbers (C{1e400}
became C{Infinity}) and failed on lone surrogates.

L{top_level} reads the top-level object strictly (member names, C{:}, C{,}, scalar values)
and only finds where each nested value ends: its strings (with their escaped quotes) and
brackets, with C{bytes.find}.  It builds no nested value, takes memory independent of the
body's structure, and its Python work is bounded by C{max_steps} (top-level members, nested
strings and brackets, escaped quotes): a body that needs more is refused with L{TooComplex}.
What is nested is not otherwise validated: its bytes are passed on, and the upstream judges
them.  Other costs are linear in the body's size at C speed.

The scan uses only C{len}, indexing, slicing, C{find}, C{in} and regular expressions on the
body, so a read-only C{mmap} of a large body's file serves as well as C{bytes}: only the pages
it touches are read.

A body held as C{bytes} (up to L{FAST_MAX} bytes: the common, small one) is first read by
L{_fast_object}: its member names and separators with regular expressions, each member's value
with C{json}'s C scanner, so that a member costs a few Python calls however it is nested.  It
gives the very L{TopLevel} that the scanner would, or nothing (the scanner then reads the body
and gives its verdict): it stands aside for anything it cannot decide the same way (an escaped
or long member name, a nested value that is not strict JSON, a body nesting deeper than the C
scanner recurses, a body the scanner might find L{TooComplex}: L{_step_bound}).  The values it
builds in passing are dropped at once, and there are fewer of them than C{max_steps}.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection
from typing import Any

import attrs

#: Default bound on the Python work for one body: top-level members, strings and brackets
#: inside nested values, and escaped quotes.  A chat request with thousands of messages and
#: tools, or an embeddings request with 2,048 inputs, needs a few thousand.
MAX_STEPS = 100_000
#: Top-level numbers and literals longer than this are refused (no valid one is).
MAX_SCALAR = 1024
#: Member names longer than this (raw bytes) are never decoded: none that is looked for is.
MAX_NAME = 256

#: Escaped quotes in one string counted one by one; after these, the string is read in windows.
_ESCAPED_PER_STRING = 64
_WINDOW = 64 * 1024
#: What one step stands for, in bytes, where work is linear in bytes (about the cost of a
#: Python step on the machines measured): windows of a string dense with escaped quotes, runs
#: of backslashes, and whitespace between top-level values.
_WINDOW_BYTES_PER_STEP = 128
_RUN_BYTES_PER_STEP = 64
_WS_BYTES_PER_STEP = 256
#: A top-level member costs several times a nested value.
_STEPS_PER_MEMBER = 4

_QUOTE, _BACKSLASH = 0x22, 0x5C
_OPEN = (0x5B, 0x7B)  # [ {; each one's closer is two bytes on: ] }
_STRUCTURAL = re.compile(rb'["\[\]{}]')
_WS = b" \t\n\r"
_BOM = b"\xef\xbb\xbf"
#: A member name without escapes and the ':' after it (whitespace runs longer than these
#: bounds are left to L{_Scanner.ws}, which is faster on them than a regular expression).
_NAME = re.compile(rb'"([^"\\]{0,%d})"[ \t\n\r]{0,16}:[ \t\n\r]{0,16}' % MAX_NAME)
#: Whitespace, then the ',' or '}' after a member's value.
_SEPARATOR = re.compile(rb"[ \t\n\r]{0,16}([,}])")
_SCALAR = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null|NaN|-?Infinity")

#: Bodies up to this size, held as C{bytes}, are read by L{_fast_object} first (twisted.web
#: keeps a request's body in memory below 100,000 bytes; larger ones are mapped files).  The
#: values it builds and drops are fewer than C{max_steps}: a few MB at most, for an instant.
FAST_MAX = 256 * 1024
#: The start of an object up to its first member's value, or an empty object to the end.
_FAST_FIRST = re.compile(
    rb'[ \t\n\r]*\{[ \t\n\r]*(?:"([^"\\]{0,%d})"[ \t\n\r]*:[ \t\n\r]*|(\})[ \t\n\r]*\Z)' % MAX_NAME
)
#: After a member's value: the next member up to its value, or the object's end to the body's.
_FAST_NEXT = re.compile(
    rb'[ \t\n\r]*(?:,[ \t\n\r]*"([^"\\]{0,%d})"[ \t\n\r]*:[ \t\n\r]*|\}[ \t\n\r]*\Z)' % MAX_NAME
)
#: C{json}'s C scanner: one JSON value at an index of a C{str}, and where it ends.
_scan_string: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]
_scan_value: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


class JSONBodyError(ValueError):
    """The body cannot be read as a JSON object."""


class NotAnObject(JSONBodyError):
    """The body is not a JSON object (or not JSON at all)."""


class TooComplex(JSONBodyError):
    """Reading the body would take more than the allowed number of steps."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} steps to read")
        self.limit = limit


class DuplicateMember(JSONBodyError):
    """A top-level member that must be unique appears more than once."""

    def __init__(self, name: str) -> None:
        super().__init__(f"duplicate member {name!r}")
        self.name = name


@attrs.frozen
class Member:
    """One top-level member: its name and where its name and value are in the body."""

    #: The decoded name, or None for a name longer than L{MAX_NAME} bytes.
    name: str | None
    key_start: int
    value_start: int
    value_end: int

    def raw(self, body: bytes) -> bytes:
        """The value's bytes, as the client sent them."""
        return body[self.value_start : self.value_end]


@attrs.frozen
class TopLevel:
    """The top-level object of a body: its members (those asked for) and where it ends."""

    members: tuple[Member, ...]
    #: How many members the object has, those not kept among them.
    count: int
    #: Where a new member goes: right after the last member's value, or after C{{}.
    insert_at: int

    def named(self, name: str) -> list[Member]:
        return [m for m in self.members if m.name == name]

    def get(self, name: str) -> Member | None:
        """The member called C{name}, or None; L{DuplicateMember} if there are several."""
        found = self.named(name)
        if len(found) > 1:
            raise DuplicateMember(name)
        return found[0] if found else None


def top_level(body: bytes, names: Collection[str] | None = None, *, max_steps: int = MAX_STEPS) -> TopLevel:
    """
    Read the top level of a JSON object body.

    @param names: keep only the members with these names (None: keep every member).
    @raise NotAnObject: the body is not a JSON object.
    @raise TooComplex: reading it takes more than C{max_steps} steps.
    """
    if type(body) is bytes and len(body) <= FAST_MAX:
        top = _fast_object(body, names, max_steps)
        if top is not None:
            return top
    return _Scanner(body, max_steps).object(names)


def _fast_object(body: bytes, names: Collection[str] | None, max_steps: int) -> TopLevel | None:
    """
    The top level of C{body} as L{_Scanner.object} reads it, or None where that cannot be
    told as cheaply (the scanner then reads it): the names and separators are matched by
    L{_FAST_FIRST} and L{_FAST_NEXT}, each value is read by C{json}'s C scanner (which
    validates what is nested, more strictly than the scanner: a value it refuses is left to
    the scanner).  The body is decoded as Latin-1, so that its offsets are the bytes'.
    """
    n = len(body)
    # A bound on the scanner's steps without the members': checked before the values are
    # built (so that they are fewer than max_steps), counted only for a body long enough.
    bound = _CRUDE_PER_BYTE * n + _WINDOW // _WINDOW_BYTES_PER_STEP + 2
    if bound > max_steps:
        bound = _step_bound(body)
        if bound > max_steps:
            return None
    m = _FAST_FIRST.match(body, len(_BOM) if body[: len(_BOM)] == _BOM else 0)
    if m is None:
        return None
    if m.lastindex == 2:  # {}
        return TopLevel((), 0, body.index(b"{", m.start()) + 1)
    wanted = _wanted(names)
    text = body.decode("latin-1")
    members = []
    count = 0
    try:
        while True:
            raw = m.group(1)
            if wanted is None:
                keep, name = True, raw.decode("utf-8")
            else:
                name = wanted.get(raw)
                keep = name is not None
            value_start = m.end()
            value_end = _scan_value(text, value_start)[1]
            if value_end - value_start > MAX_SCALAR and body[value_start] not in b'"[{':
                return None  # a scalar the scanner does not read that far
            count += 1
            if keep:
                members.append(Member(name, m.start(1) - 1, value_start, value_end))
            m = _FAST_NEXT.match(body, value_end)
            if m is None:
                return None
            if m.lastindex is None:  # }
                break
    except (ValueError, StopIteration, RecursionError):  # UnicodeDecodeError among them
        return None
    if bound + _STEPS_PER_MEMBER * count > max_steps:
        return None
    return TopLevel(tuple(members), count, value_end)


def _wanted(names: Collection[str] | None) -> dict[bytes, str] | None:
    """The names asked for, by their UTF-8 bytes (None: every name)."""
    if names is None:
        return None
    wanted = _WANTED.get(names) if type(names) is tuple else None
    if wanted is None:
        wanted = {name.encode("utf-8"): name for name in names}
        if type(names) is tuple and len(_WANTED) < 64:
            _WANTED[names] = wanted
    return wanted


#: L{_wanted} of the tuples of names asked for (a few constants), not built again each time.
_WANTED: dict[Collection[str], dict[bytes, str]] = {}


#: A bound on L{_step_bound} per byte of any body (besides a constant: L{_fast_object}).
_CRUDE_PER_BYTE = 7


def _step_bound(body: bytes) -> int:
    """
    A bound on the steps L{_Scanner.object} takes on C{body}, but for the members' own
    (L{_STEPS_PER_MEMBER} each): each quote or bracket (in a nested value), each escaped quote
    twice (once counted, once for the backslashes before it), a step per 8 backslashes (their
    longer runs cost one per 13 bytes), the windows of strings dense with escaped quotes (one per string at
    most, besides full ones), and whitespace between top-level values (a step per 64 bytes).
    """
    n = len(body)
    structural = n - len(body.translate(None, b'"[]{}'))
    blank = n - len(body.translate(None, _WS))
    backslashes = body.count(b"\\")
    escaped = body.count(b'\\"')
    windows = 0
    if escaped >= _ESCAPED_PER_STRING:
        windows = escaped // _ESCAPED_PER_STRING + n // _WINDOW + 1
    return (
        structural
        + 2 * escaped
        + backslashes // 8
        + 1
        + windows * (_WINDOW // _WINDOW_BYTES_PER_STEP)
        + blank // 64
        + 1
    )


def replace_value(body: bytes, member: Member, value: bytes) -> bytes:
    """C{body} with C{member}'s value replaced by C{value} (JSON), every other byte unchanged."""
    return b"".join((body[: member.value_start], value, body[member.value_end :]))


def add_member(body: bytes, top: TopLevel, name: str, value: bytes) -> bytes:
    """C{body} with a member C{name} (value C{value}, JSON) added after the last one."""
    at = top.insert_at
    member = json.dumps(name).encode("ascii") + b":" + value
    return b"".join((body[:at], b"," if top.count else b"", member, body[at:]))


def set_member(body: bytes, name: str, value: bytes, *, max_steps: int = MAX_STEPS) -> bytes:
    """
    C{body} with its top-level C{name} set to C{value} (JSON): replaced where it is, added
    after the last member if there is none.  Raises L{JSONBodyError}s as L{top_level}, and
    L{DuplicateMember} if C{name} is there more than once.
    """
    top = top_level(body, (name,), max_steps=max_steps)
    member = top.get(name)
    if member is None:
        return add_member(body, top, name, value)
    return replace_value(body, member, value)


def decode(body: bytes, member: Member, max_bytes: int = 4096) -> Any:
    """
    A (small) member value, decoded.  Raises L{NotAnObject} if it is longer than
    C{max_bytes} or not valid JSON (nested values are not validated by L{top_level}).
    """
    raw = member.raw(body)
    if len(raw) > max_bytes:
        raise NotAnObject(f"value of {member.name!r} longer than {max_bytes} bytes")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise NotAnObject(f"value of {member.name!r} is not JSON") from None


def string_value(raw: bytes) -> str:
    """
    A JSON string value that starts at its quote (as a member's span gives it) decoded, as
    C{json.loads} would; C{ValueError} if it is not one.
    """
    if raw[:1] != b'"':
        raise ValueError("not a JSON string")
    text = raw.decode("utf-8", "surrogatepass")  # as json.loads decodes bytes
    value, end = _scan_string(text, 1)
    if end != len(text) and text[end:].strip(" \t\n\r"):
        raise ValueError("not one JSON string")
    return value


class _Scanner:
    """One pass over a body; positions only move forward."""

    def __init__(self, body: bytes, max_steps: int) -> None:
        self.body = body
        self.n = len(body)
        self.steps = 0
        self.max_steps = max_steps
        # A quote can only be escaped if the body has a backslash at all (not searched for in
        # a body that is not bytes: a map of a file, whose pages are read only where scanned).
        self.escapes = b"\\" in body if isinstance(body, bytes) else True

    def step(self, count: int = 1) -> None:
        self.steps += count
        if self.steps > self.max_steps:
            raise TooComplex(self.max_steps)

    def fail(self, what: str, pos: int) -> NotAnObject:
        return NotAnObject(f"{what} at offset {pos}")

    def at(self, pos: int) -> int:
        """The byte at C{pos}, or -1 past the end."""
        return self.body[pos] if pos < self.n else -1

    def ws(self, pos: int) -> int:
        """The first position at or after C{pos} that is not JSON whitespace."""
        body, n = self.body, self.n
        if pos >= n or body[pos] not in _WS:
            return pos
        size = 64
        while pos < n:
            self.step(size // _WS_BYTES_PER_STEP)
            chunk = body[pos : pos + size]
            # bytes.lstrip() without an argument runs at C speed but also strips \x0b, \x0c.
            kept = len(chunk.lstrip())
            stripped = len(chunk) - kept
            for other in (b"\x0b", b"\x0c"):
                i = chunk.find(other, 0, stripped)
                if i >= 0:
                    stripped = i
                    kept = 1
            pos += stripped
            if kept:
                return pos
            size = min(size * 4, _WINDOW)
        return pos

    def object(self, names: Collection[str] | None) -> TopLevel:
        body, n = self.body, self.n
        pos = self.ws(len(_BOM) if body[: len(_BOM)] == _BOM else 0)
        if self.at(pos) != 0x7B:
            raise self.fail("not a JSON object", pos)
        wanted = _wanted(names)
        members = []
        count = 0
        insert_at = pos + 1
        pos = self.ws(pos + 1)
        if self.at(pos) != 0x7D:
            while True:
                self.step(_STEPS_PER_MEMBER)
                key_start = pos
                # The usual member name (short, no escape) and its ':' in one match.
                m = _NAME.match(body, pos)
                if m is not None:
                    keep, name = self.name(m.group(1), key_start, wanted)
                    value_start = self.ws(m.end())
                else:
                    if self.at(pos) != _QUOTE:
                        raise self.fail("expected a member name", pos)
                    key_end = self.string_end(pos)
                    keep, name = self.name(body[pos + 1 : key_end - 1], key_start, wanted)
                    pos = self.ws(key_end)
                    if self.at(pos) != 0x3A:
                        raise self.fail("expected ':'", pos)
                    value_start = self.ws(pos + 1)
                value_end = self.value_end(value_start)
                count += 1
                insert_at = value_end
                if keep:
                    members.append(Member(name, key_start, value_start, value_end))
                m = _SEPARATOR.match(body, value_end)
                if m is not None:
                    pos = m.start(1)
                else:
                    pos = self.ws(value_end)
                if self.at(pos) == 0x7D:
                    break
                if self.at(pos) != 0x2C:
                    raise self.fail("expected ',' or '}'", pos)
                pos = self.ws(pos + 1)
        if self.ws(pos + 1) != n:
            raise self.fail("data after the object", pos + 1)
        return TopLevel(tuple(members), count, insert_at)

    def name(self, raw: bytes, start: int, wanted: dict[bytes, str] | None) -> tuple[bool, str | None]:
        """Whether to keep the member whose name (raw, without quotes) is C{raw}, and its name."""
        if len(raw) > MAX_NAME:
            return wanted is None, None
        escaped = b"\\" in raw
        if wanted is not None and not escaped:
            name = wanted.get(raw)
            return name is not None, name
        try:
            decoded = json.loads(b'"%s"' % raw) if escaped else raw.decode("utf-8")
        except ValueError:  # UnicodeDecodeError among them
            raise self.fail("invalid member name", start) from None
        return wanted is None or decoded in wanted.values(), decoded

    def value_end(self, pos: int) -> int:
        """Where the value starting at C{pos} ends."""
        first = self.at(pos)
        if first == _QUOTE:
            return self.string_end(pos)
        if first in _OPEN:
            return self.container_end(pos)
        m = _SCALAR.match(self.body, pos, min(self.n, pos + MAX_SCALAR))
        if m is None:
            raise self.fail("expected a JSON value", pos)
        return m.end()

    def string_end(self, start: int) -> int:
        """Where the string whose opening quote is at C{start} ends (after its closing quote)."""
        body, find = self.body, self.body.find
        q = find(b'"', start + 1)
        escaped = 0
        while True:
            if q < 0:
                raise self.fail("unterminated string", start)
            if not self.escapes or body[q - 1] != _BACKSLASH or self.backslashes(start + 1, q) % 2 == 0:
                return q + 1
            escaped += 1
            if escaped == _ESCAPED_PER_STRING:
                return self.escaped_string_end(start, q + 1)
            self.step()
            q = find(b'"', q + 1)

    def escaped_string_end(self, start: int, pos: int) -> int:
        """
        The rest of a string dense with escaped quotes, from C{pos} (not inside an escape),
        in windows at C speed: pairs of backslashes and escaped quotes are blanked in a copy of
        the window, and the first quote left is the string's end.
        """
        body, n = self.body, self.n
        while pos < n:
            self.step(_WINDOW // _WINDOW_BYTES_PER_STEP)
            window = body[pos : pos + _WINDOW].replace(b"\\\\", b"__").replace(b'\\"', b"__")
            end = window.find(b'"')
            if end >= 0:
                return pos + end + 1
            # A backslash left at the end escapes the first byte of the next window.
            pos += len(window) + (window[-1] == _BACKSLASH)
        raise self.fail("unterminated string", start)

    def backslashes(self, low: int, q: int) -> int:
        """How many backslashes are right before C{q} (not before C{low})."""
        body = self.body
        if q - 2 < low or body[q - 2] != _BACKSLASH:
            return 1
        count, end, size = 0, q, 64
        while True:
            start = max(low, end - size)
            self.step(size // _RUN_BYTES_PER_STEP)
            run = body[start:end]
            here = len(run) - len(run.rstrip(b"\\"))
            count += here
            if here < len(run) or start == low:
                return count
            end, size = start, min(size * 4, _WINDOW)

    def container_end(self, pos: int) -> int:
        """Where the array or object opening at C{pos} ends: its brackets match, its strings end."""
        body, find = self.body, self.body.find
        closers = bytearray((body[pos] + 2,))
        pos += 1
        steps, limit = self.steps, self.max_steps
        try:
            while True:
                # The next quote or bracket, found by the regular expression engine: the bytes
                # between are read once, and only as far as the container goes.
                for m in _STRUCTURAL.finditer(body, pos):
                    steps += 1
                    if steps > limit:
                        raise TooComplex(limit)
                    p = m.start()
                    byte = body[p]
                    if byte == _QUOTE:
                        end = find(b'"', p + 1)
                        if end < 0 or (self.escapes and body[end - 1] == _BACKSLASH):
                            self.steps = steps
                            end = self.string_end(p) - 1
                            steps = self.steps
                        pos = end + 1
                        break  # search on after the string
                    if byte in _OPEN:
                        closers.append(byte + 2)
                    elif closers.pop() != byte:
                        raise self.fail("mismatched bracket", p)
                    elif not closers:
                        return p + 1
                else:
                    raise self.fail("unterminated array or object", pos)
        finally:
            self.steps = steps
