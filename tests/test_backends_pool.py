"""
The backend pool's decisions, driven directly with a fake clock: choice by priority and weight,
failover order, cooldowns from 429s, circuits, the all-busy and not-served answers, and reload.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from aoaiproxy.backends.cooldown import PROBE_LEASE
from aoaiproxy.backends.pool import Attempt, Plan, Pool, fails_over, outcome_for_status

START = 1_700_000_000.0


@attrs.frozen
class B:
    """A backend as the config gives it (the fields the pool reads, and a few it doesn't)."""

    name: str
    priority: int = 0
    weight: int = 1
    models: Mapping[str, str] | None = None
    endpoint: str = "https://x.openai.azure.com"
    api_key: str | None = "k"


def global_deployment(model: str) -> str:
    if model == "bad/model":
        raise ValueError("bad model")
    return {"gpt-3.5-turbo": "gpt-35-turbo"}.get(model, model)


def make(backends: Sequence[B], max_cooldown: float = 60, seed: int = 1) -> tuple[Pool[B], Clock]:
    clock = Clock()
    clock.advance(START)
    pool = Pool(backends, clock, max_cooldown, random.Random(seed), global_deployment=global_deployment)
    return pool, clock


def names(pool: Pool[B], model: str = "gpt-4o", max_attempts: int = 10) -> list[str]:
    return [a.backend.name for a in pool.plan(model, max_attempts)]


def first(pool: Pool[B], model: str = "gpt-4o") -> Attempt[B]:
    return next(pool.plan(model))


def fail(pool: Pool[B], name: str, times: int = 1, outcome: str = "connect_error") -> None:
    backend = next(b for b in pool.backends if b.name == name)
    for _ in range(times):
        pool.record(Attempt(backend, "gpt-4o", 1, False), outcome, ())  # type: ignore[arg-type]


def too_many(
    pool: Pool[B], name: str, headers: list[tuple[bytes, bytes]], deployment: str = "gpt-4o"
) -> None:
    backend = next(b for b in pool.backends if b.name == name)
    pool.record(Attempt(backend, deployment, 1, False), "429", headers)


def test_spread_by_weight() -> None:
    pool, _ = make([B("a", weight=1), B("b", weight=3), B("c", weight=6)])
    counts = Counter(first(pool).backend.name for _ in range(10_000))
    assert counts["a"] == pytest.approx(1_000, abs=150)
    assert counts["b"] == pytest.approx(3_000, abs=250)
    assert counts["c"] == pytest.approx(6_000, abs=250)


def test_equal_weights_spread_evenly_and_zero_weight_is_last() -> None:
    pool, _ = make([B("a"), B("b"), B("z", weight=0)])
    counts = Counter(first(pool).backend.name for _ in range(10_000))
    assert counts["z"] == 0
    assert counts["a"] == pytest.approx(5_000, abs=250)
    # A weight-0 backend is still a failover target, after the others.
    assert names(pool)[2] == "z"


def test_priority_order_and_failover_without_repeats() -> None:
    pool, _ = make([B("far", priority=1), B("a", weight=2), B("b"), B("farther", priority=5)])
    orders = Counter(tuple(names(pool)) for _ in range(2_000))
    # The two of priority 0 in either order, then 1, then 5; never a repeat.
    assert set(orders) == {("a", "b", "far", "farther"), ("b", "a", "far", "farther")}
    # Weight decides which of priority 0 comes first (2:1).
    assert orders[("a", "b", "far", "farther")] == pytest.approx(2 / 3 * 2_000, abs=120)


def test_higher_priority_only_when_lower_unavailable() -> None:
    pool, _ = make([B("near"), B("far", priority=1)])
    assert {first(pool).backend.name for _ in range(200)} == {"near"}
    too_many(pool, "near", [(b"retry-after", b"5")])
    assert names(pool) == ["far"]


def test_max_attempts_and_attempt_numbers() -> None:
    pool, _ = make([B("a"), B("b"), B("c"), B("d")])
    plan = pool.plan("gpt-4o", max_attempts=2)
    attempts = list(plan)
    assert [a.number for a in attempts] == [1, 2]
    assert plan.attempts == 2
    assert len({a.backend.name for a in attempts}) == 2
    assert len(list(pool.plan("gpt-4o"))) == 3  # the pool's default


def test_deployment_names_per_backend() -> None:
    pool, _ = make(
        [
            B("mapped", models={"gpt-4o": "prod-4o", "gpt-4o-mini": "mini"}),
            B("everything", priority=1),
        ]
    )
    assert [(a.backend.name, a.deployment) for a in pool.plan("gpt-4o")] == [
        ("mapped", "prod-4o"),
        ("everything", "gpt-4o"),
    ]
    assert [(a.backend.name, a.deployment) for a in pool.plan("gpt-3.5-turbo")] == [
        ("everything", "gpt-35-turbo")
    ]
    # The global map's errors (a bad model name) come out of plan(), before any attempt.
    with pytest.raises(ValueError):
        pool.plan("bad/model")


def test_model_not_served() -> None:
    pool, _ = make([B("a", models={"gpt-4o": "x"}), B("b", models={"o1": "o1"})])
    plan = pool.plan("gpt-5")
    assert list(plan) == []
    assert plan.attempts == 0
    assert plan.served is False
    assert plan.retry_after() is None
    # A map-only pool never asks the global map (a name it would refuse is simply not served).
    assert pool.plan("bad/model").served is False
    assert pool.plan("gpt-4o").served is True


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ([(b"retry-after-ms", b"1500")], 1.5),
        ([(b"x-ms-retry-after-ms", b"2500")], 2.5),
        ([(b"retry-after", b"7")], 7.0),
        ([(b"retry-after", b"Tue, 14 Nov 2023 22:13:50 GMT")], 30.0),  # START + 30
        ([], 10.0),
        ([(b"retry-after", b"86400")], 60.0),  # capped by max_cooldown
    ],
)
def test_429_cools_the_deployment_until_its_time(headers: list[tuple[bytes, bytes]], seconds: float) -> None:
    pool, clock = make([B("a"), B("b", priority=1)])
    too_many(pool, "a", headers)
    assert pool.cooling_until("a", "gpt-4o") == START + seconds
    clock.advance(seconds - 0.001)
    assert names(pool) == ["b"]
    clock.advance(0.001)
    assert names(pool) == ["a", "b"]


