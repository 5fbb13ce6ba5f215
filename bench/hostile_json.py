"""
What hostile and large JSON bodies cost the daemon: a C{twistd -n aoaiproxy} subprocess in
front of the fake upstream (C{python -m aoaiproxy.testing}), on 127.0.0.1.

For each body (sent on C{--concurrency} connections at once) it prints the status the proxy
answered, the time to the slowest answer, the daemon's
peak resident memory (VmHWM: the high-water mark, reset before each body where the kernel
allows) and its RSS afterwards, and the slowest C{/healthz} answer seen by a client that asks
every 20 ms on its own connection while the body is sent and answered, and the CPU time the
daemon spent on it all (receiving the body, reading it, answering; on a busy machine the
latencies say more about the machine than about the daemon).

Run it from the repository root (it is not part of the test run)::

    .venv/bin/python bench/hostile_json.py                  # 60 MiB bodies, each once
    .venv/bin/python bench/hostile_json.py --mib 20 --only nested-objects,image
    .venv/bin/python bench/hostile_json.py --concurrency 20 --only nested-objects,deep

Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from _common import HOST, free_port, read_response, rss_kib, wait_for_port

REPO = Path(__file__).resolve().parent.parent


def bodies(size: int) -> dict[str, Callable[[], bytes]]:
    """Name -> a function building a body of about C{size} bytes."""

    def fill(prefix: bytes, unit: bytes, suffix: bytes) -> bytes:
        return prefix + unit * max(1, (size - len(prefix) - len(suffix)) // len(unit)) + suffix

    image = base64.b64encode(os.urandom(size * 3 // 4)).decode()
    return {
        # Hostile: structure chosen to cost a whole-body parser as much as possible.
        "array-of-objects": lambda: fill(b"[", b"{},", b"{}]"),
        "nested-objects": lambda: fill(b'{"model": "gpt-4o", "a": [', b"{},", b'{}], "x": 1}'),
        "nested-strings": lambda: fill(b'{"model": "gpt-4o", "a": [', b'"ab",', b'"ab"]}'),
        "nested-floats": lambda: fill(b'{"model": "gpt-4o", "a": [', b"0.5,", b"0.5]}"),
        "deep": lambda: b'{"model": "gpt-4o", "a": ' + b"[" * (size // 2) + b"]" * (size // 2) + b"}",
        "escapes": lambda: fill(b'{"model": "gpt-4o", "a": "', b'\\"', b'"}'),
        # Legitimate and large: they must pass.
        "image": lambda: (
            b'{"model": "gpt-4o", "messages": [{"role": "user", "content": [{"type": "image_url", '
            b'"image_url": {"url": "data:image/png;base64,' + image.encode() + b'"}}]}]}'
        ),
        "embedding-tokens": lambda: (
            b'{"model": "text-embedding-3-small", "input": ['
            + b",".join(b"[" + b",".join(b"%d" % (i * 7 + j) for j in range(146)) + b"]" for i in range(2048))
            + b"]}"
        ),
    }


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM (Linux >= 4.0: write 5 to clear_refs); whether it worked."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


async def healthz_poller(port: int, stop: asyncio.Event, worst: list[float]) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        for _ in range(100_000):  # bounded: stop is set long before
            if stop.is_set():
                return
            began = time.monotonic()
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n")
            status, _ = await asyncio.wait_for(read_response(reader), 30)
            assert status == 200
            worst[0] = max(worst[0], time.monotonic() - began)
            await asyncio.sleep(0.02)
    finally:
        writer.close()


async def post(port: int, path: str, body: bytes) -> tuple[int, bytes, float]:
    began = time.monotonic()
    reader, writer = await asyncio.open_connection(HOST, port)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer k\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    writer.write(head + body)
    status, answer = await asyncio.wait_for(read_response(reader), 120)
    writer.close()
    return status, answer, time.monotonic() - began


async def measure(port: int, pid: int, name: str, body: bytes, concurrency: int) -> None:
    path = "/v1/embeddings" if name.startswith("embedding") else "/v1/chat/completions"
    stop = asyncio.Event()
    worst = [0.0]
    poller = asyncio.create_task(healthz_poller(port, stop, worst))
    await asyncio.sleep(0.1)
    reset = reset_peak(pid)
    before = rss_kib(pid)
    cpu = cpu_seconds(pid)
    answers = await asyncio.gather(*(post(port, path, body) for _ in range(concurrency)))
    cpu = cpu_seconds(pid) - cpu
    status, answer, took = max(answers, key=lambda a: a[2])
    statuses = sorted({a[0] for a in answers})
    if len(statuses) > 1:
        answer = f"statuses {statuses}".encode()
        status = 999
    await asyncio.sleep(0.3)
    stop.set()
    await poller
    peak = peak_kib(pid) if reset else 0
    after = rss_kib(pid)
    print(
        f"{name:16} {concurrency}x{len(body) / 2**20:4.1f} MiB -> {status} in {took:5.2f}s "
        f"(daemon CPU {cpu:4.2f}s); "
        f"RSS before {before / 1024:6.1f} MB, peak {peak / 1024:7.1f} MB, after {after / 1024:6.1f} MB; "
        f"worst /healthz {worst[0] * 1000:6.0f} ms" + ("" if status < 400 else f"  {answer[:90]!r}"),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=float, default=60.0, help="size of each body in MiB")
    parser.add_argument("--only", default="", help="comma-separated body names (default: all)")
    parser.add_argument(
        "--concurrency", type=int, default=1, help="send each body on this many connections at once"
    )
    parser.add_argument("--log", default="/dev/null", help="the daemon's log file")
    args = parser.parse_args()
    makers = bodies(int(args.mib * 2**20))
    names = [n for n in args.only.split(",") if n] or list(makers)

    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    upstream_port, proxy_port = free_port(), free_port()
    bindir = Path(sys.executable).parent
    upstream = subprocess.Popen(
        [sys.executable, "-m", "aoaiproxy.testing", "--port", str(upstream_port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
    )  # fmt: skip
    daemon = subprocess.Popen(
        [str(bindir / "twistd"), "--nodaemon", "--pidfile=", f"--logfile={args.log}", "aoaiproxy",
         "--listen", f"tcp:{proxy_port}:interface={HOST}", "--endpoint", f"http://{HOST}:{upstream_port}",
         "--max-body", str(64 * 2**20 + 2**20), "--max-connections", str(args.concurrency + 16)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
    )  # fmt: skip
    try:
        wait_for_port(upstream_port, upstream)
        wait_for_port(proxy_port, daemon)
        for name in names:
            asyncio.run(measure(proxy_port, daemon.pid, name, makers[name](), args.concurrency))
    finally:
        for proc in (daemon, upstream):
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
