"""
Entra ID end to end (SPEC §12): C{twistd -n aoaiproxy --auth entra} gets its tokens with
azure-identity's managed identity through a fake C{IDENTITY_ENDPOINT} (App Service protocol), and
a fake Azure resource accepts only that endpoint's tokens: tokens refreshed before they expire
while requests go on, a failing token endpoint (the old token serves until it expires, then 503
token_unavailable), and a revoked token (401, a new token, one retry).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from aoaiproxy.testing import FakeAzure, FakeManagedIdentity
from aoaiproxy.testing.identity import CLOCK_SKEW

from ..conftest import Daemon
from ..rawnet import get_reactor
from .test_service_e2e import wait_log

CLIENT_KEY = "sk-client-entra-e2e-0b6e"
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
#: What could point azure-identity elsewhere than the fake endpoint.
OTHER_CREDENTIALS = (
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_USERNAME",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_TOKEN_CREDENTIALS",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "IMDS_ENDPOINT",
)


@pytest_twisted.async_yield_fixture
async def identity(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeManagedIdentity]:
    for name in OTHER_CREDENTIALS:  # the daemon's environment is this one's, plus the endpoint's
        monkeypatch.delenv(name, raising=False)
    endpoint = FakeManagedIdentity(get_reactor(), lifetime=3600)
    endpoint.listen()
    yield endpoint
    await endpoint.stop()


@pytest_twisted.async_yield_fixture
async def azure(identity: FakeManagedIdentity) -> AsyncIterator[FakeAzure]:
    """A resource that takes the identity endpoint's tokens, and nothing else."""
    fake = FakeAzure(get_reactor(), identity=identity)
    fake.listen()
    yield fake
    await fake.stop()


def start(
    start_daemon: Callable[..., Daemon], tmp_path: Path, identity: FakeManagedIdentity, azure: FakeAzure
) -> Daemon:
    keys = tmp_path / "client-keys"
    keys.write_text(CLIENT_KEY + "\n")
    return start_daemon(
        "--endpoint", azure.url, "--auth", "entra", "--client-keys", str(keys), env=identity.environ()
    )


def post(daemon: Daemon) -> tuple[int, httpx.Headers, dict[str, object]]:
    r = httpx.post(
        daemon.url + "/v1/chat/completions",
        json=CHAT,
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        timeout=30,
    )
    return r.status_code, r.headers, r.json()


def bearer(azure: FakeAzure, n: int) -> str | None:
    return azure.requests[n].header("authorization")


@pytest_twisted.ensureDeferred
async def test_tokens_are_refreshed_before_they_expire_while_requests_go_on(
    identity: FakeManagedIdentity, azure: FakeAzure, start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    identity.lifetime = 3  # refreshed at about half its life
    daemon = start(start_daemon, tmp_path, identity, azure)

    def requests_until_three_tokens() -> list[int]:
        codes = []
        deadline = time.monotonic() + 10
        while len(identity.issued) < 3 and len(codes) < 5000 and time.monotonic() < deadline:
            codes.append(post(daemon)[0])
        return codes

    codes = await deferToThread(requests_until_three_tokens)
    assert len(identity.issued) >= 3
    assert set(codes) == {200}  # no request met an expired token, none got 503
    used = [bearer(azure, n) for n in range(len(azure.requests))]
    assert len(set(used)) >= 2 and all(u and u.startswith("Bearer ey") for u in used)
    # Each new token was fetched while the one before was still valid.
    first, second = identity.requests[0], identity.requests[1]
    assert first.received_at < second.received_at < identity.issued[0].expires_on
    log = daemon.log()
    assert "Entra ID: token for https://cognitiveservices.azure.com/.default obtained" in log
    assert not any(t.token in log for t in identity.issued)
    assert "token_unavailable" not in log


@pytest_twisted.ensureDeferred
async def test_a_failing_token_endpoint_keeps_the_old_token_until_it_expires_then_503(
    identity: FakeManagedIdentity, azure: FakeAzure, start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    identity.lifetime = 3
    daemon = start(start_daemon, tmp_path, identity, azure)
    code, _, _ = await deferToThread(post, daemon)
    assert code == 200
    identity.fail(400)  # every refresh fails from now on
    expires_on = identity.issued[0].expires_on

    def requests_until_503() -> list[tuple[int, httpx.Headers, dict[str, object], float]]:
        answers = []
        deadline = time.monotonic() + 10
        while len(answers) < 5000 and time.monotonic() < deadline:
            answers.append((*post(daemon), time.time()))
            if answers[-1][0] != 200:
                break
        return answers

    answers = await deferToThread(requests_until_503)
    *served, (code, headers, body, when) = answers
    assert code == 503, body
    assert body["error"]["code"] == "token_unavailable"  # type: ignore[index]
    assert 1 <= int(headers["retry-after"]) <= 30
    assert when >= expires_on  # not before the old token expired
    # The refresh failed before the old token expired, and the old token still served.
    failed_at = identity.requests[1].received_at
    assert failed_at < expires_on
    assert any(t >= failed_at for _, _, _, t in served)
    assert {bearer(azure, n) for n in range(len(azure.requests))} == {f"Bearer {identity.issued[0].token}"}
    # Sent before the old token expired (received within the fake's allowance for skew).
    assert all(r.received_at < expires_on + CLOCK_SKEW for r in azure.requests)
    assert len(identity.issued) == 1
    await wait_log(daemon, "Entra ID: no token for https://cognitiveservices.azure.com/.default")


@pytest_twisted.ensureDeferred
async def test_a_revoked_token_gets_a_401_then_a_new_token_and_one_retry(
    identity: FakeManagedIdentity, azure: FakeAzure, start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = start(start_daemon, tmp_path, identity, azure)
    code, headers, _ = await deferToThread(post, daemon)
    assert code == 200 and headers["x-aoaiproxy-backend"] == "default"
    identity.revoke()
    code, _, body = await deferToThread(post, daemon)
    assert code == 200, body
    assert len(identity.issued) == 2
    assert [bearer(azure, n) for n in (1, 2)] == [f"Bearer {t.token}" for t in identity.issued]
    await wait_log(daemon, "backend=default attempts=2")
