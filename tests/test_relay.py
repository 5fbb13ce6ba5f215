"""
L{aoaiproxy.relay.BodyRelay}'s inactivity timeout, on a clock: each chunk only notes its
time, and the timer set again when it fires after one came, so the upstream read is stopped
exactly a timeout after the last chunk, never earlier, and never while the client's own
backpressure holds the stream.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.test.requesthelper import DummyRequest

from aoaiproxy.deadlines import Deadlines
from aoaiproxy.relay import BodyRelay

TIMEOUT = 10.0


class Request(DummyRequest):
    """A request that takes a push producer (DummyRequest pulls from any producer)."""

    producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer


class Upstream:
    """The body transport the relay drives."""

    stopped = False
    paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


def relay(
    clock: MemoryReactorClock | None = None, deadlines: Deadlines | None = None
) -> tuple[BodyRelay, Request, Upstream, MemoryReactorClock]:
    clock = MemoryReactorClock() if clock is None else clock
    deadlines = Deadlines(clock) if deadlines is None else deadlines
    request = Request([b""])
    body = BodyRelay(request, clock, TIMEOUT, deadlines=deadlines)
    upstream = Upstream()
    body.makeConnection(upstream)  # type: ignore[arg-type]
    return body, request, upstream, clock


def test_chunks_within_the_timeout_keep_the_body_read() -> None:
    body, request, upstream, clock = relay()
    for i in range(10):
        clock.advance(6)
        body.dataReceived(b"%d" % i)
    assert not upstream.stopped
    assert request.written == [b"%d" % i for i in range(10)]
    clock.advance(TIMEOUT - 1)  # 9 s after the last chunk
    assert not upstream.stopped
    clock.advance(1)
    assert upstream.stopped


def test_silence_from_the_start_stops_the_read() -> None:
    _, _, upstream, clock = relay()
    clock.advance(TIMEOUT - 0.5)
    assert not upstream.stopped
    clock.advance(0.5)
    assert upstream.stopped


def test_backpressure_is_not_upstream_silence() -> None:
    body, request, upstream, clock = relay()
    clock.advance(5)
    request.producer.pauseProducing()
    assert upstream.paused
    clock.advance(10 * TIMEOUT)
    assert not upstream.stopped
    request.producer.resumeProducing()  # a whole timeout again from here
    assert not upstream.paused
    clock.advance(TIMEOUT - 1)
    body.dataReceived(b"x")
    clock.advance(TIMEOUT - 1)
    assert not upstream.stopped
    clock.advance(1)
    assert upstream.stopped


@pytest.mark.parametrize("end", [ResponseDone(), PotentialDataLoss()])
def test_a_body_that_ends_cleanly_finishes_the_response(end: Exception) -> None:
    """A body delimited by its length or chunks (ResponseDone) or by the close (PotentialDataLoss)."""
    clock = MemoryReactorClock()
    deadlines = Deadlines(clock)
    body, request, _, _ = relay(clock, deadlines)
    body.dataReceived(b"data: x\n\n")
    assert len(deadlines) == 1
    body.connectionLost(Failure(end))
    assert request.finished == 1
    assert request.written == [b"data: x\n\n"]
    assert len(deadlines) == 0  # its inactivity timer is gone


class Response:
    """A response whose body (C{chunks}, then an end unless C{ended} is false) is delivered at once."""

    def __init__(self, chunks: list[bytes], *, ended: bool = True, pause: bool = False) -> None:
        self.chunks = chunks
        self.ended = ended
        self.pause = pause
        self.upstream = Upstream()

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(self.upstream)
        if self.pause:
            protocol.request.producer.pauseProducing()  # the client's buffer is full
        for chunk in self.chunks:
            protocol.dataReceived(chunk)
        if self.ended:
            protocol.connectionLost(Failure(ResponseDone()))


class CountingClock(MemoryReactorClock):
    """A clock that counts the calls set on it (a cancelled one leaves C{calls})."""

    set = 0

    def callLater(self, delay: float, callable: Any, *args: object, **kw: object) -> Any:
        self.set += 1
        return super().callLater(delay, callable, *args, **kw)


def fed(response: Response) -> tuple[BodyRelay, Request, CountingClock]:
    clock = CountingClock()
    request = Request([b""])
    body = BodyRelay(request, clock, TIMEOUT, deadlines=Deadlines(clock))
    body.relay_from(response)
    return body, request, clock


def test_a_body_that_came_whole_sets_no_timer() -> None:
    _, request, clock = fed(Response([b"{}"]))
    assert request.finished == 1
    assert request.written == [b"{}"]
    assert clock.set == 0


def test_a_body_still_arriving_is_timed_from_its_delivery() -> None:
    response = Response([b"{"], ended=False)
    body, request, clock = fed(response)
    assert request.written == [b"{"]
    clock.advance(TIMEOUT - 1)
    body.dataReceived(b'"a"')
    clock.advance(TIMEOUT - 1)
    assert not response.upstream.stopped
    clock.advance(1)
    assert response.upstream.stopped


def test_a_body_held_back_by_the_client_during_its_delivery_is_not_timed() -> None:
    response = Response([b"{"], ended=False, pause=True)
    _, request, clock = fed(response)
    assert clock.set == 0
    clock.advance(10 * TIMEOUT)
    assert not response.upstream.stopped
    request.producer.resumeProducing()
    clock.advance(TIMEOUT - 1)
    assert not response.upstream.stopped
    clock.advance(1)
    assert response.upstream.stopped
