"""
C{--workers N} end to end (SPEC §15): C{twistd -n aoaiproxy --workers 2} subprocesses against
the fake Azure upstream in this process.

Which worker answers is made certain by stopping the other (C{SIGSTOP}): the kernel then hands
the connection to the one left, whose pid the access line carries.  Every wait is for an
event (a notification datagram, a log line, a process exit) with a bound.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import pytest_twisted
import treq
from treq.client import HTTPClient
from twisted.internet.threads import deferToThread

from aoaiproxy.testing import FakeAzure

from ..certs import make_ca
from ..conftest import Daemon, free_port, spawned, twistd_command, twistd_env
from ..test_service import wait_until
from .test_service_e2e import (
    CHAT,
    CLIENT_KEY,
    NEW_KEY,
    SERVER_KEY,
    STREAM,
    headers,
    notified,
    refused,
    server_certificate,
    wait_exit,
)
from .test_service_e2e import wait_log as service_wait_log

WORKERS = ("--workers", "2")

#: Seconds to wait for a worker's log line: starting a Python process on a busy machine is slow.
LOG_WAIT = 60.0


async def wait_log(daemon: Daemon, text: str, count: int = 1) -> None:
    await service_wait_log(daemon, text, count, timeout=LOG_WAIT)


@pytest.fixture
def start_workers(tmp_path: Path, notify_socket: socket.socket) -> Iterator[Callable[..., Daemon]]:
    """
    C{start_workers(*args)}: C{twistd -n aoaiproxy --workers 2 --listen tcp:PORT ARGS}, with
    C{$NOTIFY_SOCKET} set to L{notify_socket}; returns once it listens (the parent's socket,
    before the workers are ready: wait for C{READY=1} for that).
    """
    with ExitStack() as daemons:

        def start(*args: str, port: int | None = None, listen: bool = True) -> Daemon:
            port = port or free_port()
            listen_args = ["--listen", f"tcp:{port}:interface=127.0.0.1"] if listen else []
            command = twistd_command(*WORKERS, *listen_args, *args)
            env = {"NOTIFY_SOCKET": str(tmp_path / "notify")}
            return daemons.enter_context(spawned(command, tmp_path / f"workers-{port}.log", port, env=env))

        yield start


def worker_pids(daemon: Daemon) -> dict[int, int]:
    """The pid of the worker in each place (the last one started there), from the log."""
    return {
        int(slot): int(pid) for slot, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", daemon.log())
    }


def parent_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^PPid:\s+(\d+)$", status, re.M)
    assert match is not None
    return int(match.group(1))


@contextmanager
def only(serving: int, pids: list[int]) -> Iterator[None]:
    """Stop (SIGSTOP) every worker but C{serving}, so that it takes the next connections."""
    stopped = [pid for pid in pids if pid != serving]
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)


async def post(client: HTTPClient, url: str, key: str = CLIENT_KEY) -> int:
    """A chat completion on a new connection (the client's pool keeps none)."""
    response = await client.post(url + "/v1/chat/completions", json=CHAT, headers=headers(key), timeout=30)
    await response.content()
    code: int = response.code
    return code


async def served_by(daemon: Daemon, pid: int, status: int, count: int = 1) -> None:
    """Wait until worker C{pid} has logged C{count} chat completions answered with C{status}."""
    await wait_log(daemon, f'worker {pid}] 127.0.0.1 "POST /v1/chat/completions" {status} ', count)


# -- READY, both serve, SIGHUP, a killed worker, SIGTERM --------------------------------------


@pytest_twisted.ensureDeferred
async def test_two_workers_serve_reload_restart_and_stop(
    fake: FakeAzure,
    client: HTTPClient,
    start_workers: Callable[..., Daemon],
    notify_socket: socket.socket,
    tmp_path: Path,
) -> None:
    keys = tmp_path / "client-keys"
    keys.write_text(CLIENT_KEY + "\n")
    daemon = start_workers("--endpoint", fake.url, "--token", SERVER_KEY, "--client-keys", str(keys))

    # READY=1 once both workers said they listen, not when the parent bound the socket.
    assert await notified(notify_socket) == b"READY=1\nSTATUS=serving"
    log = daemon.log()
    pids = worker_pids(daemon)
    assert sorted(pids) == [1, 2]
    for slot, pid in pids.items():
        assert f"worker {slot} (pid {pid}) is ready" in log
        assert parent_of(pid) == daemon.proc.pid
    assert log.index("all 2 workers are ready") > max(
        log.index(f"(pid {pid}) is ready") for pid in pids.values()
    )
    workers = list(pids.values())

    # Each worker answers (the other one stopped meanwhile).
    for pid in workers:
        with only(pid, workers):
            assert await post(client, daemon.url) == 200
        await served_by(daemon, pid, 200)

    # SIGHUP reaches both: the new key works and the old one is refused by each.
    keys.write_text(f"# rotated\n{NEW_KEY}\n")
    daemon.proc.send_signal(signal.SIGHUP)
    assert re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=[0-9]+", await notified(notify_socket))
    assert await notified(notify_socket) == b"READY=1"  # after both reloaded
    for pid in workers:
        assert f"[aoaiproxy.reload#info worker {pid}] configuration reloaded: client_keys" in daemon.log()
        with only(pid, workers):
            assert await post(client, daemon.url, NEW_KEY) == 200
            assert await post(client, daemon.url, CLIENT_KEY) == 401
        await served_by(daemon, pid, 200, count=2)
        await served_by(daemon, pid, 401)

    # A worker killed is restarted, and the new one serves.
    os.kill(workers[0], signal.SIGKILL)
    await wait_log(daemon, f"worker 1 (pid {workers[0]}) was killed by signal 9; restarting it in ")
    await wait_log(daemon, "worker 1 started (pid ", count=2)
    await wait_log(daemon, "is ready", count=3)
    restarted = worker_pids(daemon)[1]
    assert restarted != workers[0] and parent_of(restarted) == daemon.proc.pid
    with only(restarted, [restarted, workers[1]]):
        assert await post(client, daemon.url, NEW_KEY) == 200
    await served_by(daemon, restarted, 200)

    # SIGTERM: the workers stop, then the parent, with status 0.
    daemon.proc.send_signal(signal.SIGTERM)
    assert await notified(notify_socket) == b"STOPPING=1"
    assert await wait_exit(daemon) == 0
    log = daemon.log()
    assert f"worker 2 (pid {workers[1]}) exited with status 0" in log
    assert f"worker 1 (pid {restarted}) exited with status 0" in log
    assert "every worker has exited" in log
    assert {r.header("api-key") for r in fake.requests} == {SERVER_KEY}
    for secret in (CLIENT_KEY, NEW_KEY, SERVER_KEY):
        assert secret not in log


# -- drain ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sigterm_lets_a_stream_finish_in_a_worker_then_exits_0(
    fake: FakeAzure, client: HTTPClient, start_workers: Callable[..., Daemon], notify_socket: socket.socket
) -> None:
    daemon = start_workers("--endpoint", fake.url, "--drain-timeout", "30")
    assert await notified(notify_socket) == b"READY=1\nSTATUS=serving"
    fake.hold_last_chunk()
    response = await client.post(
        daemon.url + "/v1/chat/completions", json=STREAM, headers=headers(), unbuffered=True, timeout=30
    )
    assert response.code == 200
    chunks: list[bytes] = []
    done = treq.collect(response, chunks.append)
    await wait_until(lambda: fake.held_streams == 1, "the held stream")

    daemon.proc.send_signal(signal.SIGTERM)
    await wait_log(daemon, "draining: 1 connection(s) with a request in flight")
    await wait_log(daemon, "drained: every request in flight has finished")  # the idle worker
    await wait_until(lambda: refused(daemon.port), "the port to be closed")  # every process stopped listening
    assert daemon.proc.poll() is None  # still serving the stream

    fake.release()
    await done
    assert b"".join(chunks).endswith(b"data: [DONE]\n\n")
    assert await wait_exit(daemon) == 0
    log = daemon.log()
    assert log.count("drained: every request in flight has finished") == 2
    assert '"POST /v1/chat/completions" 200 ' in log
    assert " aborted" not in log


