"""
Entra ID tokens for backends with C{auth = "entra"} (SPEC §12), from C{azure-identity}.

One L{TokenSource} per scope (L{TokenSources} shares it among the backends naming that scope).
The request path only ever calls L{TokenSource.current}, which never waits: it returns the token
while it is valid, else None (answer 503 C{token_unavailable} with
C{Retry-After: }L{TokenSource.retry_after}).

- The credential is L{default_credential}: a C{ChainedTokenCredential} of, in this order,
  C{EnvironmentCredential} (C{AZURE_TENANT_ID}, C{AZURE_CLIENT_ID} with C{AZURE_CLIENT_SECRET}
  or C{AZURE_CLIENT_CERTIFICATE_PATH}), C{WorkloadIdentityCredential} (when
  C{AZURE_FEDERATED_TOKEN_FILE} is set), C{ManagedIdentityCredential} (App Service / Container
  Apps C{IDENTITY_ENDPOINT}, else the VM's IMDS; C{AZURE_CLIENT_ID} picks a user-assigned
  identity) and C{AzureCliCredential}: the service part of C{DefaultAzureCredential}'s order,
  with none of its developer-tool or interactive members.  It is built (and C{azure.identity}
  imported) lazily, in a thread, on the first refresh.
- Its calls block, so they run in a thread (C{run_in_thread}, L{reactor_threads} in the daemon),
  one at a time per source: a refresh asked for while one runs joins it.
- Refresh: 5 minutes before expiry, or at half the token's lifetime when that is shorter; a
  failed refresh is retried every 30 s, while the old token lasts and after.
- L{TokenSource.force_refresh}, after an upstream 401 with a token believed valid, fetches with a
  new credential object: MSAL would otherwise answer from its cache with the same token (and a
  C{claims} challenge is refused by C{AzureCliCredential}, which would end the chain).
- L{TokenSource.start} seeks the first token for up to 10 s; its Deferred fires either way.
- Tokens are never logged nor in a repr; errors are logged in one line.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

import attrs
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from aoaiproxy.backends.cooldown import seconds_until

__all__ = [
    "DEFAULT_SCOPE",
    "Credential",
    "TokenSource",
    "TokenSources",
    "default_credential",
    "reactor_threads",
]

DEFAULT_SCOPE = "https://cognitiveservices.azure.com/.default"
#: How long L{TokenSource.start} waits for the first token.
START_WAIT = 10.0
#: Seconds between attempts after a failed refresh.
RETRY_INTERVAL = 30.0
#: Refresh this long before expiry (or at half the lifetime, when that is shorter).
MARGIN = 300.0
#: Never schedule a refresh sooner than this (a credential handing out very short tokens).
MIN_DELAY = 1.0
#: Forced refreshes (after upstream 401s) at most this often.
MIN_FORCE_INTERVAL = 10.0

_T = TypeVar("_T")


class AccessTokenLike(Protocol):
    """What C{get_token} returns (C{azure.core.credentials.AccessToken})."""

    @property
    def token(self) -> str: ...

    @property
    def expires_on(self) -> int: ...


class Credential(Protocol):
    """The part of an C{azure-identity} credential used here."""

    def get_token(self, *scopes: str) -> AccessTokenLike: ...

    def close(self) -> None: ...


class RunInThread(Protocol):
    """Run a blocking callable off the reactor thread; the Deferred fires on the reactor thread."""

    def __call__(self, f: Callable[[], _T], /) -> Deferred[_T]: ...


def reactor_threads(reactor: Any) -> RunInThread:
    """L{RunInThread} over the reactor's thread pool (what C{deferToThread} uses)."""

    def run(f: Callable[[], _T]) -> Deferred[_T]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f)

    return run


def default_credential() -> Credential:
    """
    The credential chain of the module docstring.  Blocking-free but imports C{azure.identity}:
    call it in a thread.
    """
    import logging

    from azure.identity import (
        AzureCliCredential,
        ChainedTokenCredential,
        EnvironmentCredential,
        ManagedIdentityCredential,
        WorkloadIdentityCredential,
    )

    # azure-identity logs each failed chain as a many-line warning through the standard logging
    # module, which with no handler configured goes to stderr; the source logs it in one line.
    azure_log = logging.getLogger("azure.identity")
    if not any(isinstance(h, logging.NullHandler) for h in azure_log.handlers):
        azure_log.addHandler(logging.NullHandler())
    chain: list[Any] = [EnvironmentCredential()]
    if os.environ.get("AZURE_FEDERATED_TOKEN_FILE"):
        chain.append(WorkloadIdentityCredential())
    chain.append(ManagedIdentityCredential(client_id=os.environ.get("AZURE_CLIENT_ID") or None))
    chain.append(AzureCliCredential())
    credential: Credential = ChainedTokenCredential(*chain)
    return credential


