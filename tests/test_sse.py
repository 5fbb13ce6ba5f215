"""
The SSE splitter (L{aoaiproxy.sse.Events}): the events it hands its reader, however the byte
stream is cut into chunks, are those the event-end pattern gives on the whole stream, and the
bytes it passes on are the stream's.  The splitter has a fast path for the usual chunk (one
whole event without CR); the streams below take both paths, and the verdicts must agree.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from aoaiproxy.sse import _EVENT_END, Events


class Recorder(Events):
    """Passes every event on, unchanged, and keeps a copy."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bytes] = []

    def event(self, event: bytes) -> bytes:
        self.seen.append(event)
        return event


def whole_stream_events(stream: bytes) -> list[bytes]:
    """The events of C{stream} read at once: up to each event end in turn, then the rest."""
    events, pos = [], 0
    while (m := _EVENT_END.search(stream, pos)) is not None:
        events.append(stream[pos : m.end()])
        pos = m.end()
    return [*events, stream[pos:]] if stream[pos:] else events


pieces = st.sampled_from([b"data: x", b"data: {}", b"a", b"\n", b"\r", b"\r\n", b"\n\n", b": c"])
streams = st.lists(pieces, max_size=30).map(b"".join)


def chunked(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    return [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]


@settings(max_examples=400)
@given(streams, st.lists(st.integers(0, 10_000), max_size=8))
def test_events_are_the_same_however_the_stream_is_cut(stream: bytes, cuts: list[int]) -> None:
    r = Recorder()
    out = b"".join(r.feed(chunk) for chunk in chunked(stream, cuts)) + r.flush()
    assert out == stream
    assert r.seen == whole_stream_events(stream)


@given(st.lists(st.sampled_from([b"data: x\n\n", b"data: y\ndata: z\n\n", b"data: {}\n\n"]), max_size=10))
def test_one_event_per_chunk(events: list[bytes]) -> None:
    """The fast path's case: each chunk one whole event, LF only."""
    r = Recorder()
    assert [r.feed(e) for e in events] == events
    assert r.flush() == b""
    assert r.seen == events


def test_an_event_completed_by_the_next_chunk() -> None:
    r = Recorder()
    assert r.feed(b"data: x\n") == b""
    assert r.feed(b"\n") == b"data: x\n\n"
    assert r.feed(b"data: y\r") == b""
    assert r.feed(b"\r") == b""  # a CR at the end may be the first half of a CRLF
    assert r.feed(b"data: z\n\n") == b"data: y\r\rdata: z\n\n"
    assert r.seen == [b"data: x\n\n", b"data: y\r\r", b"data: z\n\n"]


class Broken(Events):
    def event(self, event: bytes) -> bytes:
        raise RuntimeError("a bug")


@given(streams, st.lists(st.integers(0, 10_000), max_size=8))
def test_an_event_that_breaks_its_reader_passes_unchanged(stream: bytes, cuts: list[int]) -> None:
    r = Broken()
    assert b"".join(r.feed(chunk) for chunk in chunked(stream, cuts)) + r.flush() == stream
    r = Broken()
    assert r.feed(b"data: x\n\n") == b"data: x\n\n"  # the one-event chunk
    assert r.feed(b"data: x\n\ndata: y\n\n") == b"data: x\n\ndata: y\n\n"
