"""
Several Azure OpenAI resources behind one proxy (SPEC §11 and §12): where a request goes.

How a backend is chosen, for a request for model M (README, "Several resources"):

- B{Eligible}: the backends that serve M (those with a C{models} table listing M, and every
  backend without one), whose deployment for M is not cooling down after a 429, and whose
  circuit is not open.
- B{Priority, then weight}: the lowest C{priority} number among the eligible backends wins;
  among backends of that priority the choice is a weighted random draw, so a backend of
  C{weight = 2} gets about twice the requests of one of C{weight = 1}.  A higher priority
  number is used only when no backend of a lower one is eligible (or left for this request).
- B{Failover}: until the first byte of the response has gone to the client, a 429, 500, 502,
  503 or 504, a failed connection or a timeout sends the same request to the next backend,
  chosen by the same rule among those this request has not tried, up to C{--max-attempts}
  attempts in all.  Other answers (a 400, say) go to the client at once.
- B{Cooldown}: a 429 takes that backend's deployment out until the time Azure names in
  C{retry-after-ms}, C{x-ms-retry-after-ms} or C{retry-after} (seconds or an HTTP date), else
  for 10 s, never longer than C{--max-cooldown}.  A further 429 can lengthen a cooldown, never
  shorten it.  Other models on that backend are not affected.
- B{Circuit}: failed connections, timeouts and 5xx answers count against the whole backend;
  3 in a row open its circuit: no requests for 5 s.  Then exactly one request is let through
  as a probe; if it fails the backend is out again for twice as long (10 s, 20 s, ... up to
  C{--max-cooldown}); any answer that is not a 5xx closes the circuit.
- B{Nothing left}: a model no backend serves gets 404 C{model_not_found}; when every backend
  for M is cooling down or open, 429 C{all_backends_busy} with C{Retry-After} the seconds
  (rounded up) until the soonest one returns.
- B{Reload}: on SIGHUP, backends that keep their name keep their cooldowns and circuit.

The modules: L{cooldown} (retry headers, cooldowns, circuits; pure), L{pool} (the choice and
the state; pure but for a clock), L{entra} (Entra ID tokens over azure-identity, which is
imported only when a token is first sought).
"""

from aoaiproxy.backends.cooldown import retry_delay
from aoaiproxy.backends.entra import DEFAULT_SCOPE, TokenSource, TokenSources, reactor_threads
from aoaiproxy.backends.pool import (
    Attempt,
    Backend,
    Outcome,
    Plan,
    Pool,
    fails_over,
    outcome_for_status,
)

__all__ = [
    "DEFAULT_SCOPE",
    "Attempt",
    "Backend",
    "Outcome",
    "Plan",
    "Pool",
    "TokenSource",
    "TokenSources",
    "fails_over",
    "outcome_for_status",
    "reactor_threads",
    "retry_delay",
]
