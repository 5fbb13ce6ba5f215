"""
Several backends in the request path (SPEC §11 and §12): which backend each attempt of a request
goes to, with which credential, and which answer the client gets.

- L{Backends} holds the daemon's backend L{Pool} and its Entra ID L{TokenSources}, and follows
  the live configuration: on a reload (SIGHUP) the pool takes the new list (backends that keep
  their name keep their cooldowns and circuit) and token sources are started or stopped;
  requests in flight keep the backend they were sent to.
- L{Attempts} runs one request's attempts and fires with its L{Answer}: the upstream response to
  relay, or the proxy's error.  A 429, 500, 502, 503 or 504, a failed connection or a timeout
  tries the next backend the pool offers (the same body bytes, but for a v1 body's model);
  nothing is relayed until a response is final, so a client never sees a backend switch.  A
  response that may be the last answer (a 429 or 5xx) is kept unread until the next attempt's
  outcome is known, and only then relayed or dropped.
- L{ReplayBody} gives each attempt the client's body afresh without a second copy of it: a
  large body stays in the file twisted.web keeps it in, and each attempt reads it through its
  own view.

A request that names no model (files, batches, a stored response, C{/openai/...} passthrough,
openai mode) goes to the first backend of the lowest priority number, without failover: the
objects it refers to live on one resource.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import IO, Any, Protocol, cast

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from aoaiproxy import errors, rewrite
from aoaiproxy.backends import (
    Attempt,
    Outcome,
    Pool,
    TokenSources,
    fails_over,
    outcome_for_status,
    reactor_threads,
)
from aoaiproxy.backends.cooldown import ResponseHeaders
from aoaiproxy.backends.entra import RETRY_INTERVAL
from aoaiproxy.config import BackendConfig, Config, LiveConfig
from aoaiproxy.errors import ProxyError
from aoaiproxy.metrics import NullMetrics, Recorder
from aoaiproxy.upstream import UpstreamClient
from aoaiproxy.upstream.client import Pending

__all__ = ["Answer", "Attempts", "Backends", "ReplayBody", "discard", "response_headers"]

BACKEND_HEADER = b"x-aoaiproxy-backend"

_log = Logger(namespace="aoaiproxy.backends")


class AttemptPlan(Protocol):
    """The attempts of one request (L{aoaiproxy.backends.Plan}, or L{OneBackend})."""

    attempts: int
    served: bool

    def __next__(self) -> Attempt[BackendConfig]: ...

    def retry_after(self) -> int | None: ...


class OneBackend:
    """The plan of a request that names no model: one attempt, on the first backend."""

    served = True

    def __init__(self, backend: BackendConfig) -> None:
        self._backend: BackendConfig | None = backend
        self.attempts = 0

    def __iter__(self) -> Iterator[Attempt[BackendConfig]]:
        return self

    def __next__(self) -> Attempt[BackendConfig]:
        backend, self._backend = self._backend, None
        if backend is None:
            raise StopIteration
        self.attempts = 1
        return Attempt(backend, "", 1, probe=False)

    def retry_after(self) -> int | None:  # pragma: no cover - never without an attempt
        return None


def first_backend(backends: Sequence[BackendConfig]) -> BackendConfig:
    """The backend of a request that names no model: the first of the lowest priority number."""
    return min(backends, key=lambda b: b.priority)


class Backends:
    """
    The backend pool and the Entra ID token sources of the live configuration.  Call L{start}
    once (the daemon does when it starts) and L{stop} at the end.

    @param tokens: the token sources (default: azure-identity's credential chain, its blocking
        calls in the reactor's thread pool).
    @param rng: the weighted draws' source (a seeded C{random.Random} in tests).
    """

    def __init__(
        self,
        live: LiveConfig,
        reactor: Any,
        *,
        tokens: TokenSources | None = None,
        recorder: Recorder | None = None,
        rng: random.Random | None = None,
    ) -> None:
        config = live.config
        self.config = config
        self.recorder: Recorder = recorder if recorder is not None else NullMetrics()
        self.pool: Pool[BackendConfig] = Pool(
            config.backends,
            reactor,
            config.max_cooldown,
            rng if rng is not None else random.Random(),
            global_deployment=partial(rewrite.deployment_for, config),
            max_attempts=config.max_attempts,
        )
        self.tokens = tokens if tokens is not None else TokenSources(reactor, reactor_threads(reactor))
        #: Token-source updates whose first tokens are still sought, and who waits for them.
        self._seeking = 0
        self._waiters: list[Deferred[None]] = []
        self._started = False
        for backend in config.backends:
            self.recorder.backend_available(backend.name, True)
        live.watch(self.reload)

    def start(self) -> Deferred[None]:
        """Start the token sources; fires once each has its first token or gave up waiting (10 s)."""
        self._started = True
        _log.info("backends: {backends}", backends=", ".join(describe(b) for b in self.config.backends))
        return self._update_tokens(self.config.backends)

    def stop(self) -> None:
        self._started = False
        self.tokens.stop()

    def reload(self, config: Config) -> None:
        """Take a new configuration (SIGHUP): its backends, its settings, its token scopes."""
        try:
            self._reload(config)
        except Exception:  # a bug here must not fail the reload of everything else
            _log.failure("taking the reloaded backends failed; requests keep the old ones")

    def _reload(self, config: Config) -> None:
        old = {b.name for b in self.config.backends}
        self.pool.replace(
            config.backends,
            max_cooldown=config.max_cooldown,
            global_deployment=partial(rewrite.deployment_for, config),
            max_attempts=config.max_attempts,
        )
        self.config = config
        for backend in config.backends:
            if backend.name not in old:
                self.recorder.backend_available(backend.name, True)
        if self._started:
            self._update_tokens(config.backends)
        _log.info(
            "backends: {backends}",
            backends=", ".join(describe(b) for b in config.backends),
        )

    def _update_tokens(self, backends: Sequence[BackendConfig]) -> Deferred[None]:
        d = self.tokens.update(backends)
        if not d.called:
            self._seeking += 1
            d.addBoth(self._sought)
        return d

    def _sought(self, result: object) -> object:
        self._seeking -= 1
        if self._seeking == 0:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(None)
        return result

    @property
    def waiting_for_tokens(self) -> int:
        """How many requests wait for the first tokens now."""
        return len(self._waiters)

    def first_tokens(self) -> Deferred[None] | None:
        """
        While token sources just started (or added by a reload) seek their first token, a
        Deferred that fires when they have it or gave up; else None.  A request that finds no
        token waits on it rather than get a 503 in the daemon's first moments.
        """
        if self._seeking == 0:
            return None

        def cancel(d: Deferred[None]) -> None:
            if d in self._waiters:
                self._waiters.remove(d)

        waiter: Deferred[None] = Deferred(cancel)
        self._waiters.append(waiter)
        return waiter

    def plan(self, model: str | None) -> AttemptPlan:
        """
        The attempts for a request for C{model} (None: it names none).  Raises the global
        model map's 400 for a bad model name.
        """
        if model is None:
            return OneBackend(first_backend(self.config.backends))
        return self.pool.plan(model)

    def models(self) -> list[str]:
        """The models of every backend, for C{/v1/models}."""
        return self.pool.models(self.config.models)

    def record(self, attempt: Attempt[BackendConfig], outcome: Outcome, headers: Any = ()) -> None:
        """Report an attempt's outcome to the pool (and the availability gauge)."""
        self.pool.record(attempt, outcome, headers)
        recorder = self.recorder
        if recorder.recording:  # else no gauge: nothing to work out for it
            name = attempt.backend.name
            recorder.backend_available(name, self.pool.available(name))


def describe(backend: BackendConfig) -> str:
    """A backend for the log: name, endpoint, credential kind, priority and weight; never a key."""
    return (
        f"{backend.name} ({backend.endpoint}, auth {backend.auth}, "
        f"priority {backend.priority}, weight {backend.weight})"
    )


@attrs.frozen
class Answer:
    """
    What the client gets: the upstream C{response} to relay, or the proxy's C{error}; the
    backend that answered (or whose attempt failed last), its deployment, and how many
    requests were sent upstream.
    """

    response: IResponse | None
    error: ProxyError | None
    backend: str | None
    deployment: str | None
    attempts: int


class _FileView(io.RawIOBase):
    """
    A read-only view of a file with its own position (C{os.pread}), so that two attempts never
    move each other's place in the body, and that cannot close the file.  Once the request's
    file is closed (the client left), reading fails rather than read another file that took
    its descriptor.
    """

    def __init__(self, f: IO[bytes]) -> None:
        super().__init__()
        self._f = f
        self._fd = f.fileno()
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _size(self) -> int:
        return os.fstat(self._fd).st_size

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, self._size())[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        if self._f.closed:
            raise ValueError("the request body is gone")
        if n is None or n < 0:
            n = max(0, self._size() - self._pos)
        data = os.pread(self._fd, n, self._pos)
        self._pos += len(data)
        return data

    def close(self) -> None:
        pass  # the file is the request's


class ReplayBody:
    """
    The client's body, given afresh to each attempt (L{fresh}): bytes as they are; a small
    in-memory body as bytes; a file (a large body) through a L{_FileView} of its own, never
    read whole into memory.
    """

    def __init__(self, body: bytes | IO[bytes] | None) -> None:
        self._file: IO[bytes] | None = None
        self._bytes: bytes | None = None
        if body is None or isinstance(body, bytes):
            self._bytes = body
        elif isinstance(body, io.BytesIO):
            self._bytes = body.getvalue()  # twisted.web keeps only small bodies in memory
        else:
            body.flush()  # what was written through the file's buffer is in the file
            self._file = body

    def fresh(self) -> bytes | IO[bytes] | None:
        if self._file is None:
            return self._bytes
        try:
            return cast(IO[bytes], _FileView(self._file))
        except (AttributeError, OSError, io.UnsupportedOperation):  # no descriptor: one reader
            self._file.seek(0)
            return self._file


class _Discard(TwistedProtocol):
    """Receives an upstream body nobody wants: stops the upstream at once."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[attr-defined,union-attr]


def discard(response: IResponse) -> None:
    """Drop a response unread (its connection is closed)."""
    response.deliverBody(_Discard())


class Attempts:
    """
    One request's attempts (see the module docstring).  L{run} calls back with the L{Answer}
    (L{start}: a Deferred that fires with it); L{cancel} (the client left; cancelling
    L{start}'s Deferred) ends the attempt in flight, drops a response kept, and reports the
    attempt as abandoned.

    @raise ProxyError: (from the constructor) the global model map's 400 for a bad model name.
    """

    def __init__(
        self,
        backends: Backends,
        upstream: UpstreamClient,
        config: Config,
        client: rewrite.ClientRequest,
        body: ReplayBody,
    ) -> None:
        self._backends = backends
        self._upstream = upstream
        self._config = config
        self._client = client
        self._body = body
        self._plan = backends.plan(client.model)
        #: Who hears of the answer, and of a bug (L{run}).
        self._report: Callable[[Answer], object] | None = None
        self._report_bug: Callable[[Failure], object] | None = None
        #: Whether the answer (or a bug) was reported, or the attempts were cancelled.
        self.over = False
        #: Requests sent upstream (a retry after a 401 counts).
        self.sent = 0
        #: The attempt taken and not yet reported to the pool.
        self._open: Attempt[BackendConfig] | None = None
        #: What the request waits for: the upstream's response head, or the first tokens.
        self._inflight: Pending | Deferred[Any] | None = None
        #: The attempt sent last, with its token; and the number (L{sent}) of the last one
        #: answered (C{send} may answer before it returns).
        self._sending: tuple[Attempt[BackendConfig], str | None] | None = None
        self._replied = 0
        #: The last response that would fail over, kept unread: the answer if nothing follows.
        self._kept: tuple[Attempt[BackendConfig], IResponse] | None = None
        #: A 401 held while a new token is fetched.
        self._held: IResponse | None = None
        self._last_error: tuple[Attempt[BackendConfig], ProxyError] | None = None
        self._waited_for_token = False
        self._refreshed = False
        self._gone = False

    def run(self, answered: Callable[[Answer], object], bug: Callable[[Failure], object]) -> None:
        """
        Start the attempts: C{answered} is called once with the L{Answer} (perhaps before this
        returns, then L{over} is true), or C{bug} with the failure of a bug; neither after
        L{cancel}.
        """
        self._report = answered
        self._report_bug = bug
        self._next()

    def start(self) -> Deferred[Answer]:
        """L{run}, with a Deferred that fires with the L{Answer}; cancelling it is L{cancel}."""
        d: Deferred[Answer] = Deferred(lambda _: self.cancel())
        self.run(d.callback, d.errback)
        return d

    # -- the loop ------------------------------------------------------------------------------

    def _next(self) -> None:
        attempt = next(self._plan, None)
        if attempt is None:
            self._give_up()
            return
        self._open = attempt
        self._send(attempt, None)

    def _send(self, attempt: Attempt[BackendConfig], token: str | None) -> None:
        backend = attempt.backend
        if backend.auth == "entra" and token is None:
            source = self._backends.tokens.for_backend(backend)
            token = source.current() if source is not None else None
            if token is None:
                waiting = None if self._waited_for_token else self._backends.first_tokens()
                if waiting is not None:
                    self._waited_for_token = True
                    self._inflight_wait(waiting, attempt)
                    return
                self._record(attempt, "abandoned")
                retry = source.retry_after() if source is not None else int(RETRY_INTERVAL)
                self._last_error = (attempt, errors.token_unavailable(retry))
                self._next()
                return
        auth = rewrite.backend_auth(self._config.mode, backend, self._client.presented, token)
        upstream = rewrite.for_backend(self._config, self._client, backend, attempt.deployment or None, auth)
        body = upstream.body if upstream.body is not None else self._body.fresh()
        self.sent += 1
        self._sending = (attempt, token)
        number = self.sent
        pending = self._upstream.send(
            upstream.method,
            upstream.url,
            upstream.headers,
            body,
            self,
            connect_timeout=self._config.connect_timeout,
            header_timeout=self._config.upstream_timeout,
        )
        if self._replied < number:  # not answered at once
            self._inflight = pending

    def _inflight_wait(self, waiting: Deferred[None], attempt: Attempt[BackendConfig]) -> None:
        """Wait for the first tokens (start-up), then send C{attempt}."""

        def ready(_: object) -> None:
            self._inflight = None
            if not self._gone:
                self._send(attempt, None)

        def cancelled(failure: Failure) -> None:
            failure.trap(CancelledError)

        self._inflight = waiting
        waiting.addCallbacks(ready, cancelled).addErrback(self._bug)

    # -- the upstream's answers (L{aoaiproxy.upstream.client.Receiver}) --------------------------

    def answered(self, response: IResponse) -> None:
        self._replied = self.sent
        self._inflight = None
        assert self._sending is not None
        try:
            self._got(response, *self._sending)
        except Exception:
            self._bug(Failure())

    def failed(self, error: ProxyError) -> None:
        self._replied = self.sent
        self._inflight = None
        assert self._sending is not None
        try:
            self._failed(error, self._sending[0])
        except Exception:
            self._bug(Failure())

    def _got(self, response: IResponse, attempt: Attempt[BackendConfig], token: str | None) -> None:
        name = attempt.backend.name
        status = response.code
        outcome = outcome_for_status(status)
        recorder = self._backends.recorder
        headers = response_headers(response)
        recorder.ratelimit(name, attempt.deployment, headers)
        recorder.attempt(name, _metric(outcome))
        if status == 401 and token is not None and not self._refreshed:
            source = self._backends.tokens.for_backend(attempt.backend)
            if source is not None:
                # A token believed valid was refused: fetch a new one and try once more.
                self._refreshed = True
                self._held = response
                d = source.force_refresh(token)
                d.addCallback(self._token_refreshed, attempt, token)
                d.addErrback(self._bug)
                return
        self._record(attempt, outcome, headers)
        if fails_over(status):
            self._keep(attempt, response)
            self._next()
            return
        self._answer(attempt, response)

    def _token_refreshed(self, token: str | None, attempt: Attempt[BackendConfig], rejected: str) -> None:
        response, self._held = self._held, None
        if self._gone or response is None:
            return
        if token is not None and token != rejected:
            discard(response)
            self._send(attempt, token)
            return
        self._record(attempt, "401", response_headers(response))
        self._answer(attempt, response)

    def _failed(self, error: ProxyError, attempt: Attempt[BackendConfig]) -> None:
        if self._gone:  # pragma: no cover - a cancelled request hears nothing
            return
        outcome: Outcome = "timeout" if error.status == 504 else "connect_error"
        self._backends.recorder.attempt(attempt.backend.name, outcome)
        self._record(attempt, outcome)
        self._last_error = (attempt, error)
        self._next()

    def _give_up(self) -> None:
        """No attempt is left: the last response kept, else the last error, else 404 or 429."""
        if self._kept is not None:
            attempt, response = self._kept
            self._kept = None
            self._answer(attempt, response)
        elif self._last_error is not None:
            attempt, error = self._last_error
            name = attempt.backend.name
            error = attrs.evolve(error, headers=(*error.headers, (BACKEND_HEADER, name.encode("ascii"))))
            self._finish(Answer(None, error, name, attempt.deployment or None, self.sent))
        elif not self._plan.served:
            assert self._client.model is not None
            self._finish(Answer(None, errors.model_not_found(self._client.model), None, None, self.sent))
        else:
            busy = errors.all_backends_busy(self._plan.retry_after() or 1)
            self._finish(Answer(None, busy, None, None, self.sent))

    # -- bookkeeping -----------------------------------------------------------------------------

    def _record(self, attempt: Attempt[BackendConfig], outcome: Outcome, headers: Any = ()) -> None:
        if self._open is attempt:
            self._open = None
            self._backends.record(attempt, outcome, headers)

    def _keep(self, attempt: Attempt[BackendConfig], response: IResponse) -> None:
        if self._kept is not None:
            discard(self._kept[1])
        self._kept = (attempt, response)

    def _answer(self, attempt: Attempt[BackendConfig], response: IResponse) -> None:
        if self._kept is not None and self._kept[1] is not response:
            discard(self._kept[1])
        self._kept = None
        self._finish(Answer(response, None, attempt.backend.name, attempt.deployment or None, self.sent))

    def _finish(self, answer: Answer) -> None:
        report = self._report
        if not self.over and report is not None:
            self.over = True
            self._let_go()
            report(answer)
        elif answer.response is not None:
            discard(answer.response)

    def _bug(self, failure: Failure) -> None:
        report = self._report_bug
        if not self.over and report is not None:
            self.over = True
            self._let_go()
            report(failure)
        else:
            _log.failure("after a request's answer", failure)

    def _let_go(self) -> None:
        """
        Over: nothing is sent or reported any more.  The client's request keeps these attempts
        (its L{cancel}) while a stream is relayed, maybe for minutes: they keep none of the
        request (its parsed body, its body, the plan, the callbacks that hold the request).
        Anything that read them now would be a bug, and fail loudly.
        """
        self._report = self._report_bug = None
        del self._client, self._body, self._plan

    def cancel(self) -> None:
        """The client left: nothing is reported; the attempt in flight ends, a response kept is dropped."""
        if self.over:
            return
        self.over = True
        self._gone = True
        self._let_go()
        if self._open is not None:
            self._record(self._open, "abandoned")
        if self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            inflight.cancel()
        for response in (self._held, self._kept[1] if self._kept else None):
            if response is not None:
                discard(response)
        self._held = self._kept = None


def response_headers(response: IResponse) -> ResponseHeaders:
    """
    A response's headers as the pool, the metrics and the relay read them
    (L{aoaiproxy.backends.cooldown.header_pairs} gives them as pairs): the upstream client's
    raw pairs (L{aoaiproxy.upstream.protocol.UpstreamResponse.raw_headers}: no C{Headers}
    made), else its C{headers}.
    """
    raw: ResponseHeaders | None = getattr(response, "raw_headers", None)
    return raw if raw is not None else response.headers


def _metric(outcome: Outcome) -> str:
    """The C{outcome} label of C{aoaiproxy_upstream_attempts_total} (a 401 is a 4xx there)."""
    return "4xx" if outcome == "401" else outcome
