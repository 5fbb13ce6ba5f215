"""
End to end: C{twistd -n aoaiproxy} as a subprocess, exactly as a user starts it, driven by the
official C{openai} SDK (sync and streaming) and by C{curl}, against the fake Azure upstream.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from aoaiproxy.testing import FakeAzure

from ..conftest import Daemon, free_port, twistd_command, twistd_env, wait_for_port


def sdk(daemon: Daemon, key: str = "client-key") -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key=key, max_retries=0, timeout=30)


@pytest_twisted.ensureDeferred
async def test_openai_sdk_chat_sync_and_streaming(
    fake: FakeAzure, start_daemon: Callable[..., Daemon]
) -> None:
    daemon = start_daemon("--endpoint", fake.url, "--model-mapper", "gpt-4o=prod-4o")
    client = sdk(daemon)

    completion = await deferToThread(
        client.chat.completions.create,
        model="gpt-4o",
        messages=[{"role": "user", "content": "hello"}],
    )
    assert completion.choices[0].message.content == "Hello from fake Azure (prod-4o)"
    seen = fake.requests[-1]
    assert seen.path == "/openai/deployments/prod-4o/chat/completions"
    assert seen.query["api-version"] == ["2024-10-21"]
    assert seen.header("api-key") == "client-key"
    assert seen.json()["messages"] == [{"role": "user", "content": "hello"}]

    def stream() -> list[str]:
        pieces = []
        with client.chat.completions.create(
            model="gpt-3.5-turbo",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        ) as s:
            for chunk in s:
                # A client that indexes choices[0] does not crash: no filter-only frames.
                if chunk.choices:
                    pieces.append(chunk.choices[0].delta.content or "")
                else:
                    assert chunk.usage is not None
        return pieces

    pieces = await deferToThread(stream)
    assert "".join(pieces) == "chunk0 chunk1 chunk2 "
    assert fake.requests[-1].path == "/openai/deployments/gpt-35-turbo/chat/completions"

    embeddings = await deferToThread(
        client.embeddings.create, model="text-embedding-3-small", input=["a", "b"]
    )
    assert len(embeddings.data) == 2
    models = await deferToThread(client.models.list)
    assert "gpt-4o" in {m.id for m in models}


@pytest_twisted.ensureDeferred
async def test_openai_sdk_sees_errors(fake: FakeAzure, start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon("--endpoint", fake.url)
    client = sdk(daemon)
    fake.rate_limit_next(retry_after=3)
    with pytest.raises(openai.RateLimitError) as rate:
        await deferToThread(
            client.chat.completions.create, model="gpt-4o", messages=[{"role": "user", "content": "x"}]
        )
    assert rate.value.response.headers["retry-after"] == "3"
    with pytest.raises(openai.BadRequestError) as bad:
        await deferToThread(
            client.chat.completions.create, model="../../x", messages=[{"role": "user", "content": "x"}]
        )
    assert bad.value.body["param"] == "model"  # type: ignore[index]
    assert len(fake.requests) == 1


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "30", *args], capture_output=True, text=True, timeout=60
    )


@pytest_twisted.ensureDeferred
async def test_curl_with_server_key_and_client_keys(
    fake: FakeAzure, start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    (tmp_path / "server.key").write_text("S3rv3r-K3y-do-not-log\n")
    (tmp_path / "clients").write_text("team-key-1\n")
    daemon = start_daemon(
        "--endpoint",
        fake.url,
        "--token-file",
        str(tmp_path / "server.key"),
        "--client-keys",
        str(tmp_path / "clients"),
    )
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
    ok = await deferToThread(
        curl,
        "-i",
        daemon.url + "/v1/chat/completions",
        "-H",
        "Authorization: Bearer team-key-1",
        "-H",
        "Content-Type: application/json",
        "-d",
        body,
    )
    assert ok.stdout.startswith("HTTP/1.1 200"), ok.stdout + ok.stderr
    assert "access-control-allow-origin: *" in ok.stdout.lower()
    assert fake.requests[-1].header("api-key") == "S3rv3r-K3y-do-not-log"
    denied = await deferToThread(
        curl,
        "-i",
        daemon.url + "/v1/chat/completions",
        "-H",
        "api-key: wrong-key",
        "-H",
        "Content-Type: application/json",
        "-d",
        body,
    )
    assert denied.stdout.startswith("HTTP/1.1 401")
    assert json.loads(denied.stdout.split("\n\n", 1)[1])["error"]["code"] == "invalid_api_key"
    assert len(fake.requests) == 1
    streamed = await deferToThread(
        curl,
        "-N",
        daemon.url + "/v1/chat/completions",
        "-H",
        "Authorization: Bearer team-key-1",
        "-H",
        "Content-Type: application/json",
        "-d",
        json.dumps({"model": "gpt-4o", "stream": True, "messages": []}),
    )
    assert streamed.stdout.endswith("data: [DONE]\n\n")
    assert "prompt_filter_results" not in streamed.stdout
    health = await deferToThread(curl, daemon.url + "/healthz")
    assert json.loads(health.stdout) == {"status": "ok"}
    log = daemon.log()
    # The refused request's access line says why, by code (never by key).
    assert '"POST /v1/chat/completions" 401' in log and 'error="invalid_api_key"' in log
    for secret in ("S3rv3r-K3y-do-not-log", "team-key-1", "wrong-key"):
        assert secret not in log


def test_bad_configuration_stops_startup_with_one_line(tmp_path: Path) -> None:
    cases = [
        (["--mode", "sideways"], "--mode"),
        (["--endpoint", "https://x.openai.azure.com", "--model-mapper", "broken"], "--model-mapper"),
        (["--endpoint", "https://x.openai.azure.com", "--token", "k"], "--allow-anonymous"),
        (
            ["--endpoint", "https://x.openai.azure.com", "--token-file", str(tmp_path / "nope")],
            "--token-file",
        ),
    ]
    for args, needle in cases:
        result = subprocess.run(
            twistd_command(*args),
            capture_output=True,
            text=True,
            env=twistd_env(),
            timeout=60,
            cwd=tmp_path,
        )
        assert result.returncode != 0
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and needle in lines[0], result.stderr


def test_listener_that_cannot_bind_stops_startup(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = subprocess.run(
            twistd_command(
                "--endpoint", "https://x.openai.azure.com", "--listen", f"tcp:{port}:interface=127.0.0.1"
            ),
            capture_output=True,
            text=True,
            env=twistd_env(),
            timeout=60,
            cwd=tmp_path,
        )
    assert result.returncode != 0
    # By then twistd logs stderr to its log: one line names the option, and no traceback.
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if "aoaiproxy: --listen" in line]
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0], output
    assert "Traceback" not in output


def test_go_style_environment(tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    port = free_port()
    daemon = start_daemon(
        port=port,
        listen=False,
        env={
            "AZURE_OPENAI_PROXY_ADDRESS": f"127.0.0.1:{port}",
            "AZURE_OPENAI_ENDPOINT": "https://x.openai.azure.com",
        },
    )
    health = curl(daemon.url + "/healthz")
    assert json.loads(health.stdout) == {"status": "ok"}


def test_unix_socket_and_several_listeners(tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    sock = tmp_path / "aoaiproxy.sock"
    other = free_port()
    daemon = start_daemon(
        "--endpoint",
        "https://x.openai.azure.com",
        "--listen",
        f"unix:{sock}",
        "--listen",
        f"127.0.0.1:{other}",
    )
    # The listeners bind in order and start_daemon waits for the first only: wait for the last.
    wait_for_port(other, daemon.proc)
    via_unix = curl("--unix-socket", str(sock), "http://proxy/healthz")
    assert json.loads(via_unix.stdout) == {"status": "ok"}, via_unix.stderr
    assert json.loads(curl(f"http://127.0.0.1:{other}/healthz").stdout) == {"status": "ok"}
    assert json.loads(curl(daemon.url + "/healthz").stdout) == {"status": "ok"}
