"""
Relaying an upstream response body to the client: chunk by chunk as it arrives, with
backpressure both ways, an inactivity timeout, and (for Azure's Server-Sent Events) the
filter that drops Azure's filter-only frames.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss, Request
from zope.interface import implementer

from aoaiproxy import jsonbody

#: An SSE line ends with CRLF, LF or CR, and an event with an empty line: two line ends in a
#: row, of any kinds.  A CR followed by LF is one line end, never two.
_EVENT_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r)")
_ENDS_WITH_EVENT_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r)\Z")
#: An event longer than this is no filter-only frame (those are a few hundred bytes): it is
#: passed on as it arrives instead of being held until its end.
MAX_HELD_EVENT = 64 * 1024
_FRAME_MEMBERS = ("choices", "prompt_filter_results", "usage")

#: After a failed upstream body, how long the client may take to read what was relayed before
#: its connection is aborted.
CUT_GRACE_SECONDS = 5.0

_log = Logger()


def is_filter_only(event: bytes) -> bool:
    """
    Whether an SSE event is one of Azure's frames that OpenAI never sends: C{choices} empty
    and nothing but C{prompt_filter_results} (so not the C{include_usage} chunk).  An event
    that cannot be read as such (not JSON, nested too deep, a duplicate member) is not one.
    """
    if b"prompt_filter_results" not in event:
        return False
    data = b"\n".join(line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:"))
    try:
        top = jsonbody.top_level(data, _FRAME_MEMBERS)
        choices = top.get("choices")
        usage = top.get("usage")
        if choices is None or top.get("prompt_filter_results") is None:
            return False
        return jsonbody.decode(data, choices, 64) == [] and (
            usage is None or not jsonbody.decode(data, usage)
        )
    except jsonbody.JSONBodyError:
        return False


class FilterFrames:
    """
    Splits an SSE byte stream into whole events and drops filter-only ones.  Bytes of an
    event not yet complete are held until its end arrives (one event, at most
    L{MAX_HELD_EVENT} bytes: a longer one is passed on as it arrives).  Every byte that is not
    part of a dropped event is passed on unchanged, in order.
    """

    def __init__(self) -> None:
        self._buffer = b""
        #: The current event is too long to be held: its bytes are passed on as they come,
        #: and C{_tail} (the last bytes passed) shows an end that falls across two chunks.
        self._passing = False
        self._tail = b""

    def feed(self, data: bytes) -> bytes:
        out = []
        if self._passing:
            seen = self._tail + data
            m = _event_end(seen, 0)
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
        while (m := _event_end(buf, max(pos, held - 3))) is not None:
            event = buf[pos : m.end()]
            pos = m.end()
            if self._keeps(event):
                out.append(event)
        rest = buf[pos:]
        if len(rest) > MAX_HELD_EVENT:
            out.append(rest)
            self._passing, self._tail, rest = True, rest[-3:], b""
        self._buffer = rest
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._buffer = self._buffer, b""
        if rest and not self._keeps(rest):
            return b""
        return rest

    def _keeps(self, event: bytes) -> bool:
        """Whether to pass an event on: any error reading it passes it, and is logged."""
        try:
            return not is_filter_only(event)
        except Exception:
            _log.failure("reading an SSE event failed; it is passed on unchanged")
            return True


def _event_end(buf: bytes, start: int) -> re.Match[bytes] | None:
    """
    The first event end in C{buf} from C{start}, or None.  A CR that ends C{buf} may be the
    first half of a CRLF: an end that relies on it waits for the next byte.
    """
    m = _EVENT_END.search(buf, start)
    if m is None or (m.end() == len(buf) and buf.endswith(b"\r")):
        return None
    return m


@implementer(IPushProducer)
class BodyRelay(Protocol):
    """
    Receives the upstream body (C{response.deliverBody(relay)}) and writes it to the client.

    The relay is registered as the client request's streaming producer and passes pause and
    resume on to the upstream transport, so a client that stops reading pauses the upstream
    read.  While paused, the inactivity timer is stopped: silence that our own backpressure
    causes is not the upstream's.  A body that ends cleanly finishes
    the client's response; one that fails (reset, timeout) aborts the client's connection so
    the truncation is visible.
    """

    def __init__(
        self,
        request: Request,
        reactor: Any,
        idle_timeout: float,
        *,
        event_stream: bool = False,
        filter_frames: bool = False,
        on_done: Callable[[bool], None] | None = None,
    ) -> None:
        self.request = request
        self._reactor = reactor
        self._idle_timeout = idle_timeout
        self._event_stream = event_stream
        self._filter = FilterFrames() if filter_frames else None
        self._tail = b""
        self._timer: IDelayedCall | None = None
        self._client_gone = False
        self._timed_out = False
        self._on_done = on_done
        self.bytes_out = 0

    def connectionMade(self) -> None:
        self.request.registerProducer(self, True)
        self._timer = self._reactor.callLater(self._idle_timeout, self._idle)
        self.request.notifyFinish().addErrback(self._client_lost)

    # IPushProducer, for the client's request: pass on to the upstream transport.

    def pauseProducing(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.transport.pauseProducing()  # type: ignore[attr-defined,union-attr]

    def resumeProducing(self) -> None:
        if self._timer is None and not self._timed_out:
            self._timer = self._reactor.callLater(self._idle_timeout, self._idle)
        self.transport.resumeProducing()  # type: ignore[attr-defined,union-attr]

    def stopProducing(self) -> None:
        self.transport.stopProducing()  # type: ignore[attr-defined,union-attr]

    def _client_lost(self, _: Failure) -> None:
        self._client_gone = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined,union-attr]

    def _idle(self) -> None:
        self._timer = None
        # Stop reading upstream; connectionLost then aborts the client.  Not a clean end even
        # for a body delimited by the connection's close (which then reports only a
        # PotentialDataLoss).
        self._timed_out = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined,union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self._timer is not None:
            self._timer.reset(self._idle_timeout)
        if self._filter is not None:
            data = self._filter.feed(data)
        self._write(data)

    def _write(self, data: bytes) -> None:
        if data and not self._client_gone:
            if self._event_stream:
                # Only the last bytes matter (is there a final blank line?): no copy of data.
                self._tail = (self._tail + data[-4:])[-4:]
            self.bytes_out += len(data)
            self.request.write(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        clean = reason.check(ResponseDone, PotentialDataLoss) is not None and not self._timed_out
        if not self._client_gone:
            self.request.unregisterProducer()
            if clean:
                if self._filter is not None:
                    self._write(self._filter.flush())
                if self._event_stream and self.bytes_out:
                    self._write(_missing_blank_line(self._tail))
                self.request.finish()
            else:
                self._cut_client()
        if self._on_done is not None:
            self._on_done(clean and not self._client_gone)

    def _cut_client(self) -> None:
        """
        The upstream body failed: end the client's connection so that the truncation is
        visible.  A response framed by chunks or a length gets what was relayed, then a close
        without the rest (no terminating 0-chunk; fewer bytes than its length), which every
        HTTP client reports as an error; it is aborted if the client does not read it within
        L{CUT_GRACE_SECONDS}.  Otherwise (nothing sent yet, or a response delimited by the
        close itself) the connection is aborted at once.
        """
        request = self.request
        transport: Any = request.channel.transport  # type: ignore[attr-defined]
        framed = getattr(request, "chunked", False) or request.responseHeaders.hasHeader(b"content-length")
        if not (request.startedWriting and framed):  # type: ignore[attr-defined]
            transport.abortConnection()
            return
        timer = self._reactor.callLater(CUT_GRACE_SECONDS, transport.abortConnection)
        request.notifyFinish().addBoth(lambda _: timer.cancel() if timer.active() else None)
        request.loseConnection()


def _missing_blank_line(tail: bytes) -> bytes:
    """What to append so that a stream ends with a blank line after its last event."""
    if _ENDS_WITH_EVENT_END.search(tail):
        return b""
    for line_end in (b"\r\n", b"\n", b"\r"):
        if tail.endswith(line_end):
            return line_end
    return b"\n\n"
