"""
Streaming (SPEC §7) over real sockets: chunks arrive while the upstream still holds the last
one (no buffering), a client that stops reading pauses the upstream (backpressure), a client
that disconnects closes the upstream connection (cancellation), Azure's filter-only frames are
dropped (whatever the stream's line ends, and from clients that accept gzip), an event the
filter cannot read passes unchanged, and every stream ends with a blank line.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site

from aoaiproxy.testing import FakeAzure

from .conftest import Proxy, get_reactor
from .rawnet import connect, raw_post

STREAM = {
    "model": "gpt-3.5-turbo",
    "stream": True,
    "stream_options": {"include_usage": True},
    "messages": [{"role": "user", "content": "hi"}],
}


def dechunk(raw: bytes) -> bytes:
    """The body of a chunked HTTP/1.1 response (head stripped)."""
    body = raw.split(b"\r\n\r\n", 1)[1]
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out


@pytest_twisted.ensureDeferred
async def test_first_chunks_arrive_while_upstream_holds_the_last(
    fake: FakeAzure, make_proxy: Callable[..., Proxy]
) -> None:
    proxy = make_proxy()
    fake.hold_last_chunk()
    client = await connect(proxy, raw_post("/v1/chat/completions", STREAM))
    await client.wait_for(b"chunk2 ")
    assert fake.held_streams == 1
    assert b"[DONE]" not in client.received
    assert b"text/event-stream" in client.received.split(b"\r\n\r\n", 1)[0].lower()
    # Once the attempts are over no attempt sends the body again: a held stream keeps none.
    [channel] = proxy.site.connections.open
    [request] = channel.requests
    assert request.content is None
    fake.release()
    raw = await client.wait_for(lambda got: got.endswith(b"0\r\n\r\n"))
    body = dechunk(raw)
    events = [e for e in body.split(b"\n\n") if e]
    assert body.endswith(b"data: [DONE]\n\n")
    # Azure's filter-only first frame is gone; every other frame, usage among them, stays.
    assert b"prompt_filter_results" not in body
    payloads = [json.loads(e[len(b"data: ") :]) for e in events[:-1]]
    assert all(p["choices"] for p in payloads[:-1])
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]
    client.transport.loseConnection()  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_keep_filter_frames(fake: FakeAzure, make_proxy: Callable[..., Proxy]) -> None:
    proxy = make_proxy(keep_filter_frames=True)
    client = await connect(proxy, raw_post("/v1/chat/completions", STREAM))
    raw = await client.wait_for(lambda got: got.endswith(b"0\r\n\r\n"))
    body = dechunk(raw)
    first = json.loads(body.split(b"\n\n")[0][len(b"data: ") :])
    assert first["choices"] == [] and "prompt_filter_results" in first
    client.transport.loseConnection()  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_stream_without_final_blank_line_gets_one(
    fake: FakeAzure, make_proxy: Callable[..., Proxy]
) -> None:
    proxy = make_proxy()
    fake.respond_next(200, b"data: {}\n\ndata: [DONE]", {"content-type": "text/event-stream"})
    client = await connect(proxy, raw_post("/v1/chat/completions", STREAM))
    raw = await client.wait_for(lambda got: got.endswith(b"0\r\n\r\n"))
    assert dechunk(raw) == b"data: {}\n\ndata: [DONE]\n\n"
    client.transport.loseConnection()  # type: ignore[union-attr]


def proxy_reads_upstream(fake: FakeAzure) -> bool:
    """Whether the proxy's socket to the fake upstream is being read (not paused)."""
    [conn] = fake._tracker.protocols
    local_port = conn.transport.getPeer().port
    for reader in get_reactor().getReaders():
        get_host = getattr(reader, "getHost", None)
        if get_host is not None and getattr(get_host(), "port", None) == local_port:
            return True
    return False


