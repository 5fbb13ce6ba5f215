"""
The machinery of C{bench.py}: the payloads, the tools it needs (found, not installed), the
processes it starts (each pinned to a core, with the open-file limit raised, killed at the end
and when the bench itself dies), their configurations, and the parsing of what the load tools
print.  Run as a script's neighbour (its folder is on sys.path).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import HOST, free_port, rss_kib, wait_for_port

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "aoaiproxy-bench"

# -- payloads ---------------------------------------------------------------------------------

_TEXT = (
    "Check the database server's own log for the time of the reset first: a restart, a failover "
    "or an idle-connection timeout there explains most of these. Then compare the driver version "
    "the upgrade brought with the one the server supports, and retry the export by hand. "
) * 4


def _padded(template: dict[str, Any], size: int, put: Any) -> bytes:
    """C{template} as compact JSON, its text field (set by C{put}) cut so the whole is C{size}."""
    put(template, "")
    room = size - len(json.dumps(template, separators=(",", ":")).encode())
    put(template, _TEXT[:room])
    return json.dumps(template, separators=(",", ":")).encode()


def _request(stream: bool) -> bytes:
    body = {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are a concise assistant for a support team."},
            {"role": "user", "content": ""},
        ],
        "temperature": 0.2,
        "max_tokens": 256,
        "stream": stream,
    }
    return _padded(body, 575, lambda b, text: b["messages"][1].__setitem__("content", text))


#: A chat completion request of 575 bytes, plain and streaming.
CHAT_REQUEST = _request(False)
STREAM_REQUEST = _request(True)

#: The upstream's (and the floor's) answer to a plain chat completion: 575 bytes.
CHAT_RESPONSE = _padded(
    {
        "id": "chatcmpl-AZ12bench0000000000000000",
        "object": "chat.completion",
        "created": 1730000000,
        "model": "gpt-4o-2024-08-06",
        "system_fingerprint": "fp_bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": ""},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 57, "completion_tokens": 41, "total_tokens": 98},
    },
    575,
    lambda b, text: b["choices"][0]["message"].__setitem__("content", text),
)

#: One SSE event of a streamed chat completion, as Azure sends them.  The upstream writes its
#: send time (16 digits of microseconds) over the id's zeros, so the client sees how late it is.
STREAM_CHUNK = (
    b'data: {"id":"chatcmpl-AZ12bench0000000000000000","object":"chat.completion.chunk",'
    b'"created":1730000000,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_bench",'
    b'"choices":[{"index":0,"delta":{"content":" the"},"finish_reason":null,"logprobs":null}]}\n\n'
)

# -- parsing what the load tools print ----------------------------------------------------------

#: wrk's Lua hooks: the request, and a JSON summary line at the end (parsed by L{parse_wrk}).
WRK_LUA = """\
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer bench-key"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50_us": %.1f, "p99_us": %.1f, "max_us": %.1f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def parse_wrk(output: str) -> dict[str, float]:
    """
    The summary that L{WRK_LUA} makes wrk print, with C{rps} (requests per second) and
    C{errors} (socket errors and non-2xx/3xx answers) added.
    """
    for line in reversed(output.splitlines()):
        if line.startswith("WRKJSON "):
            out: dict[str, float] = json.loads(line[len("WRKJSON ") :])
            out["rps"] = out["requests"] / (out["duration_us"] / 1e6) if out["duration_us"] else 0.0
            out["errors"] = sum(out[k] for k in ("connect", "read", "write", "status", "timeout"))
            return out
    raise ValueError("no WRKJSON line in wrk's output:\n" + output[-2000:])


def parse_json_line(output: str) -> dict[str, Any]:
    """The last line of C{output} that is a JSON object (what loadtool prints)."""
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            value: dict[str, Any] = json.loads(line)
            return value
    raise ValueError("no JSON line in:\n" + output[-2000:])


def parse_collapsed(lines: Sequence[str]) -> list[tuple[list[str], int]]:
    """py-spy's C{--format raw} output (collapsed stacks): (frames root first, samples)."""
    out = []
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if stack and count.isdigit():
            out.append((stack.split(";"), int(count)))
    return out


