"""
The backend pool: which backend a request goes to, in what order it fails over, and what each
backend's answers did to its state.

Pure state and a clock (only C{clock.seconds()} is used; no timers, no I/O).  One L{Pool} lives
as long as the daemon; SIGHUP gives it the new list with L{Pool.replace}.

A request asks L{Pool.plan} for a L{Plan} and takes L{Attempt}s from it one at a time (it is an
iterator), reporting each one's outcome with L{Pool.record} (always, once; "abandoned" when the
client went away first) before taking the next::

    plan = pool.plan(model)          # may raise the global map's 400 for a bad model name
    for attempt in plan:
        send to attempt.backend, naming attempt.deployment
        a response:  pool.record(attempt, outcome_for_status(status), response.headers)
                     if not fails_over(status): relay it; stop
        no response: pool.record(attempt, "connect_error" or "timeout")
    nothing relayed and plan.attempts == 0:
        plan.served is False: 404 model_not_found
        else: 429 all_backends_busy, Retry-After: plan.retry_after()
    nothing relayed after attempts: the last upstream response as it came, else 502/504

Each attempt is chosen when it is taken, from the state at that moment, among the backends that
serve the model, were not tried by this request, and are available: the deployment is not
cooling down and the backend's circuit is not open.  The lowest priority number wins; within
it, the choice is a weighted random draw (a backend of weight 2 is chosen twice as often as one
of weight 1), without repetition within the request.  A higher priority number is used only
when no backend of a lower one is available or left.  At most C{max_attempts} attempts.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Generic, Literal, Protocol, TypeVar

import attrs
from twisted.internet.interfaces import IReactorTime

from aoaiproxy.backends.cooldown import (
    Circuit,
    Cooldowns,
    ResponseHeaders,
    cooldown_for,
    seconds_until,
)

__all__ = [
    "Attempt",
    "Backend",
    "Outcome",
    "Plan",
    "Pool",
    "fails_over",
    "outcome_for_status",
]

#: What became of one attempt.  "abandoned": it ended with no outcome (the client went away).
Outcome = Literal["ok", "429", "5xx", "4xx", "401", "connect_error", "timeout", "abandoned"]

#: Models whose deployments per backend L{Pool.plan} remembers (client-chosen names: bounded).
_MODELS_CACHED = 256

_FAILOVER_STATUSES = frozenset({429, 500, 502, 503, 504})
_CIRCUIT_FAILURES: frozenset[Outcome] = frozenset({"5xx", "connect_error", "timeout"})


def outcome_for_status(status: int) -> Outcome:
    """The outcome of an upstream response with this status."""
    if status == 429:
        return "429"
    if status == 401:
        return "401"
    if status >= 500:
        return "5xx"
    if status >= 400:
        return "4xx"
    return "ok"


def fails_over(status: int) -> bool:
    """Whether a response with this status (before its first byte went out) tries the next backend."""
    return status in _FAILOVER_STATUSES


class Backend(Protocol):
    """What the pool needs of a backend (the config's C{BackendConfig} has it)."""

    @property
    def name(self) -> str: ...

    @property
    def priority(self) -> int: ...

    @property
    def weight(self) -> int: ...

    @property
    def models(self) -> Mapping[str, str] | None: ...


B = TypeVar("B", bound=Backend)


@attrs.frozen
class Attempt(Generic[B]):
    """Send the request to C{backend}, naming C{deployment}."""

    backend: B
    deployment: str
    #: 1 for the first attempt of a request.
    number: int
    #: Whether this attempt is its backend's circuit probe (report its outcome, always).
    probe: bool


class Plan(Generic[B]):
    """
    The attempts of one request, chosen one at a time as they are taken (see the module
    docstring).  C{served} says whether any backend serves the model at all.
    """

    def __init__(self, pool: Pool[B], model: str, deployments: dict[str, str], max_attempts: int) -> None:
        self._pool = pool
        self._deployments = deployments
        self._max_attempts = max_attempts
        self._tried: set[str] = set()
        self.model = model
        self.attempts = 0
        self.served = bool(deployments)

    def __iter__(self) -> Iterator[Attempt[B]]:
        return self

    def __next__(self) -> Attempt[B]:
        if self.attempts >= self._max_attempts:
            raise StopIteration
        chosen = self._pool._choose(self._deployments, self._tried)
        if chosen is None:
            raise StopIteration
        backend, probe = chosen
        self._tried.add(backend.name)
        self.attempts += 1
        return Attempt(backend, self._deployments[backend.name], self.attempts, probe)

    def retry_after(self) -> int | None:
        """
        Whole seconds (rounded up, at least 1) until the soonest backend serving the model is
        available again, for the C{Retry-After} of a 429 C{all_backends_busy}; None when no
        backend serves the model.
        """
        return self._pool._retry_after(self._deployments)


class Pool(Generic[B]):
    """
    The backends and their cooldown and circuit state.

    @param global_deployment: the deployment name for a model on a backend with no model map
        (§4's map); it may raise a L{aoaiproxy.errors.ProxyError} for a bad model name.
    @param rng: the source of the weighted draws (a seeded C{random.Random} in tests).
    """

    def __init__(
        self,
        backends: Sequence[B],
        clock: IReactorTime,
        max_cooldown: float,
        rng: random.Random,
        *,
        global_deployment: Callable[[str], str],
        max_attempts: int = 3,
    ) -> None:
        self._clock = clock
        self._rng = rng
        self.max_cooldown = max_cooldown
        self.max_attempts = max_attempts
        self._global_deployment = global_deployment
        self._backends: tuple[B, ...] = ()
        self._circuits: dict[str, Circuit] = {}
        self._cooldowns = Cooldowns()
        #: The deployments of each model asked for (L{plan}), until the next L{replace}.
        self._deployments: dict[str, dict[str, str]] = {}
        self.replace(backends)

    @property
    def backends(self) -> tuple[B, ...]:
        return self._backends

    def replace(
        self,
        backends: Sequence[B],
        *,
        max_cooldown: float | None = None,
        global_deployment: Callable[[str], str] | None = None,
        max_attempts: int | None = None,
    ) -> None:
        """
        Take a new list of backends (SIGHUP).  Backends that keep their name keep their cooldowns
        and circuit; the state of removed ones is dropped.  The other arguments, when given,
        replace the settings.
        """
        names = [b.name for b in backends]
        if len(set(names)) != len(names):
            raise ValueError(f"backend names must be unique: {names}")
        self._backends = tuple(backends)
        self._circuits = {n: self._circuits.get(n) or Circuit() for n in names}
        self._cooldowns.keep_only(set(names))
        if max_cooldown is not None:
            self.max_cooldown = max_cooldown
        if global_deployment is not None:
            self._global_deployment = global_deployment
        if max_attempts is not None:
            self.max_attempts = max_attempts
        self._deployments = {}

    def plan(self, model: str, max_attempts: int | None = None) -> Plan[B]:
        """
        The attempts for a request for C{model}.  Raises what C{global_deployment} raises for a
        bad model name (only when a backend without a model map serves it).
        """
        deployments = self._deployments.get(model)
        if deployments is None:
            deployments = self._deployments_for(model)
            if len(self._deployments) >= _MODELS_CACHED:
                self._deployments.clear()
            self._deployments[model] = deployments
        return Plan(self, model, deployments, self.max_attempts if max_attempts is None else max_attempts)

    def _deployments_for(self, model: str) -> dict[str, str]:
        """Each backend serving C{model}, and its deployment for it (a plan's, never changed)."""
        deployments: dict[str, str] = {}
        everyone: str | None = None
        for b in self._backends:
            if b.models is None:
                if everyone is None:
                    everyone = self._global_deployment(model)
                deployments[b.name] = everyone
            elif model in b.models:
                deployments[b.name] = b.models[model]
        return deployments

    def record(self, attempt: Attempt[B], outcome: Outcome, headers: ResponseHeaders = ()) -> None:
        """
        Report what became of an attempt: a 429 cools its deployment (from C{headers}, the
        response's); a failed connection, a timeout or a 5xx counts against its backend's
        circuit; anything else but "abandoned" closes the circuit.  An attempt of a backend
        removed since is ignored.
        """
        name = attempt.backend.name
        circuit = self._circuits.get(name)
        if circuit is None:
            return
        now = self._clock.seconds()
        if outcome in _CIRCUIT_FAILURES:
            circuit.failed(now, self.max_cooldown, attempt.probe)
        elif outcome == "abandoned":
            circuit.abandoned(attempt.probe)
        else:
            circuit.succeeded()
            if outcome == "429":
                until = cooldown_for(headers, now, self.max_cooldown)
                self._cooldowns.cool((name, attempt.deployment), until, now)

    def available(self, name: str) -> bool:
        """Whether the backend can take a request now as far as its circuit goes (for a gauge)."""
        circuit = self._circuits.get(name)
        return circuit is not None and circuit.available(self._clock.seconds())

    def cooling_until(self, name: str, deployment: str) -> float:
        """When that deployment returns from its cooldown (0 when it is not cooling)."""
        return self._cooldowns.until((name, deployment))

    def models(self, global_names: Iterable[str]) -> list[str]:
        """
        The models of all backends, sorted, for C{/v1/models}; a backend without a model map
        contributes C{global_names} (the global map's model names).
        """
        names: set[str] = set()
        everyone = False
        for b in self._backends:
            if b.models is None:
                everyone = True
            else:
                names.update(b.models)
        if everyone:
            names.update(global_names)
        return sorted(names)

    def _ready_at(self, name: str, deployment: str, now: float) -> float:
        """When the backend can take a request for that deployment (C{now} or earlier if it can)."""
        return max(self._cooldowns.until((name, deployment)), self._circuits[name].available_at(now))

    def _choose(self, deployments: Mapping[str, str], tried: set[str]) -> tuple[B, bool] | None:
        """
        The backend of the next attempt: among those serving the model (C{deployments}), not
        C{tried}, and available, the lowest priority number, then a weighted draw.
        """
        now = self._clock.seconds()
        cooldowns = self._cooldowns
        circuits = self._circuits
        best = 0
        group: list[B] = []
        for b in self._backends:
            name = b.name
            deployment = deployments.get(name)
            if (
                deployment is None
                or name in tried
                or cooldowns.until((name, deployment)) > now
                or not circuits[name].available(now)
            ):
                continue
            if not group or b.priority < best:
                best = b.priority
                group = [b]
            elif b.priority == best:
                group.append(b)
        if not group:
            return None
        chosen = self._draw(group)
        return chosen, circuits[chosen.name].take(now)

    def _draw(self, group: list[B]) -> B:
        """A weighted random choice (uniform when no weight is positive)."""
        if len(group) == 1:
            # The same draw as for a larger group (so that a seeded source gives the same
            # choices after it), without the arithmetic.
            only = group[0]
            if only.weight > 0:
                self._rng.random()
            else:
                self._rng.randrange(1)
            return only
        total = 0
        for b in group:
            if b.weight > 0:
                total += b.weight
        if total <= 0:
            return group[self._rng.randrange(len(group))]
        point = self._rng.random() * total
        for b in group:
            point -= max(b.weight, 0)
            if point < 0:
                return b
        return next(b for b in reversed(group) if b.weight > 0)  # rounding at the very top

    def _retry_after(self, deployments: Mapping[str, str]) -> int | None:
        if not deployments:
            return None
        now = self._clock.seconds()
        times = [self._ready_at(n, d, now) for n, d in deployments.items() if n in self._circuits]
        return seconds_until(min(times, default=now), now)
