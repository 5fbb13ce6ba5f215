"""
Several backends end to end (SPEC §11): C{twistd -n aoaiproxy} with a TOML config of
C{[[backend]]} tables, driven by the C{openai} SDK, against fake Azure resources in this process
("regions"): weights, failover on 429, cooldowns from C{retry-after-ms}, 429 all_backends_busy
that the SDK retries, a killed backend's circuit, a stream cut mid-way, and SIGHUP.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
import pytest_twisted
import treq
from twisted.internet.threads import deferToThread

from aoaiproxy.testing import FakeAzure

from ..conftest import Daemon
from ..test_service import wait_until
from .test_service_e2e import Stream, wait_log

CLIENT_KEY = "sk-client-backends-e2e-73d1"
MESSAGES = [{"role": "user", "content": "hi"}]


def table(name: str, fake: FakeAzure, **keys: Any) -> str:
    lines = [f'[[backend]]\nname = "{name}"\nendpoint = "{fake.url}"\napi_key = "key-{name}"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def write_config(tmp_path: Path, *tables: str, top: str = "") -> Path:
    keys = tmp_path / "client-keys"
    keys.write_text(f"app:{CLIENT_KEY}\n")
    path = tmp_path / "aoaiproxy.toml"
    path.write_text(f'client_keys_file = "{keys}"\n{top}' + "".join(tables))
    return path


def sdk(daemon: Daemon, max_retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key=CLIENT_KEY, max_retries=max_retries, timeout=30)


def chat(client: openai.OpenAI, model: str = "gpt-4o") -> str:
    """One chat completion; the backend that answered (C{x-aoaiproxy-backend})."""
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)  # type: ignore[arg-type]
    assert raw.parse().choices[0].message.content
    return raw.headers["x-aoaiproxy-backend"]


def until(
    client: openai.OpenAI, backend: str, timeout: float = 8.0, most: int = 2000
) -> list[tuple[str, float]]:
    """Chat completions one by one until C{backend} answers one (bounded); (backend, time sent) each."""
    served: list[tuple[str, float]] = []
    deadline = time.monotonic() + timeout
    while len(served) < most and time.monotonic() < deadline:
        sent = time.time()
        served.append((chat(client), sent))
        if served[-1][0] == backend:
            return served
    raise AssertionError(f"{backend} never answered: {served[-5:]}")


@pytest_twisted.ensureDeferred
async def test_weights_spread_requests_and_a_429_moves_to_the_other(
    regions: dict[str, FakeAzure], start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    east, west = regions["east"], regions["west"]
    daemon = start_daemon(
        "--config", str(write_config(tmp_path, table("east", east, weight=3), table("west", west)))
    )
    client = sdk(daemon)

    def spread() -> list[str]:
        return [chat(client) for _ in range(40)]

    served = await deferToThread(spread)
    # About 3/4 to east: a binomial(40, 0.75) leaves [18, 39] once in ~10^5 runs.
    assert 18 <= served.count("east") <= 39 and served.count("west") == 40 - served.count("east")
    assert len(east.requests) == served.count("east")
    assert {r.header("api-key") for r in east.requests} == {"key-east"}

    east.throttle(count=5, retry_after_ms=60_000, deployment="gpt-4o")
    more = await deferToThread(spread)  # no error reaches the client
    assert more == ["west"] * 40
    assert len(east.requests) - served.count("east") == 1  # one 429, then east cools for a minute
    await wait_log(daemon, "backend=west attempts=2")  # written after the answer's bytes leave
    assert daemon.log().count("backend=west attempts=2") == 1
    # Only that deployment cools: another model still goes to east too.
    assert "east" in await deferToThread(lambda: [chat(client, "gpt-4o-mini") for _ in range(20)])


@pytest_twisted.ensureDeferred
async def test_a_cooled_backend_returns_when_retry_after_ms_ends_and_later_429s_keep_it_out_longer(
    regions: dict[str, FakeAzure], start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    east, west = regions["east"], regions["west"]
    config = write_config(tmp_path, table("east", east, priority=0), table("west", west, priority=1))
    daemon = start_daemon("--config", str(config))
    client = sdk(daemon)
    assert await deferToThread(chat, client) == "east"

    for ms in (600, 1500):
        east.throttle(count=1, retry_after_ms=ms)
        served = await deferToThread(until, client, "east")
        assert served[0][0] == "west"  # the 429 moved to west
        # Not before: east's next request came at least ms after its 429, and every one sent
        # meanwhile went to west.
        throttled, back = east.requests[-2], east.requests[-1]
        assert back.received_at - throttled.received_at >= ms / 1000
        assert [b for b, _ in served[:-1]] == ["west"] * (len(served) - 1)
    await wait_log(daemon, "backend=west attempts=2", 2)
    assert daemon.log().count("backend=west attempts=2") == 2


@pytest_twisted.ensureDeferred
async def test_all_busy_is_429_with_a_retry_after_the_sdk_honours(
    regions: dict[str, FakeAzure], start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    east, west = regions["east"], regions["west"]
    daemon = start_daemon("--config", str(write_config(tmp_path, table("east", east), table("west", west))))
    east.throttle(count=1, retry_after_ms=1500)
    west.throttle(count=1, retry_after_ms=1500)
    before = time.time()
    with pytest.raises(openai.RateLimitError) as relayed:
        await deferToThread(chat, sdk(daemon))
    after = time.time()
    # The last upstream 429, as Azure sent it.
    assert relayed.value.response.headers["retry-after-ms"] == "1500"
    assert relayed.value.response.headers["x-aoaiproxy-backend"] in ("east", "west")

    start = time.time()
    response = await treq.post(
        daemon.url + "/v1/chat/completions",
        json={"model": "gpt-4o", "messages": MESSAGES},
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
    )
    end = time.time()
    assert response.code == 429
    assert (await response.json())["error"]["code"] == "all_backends_busy"
    retry_after = int(response.headers.getRawHeaders("retry-after")[0])
    assert math.ceil(before + 1.5 - end) <= retry_after <= math.ceil(after + 1.5 - start)

    # The SDK's first try finds them still cooling; it waits Retry-After (not its own shorter
    # backoff, which would meet a second 429 and fail) and its one retry succeeds.
    # The access line is written after the answer's bytes leave: wait for it.
    await wait_log(daemon, 'error="all_backends_busy"')
    busy = daemon.log().count('error="all_backends_busy"')
    assert await deferToThread(chat, sdk(daemon, max_retries=1)) in ("east", "west")
    await wait_log(daemon, 'error="all_backends_busy"', busy + 1)
    assert daemon.log().count('error="all_backends_busy"') == busy + 1
    assert len(east.requests) + len(west.requests) == 3


@pytest_twisted.ensureDeferred
async def test_a_killed_backend_opens_its_circuit_and_a_restarted_one_is_probed_back(
    regions: dict[str, FakeAzure], start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    east, west = regions["east"], regions["west"]
    port = int(east.url.rsplit(":", 1)[1])
    # max_cooldown also bounds how long a circuit stays open: 1 s here.
    config = write_config(
        tmp_path, table("east", east, priority=0), table("west", west, priority=1), top="max_cooldown = 1\n"
    )
    daemon = start_daemon("--config", str(config))
    client = sdk(daemon)
    assert await deferToThread(chat, client) == "east"
    await east.stop()

    def failing_over() -> list[str]:
        return [chat(client) for _ in range(5)]

    assert await deferToThread(failing_over) == ["west"] * 5
    await wait_log(daemon, "backend=west attempts=1", 2)  # the last access line follows the answer
    log = daemon.log()
    # Three refused connections in a row open east's circuit: then only west is tried.
    assert log.count("backend=west attempts=2") == 3
    assert log.count("backend=west attempts=1") >= 2
    east.listen(port)
    served = await deferToThread(until, client, "east")
    assert served[-1][0] == "east" and len(east.requests) == 2
    await wait_log(daemon, "backend=east attempts=1", 2)


@pytest_twisted.ensureDeferred
async def test_a_stream_never_switches_backend_after_its_first_byte(
    regions: dict[str, FakeAzure], start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    east, west = regions["east"], regions["west"]
    config = write_config(tmp_path, table("east", east, priority=0), table("west", west, priority=1))
    daemon = start_daemon("--config", str(config))
    east.close_connections(count=1, after_bytes=80)

    def stream() -> tuple[list[Any], BaseException | None]:
        chunks: list[Any] = []
        try:
            with sdk(daemon).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True) as s:  # type: ignore[arg-type]
                chunks.extend(s)
        except Exception as e:
            return chunks, e
        return chunks, None

    _, error = await deferToThread(stream)
    assert error is not None  # the cut is visible
    assert west.requests == [] and len(east.requests) == 1
    await wait_log(daemon, "backend=east attempts=1")
    # A stream whose 429 comes before any byte does move.
    east.throttle(count=1, retry_after_ms=60_000)
    chunks, error = await deferToThread(stream)
    assert error is None and "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(west.requests) == 1


@pytest_twisted.ensureDeferred
async def test_sighup_adds_and_removes_a_backend_without_dropping_open_streams(
    regions: dict[str, FakeAzure], start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    east, west, north = regions["east"], regions["west"], regions["north"]
    config = write_config(tmp_path, table("east", east, priority=0), table("west", west, priority=1))
    daemon = start_daemon("--config", str(config))
    east.hold_last_chunk()
    stream = await Stream().start(daemon.url, CLIENT_KEY)
    assert stream.code == 200
    await wait_until(lambda: east.held_streams == 1, "the held stream")

    write_config(tmp_path, table("west", west), table("north", north))
    daemon.proc.send_signal(signal.SIGHUP)
    await wait_log(daemon, "configuration reloaded: ")
    await wait_log(daemon, "backends: west (")
    client = sdk(daemon)

    def twenty() -> list[str]:
        return [chat(client) for _ in range(20)]

    served = await deferToThread(twenty)
    assert set(served) == {"west", "north"}  # both; each missing once in ~10^6 runs
    assert len(east.requests) == 1

    east.release()
    assert stream.done is not None
    await stream.done  # the stream on the removed backend was not dropped
    assert stream.body.endswith(b"data: [DONE]\n\n")
    assert daemon.stop() == 0
