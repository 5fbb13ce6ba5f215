"""
The Entra ID token source: refresh timing, single flight, retries, expiry, forced refresh and
start-up, with a fake credential, a fake clock and a hand-run "thread"; then once for real, with
azure-identity's own ManagedIdentityCredential against a local App Service token endpoint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from aoaiproxy.backends.entra import (
    DEFAULT_SCOPE,
    AccessTokenLike,
    TokenSource,
    TokenSources,
    default_credential,
    reactor_threads,
)

from .rawnet import get_reactor

START = 1_700_000_000.0


@attrs.frozen
class Token:
    token: str
    expires_on: int


class Script:
    """What successive get_token calls answer: a lifetime in seconds, or an exception."""

    def __init__(self, clock: Clock, *steps: float | Exception) -> None:
        self.clock = clock
        self.steps = list(steps)
        self.calls: list[tuple[int, tuple[str, ...]]] = []  # (credential number, scopes)
        self.credentials: list[FakeCredential] = []

    def factory(self) -> FakeCredential:
        credential = FakeCredential(self, len(self.credentials) + 1)
        self.credentials.append(credential)
        return credential


@attrs.define
class FakeCredential:
    script: Script
    number: int
    closed: bool = False

    def get_token(self, *scopes: str) -> AccessTokenLike:
        assert not self.closed
        self.script.calls.append((self.number, scopes))
        step = self.script.steps.pop(0)
        if isinstance(step, Exception):
            raise step
        n = len(self.script.calls)
        return Token(f"secret-token-{n}", int(self.script.clock.seconds() + step))

    def close(self) -> None:
        self.closed = True


class Threads:
    """A stand-in for deferToThread that runs each queued call when told to."""

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, f: Callable[[], Any], /) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append((f, d))
        return d

    def run(self) -> None:
        f, d = self.pending.pop(0)
        try:
            result = f()
        except Exception as e:
            d.errback(e)
        else:
            d.callback(result)


@attrs.define
class Setup:
    clock: Clock
    threads: Threads
    script: Script
    source: TokenSource
    events: list[dict[str, Any]]

    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events]


def setup(*steps: float | Exception) -> Setup:
    clock = Clock()
    clock.advance(START)
    threads = Threads()
    script = Script(clock, *steps)
    events: list[dict[str, Any]] = []
    source = TokenSource(DEFAULT_SCOPE, clock, threads, script.factory, Logger(observer=events.append))
    return Setup(clock, threads, script, source, events)


def started(*steps: float | Exception) -> Setup:
    """A source that has its first token (the first step)."""
    s = setup(*steps)
    d = s.source.start()
    s.threads.run()
    assert fired(d) is True
    return s


def fired(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def test_start_gets_the_first_token_and_logs_no_token() -> None:
    s = setup(3600)
    d = s.source.start()
    assert s.source.current() is None
    assert not d.called
    s.threads.run()
    assert fired(d) is True
    assert s.source.current() == "secret-token-1"
    assert s.script.calls == [(1, (DEFAULT_SCOPE,))]
    assert s.lines() == [f"Entra ID: token for {DEFAULT_SCOPE} obtained, valid for 3600 s"]
    assert "secret" not in repr(s.source)


def test_start_gives_up_waiting_after_10_s_and_keeps_the_late_token() -> None:
    s = setup(3600)
    d = s.source.start()
    s.clock.advance(9.9)
    assert not d.called
    s.clock.advance(0.1)
    assert fired(d) is False
    assert "after 10.0 s" in s.lines()[0]
    s.threads.run()  # the fetch ends later
    assert s.source.current() == "secret-token-1"


def test_start_failure_logged_in_one_line_then_retried_every_30_s() -> None:
    chain_error = Exception(
        "ChainedTokenCredential failed to retrieve a token from the included credentials.\n"
        "Attempted credentials:\n\tEnvironmentCredential: not configured\n\tManagedIdentityCredential: no"
    )
    s = setup(chain_error, chain_error, 3600)
    d = s.source.start()
    s.threads.run()
    assert fired(d) is False
    [line] = s.lines()
    assert "\n" not in line and "\t" not in line
    assert (
        "Attempted credentials: EnvironmentCredential: not configured ManagedIdentityCredential: no" in line
    )
    assert "requests get 503" in line
    assert s.source.retry_after() == 30
    s.clock.advance(29.9)
    assert s.threads.pending == []
    s.clock.advance(0.1)
    s.threads.run()
    assert len(s.lines()) == 1  # the same error again is not logged again
    s.clock.advance(30)
    s.threads.run()
    assert s.source.current() == "secret-token-3"
    assert s.lines()[-1].startswith("Entra ID: token for")


@pytest.mark.parametrize(
    ("lifetime", "refresh_after"),
    [
        (3600, 3300),  # 5 minutes before expiry
        (86400, 86100),
        (600, 300),
        (400, 200),  # half the lifetime, as that is shorter than 5 minutes before expiry
        (60, 30),
        (1.5, 1),  # never sooner than 1 s
    ],
)
def test_refresh_is_scheduled_before_expiry(lifetime: float, refresh_after: float) -> None:
    s = started(lifetime, 3600)
    s.clock.advance(refresh_after - 0.01)
    assert s.threads.pending == []
    s.clock.advance(0.01)
    assert len(s.threads.pending) == 1
    s.threads.run()
    assert s.source.current() == "secret-token-2"
    assert s.script.calls == [(1, (DEFAULT_SCOPE,)), (1, (DEFAULT_SCOPE,))]  # the same credential


def test_requests_never_wait_while_the_token_is_valid() -> None:
    s = started(3600, 3600)
    s.clock.advance(3300)
    assert len(s.threads.pending) == 1  # a refresh is running...
    assert s.source.current() == "secret-token-1"  # ...and the old token is served meanwhile
    s.threads.run()
    assert s.source.current() == "secret-token-2"


def test_failed_refresh_retried_every_30_s_while_the_old_token_lasts_then_none() -> None:
    boom = RuntimeError("token endpoint says 500")
    s = started(3600, boom, boom, boom, boom, boom, boom, boom, boom, boom, boom, boom, 3600)
    s.clock.advance(3300)
    times = []
    for _ in range(300):  # one second at a time until the token expires
        if s.source.current() is None:
            break
        if s.threads.pending:
            times.append(s.clock.seconds() - START)
            s.threads.run()
        s.clock.advance(1)
    assert times == [3300, 3330, 3360, 3390, 3420, 3450, 3480, 3510, 3540, 3570]
    assert s.clock.seconds() - START == 3600
    assert s.source.current() is None
    assert len(s.threads.pending) == 1  # the attempt due at expiry is running
    assert s.source.retry_after() == 1
    s.threads.run()  # fails (the 11th)
    assert s.source.retry_after() == 30
    s.clock.advance(30)
    s.threads.run()
    assert s.source.current() == "secret-token-13"
    lines = s.lines()
    assert "the current token lasts 300 s" in lines[1]
    assert lines[2].startswith("Entra ID: token for")


def test_an_already_expired_token_is_a_failure() -> None:
    s = setup(0, 3600)
    d = s.source.start()
    s.threads.run()
    assert fired(d) is False
    assert "already expired" in s.lines()[0]
    s.clock.advance(30)
    s.threads.run()
    assert s.source.current() == "secret-token-2"


def test_single_flight() -> None:
    s = started(3600, 3600, 3600)
    s.clock.advance(3300)
    assert len(s.threads.pending) == 1
    joined = [s.source._refresh(force=False) for _ in range(3)]
    s.clock.advance(100)
    assert len(s.threads.pending) == 1
    s.threads.run()
    assert all(fired(d) is None for d in joined)
    assert len(s.script.calls) == 2
    assert s.threads.pending == []


def test_force_refresh_uses_a_new_credential_and_closes_the_old() -> None:
    s = started(3600, 3600)
    d = s.source.force_refresh("secret-token-1")
    assert s.source.current() == "secret-token-1"  # still served while the new one comes
    s.threads.run()
    assert fired(d) == "secret-token-2"
    assert [n for n, _ in s.script.calls] == [1, 2]
    assert [c.closed for c in s.script.credentials] == [True, False]
    # The refresh timer follows the new token.
    s.clock.advance(3299)
    assert s.threads.pending == []


def test_force_refresh_when_already_replaced_or_too_soon() -> None:
    s = started(3600, 3600, 3600, 3600)
    d = s.source.force_refresh("secret-token-1")
    s.threads.run()
    assert fired(d) == "secret-token-2"
    # Another request that was refused with the old token, later: already replaced, no fetch.
    s.clock.advance(60)
    assert fired(s.source.force_refresh("secret-token-1")) == "secret-token-2"
    assert s.threads.pending == []
    # The new one refused, then refused again within 10 s: one fetch; the second caller sees the
    # same token (and does not retry with it).
    d = s.source.force_refresh("secret-token-2")
    s.threads.run()
    assert fired(d) == "secret-token-3"
    s.clock.advance(9)
    assert fired(s.source.force_refresh("secret-token-3")) == "secret-token-3"
    assert s.threads.pending == []
    s.clock.advance(1)
    d = s.source.force_refresh("secret-token-3")
    s.threads.run()
    assert fired(d) == "secret-token-4"


def test_forced_refreshes_join_and_follow_a_running_plain_one() -> None:
    s = started(3600, 3600, 3600)
    s.clock.advance(3300)  # a plain refresh starts (the same credential: it may answer from a cache)
    forced = [s.source.force_refresh("secret-token-1") for _ in range(3)]
    assert not any(d.called for d in forced)
    s.threads.run()
    assert not any(d.called for d in forced)  # a forced fetch follows, with a new credential
    assert len(s.threads.pending) == 1
    s.threads.run()
    assert [fired(d) for d in forced] == ["secret-token-3"] * 3
    assert [n for n, _ in s.script.calls] == [1, 1, 2]


def test_a_failed_forced_refresh_keeps_the_old_token_and_credential() -> None:
    s = started(3600, ValueError("AZURE_CLIENT_ID is not set"), 3600)
    d = s.source.force_refresh("secret-token-1")
    s.threads.run()
    assert fired(d) == "secret-token-1"
    assert [c.closed for c in s.script.credentials] == [False, True]
    s.clock.advance(30)
    s.threads.run()
    assert s.script.calls[-1][0] == 1  # the plain retry uses the old credential
    assert s.source.current() == "secret-token-3"


def test_stop_closes_and_schedules_nothing() -> None:
    s = started(3600)
    s.source.stop()
    assert s.script.credentials[0].closed
    s.clock.advance(4000)
    assert s.threads.pending == []
    # Stopped while a fetch runs: closed once it ends.
    s = started(3600, 3600)
    s.clock.advance(3300)
    s.source.stop()
    assert not s.script.credentials[0].closed
    s.threads.run()
    assert s.script.credentials[0].closed
    s.clock.advance(4000)
    assert s.threads.pending == []


def test_tokens_never_in_logs_or_repr() -> None:
    s = started(3600, RuntimeError("failed"), 3600)
    s.clock.advance(3300)
    s.threads.run()
    s.clock.advance(30)
    s.threads.run()
    text = "\n".join(s.lines()) + repr(s.source) + repr(s.source._token)
    assert s.source.current() == "secret-token-3"
    assert "secret-token" not in text


@attrs.frozen
class EB:
    name: str
    auth: str = "entra"
    entra_scope: str = DEFAULT_SCOPE


def test_one_source_per_scope_kept_across_updates() -> None:
    clock = Clock()
    clock.advance(START)
    threads = Threads()
    script = Script(clock, 3600, 3600, 3600)
    sources = TokenSources(clock, threads, script.factory, Logger(observer=lambda e: None))
    done = sources.update([EB("a"), EB("b"), EB("k", auth="key"), EB("o", entra_scope="other/.default")])
    assert len(threads.pending) == 2
    threads.run()
    assert not done.called
    threads.run()
    assert fired(done) is None
    a, b = sources.for_backend(EB("a")), sources.for_backend(EB("b"))
    assert a is b is not None
    assert sources.for_backend(EB("k", auth="key")) is None
    other = sources.get("other/.default")
    assert other is not None and other is not a
    # Reload: the default scope stays (same source, no new fetch); "other" goes; "third" comes.
    sources.update([EB("a"), EB("x", entra_scope="third/.default")])
    assert sources.for_backend(EB("a")) is a
    assert sources.get("other/.default") is None
    assert [c.closed for c in script.credentials] == [False, True]
    assert len(threads.pending) == 1
    threads.run()
    sources.stop()
    assert all(c.closed for c in script.credentials)


class AppServiceTokens(Resource):
    """App Service's managed-identity endpoint (GET ?api-version&resource, X-IDENTITY-HEADER)."""

    isLeaf = True

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret
        self.seen: list[dict[str, Any]] = []

    def render_GET(self, request: Request) -> bytes:
        args = {k.decode(): v[0].decode() for k, v in request.args.items()}
        self.seen.append({"args": args, "header": request.getHeader("x-identity-header")})
        request.setHeader(b"connection", b"close")
        request.setHeader(b"content-type", b"application/json")
        if request.getHeader("x-identity-header") != self.secret:
            request.setResponseCode(401)
            return b'{"statusCode": 401, "message": "bad header"}'
        return json.dumps(
            {
                "access_token": f"mi-token-{len(self.seen)}",
                "expires_on": str(int(time.time()) + 3600),
                "resource": args.get("resource"),
                "token_type": "Bearer",
            }
        ).encode()


