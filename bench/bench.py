"""
The project's bench, side by side: aoaiproxy (C{twistd -n aoaiproxy} from this checkout) pinned
to one core, the load generators and a fast upstream pinned to the other, and reference targets
measured in the same run, each figure printed with its ratio to them.

    python bench/bench.py [SCENARIO ...] [--quick] [--repeat N] [--profile SECONDS]

Scenarios (all by default):
  nonstream  POST /v1/chat/completions (575-byte body and answer): wrk -c64 req/s and CPU per
             request, wrk -c1 latency p50/p99; references: a bare twisted.web resource answering
             the bytes itself (the floor), nginx proxying to the same upstream.
  streams    200 concurrent 20-chunk SSE streams: streams/s, time to first chunk; references:
             nginx, and no proxy (the load side's own ceiling).
  held       10,000 streams open at once: how many open, RSS per open stream; reference nginx.
  chunks     2,000 streams x 20 chunks/s: chunks/s delivered during a window, inter-chunk gap
             p99; references: no proxy, nginx.
  connect    CONNECT setups/s to a TCP sink, TLS tunnels/s (CONNECT then a TLS handshake with a
             TLS sink through the tunnel) with the target's CPU per tunnel and how busy the
             load core was (at 100 % the figure is the load's, not the target's), one
             tunnel's MB/s, and the time of an exchange of two small writes and a reply
             through a tunnel (Nagle's algorithm on a relay adds 40 ms); references:
             tinyproxy, no proxy, the least CONNECT proxy on Twisted (connect_floor.py: the
             floor of this scenario).

Needs: Go (the upstream, sinks and load generators in loadtool.go, built into ~/.cache), taskset;
wrk for nonstream; nginx and tinyproxy for those references (skipped when missing).  On Debian:
C{apt-get install golang-go wrk nginx-light tinyproxy}; py-spy (PyPI) for --profile.
Only 127.0.0.1 is used; every load is bounded in count and time; every process it starts is
stopped at the end (and dies with it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from _common import HOST
from _harness import (
    PROXY,
    REPO,
    Figure,
    Harness,
    Proc,
    cpu_seconds,
    descendants,
    open_fds,
    parse_collapsed,
    profile_tables,
    rss_kib,
    table,
)

SCENARIOS = ("nonstream", "streams", "held", "chunks", "connect")
FLOOR, NGINX, DIRECT, TINYPROXY = "twisted.web floor", "nginx", "no proxy", "tinyproxy"
CONNECT_FLOOR = "Twisted CONNECT floor"

Target = Callable[[], AbstractContextManager[tuple[int, Proc | None]]]


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def direct(port: int) -> Iterator[tuple[int, Proc | None]]:
    """No proxy: the load goes straight to the upstream (or sink)."""
    yield port, None


class Failures:
    """Failed operations per scenario and target, over all runs (printed under the table)."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, float]] = {}

    def add(self, scenario: str, target: str, errors: dict[str, int] | float) -> None:
        counts = self.counts.setdefault(f"{scenario} / {target}", {})
        for kind, n in (errors if isinstance(errors, dict) else {"errors": errors}).items():
            if n:
                counts[kind] = counts.get(kind, 0) + n


class CpuMeter:
    """CPU seconds a process used while the block ran (None for no process)."""

    def __init__(self, proc: Proc | None) -> None:
        self.proc = proc
        self.used: float | None = None

    def __enter__(self) -> CpuMeter:
        self.start = cpu_seconds(self.proc.pid) if self.proc else 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc:
            self.used = cpu_seconds(self.proc.pid) - self.start

    def per(self, count: float) -> float | None:
        return self.used / count * 1e6 if self.used is not None and count else None


class CoreMeter:
    """How busy one core was while the block ran, in per cent (None when the load is not pinned)."""

    def __init__(self, core: int | None) -> None:
        self.core = core
        self.busy: float | None = None

    def _ticks(self) -> tuple[int, int] | None:
        if self.core is None:
            return None
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith(f"cpu{self.core} "):
                    # user nice system idle iowait irq softirq steal (guest time is in user)
                    ticks = [int(t) for t in line.split()[1:9]]
                    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # busy: all but idle, iowait
        return None

    def __enter__(self) -> CoreMeter:
        self.start = self._ticks()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._ticks()
        if self.start is not None and end is not None and end[1] > self.start[1]:
            self.busy = 100 * (end[0] - self.start[0]) / (end[1] - self.start[1])


