"""
The parent's bookkeeping of its workers (L{aoaiproxy.workers.Workers}) against a fake process
launcher: when READY fires, what a death before it does, restarts and their backoff, reloads
waited for, and a stop.  The processes themselves are tested end to end
(tests/e2e/test_workers_e2e.py).
"""

from __future__ import annotations

import io
import json
import socket
from typing import Any

import pytest
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from aoaiproxy.config import LiveConfig, load_config
from aoaiproxy.service import Reloader
from aoaiproxy.workers import (
    CUT,
    FIRST_RESTART_DELAY,
    MAX_RESTART_DELAY,
    READY,
    RELOAD,
    RELOADED,
    STABLE_SECONDS,
    STATUS_FD,
    STOP,
    ListenerSpec,
    Supervisor,
    WorkerFailed,
    Workers,
    WorkerSpec,
    _exit_now,
    _PidLines,
    restart_delay,
)


class FakeProcess:
    def __init__(self, pid: int, protocol: Any) -> None:
        self.pid = pid
        self.protocol = protocol
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def commands(self) -> list[bytes]:
        return b"".join(self.written).splitlines()[1:]  # after the spec line

    def report(self, report: bytes) -> None:
        self.protocol.childDataReceived(STATUS_FD, report + b"\n")

    def end(self, signal: int | None = None) -> None:
        reason = ProcessTerminated(signal=signal) if signal else ProcessDone(0)
        self.protocol.processEnded(Failure(reason))


class Launcher(Clock):
    """A clock that starts fake processes (C{spawnProcess}) and remembers how."""

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[FakeProcess] = []
        self.child_fds: list[dict[int, Any]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: Any, childFDs: Any) -> Any:
        process = FakeProcess(1000 + len(self.processes), protocol)
        self.processes.append(process)
        self.child_fds.append(childFDs)
        protocol.makeConnection(process)
        return process


SPEC = WorkerSpec({"endpoint": "https://r.openai.azure.com"}, (ListenerSpec("tcp:8080", 4, socket.AF_INET),))


@pytest.fixture
def launcher() -> Launcher:
    return Launcher()


def pool(launcher: Launcher, count: int = 2) -> Workers:
    return Workers(launcher, count, lambda: SPEC, lambda: {4: 9}, {"HOME": "/"})


def test_ready_once_every_worker_is_and_each_gets_the_spec_and_sockets(launcher: Launcher) -> None:
    workers = pool(launcher)
    started = workers.start()
    first, second = launcher.processes
    assert first.written == [SPEC.to_line()] and second.written == [SPEC.to_line()]
    assert launcher.child_fds == [{0: "w", 1: 1, 2: 2, 3: "r", 4: 9}] * 2
    first.report(READY)
    assert not started.called
    second.report(READY)
    assert started.called


def test_a_worker_dying_before_all_are_ready_fails_the_start(launcher: Launcher) -> None:
    workers = pool(launcher)
    started = workers.start()
    launcher.processes[0].report(READY)
    launcher.processes[1].end(signal=11)
    failures: list[Failure] = []
    started.addErrback(failures.append)
    assert failures[0].check(WorkerFailed)
    assert failures[0].getErrorMessage() == "worker 2 (pid 1001) was killed by signal 11 before it was ready"
    assert len(launcher.processes) == 2  # not restarted


def test_restart_delay_doubles_with_quick_deaths_up_to_a_bound() -> None:
    assert [restart_delay(n) for n in range(0, 4)] == [0.0, FIRST_RESTART_DELAY, 2 * FIRST_RESTART_DELAY, 2.0]
    assert restart_delay(50) == MAX_RESTART_DELAY


def test_a_dead_worker_is_restarted_at_once_if_it_ran_long_else_later(launcher: Launcher) -> None:
    workers = pool(launcher, 1)
    workers.start()
    launcher.processes[0].report(READY)
    launcher.advance(STABLE_SECONDS)
    launcher.processes[0].end(signal=9)
    launcher.advance(0)
    assert len(launcher.processes) == 2  # it ran long enough: at once

    # A crash loop: each quick death waits longer before the next start.
    waits = []
    for _ in range(4):
        launcher.processes[-1].end()
        count = len(launcher.processes)
        waited = 0.0
        while len(launcher.processes) == count:
            launcher.advance(0.25)
            waited += 0.25
        waits.append(waited)
    assert waits == [0.5, 1.0, 2.0, 4.0]


def test_reload_is_passed_on_and_done_once_each_worker_reported(launcher: Launcher) -> None:
    workers = pool(launcher)
    workers.start()
    first, second = launcher.processes
    first.report(READY)
    second.report(READY)
    done = workers.reload()
    assert first.commands() == [RELOAD] and second.commands() == [RELOAD]
    first.report(RELOADED)
    assert not done.called
    second.end(signal=9)  # a worker that died meanwhile is not waited for
    assert done.called


def test_stop_is_passed_on_no_restart_follows_and_it_ends_when_all_exited(launcher: Launcher) -> None:
    workers = pool(launcher)
    workers.start()
    for process in launcher.processes:
        process.report(READY)
    launcher.processes[0].end(signal=9)  # dies: a restart is due
    gone = workers.drain(launcher, 30)
    assert launcher.processes[1].commands() == [STOP]
    assert workers.cut() == 1
    assert launcher.processes[1].commands() == [STOP, CUT]
    assert not gone.called
    launcher.processes[1].end()
    assert gone.result == 0
    launcher.advance(MAX_RESTART_DELAY)
    assert len(launcher.processes) == 2  # the restart was called off


def test_the_spec_is_one_json_line() -> None:
    line = SPEC.to_line()
    assert line.endswith(b"\n") and b"\n" not in line[:-1]
    assert json.loads(line)["listeners"] == [{"description": "tcp:8080", "fd": 4, "family": socket.AF_INET}]
    assert WorkerSpec.from_line(line) == SPEC


def test_json_log_lines_of_a_worker_carry_its_pid() -> None:
    out = io.StringIO()
    lines = _PidLines(out, 4242)
    lines.write('{"time":"t","level":"info"}\n')
    assert json.loads(out.getvalue()) == {"pid": 4242, "time": "t", "level": "info"}


class StoppingReactor(Launcher):
    """A launcher that records how the supervisor stops it."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped = False
        self.triggers: list[tuple[Any, ...]] = []

    def stop(self) -> None:
        self.stopped = True

    def addSystemEventTrigger(self, phase: str, event: str, f: Any, *args: Any) -> None:
        self.triggers.append((phase, event, f, *args))


def test_a_failed_start_stops_the_daemon_with_status_1_and_no_ready() -> None:
    reactor = StoppingReactor()
    config = load_config({"endpoint": "https://r.openai.azure.com", "workers": "2"}, {})
    live = LiveConfig(config)
    workers = Workers(reactor, 2, lambda: SPEC, lambda: {}, {})
    top = Supervisor(live, workers, reactor, Reloader({}, {}, live), None)
    ready = top.start_serving()
    reactor.processes[0].end(signal=9)
    assert reactor.stopped and not ready.called
    assert reactor.triggers == [("after", "shutdown", _exit_now, 1)]