async def proxy_stops_reading_upstream(fake: FakeAzure) -> None:
    """
    Each time the upstream is pushed back, look whether the proxy stopped reading it.  A proxy
    without backpressure keeps reading until the whole stream is sent, the upstream stops
    pausing, and the bounded wait fails.
    """
    for _ in range(1000):
        await fake.wait_stream_paused().addTimeout(20, get_reactor())
        if not proxy_reads_upstream(fake):
            return
    raise AssertionError("the proxy never stopped reading its upstream")


@pytest_twisted.ensureDeferred
async def test_client_that_stops_reading_pauses_the_upstream(
    fake: FakeAzure, make_proxy: Callable[..., Proxy]
) -> None:
    proxy = make_proxy()
    fake.big_stream_bytes = 64 * 1024 * 1024
    client = await connect(proxy, raw_post("/v1/chat/completions", STREAM))
    await client.wait_for(b"\r\n\r\n")
    client.transport.pauseProducing()  # type: ignore[union-attr]
    await proxy_stops_reading_upstream(fake)
    # What sits in the client's and the proxy's buffers is bounded, not the whole body.
    assert fake.bytes_sent < 24 * 1024 * 1024, fake.bytes_sent
    closed = fake.wait_connection_closed()
    client.transport.abortConnection()  # type: ignore[union-attr]
    await closed.addTimeout(10, get_reactor())


@pytest_twisted.ensureDeferred
async def test_client_disconnect_cancels_the_upstream(
    fake: FakeAzure, make_proxy: Callable[..., Proxy]
) -> None:
    proxy = make_proxy()
    fake.hold_last_chunk()
    client = await connect(proxy, raw_post("/v1/chat/completions", STREAM))
    await client.wait_for(b"chunk0 ")
    assert fake.open_connections == 1
    closed = fake.wait_connection_closed()
    client.transport.abortConnection()  # type: ignore[union-attr]
    # The proxy closes its upstream connection right away (bounded wait, not a timing test).
    await closed.addTimeout(2, get_reactor())
    assert fake.open_connections == 0


class Silent(Protocol):
    """An upstream that accepts, reads the request, and never answers."""

    def __init__(self, got_request: Deferred[None], closed: Deferred[None]) -> None:
        self.got_request = got_request
        self.closed = closed

    def dataReceived(self, data: bytes) -> None:
        if not self.got_request.called:
            self.got_request.callback(None)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed.callback(None)


@pytest_twisted.ensureDeferred
async def test_client_disconnect_before_headers_cancels_the_upstream(
    make_proxy: Callable[..., Proxy],
) -> None:
    from twisted.internet.protocol import Factory

    got_request: Deferred[None] = Deferred()
    closed: Deferred[None] = Deferred()
    port = get_reactor().listenTCP(
        0, Factory.forProtocol(lambda: Silent(got_request, closed)), interface="127.0.0.1"
    )
    try:
        proxy = make_proxy(endpoint=f"http://127.0.0.1:{port.getHost().port}")
        client = await connect(proxy, raw_post("/v1/chat/completions", STREAM))
        await got_request.addTimeout(10, get_reactor())
        client.transport.abortConnection()  # type: ignore[union-attr]
        await closed.addTimeout(2, get_reactor())
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_backpressure_pause_is_not_upstream_silence(
    fake: FakeAzure, make_proxy: Callable[..., Proxy]
) -> None:
    """A client that stops reading for longer than --upstream-timeout still gets its stream:
    only silence from the upstream while we are reading counts."""
    from twisted.internet.task import deferLater

    proxy = make_proxy(upstream_timeout="0.3")
    fake.big_stream_bytes = 16 * 1024 * 1024
    client = await connect(proxy, raw_post("/v1/chat/completions", STREAM))
    await client.wait_for(b"\r\n\r\n")
    client.transport.pauseProducing()  # type: ignore[union-attr]
    await proxy_stops_reading_upstream(fake)
    # The condition under test is the passing of time: three inactivity timeouts go by
    # while the proxy is held back by its own client.
    await deferLater(get_reactor(), 1.0, lambda: None)
    client.transport.resumeProducing()  # type: ignore[union-attr]
    raw = await client.wait_for(lambda got: got.endswith(b"0\r\n\r\n"))
    assert dechunk(raw).endswith(b"data: [DONE]\n\n")
    client.transport.loseConnection()  # type: ignore[union-attr]