class ReplyAfter:
    """
    A TCP server on a thread of the bench's own process: 10 bytes back for every 200 read (two
    100-byte writes of L{exchange_ms}).  Connections are few and short; one thread each.
    """

    def __init__(self) -> None:
        self.listener = socket.create_server((HOST, 0))
        self.port: int = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            pending = 0
            while data := conn.recv(4096):
                pending += len(data)
                while pending >= 200:
                    pending -= 200
                    conn.sendall(b"0123456789")

    def close(self) -> None:
        self.listener.close()


def exchange_ms(port: int, target: int, count: int = 30) -> float:
    """
    The median time, in ms, of C{count} exchanges through a CONNECT tunnel (C{port} 0: straight
    to the target): two 100-byte writes 1 ms apart, as a TLS client writes two records, then
    the target's 10-byte reply.  A relay that holds the second write for the target's ACK of
    the first (Nagle's algorithm) adds the target's delayed ACK, 40 ms on Linux.
    """
    with socket.create_connection((HOST, port or target), timeout=10) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if port:
            c.sendall(f"CONNECT {HOST}:{target} HTTP/1.1\r\nHost: {HOST}:{target}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                data = c.recv(4096)
                if not data:
                    raise ConnectionError(f"the proxy closed before its answer: {head!r}")
                head += data
        times = []
        for _ in range(count):
            start = time.perf_counter()
            c.sendall(b"A" * 100)
            time.sleep(0.001)
            c.sendall(b"B" * 100)
            got = 0
            while got < 10:
                data = c.recv(100)
                if not data:
                    raise ConnectionError("the tunnel closed")
                got += len(data)
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


# -- scenarios --------------------------------------------------------------------------------


def nonstream(h: Harness, a: argparse.Namespace, fail: Failures) -> list[Figure]:
    if h.wrk is None:
        note("nonstream: skipped, wrk is missing (apt-get install wrk)")
        return []
    s64, s1 = "non-streaming POST, wrk -c64", "non-streaming POST, wrk -c1"
    rps = Figure(s64, "req/s")
    cpu = Figure(s64, "CPU µs per request (target's own)")
    p50 = Figure(s1, "latency p50 ms", "{:.2f}")
    p99 = Figure(s1, "latency p99 ms", "{:.2f}")
    with h.upstream() as up:
        targets: list[tuple[str, Target]] = [(FLOOR, h.floor)]
        if h.nginx:
            targets.append((NGINX, lambda: h.nginx_proxy(up)))
        else:
            note("nonstream: no nginx reference (apt-get install nginx-light)")
        targets.append((PROXY, lambda: h.proxy(up, a.proxy_arg)))
        for run in range(a.repeat):
            for name, start in targets:
                with start() as (port, proc):
                    h.run_wrk(port, 64, 1)  # warm-up
                    with CpuMeter(proc) as meter:
                        w = h.run_wrk(port, 64, a.c64_seconds)
                    one = h.run_wrk(port, 1, a.c1_seconds)
                rps.add(name, w["rps"])
                cpu.add(name, meter.per(w["requests"]))
                p50.add(name, one["p50_us"] / 1000)
                p99.add(name, one["p99_us"] / 1000)
                fail.add("nonstream", name, w["errors"] + one["errors"])
                note(
                    f"nonstream {run + 1}/{a.repeat} {name}: {w['rps']:,.0f} req/s, "
                    f"c1 p50 {one['p50_us'] / 1000:.2f} ms, errors {w['errors'] + one['errors']:g}"
                )
        if a.profile:
            profile(h, a, up)
    return [rps, cpu, p50, p99]


def profile(h: Harness, a: argparse.Namespace, up: int) -> None:
    """py-spy samples of the proxy under the wrk -c64 load, summed by function and by module."""
    with h.proxy(up, a.proxy_arg) as (port, proc):
        assert proc is not None
        h.run_wrk(port, 64, 1)
        raw = spy(h, a, proc.pid, h.wrk_argv(port, 64, a.profile + 4), BENCH_BODY=str(h.files["request"]))
    if raw is not None:
        keep_profile(raw, a.profile_out)
        print_profile(raw, a.profile_top, "wrk -c64")


def spy(h: Harness, a: argparse.Namespace, pid: int, load_argv: list[str], **env: str) -> Path | None:
    """
    py-spy's collapsed stacks of process C{pid} for C{a.profile} seconds, while C{load_argv}
    runs (it must last that long); None without py-spy.
    """
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists() and shutil.which(exe) is None:
        note("profile: skipped, py-spy is missing (pip install py-spy)")
        return None
    raw = h.workdir / "profile.txt"
    load = subprocess.Popen(
        load_argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, **env)
    )
    try:
        subprocess.run(
            h.pinned(
                [
                    exe,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    f"{a.profile:g}",
                    "--rate",
                    "250",
                    "--nonblocking",
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                ]
            ),
            check=True,
            capture_output=True,
            timeout=a.profile + 60,
        )
    finally:
        load.wait(a.profile + 30)
    return raw


