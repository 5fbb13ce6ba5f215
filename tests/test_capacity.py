"""
Capacity (SPEC §15): the connection cap derived from the open-file limit, the soft limit raised,
the listen backlog, the cap counted per process, and the systemd units' limits.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable

import pytest
import pytest_twisted
from twisted.internet.error import ConnectionDone

from aoaiproxy.capacity import (
    BACKLOG,
    UNLIMITED_TARGET,
    connections_for,
    open_file_limit,
    raise_open_file_limit,
    settle_collector,
    with_backlog,
)
from aoaiproxy.config import load_config

from .conftest import Proxy
from .rawnet import Connect, assert_openai_error, get_reactor, parse_response
from .test_service import UNITS, unit_settings

AZ = "https://r.openai.azure.com"
HEALTH = b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n"
NOFILE = resource.RLIMIT_NOFILE
INFINITY = resource.RLIM_INFINITY


# -- the derivation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("open_files", "connections"),
    [(20000, 9950), (65536, 32718), (1024, 462), (102, 1), (100, 1), (0, 1)],
)
def test_connections_are_half_the_descriptors_less_a_reserve(open_files: int, connections: int) -> None:
    assert connections_for(open_files) == connections


def limits(soft: int, hard: int) -> Callable[[int], tuple[int, int]]:
    def getrlimit(which: int) -> tuple[int, int]:
        assert which == NOFILE
        return soft, hard

    return getrlimit


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    calls: list[tuple[int, int]] = []
    assert raise_open_file_limit(limits(1024, 20000), lambda which, new: calls.append(new)) == (1024, 20000)
    assert calls == [(20000, 20000)]
    assert open_file_limit(limits(1024, 20000)) == 20000


def test_a_soft_limit_at_the_hard_one_is_left_alone() -> None:
    def refuse(which: int, new: tuple[int, int]) -> None:
        raise AssertionError("no call expected")

    assert raise_open_file_limit(limits(65536, 65536), refuse) == (65536, 65536)
    assert raise_open_file_limit(limits(INFINITY, INFINITY), refuse) == (INFINITY, INFINITY)


def test_a_refused_raise_keeps_the_limit_and_does_not_raise() -> None:
    def refuse(which: int, new: tuple[int, int]) -> None:
        raise OSError(1, "Operation not permitted")

    assert raise_open_file_limit(limits(1024, 20000), refuse) == (1024, 1024)


def test_an_unlimited_hard_limit_raises_the_soft_one_to_a_bound() -> None:
    calls: list[tuple[int, int]] = []
    assert raise_open_file_limit(limits(256, INFINITY), lambda which, new: calls.append(new)) == (
        256,
        UNLIMITED_TARGET,
    )
    assert calls == [(UNLIMITED_TARGET, INFINITY)]
    assert open_file_limit(limits(256, INFINITY)) == UNLIMITED_TARGET


def test_max_connections_defaults_to_what_the_hard_limit_carries(tmp_path: os.PathLike[str]) -> None:
    hard = resource.getrlimit(NOFILE)[1]
    expected = (hard - 100) // 2 if hard != INFINITY else (UNLIMITED_TARGET - 100) // 2
    assert load_config({"endpoint": AZ}, {}).max_connections == expected
    # Given, it wins (flag or file).
    assert load_config({"endpoint": AZ, "max_connections": "7"}, {}).max_connections == 7
    config_file = os.path.join(tmp_path, "c.toml")
    with open(config_file, "w") as f:
        f.write("max_connections = 12\n")
    assert load_config({"endpoint": AZ, "config": config_file}, {}).max_connections == 12


def test_workers_auto_is_one_per_cpu_this_process_may_use() -> None:
    assert load_config({"endpoint": AZ, "workers": "auto"}, {}).workers == len(os.sched_getaffinity(0))
    assert load_config({"endpoint": AZ, "workers": "3"}, {}).workers == 3


# -- the backlog ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("tcp:8080", f"tcp:8080:backlog={BACKLOG}"),
        ("tcp:8080:interface=127.0.0.1", f"tcp:8080:interface=127.0.0.1:backlog={BACKLOG}"),
        ("tcp6:8080:interface=\\:\\:1", f"tcp6:8080:interface=\\:\\:1:backlog={BACKLOG}"),
        ("ssl:8443:privateKey=k.pem", f"ssl:8443:privateKey=k.pem:backlog={BACKLOG}"),
        ("unix:/run/aoaiproxy.sock", f"unix:/run/aoaiproxy.sock:backlog={BACKLOG}"),
        # One named is kept; an escaped colon is part of a value, not a parameter.
        ("tcp:8080:backlog=10", "tcp:8080:backlog=10"),
        ("unix:/tmp/odd\\:backlog=3", f"unix:/tmp/odd\\:backlog=3:backlog={BACKLOG}"),
        # systemd's socket unit sets Backlog= itself.
        ("systemd:domain=INET:name=aoaiproxy", "systemd:domain=INET:name=aoaiproxy"),
    ],
)
def test_listeners_get_a_backlog_of_1024(description: str, expected: str) -> None:
    assert with_backlog(description) == expected


# -- the cap counts the process's connections -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_cap_counts_every_listener_of_the_process(
    make_proxy: Callable[..., Proxy], raw_connect: Connect
) -> None:
    proxy = make_proxy(max_connections=2)
    reactor = get_reactor()
    ports = [reactor.listenTCP(0, proxy.site.listener(), interface="127.0.0.1") for _ in range(2)]
    try:
        first, second = (p.getHost().port for p in ports)
        held = [await raw_connect(first), await raw_connect(second)]
        for client in held:  # one on each listener: both served, and kept open
            client.send(HEALTH)
            assert parse_response(await client.wait_for(b"}")).status == 200

        over = await raw_connect(first)  # the first listener has one: the process has two
        await over.wait_for(b"}}")  # the 503, at once (bounded: a served connection says nothing)
        await over.closed
        assert over.reason is not None and over.reason.check(ConnectionDone), over.reason
        assert_openai_error(parse_response(over.received), 503, "server_busy")
    finally:
        for port in ports:
            await port.stopListening()


# -- the systemd units ------------------------------------------------------------------------


def test_units_give_descriptors_a_backlog_and_a_stop_for_the_main_process() -> None:
    service = unit_settings((UNITS / "aoaiproxy.service").read_text())
    assert service["LimitNOFILE"] == ["65536"]
    # SIGTERM to the daemon's first process only: with --workers it passes the stop on itself
    # (the workers drain); anything left at the end is killed.
    assert service["KillMode"] == ["mixed"]
    socket_unit = unit_settings((UNITS / "aoaiproxy.socket").read_text())
    assert int(socket_unit["Backlog"][0]) >= BACKLOG


def test_the_collector_settles_once_serving() -> None:
    # Start-up's garbage is collected before the rest is frozen (else it would stay for good).
    calls: list[object] = []
    settle_collector(collect=lambda: calls.append("collect"), freeze=lambda: calls.append("freeze"))
    assert calls == ["collect", "freeze"]
