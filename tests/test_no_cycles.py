"""
A request served through the proxy (in this process, on real loopback sockets) leaves no
reference cycle behind: its objects (the request, the upstream response, the relay) are freed
by reference counting when it is done, not by the cyclic collector, whose passes over every
young object cost a loaded proxy several microseconds per request.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Iterator

import pytest
import pytest_twisted
import treq

from aoaiproxy.relay import BodyRelay
from aoaiproxy.site import ProxyRequest
from aoaiproxy.testing import FakeAzure
from aoaiproxy.upstream.protocol import UpstreamResponse

from .conftest import Proxy

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
WATCHED = (ProxyRequest, BodyRelay, UpstreamResponse)


@pytest.fixture
def cyclic_garbage() -> Iterator[Callable[[], list[str]]]:
    """
    The collector off and every unreachable object kept (C{gc.DEBUG_SAVEALL}); the fixture's
    value lists the watched objects that only the collector would have freed since.
    """
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.garbage.clear()

    def found() -> list[str]:
        gc.collect()
        return sorted(type(o).__name__ for o in gc.garbage if isinstance(o, WATCHED))

    try:
        yield found
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()


async def post(proxy: Proxy, body: dict[str, object]) -> tuple[int, bytes]:
    response = await treq.post(
        proxy.url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": "Bearer client-key"},
    )
    return response.code, await response.content()


@pytest_twisted.ensureDeferred
async def test_a_request_and_a_stream_leave_no_cycle(
    fake: FakeAzure, make_proxy: Callable[..., Proxy], cyclic_garbage: Callable[[], list[str]]
) -> None:
    proxy = make_proxy()
    code, content = await post(proxy, CHAT)
    assert code == 200 and json.loads(content)["object"] == "chat.completion"
    code, content = await post(proxy, {**CHAT, "stream": True})
    assert code == 200 and content.rstrip().endswith(b"data: [DONE]")
    assert cyclic_garbage() == []


@pytest_twisted.ensureDeferred
async def test_a_closed_upstream_connection_leaves_no_cycle(
    fake: FakeAzure, make_proxy: Callable[..., Proxy], cyclic_garbage: Callable[[], list[str]]
) -> None:
    """
    An upstream connection (plain TCP to an address: the one factory shared with the forward
    proxy's targets) is freed without the collector once closed: Twisted's connector and
    client would keep each other.
    """
    proxy = make_proxy()
    code, _ = await post(proxy, CHAT)
    assert code == 200
    await proxy.upstream.close()  # fires from the connection's connectionLost
    # The connector hears of the loss after that callback: another exchange with the fake
    # makes sure it has.
    assert (await post(proxy, CHAT))[0] == 200
    gc.collect()
    left = sorted(
        type(o).__name__
        for o in gc.garbage
        if type(o).__module__.startswith(
            ("twisted.internet.tcp", "aoaiproxy.upstream", "aoaiproxy.connecting")
        )
    )
    assert left == [], left