# -- start-up failures ------------------------------------------------------------------------


def test_a_listener_that_cannot_bind_stops_start_up_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            twistd_command(
                *WORKERS,
                "--endpoint",
                "https://r.openai.azure.com",
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
            ),
            capture_output=True,
            text=True,
            env=twistd_env(),
            cwd=tmp_path,
            timeout=60,
        )
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert f"aoaiproxy: --listen: Couldn't listen on 127.0.0.1:{port}" in output
    assert "Traceback" not in output
    assert "worker 1 started" not in output  # no worker was started


# -- TLS and metrics --------------------------------------------------------------------------


def worker_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(entry.split("=", 1) for entry in raw.decode().split("\0") if "=" in entry)


@pytest_twisted.ensureDeferred
async def test_workers_serve_tls_reload_certificates_and_the_parent_serves_metrics(
    fake: FakeAzure,
    client: HTTPClient,
    start_workers: Callable[..., Daemon],
    notify_socket: socket.socket,
    tmp_path: Path,
) -> None:
    ca = make_ca()
    old_key, old_cert = ca.issue(tmp_path, "old", 1)
    new_key, new_cert = ca.issue(tmp_path, "new", 2)
    key, cert = tmp_path / "server.key", tmp_path / "server.crt"
    shutil.copy(old_key, key)
    shutil.copy(old_cert, cert)
    port, metrics_port = free_port(), free_port()
    daemon = start_workers(
        "--endpoint",
        fake.url,
        "--listen",
        f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}",
        "--metrics-listen",
        f"tcp:{metrics_port}:interface=127.0.0.1",
        "--log-format",
        "json",
        port=port,
        listen=False,
    )
    assert await notified(notify_socket) == b"READY=1\nSTATUS=serving"
    workers = list(worker_pids(daemon).values())
    for pid in workers:  # each worker does the TLS handshake itself
        with only(pid, workers):
            assert await deferToThread(server_certificate, port) == old_cert.read_text()

    # Renewed certificate files: each worker serves the new certificate after SIGHUP.
    shutil.copy(new_key, key)
    shutil.copy(new_cert, cert)
    daemon.proc.send_signal(signal.SIGHUP)
    assert (await notified(notify_socket)).startswith(b"RELOADING=1\n")
    assert await notified(notify_socket) == b"READY=1"
    for pid in workers:
        with only(pid, workers):
            assert await deferToThread(server_certificate, port) == new_cert.read_text()

    response = await client.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30)
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type", [b""])[0].startswith(b"text/plain")
    await response.content()
    directories = {worker_environ(pid)["PROMETHEUS_MULTIPROC_DIR"] for pid in workers}
    assert len(directories) == 1
    (directory,) = directories
    assert Path(directory).is_dir()
    assert all("NOTIFY_SOCKET" not in worker_environ(pid) for pid in workers)  # the parent's alone

    daemon.proc.send_signal(signal.SIGTERM)
    assert await wait_exit(daemon) == 0
    assert not Path(directory).exists()  # the parent's scratch directory is removed
    # Every line is JSON; the workers' carry their pid.
    records = [json.loads(line) for line in daemon.log().splitlines()]
    reloaded = [r.get("pid") for r in records if r.get("message", "").startswith("configuration reloaded")]
    assert sorted(reloaded) == sorted(workers)


