"""
The reverse API driven in memory, with no socket: a client request goes through L{ApiResource}
and the upstream client to the fake Azure's HTTP server, connected by
C{twisted.test.iosim} pumps, on a fake clock.  The upstream client's seam is its
C{endpoints} argument (the reactor and the way to connect both come from outside).  On the
same clock: the pool's idle timeout and its cap on idle connections.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from treq.testing import RequestTraversalAgent
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from aoaiproxy.config import LiveConfig, load_config
from aoaiproxy.resource import ApiResource
from aoaiproxy.testing import FakeAzure
from aoaiproxy.upstream import UpstreamClient

ENDPOINT = "https://fake-resource.openai.azure.com"


@attrs.define
class InMemory:
    """
    The upstream client's C{endpoints}: each connection goes to a new server protocol of the
    fake Azure, through a pump this keeps (and L{pump} runs, with the clock).
    """

    fake: FakeAzure
    clock: MemoryReactorClock
    pumps: list[iosim.IOPump] = attrs.Factory(list)
    asked: list[tuple[str, str, int]] = attrs.Factory(list)

    def __call__(self, scheme: str, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
        self.asked.append((scheme, host, port))
        return _Endpoint(self)

    def run(self, d: Deferred[Any], also: Any = None) -> Any:
        """Move bytes (and run due calls) until C{d} has a result, and return it; bounded."""
        results: list[Any] = []
        d.addBoth(results.append)
        for _ in range(100):
            if results:
                if isinstance(results[0], Failure):
                    results[0].raiseException()
                return results[0]
            if also is not None:
                also.flush()
            for pump in list(self.pumps):
                pump.flush()
            self.clock.advance(0)
        raise AssertionError("nothing more happens")

    def settle(self) -> None:
        """Move bytes until none move."""
        for _ in range(100):
            if not any([pump.flush() for pump in self.pumps]):
                return
        raise AssertionError("never settles")


@implementer(IStreamClientEndpoint)
@attrs.frozen
class _Endpoint:
    memory: InMemory

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        address = IPv4Address("TCP", "127.0.0.1", 443)
        client = factory.buildProtocol(address)
        # The fake's connection-tracking factory, so that open_connections counts these too.
        server = self.memory.fake._tracker.buildProtocol(address)
        assert client is not None and server is not None
        self.memory.pumps.append(
            iosim.connect(
                server,
                iosim.FakeTransport(server, isServer=True),
                client,
                iosim.FakeTransport(client, isServer=False),
                greet=False,
                clock=self.memory.clock,
            )
        )
        return succeed(client)


@implementer(IBodyProducer)
@attrs.define
class _Body:
    """A request body written at once (FileBodyProducer would need a running reactor)."""

    data: bytes
    length: int = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.length = len(self.data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.reason: Failure | None = None
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.done.callback(None)


def test_chat_completion_through_the_resource_in_memory() -> None:
    clock = MemoryReactorClock()
    fake = FakeAzure(clock)
    memory = InMemory(fake, clock)
    upstream = UpstreamClient(clock, endpoints=memory)
    live = LiveConfig(load_config({"endpoint": ENDPOINT}, {}))
    client = RequestTraversalAgent(ApiResource(live, upstream, clock))

    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()
    headers = Headers({b"Authorization": [b"Bearer client-key"], b"Content-Type": [b"application/json"]})
    d = client.request(b"POST", b"http://proxy.test/v1/chat/completions", headers, _Body(body))
    response: IResponse = memory.run(d, also=client)
    collect = _Collect()
    response.deliverBody(collect)
    memory.run(collect.done, also=client)
    assert collect.reason is not None and collect.reason.check(ResponseDone)

    assert response.code == 200
    answer = json.loads(collect.data)
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == "Hello from fake Azure (gpt-4o)"
    assert response.headers.getRawHeaders(b"access-control-allow-origin") == [b"*"]
    # What the upstream was asked, and where.
    assert memory.asked == [("https", "fake-resource.openai.azure.com", 443)]
    [received] = fake.requests
    assert received.method == "POST" and received.path == "/openai/deployments/gpt-4o/chat/completions"
    assert received.header("api-key") == "client-key"
    assert received.header("host") == "fake-resource.openai.azure.com"
    assert received.json()["messages"] == [{"role": "user", "content": "hi"}]


def test_idle_connections_are_capped_and_closed_after_the_idle_timeout() -> None:
    clock = MemoryReactorClock()
    fake = FakeAzure(clock)
    memory = InMemory(fake, clock)
    upstream = UpstreamClient(clock, endpoints=memory, max_idle_per_host=1, idle_timeout=50)
    url = b"https://fake-resource.openai.azure.com/openai/deployments/gpt-4o/chat/completions?api-version=1"
    body = json.dumps({"messages": []}).encode()

    def chat() -> None:
        response = memory.run(upstream.request(b"POST", url, [], body, connect_timeout=5, header_timeout=30))
        collect = _Collect()
        response.deliverBody(collect)
        memory.run(collect.done)
        assert response.code == 200 and json.loads(collect.data)["object"] == "chat.completion"

    # Two at once: two connections; once both are answered, one is kept and one closed.
    first = upstream.request(b"POST", url, [], body, connect_timeout=5, header_timeout=30)
    second = upstream.request(b"POST", url, [], body, connect_timeout=5, header_timeout=30)
    for d in (first, second):
        collect = _Collect()
        memory.run(d).deliverBody(collect)
        memory.run(collect.done)
    assert len(memory.asked) == 2
    memory.settle()
    assert fake.open_connections == 1
    # The kept one is reused.
    chat()
    assert len(memory.asked) == 2
    # Idle for less than the timeout: kept; past it: closed, and the next request connects.
    clock.advance(49)
    memory.settle()
    assert fake.open_connections == 1
    clock.advance(2)
    memory.settle()
    assert fake.open_connections == 0
    chat()
    assert len(memory.asked) == 3
