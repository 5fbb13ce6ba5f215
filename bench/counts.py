"""
Counts per operation that do not move with the host's speed: the user-space instructions
(callgrind) and the system calls (strace) a target spends on one non-streaming request, or on
one CONNECT set up and closed.  Seconds on this shared machine move by ±30 % from one hour to
the next (the same floor made 7,320 and 13,137 req/s on two days); these counts do not, so
they tell a change in the code from a change in the host, and how far the code is from the
Twisted floors.  The kernel's own work (the TCP stack on loopback) is in neither count.

    python bench/counts.py . /tmp/old-checkout        # aoaiproxy at two checkouts
    python bench/counts.py . floor --ops 1000        # aoaiproxy and the Twisted floors
    python bench/counts.py . --only connect --tool strace

For each target and scenario: the target is started (a checkout's C{twistd -n aoaiproxy}, or
for C{floor} the bench's floors: C{floor.py} answering requests itself, C{connect_floor.py}
for CONNECT), pinned to the proxy core, in front of the bench's Go upstream and TCP sink on
the load core; C{--warmup} operations, then the counter is zeroed (C{callgrind_control -z})
or attached (C{strace -c -f -p}), then C{--ops} operations, then the count is read.  The
operations come from this script, on 8 connections at a time: requests on keep-alive
connections, CONNECTs each on a new connection that is closed once the 200 is read.  Every
count is divided by C{--ops}.  With C{--rounds} > 1 the targets alternate, and every sample is
printed.

Needs valgrind (callgrind_control) and strace (Debian's), Go (bench/loadtool.go) and taskset.
Only 127.0.0.1; every loop is bounded in count and time; every process started is stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from contextlib import AbstractContextManager
from pathlib import Path

from _common import HOST
from _harness import CHAT_REQUEST, Harness, Proc

PROXY_CORE, LOAD_CORE = 0, 1
SCENARIOS = ("request", "connect")
TOOLS = ("callgrind", "strace")
AT_ONCE = 8
#: What an operation may take at most, under valgrind (~50 times slower than without).
OP_TIMEOUT = 30.0
#: How long a target may take to listen, under valgrind.
START_TIMEOUT = 120.0


def parse_callgrind_totals(text: str) -> int:
    """The instruction count of a callgrind dump (its C{totals:} or C{summary:} line)."""
    for line in text.splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise ValueError("no totals in the callgrind dump")


def parse_strace_counts(text: str) -> dict[str, int]:
    """The calls per system call of C{strace -c}'s table (C{total} among them)."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5 or not fields[0].replace(".", "", 1).isdigit():
            continue
        # % time, seconds, usecs/call, calls, [errors,] syscall
        counts[fields[-1]] = int(fields[3])
    return counts


def request_bytes() -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: %b\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer bench-key\r\nContent-Length: %d\r\n\r\n%b"
        % (HOST.encode(), len(CHAT_REQUEST), CHAT_REQUEST)
    )


def _read_ok(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read until a 200's head is whole: (head, what followed it); exit on anything else."""
    buf = b""
    while (end := buf.find(b"\r\n\r\n")) < 0:
        data = sock.recv(65536)
        if not data:
            raise SystemExit(f"the target closed the connection; read so far: {buf[:200]!r}")
        buf += data
    if not buf.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"the target answered {buf[:200]!r}")
    return buf[:end], buf[end + 4 :]


def requests(port: int, count: int, conns: list[socket.socket]) -> None:
    """C{count} POSTs, AT_ONCE at a time on the keep-alive connections C{conns}."""
    request = request_bytes()
    done = 0
    while done < count:
        batch = conns[: min(len(conns), count - done)]
        for sock in batch:
            sock.sendall(request)
        for sock in batch:
            head, rest = _read_ok(sock)
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                None,
            )
            if length is None:
                raise SystemExit(f"the target answered with no Content-Length: {head[:200]!r}")
            while len(rest) < length:
                data = sock.recv(65536)
                if not data:
                    raise SystemExit("the target closed the connection inside a response")
                rest += data
        done += len(batch)