def one_line(failure: Failure) -> str:
    """An error's message on one line, bounded (an azure-identity chain error spans many)."""
    text = " ".join(str(failure.value).split()) or type(failure.value).__name__
    return text if len(text) <= 2000 else text[:2000] + "..."


def _close_quietly(credential: Credential) -> None:
    try:
        credential.close()
    except Exception:  # closing a credential we are done with must not fail anything
        pass


@attrs.frozen
class _Token:
    value: str = attrs.field(repr=False)
    expires_on: float


class TokenSource:
    """
    The tokens for one scope.  See the module docstring.

    @param clock: gives the time (C{seconds()} is the epoch time C{expires_on} counts in, as the
        reactor's is) and schedules the refreshes.
    @param run_in_thread: runs the credential's blocking calls off the reactor thread.
    @param credential_factory: makes a new credential (called in that thread).
    """

    def __init__(
        self,
        scope: str,
        clock: IReactorTime,
        run_in_thread: RunInThread,
        credential_factory: Callable[[], Credential] = default_credential,
        log: Logger | None = None,
    ) -> None:
        self.scope = scope
        self._clock = clock
        self._run_in_thread = run_in_thread
        self._factory = credential_factory
        self._log = log if log is not None else Logger(namespace="aoaiproxy.entra")
        self._token: _Token | None = None
        self._credential: Credential | None = None
        self._timer: IDelayedCall | None = None
        self._running = False
        self._running_forced = False
        self._waiters: list[Deferred[None]] = []
        self._force_next: list[Deferred[None]] | None = None
        self._forced_at: float | None = None
        #: Failed fetches in a row, and the error last logged among them.
        self._failures = 0
        self._last_error: str | None = None
        self._announced = False
        self._stopped = False

    def __repr__(self) -> str:
        expires = None if self._token is None else self._token.expires_on
        return f"<TokenSource scope={self.scope!r} expires_on={expires!r}>"

    def current(self) -> str | None:
        """The token to send now, or None when there is no valid one.  Never waits."""
        token = self._token
        if token is None or self._clock.seconds() >= token.expires_on:
            return None
        return token.value

    @property
    def expires_on(self) -> float | None:
        """When the current token expires (None before the first one)."""
        return None if self._token is None else self._token.expires_on

    def retry_after(self) -> int:
        """Seconds, rounded up, until the next attempt to get a token (for a 503's C{Retry-After})."""
        now = self._clock.seconds()
        if self._running:
            return 1
        if self._timer is not None and self._timer.active():
            return seconds_until(self._timer.getTime(), now)
        return int(RETRY_INTERVAL)

    def start(self, timeout: float = START_WAIT) -> Deferred[bool]:
        """
        Seek the first token.  The Deferred fires with whether there is one, once the first
        attempt ends or after C{timeout} seconds, whichever comes first; it never fails.
        Refreshing goes on either way.
        """
        result: Deferred[bool] = Deferred()

        def finish(_: object = None) -> None:
            if not result.called:
                if timer.active():
                    timer.cancel()
                result.callback(self.current() is not None)

        def timed_out() -> None:
            if self.current() is None:
                self._log.warn(
                    "Entra ID: no token for {scope} after {timeout} s; starting without one, "
                    "still trying (requests get 503 until one comes)",
                    scope=self.scope,
                    timeout=timeout,
                )
            finish()

        timer = self._clock.callLater(timeout, timed_out)
        self._refresh(force=False).addCallback(finish)
        return result

    def force_refresh(self, rejected: str | None = None) -> Deferred[str | None]:
        """
        Fetch a new token with a new credential object (after an upstream 401 with a token
        believed valid).  C{rejected} is the token the upstream refused: when the current one
        differs, it was already replaced and is returned at once.  Forced fetches are joined
        while one runs and happen at most every L{MIN_FORCE_INTERVAL} seconds; so the token
        returned may be the rejected one (then do not retry with it) or None.
        """
        token = self.current()
        if rejected is not None and token is not None and token != rejected:
            return succeed(token)
        now = self._clock.seconds()
        recent = self._forced_at is not None and now - self._forced_at < MIN_FORCE_INTERVAL
        if recent and not (self._running and self._running_forced):
            return succeed(token)
        return self._refresh(force=True).addCallback(lambda _: self.current())

    def stop(self) -> None:
        """No more refreshes; close the credential (once a refresh in its thread has ended)."""
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self._running and self._credential is not None:
            _close_quietly(self._credential)
            self._credential = None

    def _refresh(self, force: bool) -> Deferred[None]:
        """Fetch a token (single flight: while one fetch runs, callers join it)."""
        done: Deferred[None] = Deferred()
        if not self._running:
            self._waiters.append(done)
            self._run(force)
        elif force and not self._running_forced:
            # The fetch running may answer from a cache: a forced one follows it.
            if self._force_next is None:
                self._force_next = []
            self._force_next.append(done)
        else:
            self._waiters.append(done)
        return done

    def _run(self, force: bool) -> None:
        self._running = True
        self._running_forced = force
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if force:
            self._forced_at = self._clock.seconds()
        old = self._credential
        factory = self._factory
        scope = self.scope

        def fetch() -> tuple[Credential, AccessTokenLike]:  # in a thread
            credential = old if old is not None and not force else factory()
            try:
                token = credential.get_token(scope)
            except BaseException:
                if credential is not old:
                    _close_quietly(credential)
                raise
            if old is not None and credential is not old:
                _close_quietly(old)
            return credential, token

        d = self._run_in_thread(fetch)
        d.addCallbacks(self._got, self._failed)
        d.addBoth(self._done)

    def _got(self, result: tuple[Credential, AccessTokenLike]) -> None:
        credential, token = result
        self._credential = credential
        now = self._clock.seconds()
        expires_on = float(token.expires_on)
        if expires_on <= now:
            self._failed(Failure(ValueError("the credential returned a token that has already expired")))
            return
        self._token = _Token(token.token, expires_on)
        if self._failures or not self._announced:
            self._log.info(
                "Entra ID: token for {scope} obtained, valid for {seconds} s",
                scope=self.scope,
                seconds=int(expires_on - now),
            )
        self._announced = True
        self._failures = 0
        self._last_error = None
        lifetime = expires_on - now
        self._schedule(max(MIN_DELAY, lifetime - min(MARGIN, lifetime / 2)))

    def _failed(self, failure: Failure) -> None:
        error = one_line(failure)
        self._failures += 1
        if error != self._last_error:
            left = (self.expires_on or 0.0) - self._clock.seconds()
            state = (
                "no valid token: requests get 503" if left <= 0 else f"the current token lasts {int(left)} s"
            )
            self._log.warn(
                "Entra ID: no token for {scope}: {error} ({state}; retrying every {retry} s)",
                scope=self.scope,
                error=error,
                state=state,
                retry=int(RETRY_INTERVAL),
            )
            self._last_error = error
        self._schedule(RETRY_INTERVAL)

    def _schedule(self, delay: float) -> None:
        if self._stopped:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._refresh(force=False)

    def _done(self, result: object) -> None:
        if isinstance(result, Failure):  # a bug in _got/_failed, not a credential error
            self._log.failure("Entra ID: refreshing the token for {scope} failed", result, scope=self.scope)
            self._schedule(RETRY_INTERVAL)
        self._running = False
        waiters, self._waiters = self._waiters, []
        if self._force_next is not None and not self._stopped:
            self._waiters, self._force_next = self._force_next, None
            self._run(force=True)
        elif self._stopped and self._credential is not None:
            _close_quietly(self._credential)
            self._credential = None
        for waiter in waiters:
            waiter.callback(None)