def keep_profile(raw: Path, out: str | None) -> None:
    if out:
        shutil.copyfile(raw, out)


def print_profile(raw: Path, top: int, under: str = "wrk -c64") -> None:
    """The top functions and modules by CPU time in py-spy's collapsed stacks."""
    total, functions, modules = profile_tables(parse_collapsed(raw.read_text().splitlines()), top)
    print(
        f"\nProfile of aoaiproxy under {under} (py-spy, {total} samples of CPU time, self %, inclusive %):\n"
    )
    for title, rows in (("function", functions), ("module", modules)):
        print(f"| {title} | self % | inclusive % |\n|---|---:|---:|")
        for name, own, incl in rows:
            print(f"| `{name}` | {own:.1f} | {incl:.1f} |")
        print()


def streams(h: Harness, a: argparse.Namespace, fail: Failures) -> list[Figure]:
    s = f"{a.streams_c} concurrent {a.stream_chunks}-chunk SSE streams"
    rate = Figure(s, "streams/s")
    first50 = Figure(s, "first chunk p50 ms", "{:.1f}")
    first99 = Figure(s, "first chunk p99 ms", "{:.1f}")
    cpu = Figure(s, "CPU µs per stream (target's own)")
    with h.upstream() as up:
        targets: list[tuple[str, Target]] = [(DIRECT, lambda: direct(up))]
        if h.nginx:
            targets.append((NGINX, lambda: h.nginx_proxy(up)))
        targets.append((PROXY, lambda: h.proxy(up, a.proxy_arg)))
        for run in range(a.repeat):
            for name, start in targets:
                with start() as (port, proc):
                    h.load("streams", *h.stream_args(port), "-c", "20", "-d", "1s", timeout=60)  # warm-up
                    with CpuMeter(proc) as meter:
                        r = h.load(
                            "streams",
                            *h.stream_args(port),
                            "-c",
                            str(a.streams_c),
                            "-d",
                            f"{a.streams_seconds}s",
                            "-chunks",
                            str(a.stream_chunks),
                            "-interval-ms",
                            str(a.stream_interval),
                            timeout=a.streams_seconds + 90,
                        )
                rate.add(name, r["rate"])
                first50.add(name, r["first_chunk"].get("p50_ms"))
                first99.add(name, r["first_chunk"].get("p99_ms"))
                cpu.add(name, meter.per(r["ok"]))
                fail.add("streams", name, r["errors"])
                note(f"streams {run + 1}/{a.repeat} {name}: {r['rate']:,.0f}/s, errors {r['errors']}")
    return [rate, first50, first99, cpu]


def tree(measure: Callable[[int], int], pid: int) -> int:
    """C{measure} summed over a process and its live descendants (the workers of C{--workers})."""
    total = 0
    for each in descendants(pid):
        try:
            total += measure(each)
        except OSError:
            continue
    return total


def held(h: Harness, a: argparse.Namespace, fail: Failures) -> list[Figure]:
    s = f"{a.held:,} held streams"
    opened = Figure(s, "streams open")
    per = Figure(s, "RSS KiB per open stream", "{:.1f}")
    fds = Figure(s, "descriptors per open stream", "{:.2f}")
    with h.upstream() as up:
        targets: list[tuple[str, Target]] = [(PROXY, lambda: h.proxy(up, a.proxy_arg))]
        if h.nginx:
            targets.append((NGINX, lambda: h.nginx_proxy(up)))
        for run in range(a.repeat):
            for name, start in targets:
                with start() as (port, proc):
                    assert proc is not None
                    h.load("streams", *h.stream_args(port), "-c", "10", "-d", "1s", timeout=60)  # warm-up
                    idle, idle_fds = tree(rss_kib, proc.pid), tree(open_fds, proc.pid)
                    args = ["-n", str(a.held), "-ramp-timeout", f"{a.ramp_timeout}s"]
                    with h.talking("held", *h.stream_args(port), *args) as lines:
                        r = lines.next(a.ramp_timeout + 60)
                        rss, nfds = tree(rss_kib, proc.pid), tree(open_fds, proc.pid)
                        lines.send("close\n")
                n = r["open"]
                opened.add(name, n)
                if n:
                    per.add(name, (rss - idle) / n)
                    fds.add(name, (nfds - idle_fds) / n)
                fail.add("held", name, r["errors"])
                note(
                    f"held {run + 1}/{a.repeat} {name}: {n:,} of {a.held:,} open in {r['ramp_s']:.1f}s, "
                    f"RSS {idle:,} -> {rss:,} KiB, errors {r['errors']}"
                )
    return [opened, per, fds]