def connects(port: int, count: int, sink: int) -> None:
    """C{count} CONNECTs to the sink, AT_ONCE at a time, each closed once its 200 is read."""
    line = b"CONNECT %b:%d HTTP/1.1\r\nHost: %b:%d\r\n\r\n" % (HOST.encode(), sink, HOST.encode(), sink)
    done = 0
    while done < count:
        socks = [
            socket.create_connection((HOST, port), timeout=OP_TIMEOUT)
            for _ in range(min(AT_ONCE, count - done))
        ]
        for sock in socks:
            sock.sendall(line)
        for sock in socks:
            _read_ok(sock)
            sock.close()
        done += len(socks)


class Run:
    """The bench's upstream and sink (L{Harness}), and one target at a time in front of them."""

    def __init__(self, harness: Harness, upstream: int, sink: int) -> None:
        self.harness = harness
        self.upstream = upstream
        self.sink = sink
        self.workdir = harness.workdir

    def target(self, target: str, scenario: str, tool: str) -> AbstractContextManager[tuple[int, Proc]]:
        """The target started (under callgrind for that tool): its port and process."""
        h = self.harness
        h.wrap = []
        if tool == "callgrind":
            out = self.workdir / "callgrind.out"
            h.wrap = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        if target == "floor":
            return h.floor() if scenario == "request" else h.connect_floor()
        checkout = Path(target).resolve()
        if not (checkout / "twisted" / "plugins" / "aoaiproxy_plugin.py").exists():
            raise SystemExit(f"{target}: not a checkout of aoaiproxy (or 'floor')")
        return h.proxy(self.upstream, ["--forward-allow", f"{HOST}:{self.sink}"], checkout=checkout)

    def operations(self, scenario: str, port: int, count: int, conns: list[socket.socket]) -> None:
        if scenario == "request":
            requests(port, count, conns)
        else:
            connects(port, count, self.sink)

    def sample(self, target: str, scenario: str, tool: str, ops: int, warmup: int) -> dict[str, float]:
        """One count: what the target spends per operation (C{instructions}, or per system call)."""
        with self.target(target, scenario, tool) as (port, proc):
            pid = proc.pid  # taskset and valgrind exec: the pid is the target's
            conns = []
            if scenario == "request":
                conns = [socket.create_connection((HOST, port), timeout=OP_TIMEOUT) for _ in range(AT_ONCE)]
            try:
                self.operations(scenario, port, warmup, conns)
                if tool == "callgrind":
                    return {"instructions": self._callgrind(pid, scenario, port, ops, conns) / ops}
                return {name: n / ops for name, n in self._strace(pid, scenario, port, ops, conns).items()}
            finally:
                for sock in conns:
                    sock.close()

    def _callgrind(self, pid: int, scenario: str, port: int, ops: int, conns: list[socket.socket]) -> int:
        for old in self.workdir.glob("callgrind.out*"):
            old.unlink()
        subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True, timeout=120)
        self.operations(scenario, port, ops, conns)
        subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True, timeout=120)
        dumps = sorted(self.workdir.glob("callgrind.out.*"), key=lambda p: p.stat().st_mtime)
        if not dumps:
            raise SystemExit("callgrind wrote no dump")
        return parse_callgrind_totals(dumps[-1].read_text(errors="replace"))

    def _strace(
        self, pid: int, scenario: str, port: int, ops: int, conns: list[socket.socket]
    ) -> dict[str, int]:
        out = self.workdir / "strace.txt"
        threads = os.listdir(f"/proc/{pid}/task")  # every thread (a thread pool's among them)
        tracer = subprocess.Popen(
            ["strace", "-c", "-f", *(f"-p{tid}" for tid in threads), "-o", str(out)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            # strace says (on stderr) when it has attached to each thread.
            assert tracer.stderr is not None
            attached = 0
            while attached < len(threads):
                line = tracer.stderr.readline()
                if not line:
                    raise SystemExit("strace did not attach")
                attached += b"attached" in line
            self.operations(scenario, port, ops, conns)
        finally:
            tracer.send_signal(2)  # SIGINT: detach and write the table
            tracer.wait(60)
        return parse_strace_counts(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("targets", nargs="+", help="a checkout, or 'floor' (the bench's Twisted floors)")
    parser.add_argument("--only", choices=SCENARIOS, action="append", help="a scenario (default: both)")
    parser.add_argument("--tool", choices=(*TOOLS, "both"), default="both")
    parser.add_argument("--ops", type=int, default=2000, help="operations counted per sample")
    parser.add_argument("--warmup", type=int, default=300, help="operations before counting")
    parser.add_argument("--rounds", type=int, default=1, help="samples per target, alternated")
    a = parser.parse_args(argv)
    if not 0 < a.ops <= 100_000 or not 0 <= a.warmup <= 100_000 or not 0 < a.rounds <= 20:
        parser.error("--ops 1..100000, --warmup 0..100000, --rounds 1..20")
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {LOAD_CORE})  # this script is the load: off the target's core
    tools = TOOLS if a.tool == "both" else (a.tool,)
    scenarios = a.only or list(SCENARIOS)
    samples: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="aoaiproxy-counts-") as tmp:
        harness = Harness(Path(tmp), PROXY_CORE, LOAD_CORE, "-")
        if harness.loadtool is None:
            raise SystemExit("counts: needs Go to build bench/loadtool.go")
        harness.start_timeout = START_TIMEOUT
        try:
            with harness.upstream() as upstream, harness.sinks() as (sink, _tls):
                run = Run(harness, upstream, sink)
                for round_ in range(a.rounds):
                    order = a.targets if round_ % 2 == 0 else list(reversed(a.targets))
                    for scenario in scenarios:
                        for tool in tools:
                            for target in order:
                                got = run.sample(target, scenario, tool, a.ops, a.warmup)
                                samples.setdefault((scenario, tool, target), []).append(got)
                                print(
                                    f"{scenario} {tool} {target}: {_brief(got)}", file=sys.stderr, flush=True
                                )
        finally:
            harness.stop_all()
    print(report(samples, a.ops))
    return 0


def _brief(got: dict[str, float]) -> str:
    if "instructions" in got:
        return f"{got['instructions'] / 1000:,.1f}k instructions per op"
    return f"{got.get('total', 0.0):.1f} system calls per op"


def report(samples: dict[tuple[str, str, str], list[dict[str, float]]], ops: int) -> str:
    """The medians as a table, with every sample; system calls with their five most called."""
    lines = [f"Per operation, medians ({ops:,} operations per sample):", ""]
    lines += ["| scenario | target | instructions | system calls | most called |", "|---|---|---:|---:|---|"]
    keys = sorted({(s, t) for s, _tool, t in samples}, key=lambda k: (SCENARIOS.index(k[0]), k[1]))
    for scenario, target in keys:
        cg = samples.get((scenario, "callgrind", target), [])
        st = samples.get((scenario, "strace", target), [])
        instructions = statistics.median(x["instructions"] for x in cg) if cg else None
        calls: dict[str, float] = {}
        for name in {n for x in st for n in x}:
            calls[name] = statistics.median(x.get(name, 0.0) for x in st)
        total = calls.pop("total", None)
        top = ", ".join(f"{n} {v:.2g}" for n, v in sorted(calls.items(), key=lambda kv: (-kv[1], kv[0]))[:5])
        lines.append(
            f"| {scenario} | {target} | "
            f"{'-' if instructions is None else f'{instructions / 1000:,.1f}k'} | "
            f"{'-' if total is None else f'{total:.1f}'} | {top or '-'} |"
        )
    lines += ["", "Samples:"]
    for (scenario, tool, target), got in samples.items():
        lines.append(f"  {scenario} {tool} {target}: " + "; ".join(_brief(x) for x in got))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
