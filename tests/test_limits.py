"""
Limits on what a client may send and how long it may take, each with its exact client-visible
outcome: 414, 431, 400, 408, 413 (also for chunked bodies), idle close, the per-listener
connection cap (503), the CONNECT tunnel idle timeout, and the options themselves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol

from aoaiproxy.capacity import connections_for, open_file_limit
from aoaiproxy.config import ConfigError, load_config
from aoaiproxy.site import Listener
from aoaiproxy.tap import Options

from .conftest import Daemon, Proxy
from .rawnet import (
    Connect,
    RawClient,
    assert_openai_error,
    get_reactor,
    parse_response,
)

HEALTH = b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n"


def port_of(proxy: Proxy) -> int:
    return int(proxy.port.getHost().port)  # type: ignore[attr-defined]


async def refused(raw_connect: Connect, proxy: Proxy, data: bytes) -> tuple[Any, RawClient]:
    """Send C{data}, read until the proxy closes; the parsed answer and the client."""
    client = await raw_connect(port_of(proxy))
    client.send(data)
    await client.closed
    # An orderly close after the answer.
    assert client.reason is not None and client.reason.check(ConnectionDone), client.reason
    return parse_response(client.received), client


# -- request head limits ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_request_line_over_limit_is_414(make_proxy: Callable[..., Proxy], raw_connect: Connect) -> None:
    proxy = make_proxy(max_request_line=100)
    ok = b"GET /healthz?" + b"a" * (100 - len(b"GET /healthz? HTTP/1.1")) + b" HTTP/1.1\r\nHost: p\r\n\r\n"
    assert len(ok.split(b"\r\n")[0]) == 100
    client = await raw_connect(port_of(proxy))
    client.send(ok)
    assert parse_response(await client.wait_for(b"}")).status == 200

    response, _ = await refused(raw_connect, proxy, b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: p\r\n\r\n")
    assert_openai_error(response, 414, "request_line_too_long")
    assert response.headers[b"connection"] == b"close"


@pytest_twisted.ensureDeferred
async def test_request_line_longer_than_whole_head_without_newline_is_414(
    make_proxy: Callable[..., Proxy], raw_connect: Connect
) -> None:
    proxy = make_proxy(max_request_line=100, max_header_size=1024)
    # No line end at all: Twisted's line reader gives up at its own limit.
    response, _ = await refused(raw_connect, proxy, b"GET /" + b"a" * 5000)
    assert_openai_error(response, 414, "request_line_too_long")


@pytest_twisted.ensureDeferred
async def test_header_size_at_limit_passes_and_over_is_431(
    make_proxy: Callable[..., Proxy], raw_connect: Connect
) -> None:
    limit = 1024
    proxy = make_proxy(max_header_size=limit)

    def head(size: int) -> bytes:
        lines = [b"GET /healthz HTTP/1.1", b"Host: p", b"X-Pad: "]
        lines[-1] += b"x" * (size - sum(map(len, lines)))
        assert sum(map(len, lines)) == size  # what counts: the lines without their CRLF
        return b"\r\n".join(lines) + b"\r\n\r\n"

    client = await raw_connect(port_of(proxy))
    client.send(head(limit))
    assert parse_response(await client.wait_for(b"}")).status == 200

    response, _ = await refused(raw_connect, proxy, head(limit + 1))
    assert_openai_error(response, 431, "request_header_fields_too_large")

    # One huge header line, far over the limit, sent in one piece.
    response, _ = await refused(
        raw_connect, proxy, b"GET / HTTP/1.1\r\nX-Big: " + b"y" * 100_000 + b"\r\n\r\n"
    )
    assert_openai_error(response, 431, "request_header_fields_too_large")


@pytest_twisted.ensureDeferred
async def test_header_count_at_limit_passes_and_over_is_431(
    make_proxy: Callable[..., Proxy], raw_connect: Connect
) -> None:
    proxy = make_proxy(max_headers=5)

    def head(count: int) -> bytes:
        fields = b"".join(b"X-H%d: v\r\n" % i for i in range(count - 1))
        return b"GET /healthz HTTP/1.1\r\nHost: p\r\n" + fields + b"\r\n"

    client = await raw_connect(port_of(proxy))
    client.send(head(5))
    assert parse_response(await client.wait_for(b"}")).status == 200

    response, _ = await refused(raw_connect, proxy, head(6))
    assert_openai_error(response, 431, "request_header_fields_too_large")


@pytest.mark.parametrize(
    "data",
    [
        b"GET\r\n\r\n",  # no target, no version
        b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 12abc\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n",  # only one leading empty line is tolerated
    ],
)
@pytest_twisted.ensureDeferred
async def test_malformed_requests_are_400(
    make_proxy: Callable[..., Proxy], raw_connect: Connect, data: bytes
) -> None:
    proxy = make_proxy()
    response, _ = await refused(raw_connect, proxy, data)
    assert_openai_error(response, 400, "bad_request")


# -- time limits -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_slow_request_head_gets_408(make_proxy: Callable[..., Proxy], raw_connect: Connect) -> None:
    # The idle timeout is long: only the head timer can end this connection.
    proxy = make_proxy(header_timeout=0.3, idle_timeout=600)
    response, client = await refused(raw_connect, proxy, b"GET /healthz HTTP/1.1\r\nHost: p\r\nX-Slow")
    assert_openai_error(response, 408, "request_timeout")
    assert client.received.count(b"HTTP/1.1") == 1


@pytest_twisted.ensureDeferred
async def test_head_timer_starts_again_for_each_request(
    make_proxy: Callable[..., Proxy], raw_connect: Connect
) -> None:
    proxy = make_proxy(header_timeout=0.3, idle_timeout=600)
    client = await raw_connect(port_of(proxy))
    client.send(HEALTH + b"GET /healthz HTTP/1.1\r\n")  # a whole request, then half of one
    await client.closed
    first, _, rest = client.received.partition(b"}")
    assert parse_response(first + b"}").status == 200
    assert_openai_error(parse_response(rest), 408, "request_timeout")


@pytest_twisted.ensureDeferred
async def test_idle_keep_alive_connection_is_closed_silently(
    make_proxy: Callable[..., Proxy], raw_connect: Connect
) -> None:
    proxy = make_proxy(idle_timeout=0.3, header_timeout=600)
    client = await raw_connect(port_of(proxy))
    client.send(HEALTH)
    await client.closed
    assert client.reason is not None and client.reason.check(ConnectionDone), client.reason
    assert parse_response(client.received).status == 200
    assert client.received.endswith(b'{"status": "ok"}')  # nothing after the answer

    silent = await raw_connect(port_of(proxy))
    await silent.closed
    assert silent.received == b""


@pytest_twisted.ensureDeferred
async def test_long_upstream_wait_is_not_cut_by_idle_timeout(
    fake: Any, make_proxy: Callable[..., Proxy]
) -> None:
    # The idle timeout is off while a request is in flight (Twisted suspends it): each gap
    # between chunks is longer than the timeout.
    proxy = make_proxy(idle_timeout=0.2)
    fake.stream_interval = 0.3
    fake.stream_chunks = 2
    response = await treq.post(
        proxy.url + "/v1/chat/completions",
        json={"model": "gpt-4o", "messages": [], "stream": True},
        headers={"Authorization": "Bearer k"},
    )
    body = await response.content()
    assert response.code == 200
    assert body.rstrip().endswith(b"data: [DONE]")


# -- body size -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_announced_body_over_max_body_is_413_before_it_is_sent(
    fake: Any, make_proxy: Callable[..., Proxy], raw_connect: Connect
) -> None:
    proxy = make_proxy(max_body=100)
    client = await raw_connect(port_of(proxy))
    client.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: 101\r\n\r\n")
    assert_openai_error(parse_response(await client.wait_for(b"}}")), 413, "request_too_large")
    assert fake.requests == []


@pytest_twisted.ensureDeferred
async def test_chunked_body_over_max_body_is_413_before_the_rest(
    fake: Any, make_proxy: Callable[..., Proxy], raw_connect: Connect
) -> None:
    proxy = make_proxy(max_body=100)
    client = await raw_connect(port_of(proxy))
    client.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n")
    client.send(b"60\r\n" + b"a" * 0x60 + b"\r\n")  # 96 bytes: still under
    client.send(b"5\r\nbbbbb\r\n")  # 101: over, and the body has not ended
    response = parse_response(await client.wait_for(b"}}"))
    assert_openai_error(response, 413, "request_too_large")
    assert response.headers[b"connection"] == b"close"
    assert fake.requests == []


# -- connections per listener ----------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def capped(make_proxy: Callable[..., Proxy]) -> AsyncIterator[Callable[..., tuple[int, Listener]]]:
    """A listener with the connection cap, as the daemon listens."""
    ports: list[IListeningPort] = []

    def make(**flags: Any) -> tuple[int, Listener]:
        proxy = make_proxy(**flags)
        cap = proxy.site.listener()
        port = get_reactor().listenTCP(0, cap, interface="127.0.0.1")
        ports.append(port)
        return port.getHost().port, cap

    yield make
    for port in ports:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_connections_over_the_cap_get_503_and_close(
    capped: Callable[..., tuple[int, Listener]], raw_connect: Connect
) -> None:
    port, cap = capped(max_connections=2)
    held = [await raw_connect(port), await raw_connect(port)]
    for client in held:  # both are accepted and served, and stay open (keep-alive)
        client.send(HEALTH)
        assert parse_response(await client.wait_for(b"}")).status == 200
    assert cap.open_connections == 2

    over = await raw_connect(port)
    await over.closed
    assert over.reason is not None and over.reason.check(ConnectionDone), over.reason
    response = parse_response(over.received)
    assert_openai_error(response, 503, "server_busy")
    assert response.json()["error"]["type"] == "server_error"
    assert response.headers[b"retry-after"] == b"1"

    await held[0].abort()
    again = await raw_connect(port)
    again.send(HEALTH)
    assert parse_response(await again.wait_for(b"}")).status == 200
    assert cap.open_connections == 2


# -- options ---------------------------------------------------------------------------------


def test_limit_options_defaults_sources_and_errors(tmp_path: Any) -> None:
    base = {"endpoint": "https://r.openai.azure.com"}
    c = load_config(base, {})
    assert (c.max_request_line, c.max_header_size, c.max_headers) == (8192, 16384, 100)
    assert (c.header_timeout, c.idle_timeout, c.tunnel_idle_timeout) == (30.0, 60.0, 300.0)
    assert c.max_connections == connections_for(open_file_limit())  # tests/test_capacity.py

    f = tmp_path / "c.toml"
    f.write_text("max_headers = 7\nidle_timeout = 2.5\nmax_connections = 9\n")
    c = load_config({**base, "config": str(f), "max_headers": "8"}, {})
    assert (c.max_headers, c.idle_timeout, c.max_connections) == (8, 2.5, 9)

    for name, value, message in [
        ("max_headers", "0", "--max-headers: must be at least 1"),
        ("max_connections", "1.5", "--max-connections: '1.5' is not a whole number"),
        ("header_timeout", "0", "--header-timeout: must be more than 0 seconds"),
        ("tunnel_idle_timeout", "-1", "--tunnel-idle-timeout: '-1' must be a positive number"),
        ("max_header_size", "10", "--max-header-size: must be at least 64"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_config({**base, name: value}, {})
        assert str(e.value) == message


def test_help_shows_every_limit_with_its_default() -> None:
    text = " ".join(str(Options()).split())
    for option, default in [
        ("--max-request-line", "8192"),
        ("--max-header-size", "16384"),
        ("--max-headers", "100"),
        ("--header-timeout", "30"),
        ("--idle-timeout", "60"),
        ("--tunnel-idle-timeout", "300"),
        ("--max-connections", "(open-file limit - 100) // 2"),
        ("--max-body", "67108864"),
    ]:
        assert option in text
        after = text.split(option, 1)[1]
        assert f"[default {default}" in after.split("--", 1)[0], option


# -- the daemon: listeners are capped, tunnels time out ----------------------------------------


class _Silent(Protocol):
    """A CONNECT target that accepts and never says anything."""


@pytest_twisted.ensureDeferred
async def test_daemon_caps_connections_and_times_out_idle_tunnels(
    start_daemon: Callable[..., Daemon], raw_connect: Connect
) -> None:
    reactor = get_reactor()
    target = reactor.listenTCP(0, Factory.forProtocol(_Silent), interface="127.0.0.1")
    try:
        target_port = target.getHost().port
        daemon = start_daemon(
            "--endpoint",
            "http://127.0.0.1:9",
            "--forward-allow",
            f"127.0.0.1:{target_port}",
            "--tunnel-idle-timeout",
            "0.3",
            "--max-connections",
            "2",
        )
        tunnel = await raw_connect(daemon.port)
        tunnel.send(
            b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (target_port, target_port)
        )
        established = await tunnel.wait_for(b"\r\n\r\n")
        assert established.startswith(b"HTTP/1.1 200")

        # The tunnel and a served keep-alive connection hold the two this listener allows.
        # (Served: so the daemon has also seen start_daemon's probe connection close.)
        other = await raw_connect(daemon.port)
        other.send(HEALTH)
        assert parse_response(await other.wait_for(b"}")).status == 200
        over = await raw_connect(daemon.port)
        await over.closed
        assert_openai_error(parse_response(over.received), 503, "server_busy")

        await tunnel.closed  # closed by the idle timeout, not by us
        assert tunnel.received == established
    finally:
        await target.stopListening()