class EntraBackend(Protocol):
    """What L{TokenSources} needs of a backend (the config's C{BackendConfig} has it)."""

    @property
    def auth(self) -> str: ...

    @property
    def entra_scope(self) -> str: ...


class TokenSources:
    """
    One L{TokenSource} per scope used by an C{auth = "entra"} backend, kept across reloads.
    """

    def __init__(
        self,
        clock: IReactorTime,
        run_in_thread: RunInThread,
        credential_factory: Callable[[], Credential] = default_credential,
        log: Logger | None = None,
    ) -> None:
        self._clock = clock
        self._run_in_thread = run_in_thread
        self._factory = credential_factory
        self._log = log
        self._sources: dict[str, TokenSource] = {}

    def update(self, backends: Iterable[EntraBackend], timeout: float = START_WAIT) -> Deferred[None]:
        """
        Make sources for the scopes now used and stop those no longer used (start-up and
        SIGHUP).  The Deferred fires once every new source's L{TokenSource.start} has.
        """
        scopes = {b.entra_scope for b in backends if b.auth == "entra"}
        for scope in set(self._sources) - scopes:
            self._sources.pop(scope).stop()
        starting = []
        for scope in sorted(scopes - set(self._sources)):
            source = TokenSource(scope, self._clock, self._run_in_thread, self._factory, self._log)
            self._sources[scope] = source
            starting.append(source.start(timeout))
        return DeferredList(starting).addCallback(lambda _: None)

    def get(self, scope: str) -> TokenSource | None:
        return self._sources.get(scope)

    def for_backend(self, backend: EntraBackend) -> TokenSource | None:
        """The backend's source, or None when it does not use Entra ID."""
        return self._sources.get(backend.entra_scope) if backend.auth == "entra" else None

    def stop(self) -> None:
        for source in self._sources.values():
            source.stop()
        self._sources.clear()