def test_cooldown_is_per_deployment_not_per_backend() -> None:
    pool, _ = make([B("a"), B("b", priority=1)])
    too_many(pool, "a", [(b"retry-after", b"30")])
    assert names(pool, "gpt-4o") == ["b"]
    assert names(pool, "gpt-4o-mini") == ["a", "b"]
    assert pool.available("a")  # the backend itself is up


def test_further_429_only_lengthens() -> None:
    pool, clock = make([B("a"), B("b", priority=1)])
    too_many(pool, "a", [(b"retry-after", b"20")])
    clock.advance(1)
    too_many(pool, "a", [(b"retry-after-ms", b"500")])  # shorter: ignored
    assert pool.cooling_until("a", "gpt-4o") == START + 20
    too_many(pool, "a", [(b"retry-after", b"40")])  # longer: lengthened
    assert pool.cooling_until("a", "gpt-4o") == START + 41
    clock.advance(39.5)
    assert names(pool) == ["b"]
    clock.advance(0.5)
    assert names(pool) == ["a", "b"]


def test_all_busy_retry_after_rounded_up() -> None:
    pool, clock = make([B("a"), B("b", priority=1)])
    too_many(pool, "a", [(b"retry-after-ms", b"2300")])
    too_many(pool, "b", [(b"retry-after", b"5")])
    plan = pool.plan("gpt-4o")
    assert list(plan) == []
    assert plan.served is True
    assert plan.retry_after() == 3  # 2.3 s, rounded up
    clock.advance(1.5)
    assert pool.plan("gpt-4o").retry_after() == 1  # 0.8 s left
    # An open circuit counts with its reopening time.
    pool2, _ = make([B("a"), B("b")])
    too_many(pool2, "a", [(b"retry-after", b"9")])
    fail(pool2, "b", 3)
    assert list(pool2.plan("gpt-4o")) == []
    assert pool2.plan("gpt-4o").retry_after() == 5


def test_circuit_opens_after_three_in_a_row_for_five_seconds() -> None:
    pool, clock = make([B("a"), B("b", priority=1)])
    fail(pool, "a", 2, "connect_error")
    assert names(pool) == ["a", "b"]
    fail(pool, "a", 1, "timeout")
    assert not pool.available("a")
    assert names(pool) == ["b"]
    assert names(pool, "another-model") == ["b"]  # the whole backend is out
    clock.advance(4.999)
    assert names(pool) == ["b"]
    clock.advance(0.001)
    assert pool.available("a")


