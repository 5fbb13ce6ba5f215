"""
A seeded raw-socket fuzz of a live C{twistd -n aoaiproxy}: random bytes, truncated and
pipelined requests, invalid methods, huge headers, broken bodies and resets: a fixed, seeded
set of cases.  Afterwards the daemon still answers C{/healthz}, never answered with a 500 or a
non-HTTP reply, logged no unhandled error, and its memory grew by a bounded amount.
"""

from __future__ import annotations

import random
import re
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import pytest_twisted
from twisted.internet.threads import deferToThread

from aoaiproxy.testing import FakeAzure

from ..conftest import Daemon

SEED = 20260601
CASES = 300
RSS_GROWTH_LIMIT_KB = 30 * 1024

_STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) ")

CHAT = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'
STREAM = b'{"model": "gpt-4o", "messages": [], "stream": true}'


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def request(method: bytes, path: bytes, body: bytes = b"", extra: bytes = b"") -> bytes:
    head = b"%s %s HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer k\r\n%s" % (method, path, extra)
    if body:
        head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    return head + b"\r\n" + body


def valid(rng: random.Random) -> bytes:
    return rng.choice(
        [
            request(b"GET", b"/healthz"),
            request(b"POST", b"/v1/chat/completions", CHAT),
            request(b"POST", b"/v1/chat/completions", STREAM),
            request(b"GET", b"/v1/models"),
            request(b"OPTIONS", b"/v1/chat/completions"),
            request(b"POST", b"/v1/embeddings", b'{"model": "e", "input": "x"}'),
        ]
    )


def case(rng: random.Random) -> tuple[bytes, str]:
    """One fuzz input and how to end the connection: 'read', 'close' or 'reset'."""
    kind = rng.randrange(10)
    end = rng.choice(["read", "read", "close", "reset"])
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 4096)), end
    if kind == 1:  # a valid request cut anywhere
        data = valid(rng)
        return data[: rng.randrange(len(data))], rng.choice(["close", "reset"])
    if kind == 2:  # pipelined, valid and not
        parts = [valid(rng) if rng.random() < 0.8 else rng.randbytes(64) for _ in range(rng.randrange(2, 8))]
        return b"".join(parts), end
    if kind == 3:  # invalid or odd methods and targets
        method = rng.choice([b"G\x00T", b"", b"BREW", b"get", b"CONNECT", b"PRI", b"X" * 300])
        target = rng.choice([b"/", b"*", b"//x", b"/v1/../../etc", b"http://h/", b"a:1", b"/%00", b"/\xff"])
        return method + b" " + target + b" HTTP/1.1\r\nHost: p\r\n\r\n", end
    if kind == 4:  # huge or many headers, huge request line
        size = rng.choice([20_000, 70_000, 200_000])
        return rng.choice(
            [
                b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * size + b"\r\n\r\n",
                b"GET /healthz HTTP/1.1\r\n" + b"X: y\r\n" * (size // 6) + b"\r\n",
                b"GET /" + b"a" * size + b" HTTP/1.1\r\n\r\n",
            ]
        ), end
    if kind == 5:  # broken bodies
        return rng.choice(
            [
                b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\nshort",
                b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffff\r\n",
                b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
                b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
                b"Content-Length: 3\r\n\r\n0\r\n\r\n",
                b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                request(b"POST", b"/v1/chat/completions", b"{" * 5000),
                request(b"POST", b"/v1/chat/completions", rng.randbytes(300)),
            ]
        ), end
    if kind == 6:  # header injection attempts
        return rng.choice(
            [
                b"GET /healthz HTTP/1.1\r\nX: a\rb\r\n\r\n",
                b"GET /healthz HTTP/1.1\r\nX: a\x00b\r\n\r\n",
                b"GET /healthz HTTP/1.1\r\n X: folded\r\n\r\n",
                b"GET /healthz HTTP/1.1\n\n",
                b"GET /healthz HTTP/1.1\r\n: empty\r\n\r\n",
            ]
        ), end
    # Mutations of a valid request: a few bytes flipped.
    data = bytearray(valid(rng))
    for _ in range(rng.randrange(1, 6)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data), end


def exchange(port: int, data: bytes, end: str) -> bytes:
    """Send C{data}; end as told; return what came back (bounded)."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        try:
            s.sendall(data)
            if end == "reset":
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return b""
            if end == "close":
                s.shutdown(socket.SHUT_WR)
            s.settimeout(0.15)  # a kept-alive connection answers well within this
            while len(received) < 1 << 20:
                chunk = s.recv(65536)
                if not chunk:
                    break
                received += chunk
        except (TimeoutError, ConnectionError, OSError):
            pass
    return received


def healthz(port: int) -> bytes:
    return exchange(port, b"GET /healthz HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n", "read")


def fuzz(port: int) -> tuple[int, set[int]]:
    rng = random.Random(SEED)
    statuses: set[int] = set()
    done = 0
    for _ in range(CASES):
        data, end = case(rng)
        answer = exchange(port, data, end)
        if answer:
            assert answer.startswith(b"HTTP/1.1 "), (data[:200], answer[:200])
        statuses.update(int(m) for m in _STATUS.findall(answer))
        done += 1
    return done, statuses


@pytest_twisted.ensureDeferred
async def test_fuzzed_listener_stays_up_and_bounded(
    fake: FakeAzure, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon(
        "--endpoint", fake.url, "--header-timeout", "1", "--idle-timeout", "2", "--max-body", "100000"
    )
    for _ in range(20):  # warm up: imports, pools, caches
        assert b" 200 " in await deferToThread(healthz, daemon.port)
    before = rss_kb(daemon.proc.pid)

    done, statuses = await deferToThread(fuzz, daemon.port)

    assert daemon.proc.poll() is None
    answer = await deferToThread(healthz, daemon.port)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"status": "ok"}')
    after = rss_kb(daemon.proc.pid)
    assert done == CASES, done
    assert 500 not in statuses, statuses  # no unhandled error reached a client
    assert {200, 400}.issubset(statuses), statuses
    assert after - before < RSS_GROWTH_LIMIT_KB, (before, after)
    print(f"fuzz: {done} cases, statuses {sorted(statuses)}, RSS {before} -> {after} kB")
    log = daemon.log()
    assert "Unhandled" not in log and "Traceback" not in log, log[-3000:]