def chunks(h: Harness, a: argparse.Namespace, fail: Failures) -> list[Figure]:
    per_s = 1000 / a.chunk_interval
    s = f"{a.chunk_streams:,} streams x {per_s:g} chunks/s (offered {a.chunk_streams * per_s:,.0f}/s)"
    opened = Figure(s, "streams open")
    rate = Figure(s, "chunks/s delivered")
    gap = Figure(s, "inter-chunk gap p99 ms", "{:.1f}")
    added = Figure(s, "added gap p99 ms (vs no proxy, same run)", "{:.1f}")
    late = Figure(s, "chunk lateness p99 ms (upstream write to client read)", "{:.1f}")
    added_late = Figure(s, "added lateness p99 ms (vs no proxy, same run)", "{:.1f}")
    cpu = Figure(s, "CPU µs per chunk (target's own)", "{:.1f}")
    with h.upstream() as up:
        targets: list[tuple[str, Target]] = [(DIRECT, lambda: direct(up))]
        if h.nginx:
            targets.append((NGINX, lambda: h.nginx_proxy(up)))
        targets.append((PROXY, lambda: h.proxy(up, a.proxy_arg)))
        for run in range(a.repeat):
            base: tuple[float | None, float | None] | None = None
            for name, start in targets:
                with start() as (port, proc):
                    args = ["-n", str(a.chunk_streams), "-interval-ms", str(a.chunk_interval)]
                    args += ["-window", f"{a.chunk_window}s", "-ramp-timeout", f"{a.ramp_timeout}s"]
                    with h.talking("chunks", *h.stream_args(port), *args) as lines:
                        lines.next(a.ramp_timeout + 60)  # the window opens
                        with CpuMeter(proc) as meter:
                            lines.next(a.chunk_window + 60)  # the window closes
                        r = lines.next(60)
                p99, late99 = r["gap"].get("p99_ms"), r["late"].get("p99_ms")
                opened.add(name, r["open"])
                rate.add(name, r["rate"])
                cpu.add(name, meter.per(r["delivered"]))
                gap.add(name, p99)
                late.add(name, late99)
                if name == DIRECT:
                    base = (p99, late99)
                elif base is not None:
                    added.add(name, p99 - base[0] if p99 is not None and base[0] is not None else None)
                    added_late.add(
                        name, late99 - base[1] if late99 is not None and base[1] is not None else None
                    )
                fail.add("chunks", name, r["errors"])
                note(
                    f"chunks {run + 1}/{a.repeat} {name}: {r['open']:,} open, {r['rate']:,.0f} chunks/s, "
                    f"gap p99 {p99} ms, late p99 {late99} ms, errors {r['errors']}"
                )
    return [opened, rate, late, added_late, gap, added, cpu]


def tunnel_load(h: Harness, port: int, tool: str, sink: int, *more: str, seconds: float) -> dict[str, Any]:
    """loadtool C{tool} (connect or tunnel) to a sink through the proxy on C{port} (0: none)."""
    via = ["-proxy", f"127.0.0.1:{port}"] if port else []
    return h.load(
        tool, *via, "-target", f"127.0.0.1:{sink}", "-d", f"{seconds}s", *more, timeout=seconds + 90
    )


