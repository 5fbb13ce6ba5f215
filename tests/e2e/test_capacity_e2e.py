"""
Capacity end to end (SPEC §15): a daemon started with a soft open-file limit of 1024 raises it
to the hard limit, listens with a backlog of 1024, and with default flags holds 2,000 client
connections at once, none refused with 503.
"""

from __future__ import annotations

import re
import resource
import shutil
import socket
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from ..conftest import Daemon, free_port, spawned, twistd_command

HEALTH = b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n"
HELD = 2000
#: Descriptors this test needs of its own, beside the connections.
SPARE = 200


def open_files(pid: int) -> tuple[int, int]:
    """The soft and hard open-file limits of process C{pid}, as C{/proc} shows them."""
    limits = Path(f"/proc/{pid}/limits").read_text()
    match = re.search(r"^Max open files\s+(\d+)\s+(\d+)", limits, re.M)
    assert match is not None, limits
    return int(match.group(1)), int(match.group(2))


def backlog(port: int) -> int:
    """The backlog of the socket listening on C{port} (C{ss} shows it as Send-Q)."""
    output = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return int(output.split()[2])


def hold_connections(port: int, count: int) -> Counter[int]:
    """
    Open C{count} connections, send a request on each and keep every one open until all are
    answered; the answers' status codes, counted.
    """
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            client = socket.create_connection(("127.0.0.1", port), timeout=30)
            held.append(client)
            client.sendall(HEALTH)
        statuses: Counter[int] = Counter()
        for client in held:
            head = client.recv(4096)  # bounded by the socket's timeout
            statuses[int(head.split(b" ", 2)[1]) if head else 0] += 1
        return statuses
    finally:
        for client in held:
            client.close()


@pytest.fixture
def descriptors_for_the_test() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2 * HELD + SPARE:
        pytest.skip(f"the hard open-file limit ({hard}) is too low for {HELD} connections")
    if soft != resource.RLIM_INFINITY and soft < HELD + SPARE:
        resource.setrlimit(resource.RLIMIT_NOFILE, (HELD + SPARE, hard))


def test_raises_its_soft_limit_and_holds_2000_connections_with_default_flags(
    tmp_path: Path, descriptors_for_the_test: None
) -> None:
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.skip("prlimit is not installed (util-linux)")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    port = free_port()
    command = [
        prlimit,
        f"--nofile=1024:{hard}",
        *twistd_command(
            "--endpoint", "https://r.openai.azure.com", "--listen", f"tcp:{port}:interface=127.0.0.1"
        ),
    ]
    daemon: Daemon
    with spawned(command, tmp_path / "daemon.log", port) as daemon:
        assert open_files(daemon.proc.pid) == (hard, hard)
        assert backlog(port) >= 1024
        assert hold_connections(port, HELD) == Counter({200: HELD})
        cap = (hard - 100) // 2
        assert (
            f"open files: soft limit raised from 1024 to {hard}; at most {cap} client connections per process"
            in daemon.log()
        )
        assert daemon.stop() == 0
