"""
Metrics end to end (SPEC §14): C{twistd -n aoaiproxy --metrics-listen ...} as a user starts
it, a known mix of requests (plain, streamed with and without include_usage, embeddings, an
upstream 429, a tunnel), then C{/metrics} scraped from its own listener and its counters
checked exactly against what was sent and what the fake reports as usage.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from treq.client import HTTPClient
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

from aoaiproxy.testing import FakeAzure
from aoaiproxy.testing.usage import count_tokens, prompt_tokens

from ..conftest import Daemon, free_port, wait_for_port
from ..rawnet import connect, get_reactor
from ..test_metrics_wiring import fake_stream
from ..test_service import wait_until

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "count these five words"}]}
STREAM = {**CHAT, "stream": True}
ASKING = {**STREAM, "stream_options": {"include_usage": True}}
EMBED = {"model": "ada", "input": ["one two three", "four"]}
ROUTE = "/v1/chat/completions"


class Scrape:
    """One C{/metrics} text, read as samples: C{value(name, **labels)} (0 when absent)."""

    def __init__(self, text: str) -> None:
        self.samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def requests(self, route: str, model: str, status: int, backend: str | None = None) -> float:
        # A request with a model was sent to a backend: the one-backend form's is "default".
        if backend is None:
            backend = "default" if model else ""
        labels = {"route": route, "model": model, "backend": backend, "status": str(status)}
        return self.value("aoaiproxy_requests_total", **labels)

    def tokens(self, model: str, kind: str, backend: str = "default", client: str = "anonymous") -> float:
        labels = {"model": model, "backend": backend, "client": client, "type": kind}
        return self.value("aoaiproxy_tokens_total", **labels)


async def scrape(client: HTTPClient, port: int) -> Scrape:
    response = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert response.code == 200
    return Scrape((await response.content()).decode())


async def scrape_until(
    client: HTTPClient, port: int, done: Callable[[Scrape], bool], timeout: float = 10.0
) -> Scrape:
    """Scrape every 10 ms until C{done} holds of a scrape (bounded), and return that one."""
    reactor = get_reactor()
    deadline = reactor.seconds() + timeout
    while not done(latest := await scrape(client, port)):
        if reactor.seconds() > deadline:
            raise AssertionError("the scrapes never showed the expected values")
        await deferLater(reactor, 0.01, lambda: None)
    return latest


async def post(client: HTTPClient, daemon: Daemon, path: str, body: Any) -> tuple[int, bytes]:
    response = await client.post(daemon.url + path, json=body, headers={"Authorization": "Bearer client-key"})
    return response.code, await response.content()


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


def start_metered(start_daemon: Callable[..., Daemon], *args: str) -> tuple[Daemon, int]:
    metrics_port = free_port()
    daemon = start_daemon("--metrics-listen", f"tcp:{metrics_port}:interface=127.0.0.1", *args)
    wait_for_port(metrics_port, daemon.proc)
    return daemon, metrics_port


@pytest_twisted.ensureDeferred
async def test_scraped_counters_after_a_known_mix(
    fake: FakeAzure, start_daemon: Callable[..., Daemon], client: HTTPClient
) -> None:
    echo = get_reactor().listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
    try:
        echo_at = f"127.0.0.1:{echo.getHost().port}"
        daemon, metrics_port = start_metered(start_daemon, "--endpoint", fake.url, "--forward-allow", echo_at)
        for _ in range(2):
            assert (await post(client, daemon, ROUTE, CHAT))[0] == 200
        status, plain_stream = await post(client, daemon, ROUTE, STREAM)
        assert status == 200
        status, asked_stream = await post(client, daemon, ROUTE, ASKING)
        assert status == 200
        assert (await post(client, daemon, "/v1/embeddings", EMBED))[0] == 200
        fake.rate_limit_next()
        assert (await post(client, daemon, ROUTE, STREAM))[0] == 429
        # Nothing on the API's port.
        response = await client.get(daemon.url + "/metrics")
        assert response.code == 404
        await response.content()
        # A tunnel: 3000 bytes up, echoed down.
        tunnel = await connect(daemon.port, b"CONNECT %s HTTP/1.1\r\nHost: x\r\n\r\n" % echo_at.encode())
        await tunnel.wait_for(b"\r\n\r\n")
        tunnel.send(b"z" * 3000)
        await tunnel.wait_for(lambda received: received.count(b"z") == 3000)
        during = await scrape(client, metrics_port)
        await tunnel.abort()

        after = await scrape_until(client, metrics_port, lambda m: m.requests("CONNECT", "", 200) == 1)
        await wait_until(lambda: "CONNECT" in daemon.log(), "the tunnel's access line")
    finally:
        await echo.stopListening()

    # The client that did not ask got the stream the fake sends without usage, byte for byte;
    # the one that asked got it with the usage.
    assert plain_stream == fake_stream(fake, plain_stream, STREAM, include_usage=False)
    assert asked_stream == fake_stream(fake, asked_stream, ASKING, include_usage=True)
    upstream_bodies = [r.json() for r in fake.requests if r.path.endswith("/chat/completions")]
    assert [b.get("stream_options") for b in upstream_bodies] == [
        None,
        None,
        {"include_usage": True},
        {"include_usage": True},
        {"include_usage": True},
    ]

    # Requests, by route, model and status.
    assert after.requests(ROUTE, "gpt-4o", 200) == 4
    assert after.requests(ROUTE, "gpt-4o", 429) == 1
    assert after.requests("/v1/embeddings", "ada", 200) == 1
    assert after.requests("other", "", 404) == 1
    assert after.requests("CONNECT", "", 200) == 1
    total = sum(v for (name, _), v in after.samples.items() if name == "aoaiproxy_requests_total")
    assert total == 8
    chat = {"route": ROUTE, "model": "gpt-4o", "backend": "default"}
    assert after.value("aoaiproxy_request_duration_seconds_count", **chat) == 5
    assert after.value("aoaiproxy_time_to_first_byte_seconds_count", **chat) == 5

    # Tokens: what the fake's usage said, summed.
    prompt = prompt_tokens(CHAT)
    answer = count_tokens("Hello from fake Azure (gpt-4o)")
    assert after.tokens("gpt-4o", "prompt") == 4 * prompt
    assert after.tokens("gpt-4o", "completion") == 2 * answer + 2 * fake.stream_chunks
    assert after.tokens("ada", "prompt") == prompt_tokens(EMBED) == 4
    assert after.tokens("ada", "completion") == 0

    # Open counts: the tunnel while it was open, nothing once done; its bytes each way.
    assert during.value("aoaiproxy_open_tunnels") == 1
    assert after.value("aoaiproxy_open_tunnels") == 0
    assert after.value("aoaiproxy_open_streams") == 0
    assert after.value("aoaiproxy_tunnel_bytes_total", direction="up") == 3000
    assert after.value("aoaiproxy_tunnel_bytes_total", direction="down") == 3000
    assert after.value("process_open_fds") > 0

    # The access lines carry the usage.
    assert f"prompt_tokens={prompt} completion_tokens={answer}" in daemon.log()


@pytest_twisted.ensureDeferred
async def test_connections_close_to_zero(
    fake: FakeAzure, start_daemon: Callable[..., Daemon], client: HTTPClient
) -> None:
    daemon, metrics_port = start_metered(start_daemon, "--endpoint", fake.url)
    held = [await connect(daemon.port) for _ in range(3)]
    # The scrapes' own connections are the metrics listener's: not counted.
    await scrape_until(client, metrics_port, lambda m: m.value("aoaiproxy_open_connections") == 3)
    for raw in held:
        await raw.abort()
    await scrape_until(client, metrics_port, lambda m: m.value("aoaiproxy_open_connections") == 0)


@pytest_twisted.ensureDeferred
async def test_failover_attempts_by_backend(
    start_daemon: Callable[..., Daemon], client: HTTPClient, tmp_path: Path
) -> None:
    reactor = get_reactor()
    east, west = (FakeAzure(reactor, name=n, api_key=f"key-{n}") for n in ("east", "west"))
    for f in (east, west):
        f.listen()
    try:
        keys = tmp_path / "client-keys"
        keys.write_text("app:client-key\n")
        config = tmp_path / "aoaiproxy.toml"
        config.write_text(
            f'client_keys_file = "{keys}"\n'
            + "".join(
                f'[[backend]]\nname = "{f.name}"\nendpoint = "{f.url}"\napi_key = "key-{f.name}"\n'
                f"priority = {place}\n"
                for place, f in enumerate((east, west))
            )
        )
        daemon, metrics_port = start_metered(start_daemon, "--config", str(config))
        east.rate_limit_next()
        status, body = await post(client, daemon, ROUTE, CHAT)
        assert status == 200, body
        metrics = await scrape(client, metrics_port)
    finally:
        await east.stop()
        await west.stop()
    attempts = "aoaiproxy_upstream_attempts_total"
    assert metrics.value(attempts, backend="east", outcome="429") == 1
    assert metrics.value(attempts, backend="west", outcome="ok") == 1
    assert metrics.requests(ROUTE, "gpt-4o", 200, backend="west") == 1
    assert metrics.tokens("gpt-4o", "prompt", backend="west", client="app") == prompt_tokens(CHAT)
    assert json.loads(body)["choices"]