def connect(h: Harness, a: argparse.Namespace, fail: Failures) -> list[Figure]:
    raw_s, tls_s, bulk_s = (
        "CONNECT, new connection each",
        "CONNECT + TLS handshake",
        "one CONNECT tunnel, bulk",
    )
    setups = Figure(raw_s, "setups/s")
    setup_cpu = Figure(raw_s, "CPU µs per setup (target's own)")
    tunnels = Figure(tls_s, "tunnels/s")
    tls_cpu = Figure(tls_s, "CPU µs per tunnel (target's own)")
    tls_load = Figure(tls_s, "load core busy %", "{:.0f}")
    mbps = Figure(bulk_s, "MB/s")
    rtt = Figure("two small writes, then a reply", "ms per exchange, p50", "{:.1f}")
    reply = ReplyAfter()
    with h.sinks() as (raw, tls), contextlib.closing(reply):
        allow = ["--forward-allow", f"127.0.0.1:{raw}", "--forward-allow", f"127.0.0.1:{tls}"]
        allow += ["--forward-allow", f"127.0.0.1:{reply.port}"]
        targets: list[tuple[str, Target]] = [(DIRECT, lambda: direct(0)), (CONNECT_FLOOR, h.connect_floor)]
        if h.tinyproxy:
            targets.append((TINYPROXY, h.tinyproxy_proxy))
        else:
            note("connect: no tinyproxy reference (apt-get install tinyproxy)")
        targets.append((PROXY, lambda: h.proxy(raw, [*allow, *a.proxy_arg])))
        for run in range(a.repeat):
            for name, start in targets:
                with start() as (port, proc):

                    def go(tool: str, sink: int, *more: str, seconds: float = a.connect_seconds) -> Any:
                        return tunnel_load(h, port, tool, sink, *more, seconds=seconds)

                    go("connect", raw, "-c", "8", seconds=1)  # warm-up
                    with CpuMeter(proc) as meter:
                        r = go("connect", raw, "-c", str(a.connect_c))
                    with CpuMeter(proc) as meter_tls, CoreMeter(h.load_core) as load:
                        s = go("connect", tls, "-tls", "-c", str(a.connect_c))
                    b = go("tunnel", raw, seconds=a.tunnel_seconds)
                    rtt.add(name, exchange_ms(port, reply.port))
                setups.add(name, r["rate"])
                setup_cpu.add(name, meter.per(r["ok"]))
                tunnels.add(name, s["rate"])
                tls_cpu.add(name, meter_tls.per(s["ok"]))
                tls_load.add(name, load.busy)
                mbps.add(name, b.get("mb_per_s"))
                if not b.get("counted"):
                    note(f"tunnel {name}: the sink's count did not come back (no half-close); MB/s as sent")
                fail.add("connect", name, r["errors"])
                fail.add("connect tls", name, s["errors"])
                note(
                    f"connect {run + 1}/{a.repeat} {name}: {r['rate']:,.0f} setups/s, "
                    f"{s['rate']:,.0f} TLS/s, {b.get('mb_per_s', 0):,.0f} MB/s, "
                    f"exchange {rtt.samples[name][-1]:.1f} ms, "
                    f"errors {r['errors']} {s['errors']}"
                )
        if a.profile:
            connect_profile(h, a, raw, allow)
    return [setups, setup_cpu, tunnels, tls_cpu, tls_load, mbps, rtt]


def connect_profile(h: Harness, a: argparse.Namespace, sink: int, allow: list[str]) -> None:
    """py-spy samples of the proxy under loadtool connect -c N (a new connection each)."""
    assert h.loadtool is not None
    with h.proxy(sink, [*allow, *a.proxy_arg]) as (port, proc):
        assert proc is not None
        tunnel_load(h, port, "connect", sink, "-c", "8", seconds=1)  # warm-up
        via = ["-proxy", f"127.0.0.1:{port}", "-target", f"127.0.0.1:{sink}", "-c", str(a.connect_c)]
        load = h.pinned([str(h.loadtool), "connect", *via, "-d", f"{a.profile + 4:g}s"])
        raw = spy(h, a, proc.pid, load)
    if raw is not None:
        # With nonstream's profile in the same run, this one is kept beside it.
        both = "nonstream" in a.scenarios and a.profile_out
        keep_profile(raw, f"{a.profile_out}.connect" if both else a.profile_out)
        print_profile(raw, a.profile_top, f"loadtool connect -c{a.connect_c}")


RUNNERS = {"nonstream": nonstream, "streams": streams, "held": held, "chunks": chunks, "connect": connect}