# -- interception ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_workers_intercept_with_the_one_ca_the_parent_made(
    fake: FakeAzure,
    client: HTTPClient,
    start_workers: Callable[..., Daemon],
    notify_socket: socket.socket,
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    daemon = start_workers("--endpoint", fake.url, "--intercept", "--state-dir", str(state))
    assert await notified(notify_socket) == b"READY=1\nSTATUS=serving"
    log = daemon.log()
    assert log.count("interception CA generated in") == 1  # by the parent, before the workers
    assert log.count("interception CA from") == 2  # each worker loads it
    workers = list(worker_pids(daemon).values())
    for pid in workers:
        with only(pid, workers):
            response = await client.get(daemon.url + "/aoaiproxy/ca.pem", timeout=30)
            assert response.code == 200
            assert await response.content() == (state / "ca.pem").read_bytes()
    daemon.proc.send_signal(signal.SIGTERM)
    assert await wait_exit(daemon) == 0


# -- the parent gone ---------------------------------------------------------------------------


def gone(pid: int) -> bool:
    """Whether process C{pid} has exited (a zombie nobody reaped yet counts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest_twisted.ensureDeferred
async def test_workers_stop_when_the_parent_is_killed(
    fake: FakeAzure, start_workers: Callable[..., Daemon], notify_socket: socket.socket
) -> None:
    daemon = start_workers("--endpoint", fake.url)
    assert await notified(notify_socket) == b"READY=1\nSTATUS=serving"
    workers = list(worker_pids(daemon).values())
    daemon.proc.kill()
    daemon.proc.wait(30)
    await wait_until(lambda: all(gone(pid) for pid in workers), "the workers to exit", timeout=LOG_WAIT)
    assert daemon.log().count("shutting down gracefully (the parent is gone)") == 2


# -- systemd socket activation ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_workers_share_a_socket_from_systemd(
    fake: FakeAzure, client: HTTPClient, tmp_path: Path
) -> None:
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed (Debian package systemd)")
    port = free_port()
    command = [
        activate,
        "-l",
        f"127.0.0.1:{port}",
        "--fdname=aoaiproxy",
        f"--setenv=PYTHONPATH={twistd_env()['PYTHONPATH']}",
        *twistd_command(*WORKERS, "--listen", "systemd:domain=INET:name=aoaiproxy", "--endpoint", fake.url),
    ]
    with spawned(command, tmp_path / "activated.log", port) as daemon:
        await wait_log(daemon, "all 2 workers are ready")
        workers = list(worker_pids(daemon).values())
        for pid in workers:
            with only(pid, workers):
                assert await post(client, daemon.url) == 200
            await served_by(daemon, pid, 200)
        assert daemon.stop() == 0