FILTER_ONLY = (
    b'data: {"choices":[],"created":0,"id":"","model":"","object":"",'
    b'"prompt_filter_results":[{"prompt_index":0,"content_filter_results":{}}]}'
)
CONTENT = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"hi"}}]}'


class GzipWhenAsked(Resource):
    """An upstream that, as Azure's front ends do, gzips a stream when the request accepts it."""

    isLeaf = True

    def __init__(self, stream: bytes) -> None:
        super().__init__()
        self.stream = stream
        self.asked: list[bytes | None] = []

    def render_POST(self, request: Any) -> bytes:
        accepted = request.getHeader(b"accept-encoding")
        self.asked.append(accepted)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        if accepted is not None and b"gzip" in accepted:
            request.setHeader(b"content-encoding", b"gzip")
            return gzip.compress(self.stream)
        return self.stream


@pytest_twisted.ensureDeferred
async def test_gzip_accepting_client_still_gets_filtered_stream(make_proxy: Callable[..., Proxy]) -> None:
    """
    httpx-based SDKs send Accept-Encoding: gzip; passed on, Azure's answer would be gzip and
    the filter could not read it.  Streams are asked for unencoded instead.
    """
    stream = FILTER_ONLY + b"\n\n" + CONTENT + b"\n\ndata: [DONE]\n\n"
    upstream = GzipWhenAsked(stream)
    port = get_reactor().listenTCP(0, Site(upstream), interface="127.0.0.1")
    try:
        proxy = make_proxy(endpoint=f"http://127.0.0.1:{port.getHost().port}")
        request = raw_post("/v1/chat/completions", STREAM, extra=b"Accept-Encoding: gzip, deflate\r\n")
        client = await connect(proxy, request)
        raw = await client.wait_for(lambda got: got.endswith(b"0\r\n\r\n"))
        head = raw.split(b"\r\n\r\n", 1)[0].lower()
        assert b"content-encoding" not in head
        assert dechunk(raw) == CONTENT + b"\n\ndata: [DONE]\n\n"
        assert upstream.asked == [b"identity"]
        client.transport.loseConnection()  # type: ignore[union-attr]
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_filter_frames_dropped_whatever_the_line_ends(
    fake: FakeAzure, make_proxy: Callable[..., Proxy]
) -> None:
    proxy = make_proxy()
    body = FILTER_ONLY + b"\n\r\n" + CONTENT + b"\r\n\n" + FILTER_ONLY + b"\r\r\n" + b"data: [DONE]\n\r\n"
    fake.respond_next(200, body, {"content-type": "text/event-stream"})
    client = await connect(proxy, raw_post("/v1/chat/completions", STREAM))
    raw = await client.wait_for(lambda got: got.endswith(b"0\r\n\r\n"))
    assert dechunk(raw) == CONTENT + b"\r\n\n" + b"data: [DONE]\n\r\n"
    client.transport.loseConnection()  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_event_too_deep_to_read_passes_unchanged(
    fake: FakeAzure, make_proxy: Callable[..., Proxy]
) -> None:
    """Before: RecursionError inside the relay, and the client's stream was reset."""
    proxy = make_proxy()
    deep = b'data: {"choices":[{"delta":{}}],"prompt_filter_results":' + b"[" * 5000 + b"]" * 5000 + b"}\n\n"
    body = CONTENT + b"\n\n" + deep + b"data: [DONE]\n\n"
    fake.respond_next(200, body, {"content-type": "text/event-stream"})
    client = await connect(proxy, raw_post("/v1/chat/completions", STREAM))
    raw = await client.wait_for(lambda got: got.endswith(b"0\r\n\r\n"))
    assert dechunk(raw) == body
    client.transport.loseConnection()  # type: ignore[union-attr]
