"""
A/B: the CPU per request of several checkouts (or flag sets), alternated in one run.

On a shared machine a whole bench run per checkout moves by ±20-50 %; here every target runs
at once (all idle but the one under load), against the same upstream, and the load goes to
each in turn, round after round (the order reversed every other round), so that what disturbs
the machine disturbs them alike.  Each sample: C{wrk -t1 -c64} for a few seconds (the target's
own CPU time read from /proc, its process tree included, ÷ requests), then C{wrk -c1} for the
latency.  Medians are printed, and every sample.  With C{--connect}: C{loadtool connect -c64}
(a CONNECT to a TCP sink, a new connection each, closed at once) instead, CPU per setup.

    python bench/ab.py /tmp/old-checkout .                     # two checkouts
    python bench/ab.py ".::--workers=1" ".::--workers=2"       # one checkout, two flag sets
    python bench/ab.py ".::::/tmp/venv-a" ".::::/tmp/venv-b"   # two interpreters (virtualenvs)
    python bench/ab.py --stream --rounds 10 /tmp/old .         # 20-chunk streams instead
    python bench/ab.py --connect --rounds 8 /tmp/old .         # CONNECT setups instead

Needs what bench.py needs for C{nonstream} (Go for the upstream, wrk, taskset).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import free_port, wait_for_port
from _harness import (
    CHAT_REQUEST,
    CHAT_RESPONSE,
    STREAM_CHUNK,
    STREAM_REQUEST,
    WRK_LUA,
    build_loadtool,
    cpu_seconds,
    parse_wrk,
)

PROXY_CORE, LOAD_CORE = "0", "1"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=2, help="of wrk -c64 per sample")
    parser.add_argument("--stream", action="store_true", help="post the streaming body (20 chunks)")
    parser.add_argument("--connect", action="store_true", help="CONNECT setups to a sink, not requests")
    parser.add_argument("--arg", action="append", default=[], help="passed to every proxy")
    parser.add_argument(
        "targets", nargs="+", help="CHECKOUT, CHECKOUT::FLAGS or CHECKOUT::FLAGS::VIRTUALENV (its twistd)"
    )
    a = parser.parse_args(argv)
    loadtool = build_loadtool()
    if loadtool is None:
        print("ab: needs Go to build bench/loadtool.go", file=sys.stderr)
        return 2
    twistd = str(Path(sys.executable).parent / "twistd")
    work = Path(tempfile.mkdtemp(prefix="aoaiproxy-ab-"))
    files = {}
    for name, data in (
        ("request", CHAT_REQUEST),
        ("stream", STREAM_REQUEST),
        ("response", CHAT_RESPONSE),
        ("chunk", STREAM_CHUNK),
        ("lua", WRK_LUA.encode()),
    ):
        files[name] = work / name
        files[name].write_bytes(data)
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(argv: list[str], core: str, **kw: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["taskset", "-c", core, *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            **kw,  # type: ignore[call-overload]
        )
        procs.append(proc)
        return proc

    def wrk(port: int, connections: int, seconds: int) -> dict[str, float]:
        body = files["stream" if a.stream else "request"]
        out = subprocess.run(
            [
                *("taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s"),
                *("-s", str(files["lua"]), f"http://127.0.0.1:{port}/v1/chat/completions"),
            ],
            env={**os.environ, "BENCH_BODY": str(body)},
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        ).stdout
        return parse_wrk(out)

    def setups(port: int, sink: int, seconds: int) -> int:
        out = subprocess.run(
            [
                *("taskset", "-c", LOAD_CORE, str(loadtool), "connect"),
                *("-proxy", f"127.0.0.1:{port}", "-target", f"127.0.0.1:{sink}"),
                *("-c", "64", "-d", f"{seconds}s"),
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        ).stdout
        done: int = json.loads(out.strip().splitlines()[-1])["ok"]
        return done

    try:
        up = free_port()
        upstream = [str(loadtool), "upstream", "-listen", f"127.0.0.1:{up}"]
        upstream += ["-response", str(files["response"]), "-chunk", str(files["chunk"])]
        wait_for_port(up, spawn(upstream, LOAD_CORE))
        sink = free_port()
        if a.connect:
            wait_for_port(sink, spawn([str(loadtool), "sink", "-listen", f"127.0.0.1:{sink}"], LOAD_CORE))
        targets: list[tuple[str, int, subprocess.Popen[bytes]]] = []
        for spec in a.targets:
            path, _, rest = spec.partition("::")
            flags, _, venv = rest.partition("::")
            checkout = os.path.realpath(path)
            port = free_port()
            command = str(Path(venv, "bin", "twistd")) if venv else twistd
            argv = [command, "-n", "--pidfile=", "aoaiproxy", "--listen", f"tcp:{port}:interface=127.0.0.1"]
            argv += ["--endpoint", f"http://127.0.0.1:{up}", *a.arg, *flags.split()]
            if a.connect:
                argv += ["--forward-allow", f"127.0.0.1:{sink}"]
            proc = spawn(argv, PROXY_CORE, cwd=checkout, env={**os.environ, "PYTHONPATH": checkout})
            wait_for_port(port, proc)
            targets.append((spec, port, proc))
        cpu: dict[str, list[float]] = {spec: [] for spec, _, _ in targets}
        p50: dict[str, list[float]] = {spec: [] for spec, _, _ in targets}
        rate: dict[str, list[float]] = {spec: [] for spec, _, _ in targets}
        for _, port, _ in targets:  # warm-up
            if a.connect:
                setups(port, sink, 1)
            else:
                wrk(port, 64, 1)
        for round_ in range(a.rounds):
            for spec, port, proc in targets if round_ % 2 == 0 else targets[::-1]:
                before = cpu_seconds(proc.pid)
                if a.connect:
                    count = setups(port, sink, a.seconds)
                    rate[spec].append(count / a.seconds)
                else:
                    count = wrk(port, 64, a.seconds)["requests"]
                    p50[spec].append(wrk(port, 1, 1)["p50_us"] / 1000)
                cpu[spec].append((cpu_seconds(proc.pid) - before) / count * 1e6)
        for spec in cpu:
            samples = ", ".join(f"{x:.0f}" for x in cpu[spec])
            if a.connect:
                print(
                    f"{spec}: CPU µs per CONNECT setup, median {statistics.median(cpu[spec]):.1f} "
                    f"({samples}); setups/s median {statistics.median(rate[spec]):,.0f}"
                )
                continue
            print(
                f"{spec}: CPU µs per request, median {statistics.median(cpu[spec]):.0f} ({samples}); "
                f"c1 p50 median {statistics.median(p50[spec]):.2f} ms"
            )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
