"""
Relaying an upstream response body to the client: chunk by chunk as it arrives, with
backpressure both ways, an inactivity timeout, (for Azure's Server-Sent Events) the filter
that drops Azure's filter-only frames, and the token usage read on the way
(L{aoaiproxy.usage}: noted for the access line, and the metrics recorded from it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss, Request
from zope.interface import implementer

from aoaiproxy import jsonbody
from aoaiproxy.deadlines import Deadlines
from aoaiproxy.log import note
from aoaiproxy.metrics import NullMetrics, Recorder
from aoaiproxy.sse import MAX_HELD_EVENT, Events, event_data
from aoaiproxy.usage import FILTER_RESULTS, UsageTap, usage_tap

__all__ = ["MAX_HELD_EVENT", "BodyRelay", "FilterFrames", "body_filter", "is_filter_only"]

_ENDS_WITH_EVENT_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r)\Z")
_FRAME_MEMBERS = ("choices", "prompt_filter_results", "usage")

#: After a failed upstream body, how long the client may take to read what was relayed before
#: its connection is aborted.
CUT_GRACE_SECONDS = 5.0
#: The inactivity timer fires a chunk's time after it was set, or later: it is not set again
#: for what is left when that is less than this (a rounding error, not a chunk's time).
_IDLE_SLACK = 0.001


def is_filter_only(event: bytes) -> bool:
    """
    Whether an SSE event is one of Azure's frames that OpenAI never sends: C{choices} empty
    and nothing but C{prompt_filter_results} (so not the C{include_usage} chunk).  An event
    that cannot be read as such (not JSON, nested too deep, a duplicate member) is not one.
    """
    if event.find(FILTER_RESULTS) < 0:  # (find: cheaper than "in" on bytes)
        return False
    data = event_data(event)
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


class FilterFrames(Events):
    """
    Drops Azure's filter-only events (L{is_filter_only}) from an SSE byte stream; every other
    byte passes unchanged, in order (L{Events}: at most one short event is held).
    """

    __slots__ = ()

    def event(self, event: bytes) -> bytes:
        return b"" if is_filter_only(event) else event


def body_filter(
    request: Request, *, filter_frames: bool = False, usage: bool = False, strip_usage: bool = False
) -> Events | UsageTap | None:
    """
    What the body of the response C{request} is answered with goes through: the usage tap for
    its content type (L{usage_tap}, read from the response headers already set), which also
    drops Azure's filter-only frames from a chat stream when C{filter_frames}; else
    L{FilterFrames} when C{filter_frames}; else nothing.

    @param usage: read the response's token usage (an API response; not a forward relay).
    @param strip_usage: the proxy asked for this chat stream's usage, which its client did
        not: the usage chunk and C{"usage":null} members are removed.
    """
    if usage:
        headers = request.responseHeaders
        tap = usage_tap(
            request.path,
            headers.getRawHeaders(b"content-type", [None])[0],
            b",".join(headers.getRawHeaders(b"content-encoding", [])) or None,
            strip=strip_usage,
            drop=is_filter_only if filter_frames else None,
        )
        if tap is not None:
            return tap
    return FilterFrames() if filter_frames else None


def _recorder(request: Request) -> Recorder:
    """The metrics of the site C{request} came to (none for a request of another site)."""
    recorder: Recorder | None = getattr(getattr(request.channel, "site", None), "recorder", None)
    return recorder if recorder is not None else NullMetrics()


def when_gone(request: Request, callback: Callable[[], object]) -> None:
    """
    Call C{callback} if the client leaves before the response is finished: by the request's
    own hook when it has one (L{aoaiproxy.site.ProxyRequest.when_gone}, no L{Deferred}),
    else by C{notifyFinish}'s errback.
    """
    hook = getattr(request, "when_gone", None)
    if hook is not None:
        hook(callback)
    else:
        request.notifyFinish().addErrback(lambda _: callback())


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

    The body passes through L{body_filter}.  The usage it finds is noted for the access line
    (C{prompt_tokens}, C{completion_tokens}) before the response is finished.  An event stream
    counts among the site's open streams (C{aoaiproxy_open_streams}) while it is relayed.

    Each chunk only notes the time it came; the inactivity timer, when it fires, is set again
    for the rest of the timeout if a chunk came since it was set (no timer change per chunk).
    Fed by L{relay_from}, it sets no timer for a body that had all come before it was
    delivered (the usual response with a length): only one still arriving can go silent.
    """

    __slots__ = (
        "_client_gone",
        "_deadlines",
        "_delivering",
        "_done",
        "_event_stream",
        "_filter",
        "_idle_timeout",
        "_last",
        "_on_done",
        "_paused",
        "_reactor",
        "_recorder",
        "_tail",
        "_timed_out",
        "request",
    )

    def __init__(
        self,
        request: Request,
        reactor: Any,
        idle_timeout: float,
        *,
        deadlines: Deadlines,
        event_stream: bool = False,
        filter_frames: bool = False,
        usage: bool = False,
        strip_usage: bool = False,
        on_done: Callable[[bool], None] | None = None,
    ) -> None:
        self.request = request
        self._reactor = reactor
        self._idle_timeout = idle_timeout
        self._event_stream = event_stream
        self._filter = body_filter(request, filter_frames=filter_frames, usage=usage, strip_usage=strip_usage)
        self._tail = b""
        #: Where the inactivity timer is kept (shared by every relay of a resource).
        self._deadlines = deadlines
        #: When the last chunk came (or the timer was last started).
        self._last = 0.0
        self._client_gone = False
        self._timed_out = False
        #: Within L{relay_from}'s C{deliverBody}: the timer waits for what follows it.
        self._delivering = False
        self._paused = False
        #: connectionLost came.
        self._done = False
        self._on_done = on_done
        self._recorder = _recorder(request) if event_stream else None

    def relay_from(self, response: Any) -> None:
        """
        Receive C{response}'s body (C{deliverBody}).  What had come already is delivered at
        once; the inactivity timer starts only if the body has not ended then (and the
        client is not holding it back).
        """
        self._delivering = True
        try:
            response.deliverBody(self)
        finally:
            self._delivering = False
        if not (self._done or self._paused or self._timed_out or self in self._deadlines):
            self._start_timer()

    def connectionMade(self) -> None:
        self.request.registerProducer(self, True)
        if not self._delivering:
            self._start_timer()
        when_gone(self.request, self._client_lost)
        if self._recorder is not None:
            self._recorder.stream_opened()

    # IPushProducer, for the client's request: pass on to the upstream transport.

    def pauseProducing(self) -> None:
        self._paused = True
        self._stop_timer()
        self.transport.pauseProducing()  # type: ignore[attr-defined,union-attr]

    def resumeProducing(self) -> None:
        self._paused = False
        if not (self._timed_out or self in self._deadlines):
            self._start_timer()
        self.transport.resumeProducing()  # type: ignore[attr-defined,union-attr]

    def stopProducing(self) -> None:
        self.transport.stopProducing()  # type: ignore[attr-defined,union-attr]

    def _client_lost(self) -> None:
        self._client_gone = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined,union-attr]

    def _start_timer(self) -> None:
        self._last = self._reactor.seconds()
        self._deadlines.add(self, self._idle_timeout)

    def _stop_timer(self) -> None:
        self._deadlines.remove(self)

    def expired(self) -> None:
        """The inactivity timer fired (L{Deadlines})."""
        left = self._idle_timeout - (self._reactor.seconds() - self._last)
        if left > _IDLE_SLACK:
            # A chunk came since the timer was set: wait for the rest of the timeout.
            self._deadlines.add(self, left)
            return
        # Stop reading upstream; connectionLost then aborts the client.  Not a clean end even
        # for a body delimited by the connection's close (which then reports only a
        # PotentialDataLoss).
        self._timed_out = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined,union-attr]

    def dataReceived(self, data: bytes) -> None:
        # The per-chunk path: as few calls as can be (L{_write}, inlined).
        self._last = self._reactor.seconds()
        if self._filter is not None:
            data = self._filter.feed(data)
        if data and not self._client_gone:
            if self._event_stream:
                self._tail = data[-4:] if len(data) >= 4 else (self._tail + data)[-4:]
            self.request.write(data)

    def _write(self, data: bytes) -> None:
        if data and not self._client_gone:
            if self._event_stream:
                # Only the last bytes matter (is there a final blank line?): no copy of data.
                self._tail = (self._tail + data[-4:])[-4:]
            self.request.write(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self._done = True
        self._stop_timer()
        # (isinstance: Failure.check names each class with reflect.qual.)
        clean = isinstance(reason.value, (ResponseDone, PotentialDataLoss)) and not self._timed_out
        if self._recorder is not None:
            self._recorder.stream_closed()
        if not self._client_gone:
            self.request.unregisterProducer()
            if clean:
                if self._filter is not None:
                    self._write(self._filter.flush())
                if self._event_stream and self._tail:  # (a tail: something was written)
                    self._write(_missing_blank_line(self._tail))
                self._note_usage()  # before finish(), which writes the access line
                self.request.finish()
            else:
                self._note_usage()
                self._cut_client()
        if self._on_done is not None:
            self._on_done(clean and not self._client_gone)

    def _note_usage(self) -> None:
        found = getattr(self._filter, "usage", None)
        if found is not None:
            note(self.request, prompt_tokens=found.prompt, completion_tokens=found.completion)

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
        request.notifyFinish().addBoth(lambda _: timer.cancel() if timer.active() else None)  # rare
        request.loseConnection()


def _missing_blank_line(tail: bytes) -> bytes:
    """What to append so that a stream ends with a blank line after its last event."""
    if _ENDS_WITH_EVENT_END.search(tail):
        return b""
    for line_end in (b"\r\n", b"\n", b"\r"):
        if tail.endswith(line_end):
            return line_end
    return b"\n\n"