def frame_module(frame: str) -> str:
    """
    The dotted module of a py-spy frame C{"function (path/to/module.py:123)"}: its path after
    C{site-packages} or the standard library's folder (C{twisted.web.http}, C{urllib.parse}),
    or from C{aoaiproxy} on for the checkout; else the file name.  py-spy shortens paths to
    what follows their C{sys.path} entry, and then that is the module.
    """
    _, _, where = frame.rpartition(" (")
    path = Path(where.rstrip(")").rsplit(":", 1)[0]).with_suffix("")
    parts = path.parts
    if not path.is_absolute():  # py-spy names a file from its sys.path entry on
        return ".".join(parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "site-packages" or parts[i].startswith("python3"):
            return ".".join(parts[i + 1 :])
    if "aoaiproxy" in parts:
        return ".".join(parts[parts.index("aoaiproxy") :])
    return parts[-1] if parts else frame


def frame_function(frame: str) -> str:
    """C{"module:function"} for a py-spy frame (line numbers dropped, so callers merge)."""
    name = frame.rpartition(" (")[0] or frame
    return f"{frame_module(frame)}:{name}"


def profile_tables(
    stacks: list[tuple[list[str], int]], top: int = 25
) -> tuple[int, list[tuple[str, float, float]], list[tuple[str, float, float]]]:
    """
    (total samples, functions, modules) from collapsed stacks; each row is (name, self %,
    inclusive %), sorted by self time, at most C{top} rows.  A frame counts once per sample
    for its inclusive share however deep it recurses.
    """
    total = sum(n for _, n in stacks)
    tables = []
    for key in (frame_function, frame_module):
        own: dict[str, int] = {}
        incl: dict[str, int] = {}
        for frames, n in stacks:
            frames = [f for f in frames if " (" in f]  # drop the process and thread frames
            if not frames:
                continue
            names = [key(f) for f in frames]
            own[names[-1]] = own.get(names[-1], 0) + n
            for name in set(names):
                incl[name] = incl.get(name, 0) + n
        rows = sorted(incl, key=lambda k: (own.get(k, 0), incl[k]), reverse=True)[:top]
        tables.append([(k, 100 * own.get(k, 0) / total, 100 * incl[k] / total) for k in rows])
    return total, tables[0], tables[1]


# -- results ------------------------------------------------------------------------------------


@dataclass
class Figure:
    """One measured figure: samples per target (one per repeat), the proxy's and references'."""

    scenario: str
    name: str
    fmt: str = "{:,.0f}"
    samples: dict[str, list[float]] = field(default_factory=dict)

    def add(self, target: str, value: float | None) -> None:
        if value is not None:
            self.samples.setdefault(target, []).append(value)

    def median(self, target: str) -> float | None:
        values = self.samples.get(target)
        return statistics.median(values) if values else None


PROXY = "aoaiproxy"


def table(figures: Sequence[Figure]) -> str:
    """A Markdown table: each figure's median for the proxy, and each reference with the ratio."""
    lines = [
        "| scenario | figure | aoaiproxy | reference | reference figure | ratio |",
        "|---|---|---:|---|---:|---:|",
    ]
    last = None
    for f in figures:
        mine = f.median(PROXY)
        shown = f.fmt.format(mine) if mine is not None else "—"
        refs: list[str | None] = [t for t in f.samples if t != PROXY] or [None]
        for i, ref in enumerate(refs):
            scenario = f.scenario if f.scenario != last else ""
            last = f.scenario
            if ref is None:
                lines.append(f"| {scenario} | {f.name} | {shown} | — | — | — |")
                continue
            theirs = f.median(ref)
            # A ratio of differences that may be negative (an added delay) would mislead.
            ratio = (
                f"{mine / theirs:.2f}" if mine is not None and mine >= 0 and theirs and theirs > 0 else "—"
            )
            theirs_shown = f.fmt.format(theirs) if theirs is not None else "—"
            lines.append(
                f"| {scenario} | {f.name if i == 0 else ''} | {shown if i == 0 else ''} "
                f"| {ref} | {theirs_shown} | {ratio} |"
            )
    return "\n".join(lines)


# -- tools and processes --------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """C{pid} and its live descendants (C{--workers N} runs the workers as children)."""
    found = [pid]
    for each in found:
        try:
            for task in os.listdir(f"/proc/{each}/task"):
                children = Path(f"/proc/{each}/task/{task}/children").read_text().split()
                found.extend(int(child) for child in children)
        except OSError:
            continue
    return found


def cpu_seconds(pid: int) -> float:
    """
    User plus system CPU time of a process and its live descendants (all their threads), in
    seconds.
    """
    ticks = 0
    for each in descendants(pid):
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _child_setup() -> None:
    """In each child: the soft open-file limit up to the hard one, and die with the bench."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.suppress(OSError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def build_loadtool() -> Path | None:
    """Build bench/loadtool.go (cached by its hash outside the repository); None without Go."""
    go = shutil.which("go")
    source = BENCH / "loadtool.go"
    if go is None:
        return None
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    binary = CACHE / f"loadtool-{digest}"
    if not binary.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [go, "build", "-o", str(binary), str(source)],
            check=True,
            timeout=300,
            env=dict(os.environ, CGO_ENABLED="0", GOFLAGS="-mod=mod", GO111MODULE="off"),
        )
    return binary


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid


class Harness:
    """Starts and stops the bench's processes; the proxy on one core, the load on another."""

    def __init__(self, workdir: Path, proxy_core: int | None, load_core: int | None, proxy_log: str) -> None:
        self.workdir = workdir
        self.proxy_core = proxy_core
        self.load_core = load_core
        self.proxy_log = proxy_log
        self.procs: list[Proc] = []
        self.loadtool = build_loadtool()
        self.wrk = shutil.which("wrk")
        self.nginx = shutil.which("nginx") or (
            "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
        )
        self.tinyproxy = shutil.which("tinyproxy") or (
            "/usr/bin/tinyproxy" if Path("/usr/bin/tinyproxy").exists() else None
        )
        self.twistd = Path(sys.executable).parent / "twistd"
        #: Put before the command of every target on the proxy core (aoaiproxy and the floors):
        #: C{valgrind --tool=callgrind ...} for counts.py.
        self.wrap: list[str] = []
        #: How long a process may take to listen (longer under valgrind).
        self.start_timeout = 20.0
        self.files = {
            "request": self._write("request.json", CHAT_REQUEST),
            "stream": self._write("stream.json", STREAM_REQUEST),
            "response": self._write("response.json", CHAT_RESPONSE),
            "chunk": self._write("chunk.txt", STREAM_CHUNK),
            "lua": self._write("post.lua", WRK_LUA.encode()),
        }

    def _write(self, name: str, data: bytes) -> Path:
        path = self.workdir / name
        path.write_bytes(data)
        return path

    def _pin(self, core: int | None) -> list[str]:
        return ["taskset", "-c", str(core)] if core is not None else []

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        core: int | None,
        *,
        stdin: int | None = None,
        stdout: int | None = None,
        env: dict[str, str] | None = None,
    ) -> Proc:
        """
        Start C{argv} pinned to C{core}; its stderr (and stdout unless given) to a log file;
        C{env} added to its environment.
        """
        log = self.workdir / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                [*self._pin(core), *argv],
                stdin=stdin if stdin is not None else subprocess.DEVNULL,
                stdout=stdout if stdout is not None else out,
                stderr=out,
                cwd=self.workdir,
                env={
                    **os.environ,
                    "PYTHONPATH": str(REPO),
                    "BENCH_BODY": str(self.files["request"]),
                    **(env or {}),
                },
                preexec_fn=_child_setup,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        if proc.popen.poll() is None:
            proc.popen.terminate()
            try:
                proc.popen.wait(15)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(15)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.procs)):
            self.stop(proc)

    @contextlib.contextmanager
    def running(
        self,
        name: str,
        argv: Sequence[str],
        core: int | None,
        port: int,
        stdout: int | None = None,
        env: dict[str, str] | None = None,
    ) -> Iterator[Proc]:
        proc = self.spawn(name, argv, core, stdout=stdout, env=env)
        try:
            try:
                wait_for_port(port, proc.popen, self.start_timeout)
            except SystemExit as e:
                raise SystemExit(f"{name}: {e}; its log:\n{proc.log.read_text()[-3000:]}") from None
            yield proc
        finally:
            self.stop(proc)

    # -- servers --------------------------------------------------------------------------

    @contextlib.contextmanager
    def upstream(self) -> Iterator[int]:
        """The fast upstream (loadtool upstream) on the load core; yields its port."""
        assert self.loadtool is not None
        port = free_port()
        argv = [str(self.loadtool), "upstream", "-listen", f"{HOST}:{port}"]
        argv += ["-response", str(self.files["response"]), "-chunk", str(self.files["chunk"])]
        with self.running("upstream", argv, self.load_core, port):
            yield port

    @contextlib.contextmanager
    def sinks(self) -> Iterator[tuple[int, int]]:
        """A TCP sink and a TLS sink (loadtool sink) on the load core: (port, tls port)."""
        assert self.loadtool is not None
        raw, tls = free_port(), free_port()
        with (
            self.running(
                "sink", [str(self.loadtool), "sink", "-listen", f"{HOST}:{raw}"], self.load_core, raw
            ),
            self.running(
                "tls-sink",
                [str(self.loadtool), "sink", "-tls", "-listen", f"{HOST}:{tls}"],
                self.load_core,
                tls,
            ),
        ):
            yield raw, tls

    @contextlib.contextmanager
    def proxy(
        self, upstream_port: int, extra: Sequence[str] = (), checkout: Path = REPO
    ) -> Iterator[tuple[int, Proc]]:
        """C{twistd -n aoaiproxy} (of C{checkout}) on the proxy core, in front of the upstream."""
        port = free_port()
        # twistd -n logs to stdout: to /dev/null by default.  Never --logfile=/dev/null: twistd's
        # LogFile rotates at 1 MB by renaming the file, and as root that renames /dev/null.
        argv = [*self.wrap, str(self.twistd), "--nodaemon", "--pidfile="]
        stdout: int | None = subprocess.DEVNULL
        if self.proxy_log != "-":
            argv.append(f"--logfile={self.proxy_log}")
            stdout = None
        argv += ["aoaiproxy", "--listen", f"tcp:{port}:interface={HOST}"]
        argv += ["--endpoint", f"http://{HOST}:{upstream_port}", *extra]
        env = {"PYTHONPATH": str(checkout)}
        with self.running("aoaiproxy", argv, self.proxy_core, port, stdout, env) as proc:
            yield port, proc

    @contextlib.contextmanager
    def floor(self) -> Iterator[tuple[int, Proc]]:
        """A bare twisted.web resource answering CHAT_RESPONSE itself, on the proxy core."""
        port = free_port()
        argv = [*self.wrap, sys.executable, str(BENCH / "floor.py"), str(port), str(self.files["response"])]
        with self.running("floor", argv, self.proxy_core, port) as proc:
            yield port, proc

    @contextlib.contextmanager
    def connect_floor(self) -> Iterator[tuple[int, Proc]]:
        """The least CONNECT proxy on Twisted (C{connect_floor.py}), on the proxy core."""
        port = free_port()
        argv = [*self.wrap, sys.executable, str(BENCH / "connect_floor.py"), str(port)]
        with self.running("connect-floor", argv, self.proxy_core, port) as proc:
            yield port, proc

    @contextlib.contextmanager
    def nginx_proxy(self, upstream_port: int) -> Iterator[tuple[int, Proc]]:
        """nginx (one process, no master) proxying to the upstream, on the proxy core."""
        assert self.nginx is not None
        port = free_port()
        prefix = self.workdir / "nginx"
        prefix.mkdir(exist_ok=True)
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        conf = prefix / "nginx.conf"
        conf.write_text(f"""\
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {hard};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log error;
events {{ worker_connections {hard}; use epoll; }}
http {{
    access_log /dev/null;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    upstream up {{ server {HOST}:{upstream_port}; keepalive 1024; keepalive_requests 1000000; }}
    server {{
        listen {HOST}:{port} backlog=4096;
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
""")
        argv = [self.nginx, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)]
        with self.running("nginx", argv, self.proxy_core, port) as proc:
            yield port, proc

    @contextlib.contextmanager
    def tinyproxy_proxy(self) -> Iterator[tuple[int, Proc]]:
        """tinyproxy (CONNECT to any port of 127.0.0.1), on the proxy core."""
        assert self.tinyproxy is not None
        port = free_port()
        conf = self.workdir / "tinyproxy.conf"
        conf.write_text(
            f"Port {port}\nListen {HOST}\nTimeout 600\nMaxClients 4096\nAllow {HOST}\n"
            f'LogLevel Critical\nLogFile "{self.workdir / "tinyproxy-run.log"}"\n'
        )
        with self.running(
            "tinyproxy", [self.tinyproxy, "-d", "-c", str(conf)], self.proxy_core, port
        ) as proc:
            yield port, proc

    # -- load -----------------------------------------------------------------------------

    def pinned(self, argv: Sequence[str]) -> list[str]:
        """C{argv} run on the load core."""
        return [*self._pin(self.load_core), *argv]

    def wrk_argv(self, port: int, connections: int, seconds: float) -> list[str]:
        assert self.wrk is not None
        url = f"http://{HOST}:{port}/v1/chat/completions"
        argv = [self.wrk, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s"]
        return self.pinned([*argv, "-s", str(self.files["lua"]), url])

    def run_wrk(self, port: int, connections: int, seconds: float) -> dict[str, float]:
        result = subprocess.run(
            self.wrk_argv(port, connections, seconds),
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            env=dict(os.environ, BENCH_BODY=str(self.files["request"])),
            preexec_fn=_child_setup,
        )
        return parse_wrk(result.stdout + result.stderr)

    def load(self, *args: str, timeout: float) -> dict[str, Any]:
        """Run a loadtool load generator on the load core; its JSON summary."""
        assert self.loadtool is not None
        result = subprocess.run(
            self.pinned([str(self.loadtool), *args]),
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=_child_setup,
        )
        if result.returncode != 0:
            raise RuntimeError(f"loadtool {args[0]} failed: {result.stderr[-2000:]}")
        return parse_json_line(result.stdout)

    def stream_args(self, port: int) -> list[str]:
        return ["-addr", f"{HOST}:{port}", "-body", str(self.files["stream"])]

    @contextlib.contextmanager
    def talking(self, *args: str) -> Iterator[Lines]:
        """Run a loadtool load generator on the load core, reading its JSON lines as they come."""
        assert self.loadtool is not None
        proc = self.spawn(
            args[0],
            [str(self.loadtool), *args],
            self.load_core,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            yield Lines(proc)
            proc.popen.wait(60)
        finally:
            self.stop(proc)


class Lines:
    """The JSON lines a process prints, each read when it comes (bounded in time)."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        self.buffer = b""

    def next(self, timeout: float) -> dict[str, Any]:
        out = self.proc.popen.stdout
        assert out is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([out], [], [], max(0.0, left))
            if not ready:
                raise RuntimeError(f"{self.proc.name}: nothing printed in {timeout:g} s")
            data = os.read(out.fileno(), 65536)
            if not data:
                raise RuntimeError(f"{self.proc.name} ended early: {self.proc.log.read_text()[-2000:]}")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return parse_json_line(line.decode())

    def send(self, text: str) -> None:
        stdin = self.proc.popen.stdin
        assert stdin is not None
        with contextlib.suppress(BrokenPipeError):
            stdin.write(text.encode())
            stdin.flush()


def wait_until(condition: Any, timeout: float, step: float = 0.1) -> bool:
    """Poll C{condition()} until it is true or C{timeout} seconds pass; whether it came true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return bool(condition())


__all__ = ["Harness", "cpu_seconds", "descendants", "open_fds", "rss_kib", "table"]
