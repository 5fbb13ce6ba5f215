"""
Server-Sent Events as they are relayed: a byte stream cut into whole events, each of which a
subclass may pass, change or drop (L{Events}), without ever holding more than one short event.

The relay's filters are built on it: L{aoaiproxy.relay.FilterFrames} drops Azure's
filter-only frames; the chat and Responses usage taps of L{aoaiproxy.usage} read the usage
event (and, for a client that did not ask for it, remove it).
"""

from __future__ import annotations

import re

from twisted.logger import Logger

__all__ = ["MAX_HELD_EVENT", "Events", "event_data", "event_end"]

#: An SSE line ends with CRLF, LF or CR, and an event with an empty line: two line ends in a
#: row, of any kinds.  A CR followed by LF is one line end, never two.
_EVENT_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r)")
#: An event longer than this is none that a filter looks at (filter-only frames and usage
#: chunks are a few hundred bytes): it is passed on as it arrives instead of being held until
#: its end.
MAX_HELD_EVENT = 64 * 1024

_log = Logger()
_FAILED = "reading an SSE event failed; it is passed on unchanged"


def event_end(buf: bytes, start: int) -> re.Match[bytes] | None:
    """
    The first event end in C{buf} from C{start}, or None.  A CR that ends C{buf} may be the
    first half of a CRLF: an end that relies on it waits for the next byte.
    """
    m = _EVENT_END.search(buf, start)
    if m is None or (m.end() == len(buf) and buf.endswith(b"\r")):
        return None
    return m


def event_data(event: bytes) -> bytes:
    """The data of an SSE event: its C{data:} lines joined with newlines, as SSE joins them."""
    return b"\n".join(line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:"))


class Events:
    """
    Splits an SSE byte stream into whole events and passes each through L{event}, whose
    result goes on in its place (C{b""} drops it).  Bytes of an event not yet complete are
    held until its end arrives (one event, at most L{MAX_HELD_EVENT} bytes: a longer one is
    passed on as it arrives, unread).  Every byte L{event} does not change is passed on
    unchanged, in order; an exception in L{event} passes its event unchanged (and is logged),
    so that a stream is never broken by what it carries.

    C{feed(data)} returns the bytes for the client now; C{flush()} those held at the end.
    """

    __slots__ = ("_buffer", "_passing", "_tail")

    def __init__(self) -> None:
        self._buffer = b""
        #: The current event is too long to be held: its bytes are passed on as they come,
        #: and C{_tail} (the last bytes passed) shows an end that falls across two chunks.
        self._passing = False
        self._tail = b""

    def event(self, event: bytes) -> bytes:
        """What to pass on instead of C{event} (a whole event with its blank line, or the
        last bytes of a stream that did not end with one)."""
        return event

    def feed(self, data: bytes) -> bytes:
        # (bytes.find, not "in": "in" first tries its operand as an integer, and the error
        # that raises costs more than the search.)
        if not self._buffer and not self._passing and data.find(b"\r") < 0:
            # The usual chunk, LF only as OpenAI and Azure send, nothing held: one whole
            # event (its first LF, found by memchr, is the one before its last).
            if data.find(b"\n") == len(data) - 2 and data[-1:] == b"\n":
                try:
                    return self.event(data)
                except Exception:
                    _log.failure(_FAILED)
                    return data
        out = []
        if self._passing:
            seen = self._tail + data
            m = event_end(seen, 0)
            if m is None:
                self._tail = seen[-3:]
                return data
            cut = max(0, m.end() - len(self._tail))
            out.append(data[:cut])
            data = data[cut:]
            self._passing, self._tail = False, b""
        held = len(self._buffer)
        buf = self._buffer + data if held else data
        pos = 0
        if buf.find(b"\r") < 0:
            # LF only: an event ends at each blank line (where the pattern below would find it).
            start = held - 3 if held > 3 else 0
            i = buf.find(b"\n\n", start)
            while i >= 0:
                event = buf[pos : i + 2]
                try:
                    out.append(self.event(event))
                except Exception:
                    _log.failure(_FAILED)
                    out.append(event)
                pos = i + 2
                i = buf.find(b"\n\n", pos)
        else:
            while (m := event_end(buf, max(pos, held - 3))) is not None:
                out.append(self._safely(buf[pos : m.end()]))
                pos = m.end()
        rest = buf[pos:]
        if len(rest) > MAX_HELD_EVENT:
            out.append(rest)
            self._passing, self._tail, rest = True, rest[-3:], b""
        self._buffer = rest
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._buffer = self._buffer, b""
        return self._safely(rest) if rest else b""

    def _safely(self, event: bytes) -> bytes:
        try:
            return self.event(event)
        except Exception:
            _log.failure(_FAILED)
            return event