def test_5xx_counts_and_any_success_resets_the_count() -> None:
    pool, _ = make([B("a")])
    fail(pool, "a", 2, "5xx")
    fail(pool, "a", 1, "ok")
    fail(pool, "a", 2, "5xx")
    assert pool.available("a")
    fail(pool, "a", 1, "429")  # the backend answered: a success for its circuit
    fail(pool, "a", 2, "timeout")
    fail(pool, "a", 1, "4xx")
    fail(pool, "a", 2, "connect_error")
    assert pool.available("a")
    fail(pool, "a", 1, "5xx")
    assert not pool.available("a")


def test_exactly_one_probe_then_close_on_success() -> None:
    pool, clock = make([B("a"), B("b", priority=1)])
    fail(pool, "a", 3)
    clock.advance(5)
    probe = first(pool)
    assert (probe.backend.name, probe.probe) == ("a", True)
    # While the probe is out, every other request finds "a" unavailable.
    for _ in range(5):
        assert names(pool) == ["b"]
    assert not pool.available("a")
    pool.record(probe, "ok")
    assert pool.available("a")
    assert first(pool).probe is False
    assert names(pool) == ["a", "b"]
    # Closed means reset: three more failures open it for 5 s again, not 10.
    fail(pool, "a", 3)
    clock.advance(5)
    assert first(pool).probe is True


def test_failed_probes_double_up_to_max_cooldown() -> None:
    pool, clock = make([B("a")], max_cooldown=30)
    fail(pool, "a", 3)
    opened = []
    for _ in range(5):
        waited = 0.0
        while not pool.available("a"):
            clock.advance(0.5)
            waited += 0.5
        opened.append(waited)
        probe = first(pool)
        assert probe.probe
        pool.record(probe, "5xx")
    assert opened == [5, 10, 20, 30, 30]


def test_failures_of_requests_sent_before_opening_do_not_extend_it() -> None:
    pool, clock = make([B("a")])
    fail(pool, "a", 3)
    fail(pool, "a", 4)  # stragglers, not the probe
    clock.advance(5)
    assert pool.available("a")


def test_abandoned_probe_lets_another_through() -> None:
    pool, clock = make([B("a")])
    fail(pool, "a", 3)
    clock.advance(5)
    probe = first(pool)
    assert names(pool) == []
    pool.record(probe, "abandoned")
    assert first(pool).probe is True


def test_a_probe_that_never_reports_is_forgotten_after_its_lease() -> None:
    pool, clock = make([B("a")])
    fail(pool, "a", 3)
    clock.advance(5)
    assert first(pool).probe is True
    clock.advance(PROBE_LEASE - 1)
    assert names(pool) == []
    clock.advance(1)
    assert first(pool).probe is True


def test_models_union() -> None:
    pool, _ = make([B("a", models={"gpt-4o": "x", "o1": "o1"}), B("b", models={"o3": "o3"})])
    assert pool.models(["gpt-3.5-turbo"]) == ["gpt-4o", "o1", "o3"]
    pool.replace([*pool.backends, B("c")])
    assert pool.models(["gpt-3.5-turbo", "o1"]) == ["gpt-3.5-turbo", "gpt-4o", "o1", "o3"]


def test_replace_keeps_state_of_kept_names_and_drops_removed() -> None:
    pool, clock = make([B("a"), B("b"), B("c", priority=2)])
    fail(pool, "a", 3)
    too_many(pool, "b", [(b"retry-after", b"30")])
    too_many(pool, "c", [(b"retry-after", b"30")])
    old_plan = pool.plan("gpt-4o")
    # "a" and "b" stay (with new settings), "c" goes, "d" comes.
    pool.replace([B("a", weight=5), B("b", priority=1), B("d", priority=3)])
    assert not pool.available("a")
    assert pool.cooling_until("b", "gpt-4o") == START + 30
    assert pool.cooling_until("c", "gpt-4o") == 0
    assert not pool.available("c")
    assert names(pool) == ["d"]
    # A plan made before the reload goes on without failing.
    assert [a.backend.name for a in old_plan] == []
    assert old_plan.retry_after() == 5
    # "c" coming back starts fresh.
    pool.replace([B("a"), B("b"), B("c")])
    clock.advance(5)
    assert sorted(names(pool)) == ["a", "c"]
    with pytest.raises(ValueError):
        pool.replace([B("a"), B("a")])


def test_replace_settings() -> None:
    pool, _ = make([B("a")])
    pool.replace(pool.backends, max_cooldown=3, max_attempts=1, global_deployment=lambda m: "g-" + m)
    too_many(pool, "a", [(b"retry-after", b"60")], "g-x")
    assert pool.cooling_until("a", "g-x") == START + 3
    assert [a.deployment for a in pool.plan("y")] == ["g-y"]