# -- main ---------------------------------------------------------------------------------------


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return (
        f"{os.cpu_count()} CPUs ({model}), load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
        f"Python {platform.python_version()}, aoaiproxy at {commit.stdout.strip() or '?'}"
    )


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO", help=f"any of {', '.join(SCENARIOS)} [all]")
    p.add_argument("--quick", action="store_true", help="a smoke run of about a minute, once each")
    p.add_argument("--repeat", type=int, help="runs of each scenario; the table shows medians [2; quick 1]")
    p.add_argument("--proxy-core", type=int, default=0)
    p.add_argument("--load-core", type=int, default=1)
    p.add_argument("--proxy-arg", action="append", default=[], help="extra aoaiproxy option (repeatable)")
    p.add_argument("--proxy-log", default="-", help="the proxy's log file [- : stdout, to /dev/null]")
    p.add_argument("--c64-seconds", type=float)
    p.add_argument("--c1-seconds", type=float)
    p.add_argument("--streams-c", type=int, default=200)
    p.add_argument("--streams-seconds", type=float)
    p.add_argument("--stream-chunks", type=int, default=20)
    p.add_argument("--stream-interval", type=int, default=0, help="ms between a stream's chunks [0]")
    p.add_argument("--held", type=int, help="streams to hold open [10000; quick 1000]")
    p.add_argument("--ramp-timeout", type=float, default=120.0, help="seconds to open streams")
    p.add_argument("--chunk-streams", type=int, help="[2000; quick 500]")
    p.add_argument("--chunk-interval", type=int, default=50, help="ms between chunks [50: 20/s]")
    p.add_argument("--chunk-window", type=float)
    p.add_argument("--connect-c", type=int, default=64)
    p.add_argument("--connect-seconds", type=float)
    p.add_argument("--tunnel-seconds", type=float)
    p.add_argument("--profile", type=float, default=0, help="py-spy the proxy for this many seconds")
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--profile-out", help="keep py-spy's collapsed stacks here")
    p.add_argument("--profile-from", help="only print the tables of collapsed stacks kept before")
    p.add_argument("--json", help="write every sample here")
    a = p.parse_args(argv)
    quick = {
        "repeat": 1,
        "c64_seconds": 3,
        "c1_seconds": 2,
        "streams_seconds": 3,
        "held": 1000,
        "chunk_streams": 500,
        "chunk_window": 3,
        "connect_seconds": 2,
        "tunnel_seconds": 2,
    }
    full = {
        "repeat": 2,
        "c64_seconds": 10,
        "c1_seconds": 5,
        "streams_seconds": 10,
        "held": 10000,
        "chunk_streams": 2000,
        "chunk_window": 10,
        "connect_seconds": 10,
        "tunnel_seconds": 5,
    }
    for key, value in (quick if a.quick else full).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.scenarios = a.scenarios or list(SCENARIOS)
    if unknown := set(a.scenarios) - set(SCENARIOS):
        p.error(f"unknown scenario {', '.join(sorted(unknown))}; choose from {', '.join(SCENARIOS)}")
    if a.proxy_log != "-" and Path(a.proxy_log).exists() and not Path(a.proxy_log).is_file():
        p.error("--proxy-log must be a regular file (twistd rotates it by renaming it)")
    return a


def main(argv: list[str] | None = None) -> int:
    a = arguments(argv)
    if a.profile_from:
        print_profile(Path(a.profile_from), a.profile_top, "the recorded load")
        return 0
    cores = os.sched_getaffinity(0)
    pin = {a.proxy_core, a.load_core} <= cores and a.proxy_core != a.load_core and shutil.which("taskset")
    if not pin:
        note("not pinning: needs taskset and two distinct cores; figures will be mixed")
        a.proxy_core = a.load_core = None
    else:
        os.sched_setaffinity(0, {a.load_core})  # this script stays off the proxy's core
    began = time.monotonic()
    header = machine()
    note(header)
    figures: list[Figure] = []
    fail = Failures()
    with tempfile.TemporaryDirectory(prefix="aoaiproxy-bench-") as tmp:
        h = Harness(Path(tmp), a.proxy_core, a.load_core, a.proxy_log)
        if h.loadtool is None:
            note("needs Go to build bench/loadtool.go (apt-get install golang-go)")
            return 2
        try:
            for scenario in a.scenarios:
                figures += RUNNERS[scenario](h, a, fail)
        finally:
            h.stop_all()
    took = time.monotonic() - began
    print(f"\n{header}; {took:.0f} s; medians of {a.repeat} run(s); ratio = aoaiproxy ÷ reference\n")
    print(table(figures))
    if any(fail.counts.values()):
        print("\nFailed operations (all runs):")
        for where, counts in fail.counts.items():
            if counts:
                print(f"- {where}: {counts}")
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                [{"scenario": f.scenario, "figure": f.name, "samples": f.samples} for f in figures], indent=1
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
