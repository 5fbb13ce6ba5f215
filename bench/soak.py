"""
A bounded soak of aoaiproxy: thousands of requests and hundreds of streams, with random client
aborts, against a C{twistd -n aoaiproxy} subprocess and a fake Azure upstream subprocess
(C{python -m aoaiproxy.testing}), all on 127.0.0.1.

It prints the daemon's resident memory (VmRSS) and open file descriptors at the start, right
after the load, and after a short settle, and exits non-zero if the memory did not come back
near its starting level (or file descriptors leaked, or requests failed).

Run it from the repository root (it is not part of the test run)::

    .venv/bin/python bench/soak.py                   # defaults: 5000 requests, 500 streams
    .venv/bin/python bench/soak.py --requests 20000 --streams 2000 --concurrency 100

Every loop is bounded in count, and every phase in time (--phase-timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from _common import HOST, free_port, read_response, rss_kib, wait_for_port

REPO = Path(__file__).resolve().parent.parent

CHAT = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'
STREAM = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": true}'
EMBED = b'{"model": "text-embedding-3-small", "input": ["a", "b"]}'


def proc_status(pid: int) -> tuple[int, int]:
    """(VmRSS in kB, open file descriptors) of a process."""
    return rss_kib(pid), len(os.listdir(f"/proc/{pid}/fd"))


def request(method: str, path: str, body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer soak-key\r\n".encode()
    if body:
        head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    return head + b"\r\n" + body


class Stats:
    def __init__(self) -> None:
        self.ok = 0
        self.failed: dict[str, int] = {}
        self.streams_done = 0
        self.aborted = 0

    def fail(self, what: str) -> None:
        self.failed[what] = self.failed.get(what, 0) + 1


async def request_worker(port: int, count: int, rng: random.Random, stats: Stats) -> None:
    """C{count} requests over keep-alive connections (a new one every few requests)."""
    reader = writer = None
    for i in range(count):
        if writer is None or i % rng.randrange(5, 50) == 0:
            if writer is not None:
                writer.close()
            reader, writer = await asyncio.open_connection(HOST, port)
        assert reader is not None
        data = rng.choice(
            [
                request("POST", "/v1/chat/completions", CHAT),
                request("POST", "/v1/embeddings", EMBED),
                request("GET", "/v1/models"),
                request("GET", "/healthz"),
            ]
        )
        writer.write(data)
        try:
            status, _ = await read_response(reader)
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            stats.fail(type(e).__name__)
            writer.close()
            writer = None
            continue
        if status == 200:
            stats.ok += 1
        else:
            stats.fail(f"status {status}")
    if writer is not None:
        writer.close()


async def stream_worker(port: int, count: int, rng: random.Random, stats: Stats) -> None:
    """C{count} streams: a third read to the end, the others abandoned (closed or reset)."""
    for _ in range(count):
        reader, writer = await asyncio.open_connection(HOST, port)
        choice = rng.randrange(4)
        if choice == 3:  # half a request, then gone
            writer.write(request("POST", "/v1/chat/completions", STREAM)[: rng.randrange(10, 120)])
            await writer.drain()
            writer.close()
            stats.aborted += 1
            continue
        writer.write(request("POST", "/v1/chat/completions", STREAM))
        if choice == 0:
            try:
                status, body = await read_response(reader)
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                stats.fail(f"stream {type(e).__name__}")
            else:
                if status == 200 and b"data: [DONE]" in body:
                    stats.streams_done += 1
                else:
                    stats.fail(f"stream status {status}")
            writer.close()
            continue
        try:
            await reader.readexactly(rng.randrange(1, 600))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        if choice == 2:  # reset instead of a clean close
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()
        stats.aborted += 1


async def phase(name: str, timeout: float, workers: list[asyncio.Future[None]]) -> None:
    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*workers), timeout)
    print(f"  {name}: {time.monotonic() - started:.1f}s", flush=True)


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def load(port: int, args: argparse.Namespace, stats: Stats) -> None:
    rng = random.Random(args.seed)
    await phase(
        f"{args.requests} requests",
        args.phase_timeout,
        [
            asyncio.ensure_future(request_worker(port, n, random.Random(rng.random()), stats))
            for n in split(args.requests, args.concurrency)
        ],
    )
    await phase(
        f"{args.streams} streams",
        args.phase_timeout,
        [
            asyncio.ensure_future(stream_worker(port, n, random.Random(rng.random()), stats))
            for n in split(args.streams, max(1, args.concurrency // 2))
        ],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds to let it settle")
    parser.add_argument("--phase-timeout", type=float, default=300.0)
    parser.add_argument(
        "--log", default="-", help="the daemon's log file, a regular file [- : its stdout, to /dev/null]"
    )
    parser.add_argument(
        "--tolerance-mb", type=float, default=20.0, help="allowed RSS above the start after settling"
    )
    args = parser.parse_args()
    if args.log != "-" and os.path.exists(args.log) and not os.path.isfile(args.log):
        # twistd's --logfile rotates at 1 MB by renaming the file: as root, /dev/null too.
        parser.error("--log must be a regular file (or - for none)")

    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    upstream_port, proxy_port = free_port(), free_port()
    bindir = Path(sys.executable).parent
    upstream = subprocess.Popen(
        [sys.executable, "-m", "aoaiproxy.testing", "--port", str(upstream_port), "--stream-chunks", "20",
         "--stream-interval", "0.002"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
    )  # fmt: skip
    logfile = [f"--logfile={args.log}"] if args.log != "-" else []  # twistd -n: else to stdout
    daemon = subprocess.Popen(
        [str(bindir / "twistd"), "--nodaemon", "--pidfile=", *logfile, "aoaiproxy",
         "--listen", f"tcp:{proxy_port}:interface={HOST}", "--endpoint", f"http://{HOST}:{upstream_port}",
         "--max-connections", str(4 * args.concurrency)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
    )  # fmt: skip
    try:
        wait_for_port(upstream_port, upstream)
        wait_for_port(proxy_port, daemon)
        warm = argparse.Namespace(**{**vars(args), "requests": 500, "streams": 50})
        asyncio.run(load(proxy_port, warm, Stats()))
        time.sleep(1.0)
        start_rss, start_fds = proc_status(daemon.pid)
        print(f"start:  RSS {start_rss / 1024:.1f} MB, {start_fds} fds", flush=True)
        stats = Stats()
        began = time.monotonic()
        asyncio.run(load(proxy_port, args, stats))
        took = time.monotonic() - began
        after_rss, after_fds = proc_status(daemon.pid)
        print(f"after:  RSS {after_rss / 1024:.1f} MB, {after_fds} fds ({took:.1f}s)", flush=True)
        time.sleep(args.settle)
        settled_rss, settled_fds = proc_status(daemon.pid)
        print(f"settle: RSS {settled_rss / 1024:.1f} MB, {settled_fds} fds (after {args.settle:g}s)")
        print(
            f"requests ok {stats.ok}/{args.requests}, streams read to the end {stats.streams_done}, "
            f"aborted by the client {stats.aborted}, failures {stats.failed or 'none'}"
        )
        problems = []
        if daemon.poll() is not None:
            problems.append("the daemon died")
        if settled_rss - start_rss > args.tolerance_mb * 1024:
            problems.append(f"RSS grew by {(settled_rss - start_rss) / 1024:.1f} MB")
        if settled_fds > start_fds + 4:
            problems.append(f"{settled_fds - start_fds} file descriptors more than at the start")
        if stats.failed or stats.ok != args.requests:
            problems.append("requests failed")
        for p in problems:
            print("FAIL:", p)
        print("OK" if not problems else "FAILED")
        return 1 if problems else 0
    finally:
        for proc in (daemon, upstream):
            proc.terminate()
        for proc in (daemon, upstream):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    sys.exit(main())