@pytest.mark.parametrize(
    ("status", "outcome", "over"),
    [
        (200, "ok", False),
        (304, "ok", False),
        (400, "4xx", False),
        (401, "401", False),
        (404, "4xx", False),
        (429, "429", True),
        (500, "5xx", True),
        (501, "5xx", False),
        (502, "5xx", True),
        (503, "5xx", True),
        (504, "5xx", True),
    ],
)
def test_outcomes_of_statuses(status: int, outcome: str, over: bool) -> None:
    assert outcome_for_status(status) == outcome
    assert fails_over(status) is over


# -- the choice against the straightforward one it replaced -------------------------------------


class Reference(Pool[B]):
    """The pool with its choice written the plain way (filters and sums), and no remembered
    deployments: L{Pool}'s one-pass choice must give the same attempts and use its random
    source the same way."""

    def plan(self, model: str, max_attempts: int | None = None) -> Plan[B]:
        self._deployments = {}
        return super().plan(model, max_attempts)

    def _choose(self, deployments: Mapping[str, str], tried: set[str]) -> tuple[B, bool] | None:
        now = self._clock.seconds()
        ready = [
            b
            for b in self._backends
            if b.name in deployments
            and b.name not in tried
            and self._cooldowns.until((b.name, deployments[b.name])) <= now
            and self._circuits[b.name].available(now)
        ]
        if not ready:
            return None
        best = min(b.priority for b in ready)
        chosen = self._draw([b for b in ready if b.priority == best])
        return chosen, self._circuits[chosen.name].take(now)

    def _draw(self, group: list[B]) -> B:
        total = sum(max(b.weight, 0) for b in group)
        if total <= 0:
            return group[self._rng.randrange(len(group))]
        point = self._rng.random() * total
        for b in group:
            point -= max(b.weight, 0)
            if point < 0:
                return b
        return next(b for b in reversed(group) if b.weight > 0)


backend_lists = st.lists(
    st.builds(
        B,
        name=st.sampled_from("abcdef"),
        priority=st.integers(0, 2),
        weight=st.integers(-1, 3),
        models=st.one_of(st.none(), st.dictionaries(st.sampled_from(["gpt-4o", "o1"]), st.just("d"))),
    ),
    min_size=1,
    max_size=5,
    unique_by=lambda b: b.name,
)
# Between plans: an outcome for one backend, time passing, or a reload with other backends.
events = st.lists(
    st.one_of(
        st.tuples(
            st.just("record"),
            st.sampled_from("abcdef"),
            st.sampled_from(["ok", "429", "5xx", "connect_error", "abandoned"]),
        ),
        st.tuples(st.just("advance"), st.sampled_from([0.5, 3, 6, 40])),
        st.tuples(st.just("model"), st.sampled_from(["gpt-4o", "o1", "bad/model"])),
        st.tuples(st.just("replace"), backend_lists),
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(backend_lists, events, st.integers(1, 4))
def test_the_same_attempts_as_the_plain_choice(
    backends: list[B], script: list[tuple[Any, ...]], max_attempts: int
) -> None:
    clock = Clock()
    clock.advance(START)
    pools = [
        kind(
            backends,
            clock,
            60,
            random.Random(7),
            global_deployment=global_deployment,
            max_attempts=max_attempts,
        )
        for kind in (Pool, Reference)
    ]
    model = "gpt-4o"

    def attempts(pool: Pool[B]) -> tuple[Any, ...]:
        try:
            plan = pool.plan(model)
        except ValueError:
            return ("refused",)
        taken = [(a.backend.name, a.deployment, a.number, a.probe) for a in plan]
        for a in plan:  # pragma: no cover - a plan is exhausted above
            taken.append(a.backend.name)
        return (taken, plan.served, plan.attempts, plan.retry_after(), pool._rng.random())

    for event in script:
        if event[0] == "record":
            for pool in pools:
                backend = next((b for b in pool.backends if b.name == event[1]), None)
                if backend is not None:
                    pool.record(Attempt(backend, "gpt-4o", 1, False), event[2], [(b"retry-after", b"4")])
        elif event[0] == "advance":
            clock.advance(event[1])
        elif event[0] == "model":
            model = event[1]
        else:
            for pool in pools:
                pool.replace(event[1])
        assert attempts(pools[0]) == attempts(pools[1])
