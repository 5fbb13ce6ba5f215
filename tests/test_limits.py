"""
Limits on what a client may send and how long it may take, each with its exact client-visible
outcome: 414, 431, 400, 408, 413 (also for chunked bodies), refusals decided from the head
before the body is read (401, 404, 405, 407, 403), the total time a body may take, idle
close, half-closing and bare-LF clients, the per-listener connection cap (503), the CONNECT
tunnel idle timeout, and the options themselves.
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

from aoaiproxy import site
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

    response, client = await refused(
        raw_connect, proxy, b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: p\r\n\r\n"
    )
    assert_openai_error(response, 414, "request_line_too_long")
    assert response.headers[b"connection"] == b"close"
    assert client.received.startswith(b"HTTP/1.1 414 URI Too Long\r\n")


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

    response, client = await refused(raw_connect, proxy, head(6))
    assert_openai_error(response, 431, "request_header_fields_too_large")
    assert client.received.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")


@pytest.mark.parametrize(
    "data",
    [
        b"GET\r\n\r\n",  # no target, no version
        b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 12abc\r\n\r\n",
        # (with a key: a request without one is refused before its body is read)
        b"POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer k\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
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


@pytest.mark.parametrize(
    "data",
    [
        b"GARBAGE\r\n\r\n",  # as printf 'GARBAGE\r\n\r\n' | nc -N sends it
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nBad Name: x\r\n\r\n",
    ],
)
@pytest_twisted.ensureDeferred
async def test_refusal_reaches_a_client_that_half_closes(
    make_proxy: Callable[..., Proxy], raw_connect: Connect, data: bytes
) -> None:
    proxy = make_proxy()
    client = await raw_connect(port_of(proxy))
    client.send(data)
    client.transport.loseWriteConnection()  # type: ignore[union-attr]
    await client.closed
    response = parse_response(client.received)
    assert response.status in (400, 414)
    assert_openai_error(response, response.status)


@pytest_twisted.ensureDeferred
async def test_answers_reach_a_client_that_half_closes_after_its_request(
    make_proxy: Callable[..., Proxy], raw_connect: Connect
) -> None:
    proxy = make_proxy()
    client = await raw_connect(port_of(proxy))
    client.send(HEALTH + b"GET /nope HTTP/1.1\r\nHost: p\r\n\r\n")
    client.transport.loseWriteConnection()  # type: ignore[union-attr]
    await client.closed
    assert client.reason is not None and client.reason.check(ConnectionDone), client.reason
    first, _, rest = client.received.partition(b"}")
    assert parse_response(first + b"}").status == 200
    assert_openai_error(parse_response(rest), 404, "unknown_url")


@pytest_twisted.ensureDeferred
async def test_bare_lf_heads_are_served(make_proxy: Callable[..., Proxy], raw_connect: Connect) -> None:
    """As nginx does: what a person typing into nc sends (the head is parsed, never relayed)."""
    proxy = make_proxy()
    client = await raw_connect(port_of(proxy))
    client.send(b"GET /healthz HTTP/1.1\n\n")
    assert parse_response(await client.wait_for(b"}")).status == 200
    client.received = b""
    client.send(b"GET /healthz HTTP/1.1\r\nHost: p\nX-Mixed: yes\r\n\n")  # mixed line ends
    assert parse_response(await client.wait_for(b"}")).status == 200
    # A CR anywhere but just before the LF is still no line end: a malformed head.
    response, _ = await refused(raw_connect, proxy, b"GET /healthz HTTP/1.1\r\nX: a\r\r\n\r\n")
    assert_openai_error(response, 400, "bad_request")


# -- refused from the head, before the body ----------------------------------------------------

#: A body far larger than the test will send: only an answer given from the head can arrive.
BIG = 64 * 1024 * 1024


def body_head(target: bytes, *headers: bytes, method: bytes = b"POST") -> bytes:
    """The head of a request announcing a BIG body, and asking for 100 Continue."""
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: proxy", b"Content-Type: application/json"]
    lines += [*headers, b"Content-Length: %d" % BIG, b"Expect: 100-continue"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


@pytest.mark.parametrize(
    ("flags", "head", "status", "code"),
    [
        ({}, body_head(b"/v1/chat/completions"), 401, "missing_api_key"),
        ({"token": "server"}, body_head(b"/v1/chat/completions", b"api-key: wrong"), 401, "invalid_api_key"),
        ({}, body_head(b"/v1/nope", b"api-key: k"), 404, "unknown_url"),
        ({}, body_head(b"/v1/models"), 405, "method_not_allowed"),
        ({}, body_head(b"/healthz"), 405, "method_not_allowed"),
        ({"mode": "openai"}, body_head(b"/v1/anything"), 401, "missing_api_key"),
        # The forward proxy: credentials, then the allowlist; an API request needs a key.
        ({"forward_users": "users"}, body_head(b"http://example.test/x"), 407, None),
        ({}, body_head(b"http://example.test/x"), 403, "forward_not_allowed"),
        ({}, body_head(b"http://api.openai.com/v1/chat/completions"), 401, "missing_api_key"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_refused_before_the_body_is_read(
    fake: Any,
    make_proxy: Callable[..., Proxy],
    raw_connect: Connect,
    tmp_path: Any,
    flags: dict[str, Any],
    head: bytes,
    status: int,
    code: str | None,
) -> None:
    if "forward_users" in flags:
        users = tmp_path / "users"
        users.write_text("alice:secret\n")
        flags = {**flags, "forward_users": str(users)}
    if "token" in flags:
        keys = tmp_path / "keys"
        keys.write_text("right\n")
        flags = {**flags, "client_keys": str(keys)}
    proxy = make_proxy(**flags)
    client = await raw_connect(port_of(proxy))
    client.send(head)  # and not one byte of the body
    response = parse_response(await client.wait_for(lambda r: r.endswith(b"}}")))
    assert_openai_error(response, status, code)
    assert response.headers[b"connection"] == b"close"
    assert b"100 Continue" not in client.received
    # What the client then sends is read and discarded (so it reads our answer, not a
    # reset) until it stops; then the connection closes.
    client.send(b"x" * 100_000)
    client.transport.loseWriteConnection()  # type: ignore[union-attr]
    await client.closed
    assert client.reason is not None and client.reason.check(ConnectionDone), client.reason
    assert fake.requests == []


@pytest_twisted.ensureDeferred
async def test_accepted_head_gets_100_continue_and_its_body_is_read(
    fake: Any, make_proxy: Callable[..., Proxy], raw_connect: Connect
) -> None:
    proxy = make_proxy()
    body = b'{"model": "gpt-4o", "messages": []}'
    client = await raw_connect(port_of(proxy))
    client.send(body_head(b"/v1/chat/completions", b"api-key: k").replace(b"%d" % BIG, b"%d" % len(body)))
    await client.wait_for(b"HTTP/1.1 100 Continue\r\n\r\n")
    client.send(body)
    await client.wait_for(b"HTTP/1.1 200 ")
    assert [r.body for r in fake.requests] == [body]


@pytest_twisted.ensureDeferred
async def test_unknown_key_with_a_chunked_body_is_refused_at_its_head(
    fake: Any, make_proxy: Callable[..., Proxy], raw_connect: Connect, tmp_path: Any
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("right\n")
    proxy = make_proxy(token="server", client_keys=str(keys))
    client = await raw_connect(port_of(proxy))
    client.send(
        b"POST /v1/embeddings HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer wrong\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    response = parse_response(await client.wait_for(lambda r: r.endswith(b"}}")))
    assert_openai_error(response, 401, "invalid_api_key")
    assert fake.requests == []


# -- time limits -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_slow_request_head_gets_408(make_proxy: Callable[..., Proxy], raw_connect: Connect) -> None:
    # The idle timeout is long: only the head timer can end this connection.
    proxy = make_proxy(header_timeout=0.3, idle_timeout=600)
    response, client = await refused(raw_connect, proxy, b"GET /healthz HTTP/1.1\r\nHost: p\r\nX-Slow")
    assert_openai_error(response, 408, "request_timeout")
    assert client.received.count(b"HTTP/1.1") == 1
    assert client.received.startswith(b"HTTP/1.1 408 Request Timeout\r\n")


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
async def test_body_has_a_total_time_bound(
    fake: Any, make_proxy: Callable[..., Proxy], raw_connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A body trickling in, one byte well within the idle timeout of the last, still ends at
    the body's time bound: 408, and the connection is closed.
    """
    monkeypatch.setattr(site, "BODY_TIMEOUT", 0.5)
    proxy = make_proxy(idle_timeout=0.3, header_timeout=600)
    reactor = get_reactor()
    client = await raw_connect(port_of(proxy))
    client.send(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\napi-key: k\r\nContent-Length: 1000\r\n\r\n"
    )
    trickled = [0]

    def trickle() -> None:
        # Bounded: at most 100 bytes (10 s); stops once the proxy has closed.
        if client.reason is None and trickled[0] < 100:
            trickled[0] += 1
            client.send(b"{")
            reactor.callLater(0.1, trickle)

    trickle()
    await client.closed
    response = parse_response(client.received)
    assert_openai_error(response, 408, "request_timeout")
    assert "body" in response.json()["error"]["message"]
    assert response.headers[b"connection"] == b"close"
    assert fake.requests == []


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
    client.send(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer k\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
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