@pytest_twisted.ensureDeferred
async def test_real_managed_identity_credential(monkeypatch: pytest.MonkeyPatch) -> None:
    reactor = get_reactor()
    endpoint = AppServiceTokens("s3cret-header")
    port = reactor.listenTCP(0, Site(endpoint), interface="127.0.0.1")
    for name in [
        "AZURE_CLIENT_ID",
        "AZURE_TENANT_ID",
        "AZURE_CLIENT_SECRET",
        "AZURE_CLIENT_CERTIFICATE_PATH",
        "AZURE_USERNAME",
        "AZURE_FEDERATED_TOKEN_FILE",
        "AZURE_TOKEN_CREDENTIALS",
        "IDENTITY_SERVER_THUMBPRINT",
        "IMDS_ENDPOINT",
        "MSI_ENDPOINT",
        "MSI_SECRET",
    ]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("IDENTITY_ENDPOINT", f"http://127.0.0.1:{port.getHost().port}/msi/token")
    monkeypatch.setenv("IDENTITY_HEADER", "s3cret-header")
    events: list[dict[str, Any]] = []
    source = TokenSource(
        DEFAULT_SCOPE, reactor, reactor_threads(reactor), default_credential, Logger(observer=events.append)
    )
    try:
        assert await source.start() is True
        assert source.current() == "mi-token-1"
        expires_on = source.expires_on
        assert expires_on is not None and 3500 < expires_on - reactor.seconds() <= 3600
        assert endpoint.seen == [
            {
                "args": {"api-version": "2019-08-01", "resource": "https://cognitiveservices.azure.com"},
                "header": "s3cret-header",
            }
        ]
        # MSAL caches a one-hour token; the forced refresh goes to the endpoint all the same.
        assert await source.force_refresh("mi-token-1") == "mi-token-2"
        assert len(endpoint.seen) == 2
        assert not any("mi-token" in formatEvent(e) for e in events)
    finally:
        source.stop()
        await port.stopListening()
