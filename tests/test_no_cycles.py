"""
A request served through the proxy (in this process, on real loopback sockets) leaves no
reference cycle behind: its objects (the request, the upstream response, the relay) are freed
by reference counting when it is done, not by the cyclic collector, whose passes over every
young object cost a loaded proxy several microseconds per request.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest_twisted

from aoaiproxy.relay import BodyRelay
from aoaiproxy.site import ProxyRequest
from aoaiproxy.testing import FakeAzure
from aoaiproxy.upstream.protocol import UpstreamResponse

from .conftest import Proxy
from .test_reverse import post

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
WATCHED = (ProxyRequest, BodyRelay, UpstreamResponse)

#: What L{cyclic_garbage} gets: the objects of C{found(keep)}, and their names.
Found = Callable[[Callable[[object], bool]], list[str]]


def watched(thing: object) -> bool:
    return isinstance(thing, WATCHED)


async def chat(proxy: Proxy, body: dict[str, object]) -> tuple[int, bytes]:
    code, _, content = await post(proxy.url + "/v1/chat/completions", body)
    return code, content


@pytest_twisted.ensureDeferred
async def test_a_request_and_a_stream_leave_no_cycle(
    fake: FakeAzure, make_proxy: Callable[..., Proxy], cyclic_garbage: Found
) -> None:
    proxy = make_proxy()
    code, content = await chat(proxy, CHAT)
    assert code == 200 and json.loads(content)["object"] == "chat.completion"
    code, content = await chat(proxy, {**CHAT, "stream": True})
    assert code == 200 and content.rstrip().endswith(b"data: [DONE]")
    assert cyclic_garbage(watched) == []


@pytest_twisted.ensureDeferred
async def test_a_closed_upstream_connection_leaves_no_cycle(
    fake: FakeAzure, make_proxy: Callable[..., Proxy], cyclic_garbage: Found
) -> None:
    """
    An upstream connection (plain TCP to an address: the one factory shared with the forward
    proxy's targets) is freed without the collector once closed: Twisted's connector and
    client would keep each other.
    """
    proxy = make_proxy()
    code, _ = await chat(proxy, CHAT)
    assert code == 200
    await proxy.upstream.close()  # fires from the connection's connectionLost
    # The connector hears of the loss after that callback: another exchange with the fake
    # makes sure it has.
    assert (await chat(proxy, CHAT))[0] == 200
    modules = ("twisted.internet.tcp", "aoaiproxy.upstream", "aoaiproxy.connecting")
    assert cyclic_garbage(lambda o: type(o).__module__.startswith(modules)) == []
