"""
Hostile clients against C{twistd -n aoaiproxy} (issue 14, "Done when"): many connections
offering big bodies without a key, and keyed connections sending adversarial JSON, must not
make the daemon store bodies (temporary files) or grow (RSS), and C{/healthz} keeps answering
from another connection meanwhile.

The attack runs in its own process (tests/e2e/hostile.py, at a lower priority), for a
bounded time; this test samples the daemon while it runs: its temporary files (in the
C{TMPDIR} it was started with, open or deleted), its RSS, and one C{/healthz} after another,
each of which must be answered within 1 s (a bound on a wait: a hang is the failure, the
speed is the bench's business).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest

from ..conftest import Daemon

HOSTILE = Path(__file__).with_name("hostile.py")
MiB = 1024 * 1024
#: How long each attack lasts.
ATTACK_SECONDS = 4.0
#: The bound on each /healthz answer during an attack.
HEALTH_DEADLINE = 1.0
#: How long the bodies a client left queued for their JSON scan may keep their files.
FREED_DEADLINE = 30.0
HEALTH = b"GET /healthz HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n"
CLIENT_KEY = "sk-client-hostile-e2e"


def rss(pid: int) -> int:
    """The process's resident set, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def temporary_bytes(pid: int, tmpdir: Path) -> int:
    """
    The bytes of the daemon's temporary files: those in C{tmpdir}, and those it holds open
    there, unlinked ones included (Python's TemporaryFile has no name once created).
    """
    total = sum(f.stat().st_size for f in tmpdir.rglob("*") if f.is_file())
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith(str(tmpdir)):
                total += os.stat(fd).st_size
        except OSError:  # closed meanwhile
            continue
    return total


def health(port: int) -> bytes:
    """One /healthz on a new connection, answered within L{HEALTH_DEADLINE} or an error."""
    with socket.create_connection(("127.0.0.1", port), timeout=HEALTH_DEADLINE) as sock:
        sock.sendall(HEALTH)
        received = b""
        while not received.endswith(b'{"status": "ok"}'):
            chunk = sock.recv(4096)  # raises TimeoutError past the deadline
            if not chunk:
                break
            received += chunk
    return received


@attrs.define
class Outcome:
    idle_rss: int
    peak_rss: int
    peak_temporary: int
    temporary_after: int
    probes: int
    attack: dict[str, object]


def attack(
    daemon: Daemon, tmpdir: Path, work: Path, connections: int, head: bytes, body: bytes, repeat: str
) -> Outcome:
    """Run the hostile client against C{daemon}, sampling it until the attack ends."""
    pid, port = daemon.proc.pid, daemon.port
    for _ in range(20):  # warm up: what serving requests allocates once is in the baseline
        assert health(port).startswith(b"HTTP/1.1 200 ")
    idle_rss = rss(pid)
    (work / "head").write_bytes(head)
    (work / "body").write_bytes(body)
    command = [sys.executable, str(HOSTILE), str(port), str(connections), str(ATTACK_SECONDS)]
    command += [str(work / "head"), str(work / "body"), repeat]
    hostile = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak_rss = peak_temporary = probes = 0
    try:
        # Bounded: the attack ends after ATTACK_SECONDS; each probe after HEALTH_DEADLINE.
        while hostile.poll() is None:
            answer = health(port)
            assert answer.startswith(b"HTTP/1.1 200 "), answer
            probes += 1
            peak_rss = max(peak_rss, rss(pid))
            peak_temporary = max(peak_temporary, temporary_bytes(pid, tmpdir))
        out, err = hostile.communicate(timeout=30)
    finally:
        if hostile.poll() is None:
            hostile.kill()
            hostile.wait()
    assert hostile.returncode == 0, err.decode()
    assert health(port).startswith(b"HTTP/1.1 200 ")
    return Outcome(idle_rss, peak_rss, peak_temporary, temporary_bytes(pid, tmpdir), probes, json.loads(out))


@pytest.fixture
def tmpdir_for_daemon(tmp_path: Path) -> Path:
    path = tmp_path / "daemon-tmp"
    path.mkdir()
    return path


def test_keyless_bodies_are_refused_unread(
    start_daemon: Callable[..., Daemon], tmpdir_for_daemon: Path, tmp_path: Path
) -> None:
    """100 keyless connections each offering a 64 MiB body, sent as fast as the proxy reads."""
    daemon = start_daemon("--endpoint", "http://127.0.0.1:9", env={"TMPDIR": str(tmpdir_for_daemon)})
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (64 * MiB)
    )
    outcome = attack(daemon, tmpdir_for_daemon, tmp_path, 100, head, b"x" * MiB, "body")
    print(outcome)
    assert outcome.attack["statuses"] and set(outcome.attack["statuses"]) == {"HTTP/1.1 401 Unauthorized"}  # type: ignore[call-overload]
    assert outcome.probes > 0
    assert outcome.peak_temporary < MiB
    assert outcome.temporary_after < MiB
    assert outcome.peak_rss - outcome.idle_rss < 20 * MiB
    assert "Traceback" not in daemon.log() and "Unhandled" not in daemon.log()


def adversarial_json(size: int) -> bytes:
    """A chat body of about C{size} bytes whose structure is the cost: tiny objects, the model last."""
    count = size // 3
    return b'{"messages": [' + b"{}," * count + b'{}], "model": "gpt-4o"}'


def test_keyed_adversarial_json_stays_bounded(
    start_daemon: Callable[..., Daemon], tmpdir_for_daemon: Path, tmp_path: Path
) -> None:
    """20 keyed connections sending adversarial JSON (16 MiB of tiny objects) to a keyed route."""
    keys = tmp_path / "client-keys"
    keys.write_text(CLIENT_KEY + "\n")
    daemon = start_daemon(
        "--endpoint",
        "http://127.0.0.1:9",
        "--token",
        "server-key",
        "--client-keys",
        str(keys),
        env={"TMPDIR": str(tmpdir_for_daemon)},
    )
    body = adversarial_json(16 * MiB)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n" % (CLIENT_KEY.encode(), len(body))
    )
    outcome = attack(daemon, tmpdir_for_daemon, tmp_path, 20, head, body, "request")
    print(outcome)
    assert outcome.probes > 0
    assert outcome.peak_rss - outcome.idle_rss < 20 * MiB
    # The bodies read whole before the client left wait for their scan (one at a time, each
    # refused within its step budget): their files are freed once it is their turn.
    deadline = time.monotonic() + FREED_DEADLINE
    while temporary_bytes(daemon.proc.pid, tmpdir_for_daemon) >= MiB and time.monotonic() < deadline:
        health(daemon.port)
    assert temporary_bytes(daemon.proc.pid, tmpdir_for_daemon) < MiB
