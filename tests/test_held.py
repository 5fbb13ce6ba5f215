"""
What a held stream keeps (issue 13, memory per open stream), over real sockets: the channel's
and the request's own state in slots (with Twisted's class defaults), and once a stream's
body is relayed, its request headers let go of but the client key the access line names the
client by, its response headers once written, and the connection's timer stopped; the
deadlines armed after it still fire; the upstream response's head is not kept either, nor
the attempts' copy of the request.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.web import http, server

from aoaiproxy.admission import Admitted
from aoaiproxy.gateway import ReplayBody
from aoaiproxy.rewrite import ClientRequest
from aoaiproxy.site import ProxyChannel, ProxyRequest
from aoaiproxy.testing import FakeAzure
from aoaiproxy.upstream.protocol import UpstreamResponse

from .conftest import Proxy
from .rawnet import connect, get_reactor

STREAM = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


def post(body: Any, key_header: bytes) -> bytes:
    data = json.dumps(body).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n%s\r\n"
        b"Content-Type: application/json\r\nX-Other: dropped\r\nContent-Length: %d\r\n\r\n"
        % (key_header, len(data))
    ) + data


def class_defaults(instance: object, cls: type) -> dict[str, Any]:
    """The slots of C{cls} that a base class of C{instance} has a class attribute for, with it."""
    found = {}
    for name in cls.__slots__:  # type: ignore[attr-defined]
        for base in type(instance).__mro__[1:]:
            if name in vars(base):
                found[name] = vars(base)[name]
                break
    return found


def test_slots_start_with_twisteds_class_defaults(make_proxy: Callable[..., Proxy]) -> None:
    """A slot hides the class attribute of Twisted's it is named after: it starts with its value."""
    channel = ProxyChannel()
    defaults = class_defaults(channel, ProxyChannel)
    assert {"transport", "connected", "length", "persistent", "MAX_LENGTH", "timeOut"} <= set(defaults)
    assert {name: getattr(channel, name) for name in defaults} == defaults
    built = make_proxy().site.buildProtocol(None)
    built.transport = StringTransport()
    request = ProxyRequest(built)
    defaults = class_defaults(request, ProxyRequest)
    assert {"code", "code_message", "startedWriting", "chunked", "sentLength", "finished"} <= set(defaults)
    assert {name: getattr(request, name) for name in defaults} == defaults
    assert (request.code, request.code_message) == (http.OK, http.RESPONSES[http.OK])
    assert request.defaultContentType == server.Request.defaultContentType


#: What a held stream keeps none of (L{_counts}).
_NOT_KEPT = (UpstreamResponse, ClientRequest, ReplayBody, Admitted)


def _counts() -> dict[str, int]:
    """How many objects of each of L{_NOT_KEPT}'s types are alive (after a collection)."""
    gc.collect()
    counts = dict.fromkeys((t.__name__ for t in _NOT_KEPT), 0)
    for o in gc.get_objects():
        if isinstance(o, _NOT_KEPT):
            counts[type(o).__name__] += 1
    return counts


@pytest_twisted.ensureDeferred
async def test_held_stream_keeps_only_the_client_key_and_logs_its_name(
    fake: FakeAzure, make_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    keys = tmp_path / "client-keys"
    keys.write_text("alice:sk-alice-1\nbob:sk-bob-2\n")
    proxy = make_proxy(client_keys=str(keys), idle_timeout=60)
    events: list[dict[str, Any]] = []
    access = proxy.site.access_log
    access.logger = Logger(namespace=access.logger.namespace, observer=events.append)
    fake.hold_last_chunk()
    before = _counts()
    client = await connect(proxy, post(STREAM, b"api-key: sk-bob-2"))
    await client.wait_for(b"chunk2 ")
    [channel] = proxy.site.connections.open
    [request] = channel.requests
    assert [(n.lower(), v) for n, v in request.requestHeaders.getAllRawHeaders()] == [
        (b"api-key", [b"sk-bob-2"])
    ]
    # Its response head was sent (with every header), and is not kept.
    head = client.received.split(b"\r\n\r\n", 1)[0].lower()
    assert b"content-type: text/event-stream" in head and b"access-control-allow-origin: *" in head
    assert list(request.responseHeaders.getAllRawHeaders()) == []
    # Nor is the upstream's response head (its headers): only its body's state is.  Nor the
    # attempts' state (the request's parsed body, its body, the plan), nor the head's verdict
    # (it holds the headers): the attempts stay reachable (the request's cancel).
    assert _counts() == before
    # Few enough names in their instance dictionaries for CPython to share their keys.
    assert len(vars(channel)) < 30 and len(vars(request)) < 30
    fake.release()
    await client.wait_for(lambda got: got.endswith(b"0\r\n\r\n"))
    [event] = [e for e in events if "access" in e]
    assert event["access"]["status"] == 200
    assert event["access"]["client_name"] == "bob"
    client.transport.loseConnection()  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_held_stream_without_client_names_keeps_no_request_header(
    fake: FakeAzure, make_proxy: Callable[..., Proxy]
) -> None:
    proxy = make_proxy()
    fake.hold_last_chunk()
    client = await connect(proxy, post(STREAM, b"Authorization: Bearer k"))
    await client.wait_for(b"chunk2 ")
    [channel] = proxy.site.connections.open
    [request] = channel.requests
    assert list(request.requestHeaders.getAllRawHeaders()) == []
    fake.release()
    await client.wait_for(lambda got: got.endswith(b"0\r\n\r\n"))
    client.transport.loseConnection()  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_deadlines_after_a_stream_still_fire(fake: FakeAzure, make_proxy: Callable[..., Proxy]) -> None:
    """
    The stream stopped the connection's timer: the next request's head timeout, and then the
    idle timeout, are still enforced on the same connection.
    """
    # Each half on its own proxy, the other deadline long: a stall of the machine between
    # the stream's end and the next head cannot let the idle timeout answer for the head's.
    proxy = make_proxy(header_timeout=0.5, idle_timeout=60)
    client = await connect(proxy, post(STREAM, b"Authorization: Bearer k"))
    await client.wait_for(lambda got: got.endswith(b"0\r\n\r\n"))
    client.received = b""
    client.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n")  # and no more
    got = await client.wait_for(b"request_timeout", timeout=10)
    assert got.startswith(b"HTTP/1.1 408 ")
    await client.closed

    proxy = make_proxy(idle_timeout=0.5)
    client = await connect(proxy, post(STREAM, b"Authorization: Bearer k"))
    await client.wait_for(lambda got: got.endswith(b"0\r\n\r\n"))
    await client.closed.addTimeout(10, get_reactor())  # idle: closed by the proxy
    assert client.received.endswith(b"0\r\n\r\n")
