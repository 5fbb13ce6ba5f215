"""
Benchmark: requests per second, latency and memory of a C{twistd -n aoaiproxy} subprocess in
front of the fake Azure upstream (also a subprocess), over loopback.

    .venv/bin/python bench/bench.py [--requests 5000] [--concurrency 32] [--streams 200]

Every loop is bounded in count and time; only 127.0.0.1 is used.  It prints one line per
phase: plain chat completions, streamed chat completions (SSE), and RSS before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import free_port, read_response, rss_kib, wait_for_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def request(stream: bool) -> bytes:
    body = json.dumps(
        {"model": "gpt-4o", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer k\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )


async def worker(port: int, count: int, payload: bytes, latencies: list[float], deadline: float) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    errors = 0
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        t = time.perf_counter()
        writer.write(payload)
        status, _ = await read_response(reader)
        if status != 200:
            errors += 1
        latencies.append(time.perf_counter() - t)
    writer.close()
    return errors


async def phase(port: int, total: int, concurrency: int, stream: bool, limit: float) -> str:
    latencies: list[float] = []
    deadline = time.monotonic() + limit
    per = max(1, total // concurrency)
    t = time.perf_counter()
    errors = sum(
        await asyncio.gather(
            *(worker(port, per, request(stream), latencies, deadline) for _ in range(concurrency))
        )
    )
    elapsed = time.perf_counter() - t
    latencies.sort()
    n = len(latencies)
    return (
        f"{'stream' if stream else 'plain '}: {n} requests in {elapsed:.2f}s = {n / elapsed:.0f} req/s, "
        f"p50 {latencies[n // 2] * 1000:.1f} ms, p99 {latencies[int(n * 0.99)] * 1000:.1f} ms, "
        f"errors {errors}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--time-limit", type=float, default=60.0)
    args = parser.parse_args()

    env = dict(os.environ, PYTHONPATH=str(REPO))
    up_port, proxy_port = free_port(), free_port()
    fake = subprocess.Popen(
        [sys.executable, "-m", "aoaiproxy.testing", "--port", str(up_port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    proxy = subprocess.Popen(
        [
            str(BIN / "twistd"),
            "--nodaemon",
            "--pidfile=",
            "aoaiproxy",
            "--listen",
            f"tcp:{proxy_port}:interface=127.0.0.1",
            "--endpoint",
            f"http://127.0.0.1:{up_port}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(up_port, fake)
        wait_for_port(proxy_port, proxy)
        asyncio.run(phase(proxy_port, 200, 4, False, 10))  # warm up
        start_rss = rss_kib(proxy.pid)
        print(asyncio.run(phase(proxy_port, args.requests, args.concurrency, False, args.time_limit)))
        print(asyncio.run(phase(proxy_port, args.streams, args.concurrency, True, args.time_limit)))
        print(f"proxy RSS: {start_rss} KiB after warm-up, {rss_kib(proxy.pid)} KiB after the run")
    finally:
        for p in (proxy, fake):
            p.terminate()
            p.wait(30)


if __name__ == "__main__":
    main()
