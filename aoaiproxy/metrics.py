"""
Prometheus metrics (SPEC §14): the metric objects, the cheap calls the request path makes, and
the C{/metrics} listener.

The request path holds a L{Recorder} -- a L{Metrics}, or L{NullMetrics} when C{--metrics-listen}
is off -- and calls it on the reactor thread:

    - L{Recorder.request_done} once per request, with its L{route_label};
    - L{Recorder.attempt} once per upstream attempt, with its L{outcome_for_status} (or
      L{OUTCOME_CONNECT_ERROR}, L{OUTCOME_TIMEOUT});
    - L{Recorder.tokens} when a response's usage is known (L{aoaiproxy.usage});
    - L{Recorder.backend_available} when a backend's state changes;
    - L{Recorder.ratelimit} with each upstream response's headers;
    - the C{*_opened}/C{*_closed} pairs and L{Recorder.tunnel_bytes}.

Labelled children are looked up once per label tuple and kept, so a call costs a dict lookup
and the counter's own increments.  Label values are bounded: C{route} by L{route_label},
C{model} and C{deployment} by L{MAX_LABEL_VALUES} (then C{other}); backends, clients, outcomes
and statuses come from the configuration or a small set.

Several worker processes (SPEC §15) use prometheus_client's multiprocess mode: the parent calls
L{prepare_multiproc_dir} and starts each worker with the environment it returns (the variable
must be set before prometheus_client is imported), calls L{worker_exited} when one dies, and
serves L{multiprocess_registry}.  Counters and histograms are summed over the workers, open
counts too (C{livesum}), C{aoaiproxy_backend_available} is their minimum (C{livemin}), and
C{aoaiproxy_ratelimit_remaining} is the value Azure sent last to any worker (C{livemostrecent}).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    values,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from twisted.application import service, strports
from twisted.web import pages
from twisted.web.resource import EncodingResourceWrapper, IResource, Resource
from twisted.web.server import GzipEncoderFactory, Request, Site

from aoaiproxy.backends.cooldown import ResponseHeaders, header_pairs

__all__ = [
    "CLIENT_ANONYMOUS",
    "MAX_LABEL_VALUES",
    "MULTIPROC_ENV",
    "OTHER",
    "OUTCOMES",
    "Metrics",
    "NullMetrics",
    "Recorder",
    "metrics_service",
    "metrics_site",
    "multiprocess_registry",
    "outcome_for_status",
    "prepare_multiproc_dir",
    "request_route",
    "route_label",
    "worker_exited",
]

#: The environment variable that turns on prometheus_client's multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: At most this many distinct C{model} (and C{deployment}) label values; later ones are L{OTHER}.
MAX_LABEL_VALUES = 100
#: The label value that stands for every value past the bound, and for an unknown route.
OTHER = "other"
#: A label value longer than this is L{OTHER} (a model name is at most 64 characters).
MAX_LABEL_LENGTH = 128

ROUTE_CONNECT = "CONNECT"
ROUTE_FORWARD = "forward"
ROUTE_PASSTHROUGH = "/openai/*"

OUTCOME_OK = "ok"
OUTCOME_429 = "429"
OUTCOME_5XX = "5xx"
OUTCOME_4XX = "4xx"
OUTCOME_CONNECT_ERROR = "connect_error"
OUTCOME_TIMEOUT = "timeout"
OUTCOMES = (OUTCOME_OK, OUTCOME_429, OUTCOME_5XX, OUTCOME_4XX, OUTCOME_CONNECT_ERROR, OUTCOME_TIMEOUT)

#: C{client} when the proxy has no client keys (SPEC §14).
CLIENT_ANONYMOUS = "anonymous"

#: Seconds; an LLM request can take minutes (the upstream timeout defaults to 600 s).
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TTFB_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)

# Routes by their first segments after /v1/: ids and sub-resources after them are cut off.
_V1_TWO = frozenset(
    {
        ("chat", "completions"),
        ("images", "generations"),
        ("images", "edits"),
        ("images", "variations"),
        ("audio", "transcriptions"),
        ("audio", "translations"),
        ("audio", "speech"),
        ("fine_tuning", "jobs"),
        ("fine_tuning", "checkpoints"),
    }
)
_V1_ONE = frozenset(
    {
        "completions",
        "embeddings",
        "responses",
        "files",
        "batches",
        "vector_stores",
        "models",
        "moderations",
        "uploads",
        "assistants",
        "threads",
        "conversations",
        "containers",
        "evals",
        "realtime",
    }
)
_LOCAL = frozenset({"/healthz", "/aoaiproxy/ca.pem"})


def route_label(path: str | bytes) -> str:
    """
    The C{route} label of an origin-form request: its path without query and ids
    (C{/v1/responses/resp_1/input_items} is C{/v1/responses}), C{/openai/*} for Azure-shaped
    passthrough, C{other} for any path the proxy does not serve, so that the label stays
    bounded.  The proxy role uses L{ROUTE_CONNECT} and L{ROUTE_FORWARD} instead.
    """
    if isinstance(path, bytes):
        path = path.decode("latin-1")
    path = path.split("?", 1)[0]
    if path.startswith("/v1/"):
        parts = path[4:].split("/", 2)
        if len(parts) >= 2 and (parts[0], parts[1]) in _V1_TWO:
            return f"/v1/{parts[0]}/{parts[1]}"
        if parts[0] in _V1_ONE:
            return "/v1/" + parts[0]
        return OTHER
    if path == "/openai" or path.startswith("/openai/"):
        return ROUTE_PASSTHROUGH
    if path in _LOCAL:
        return path
    return OTHER


#: The longest origin-form request-target whose route is kept (L{_origin_route}).
_CACHED_TARGET = 256


@functools.lru_cache(maxsize=256)
def _origin_route(uri: bytes) -> str:
    """L{route_label} of the last 256 short request-targets: clients send the same few."""
    return route_label(uri)


def request_route(method: bytes, uri: bytes) -> str:
    """
    The C{route} label of any request the site served: L{ROUTE_CONNECT} for a C{CONNECT},
    L{ROUTE_FORWARD} for an absolute-form request relayed as a forward proxy (one for the API,
    C{http://api.openai.com/v1/...}, was rewritten to origin-form and is labelled by its
    path), L{route_label} of an origin-form path, C{other} for anything else (a request line
    never read).
    """
    if method == b"CONNECT":
        return ROUTE_CONNECT
    if uri[:1] == b"/":
        return _origin_route(uri) if len(uri) <= _CACHED_TARGET else route_label(uri)
    if b"://" in uri:
        return ROUTE_FORWARD
    return OTHER


def outcome_for_status(status: int) -> str:
    """The C{outcome} label of an upstream attempt that got a response with C{status}."""
    if status == 429:
        return OUTCOME_429
    if status >= 500:
        return OUTCOME_5XX
    if status >= 400:
        return OUTCOME_4XX
    return OUTCOME_OK


class Recorder(Protocol):
    """The calls the request path makes; L{Metrics} records them, L{NullMetrics} does not."""

    #: Whether the calls record anything: when not, a caller need not work out their
    #: arguments (a request's labels, a backend's availability).
    recording: bool

    def request_done(
        self, route: str, model: str, backend: str, status: int, duration: float, ttfb: float | None
    ) -> None:
        """
        A request is over (its last byte sent, or the client gone).  C{model} and C{backend}
        are C{""} when the request had none; C{ttfb} is the seconds to the first response
        byte, C{None} when none was sent.
        """

    def attempt(self, backend: str, outcome: str) -> None:
        """One upstream attempt on C{backend} ended with C{outcome} (one of L{OUTCOMES})."""

    def tokens(self, model: str, backend: str, client: str, prompt: int, completion: int) -> None:
        """A response's token usage (C{client}: the client key's name, or C{anonymous})."""

    def backend_available(self, name: str, up: bool) -> None:
        """Whether a backend may take requests now (not cooling down, circuit closed)."""

    def ratelimit(self, backend: str, deployment: str, headers: ResponseHeaders) -> None:
        """Azure's C{x-ratelimit-remaining-requests}/C{-tokens} on a response, if present."""

    def stream_opened(self) -> None: ...
    def stream_closed(self) -> None: ...
    def connection_opened(self) -> None: ...
    def connection_closed(self) -> None: ...
    def tunnel_opened(self) -> None: ...
    def tunnel_closed(self) -> None: ...

    def tunnel_bytes(self, direction: str, n: int) -> None:
        """C{n} bytes relayed through a tunnel, C{direction} C{up} (to the target) or C{down}."""


class NullMetrics:
    """A L{Recorder} that records nothing (C{--metrics-listen} off)."""

    recording = False

    def request_done(
        self, route: str, model: str, backend: str, status: int, duration: float, ttfb: float | None
    ) -> None:
        pass

    def attempt(self, backend: str, outcome: str) -> None:
        pass

    def tokens(self, model: str, backend: str, client: str, prompt: int, completion: int) -> None:
        pass

    def backend_available(self, name: str, up: bool) -> None:
        pass

    def ratelimit(self, backend: str, deployment: str, headers: ResponseHeaders) -> None:
        pass

    def stream_opened(self) -> None:
        pass

    def stream_closed(self) -> None:
        pass

    def connection_opened(self) -> None:
        pass

    def connection_closed(self) -> None:
        pass

    def tunnel_opened(self) -> None:
        pass

    def tunnel_closed(self) -> None:
        pass

    def tunnel_bytes(self, direction: str, n: int) -> None:
        pass


class _Bounded:
    """Keeps the first C{limit} distinct values of a label; later ones are L{OTHER}."""

    __slots__ = ("_limit", "_seen")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = {""}

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        # The set also holds "", so the bound counts real values only.
        if len(self._seen) > self._limit or len(value) > MAX_LABEL_LENGTH:
            return OTHER
        self._seen.add(value)
        return value


_RATELIMIT_HEADERS = (
    (b"x-ratelimit-remaining-requests", "requests"),
    (b"x-ratelimit-remaining-tokens", "tokens"),
)


def multiprocess_enabled() -> bool:
    """Whether prometheus_client was imported in multiprocess mode (L{MULTIPROC_ENV} set)."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


class Metrics:
    """
    Every metric of SPEC §14 on a registry of its own (L{registry}), and the L{Recorder} calls
    that update them.  In a worker of several (multiprocess mode) the values also go to the
    shared directory, where L{multiprocess_registry} merges them; one L{Metrics} per process
    then, since two would write the same entries.
    """

    recording = True

    def __init__(self, *, process_metrics: bool = True) -> None:
        self.multiprocess = multiprocess_enabled()
        if os.environ.get(MULTIPROC_ENV) and not self.multiprocess:
            raise RuntimeError(f"{MULTIPROC_ENV} must be set before prometheus_client is first imported")
        # Text format has no use for a second C{_created} series per child (it doubles the
        # series Prometheus stores).  Process-wide; the daemon's registries are its own.
        disable_created_metrics()
        self.registry = registry = CollectorRegistry(auto_describe=True)
        if process_metrics and not self.multiprocess:
            # process_open_fds and friends: the process's descriptors bound its streams (§15).
            ProcessCollector(registry=registry)
        self._requests = Counter(
            "aoaiproxy_requests",
            "Requests answered, by client route, model, backend and status.",
            ("route", "model", "backend", "status"),
            registry=registry,
        )
        self._duration = Histogram(
            "aoaiproxy_request_duration_seconds",
            "Seconds from a request's arrival to its response's last byte.",
            ("route", "model", "backend"),
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self._ttfb = Histogram(
            "aoaiproxy_time_to_first_byte_seconds",
            "Seconds from a request's arrival to its response's first byte (a stream's first chunk).",
            ("route", "model", "backend"),
            buckets=TTFB_BUCKETS,
            registry=registry,
        )
        self._attempts = Counter(
            "aoaiproxy_upstream_attempts",
            "Upstream attempts, by backend and outcome (ok, 429, 5xx, 4xx, connect_error, timeout).",
            ("backend", "outcome"),
            registry=registry,
        )
        self._tokens = Counter(
            "aoaiproxy_tokens",
            "Tokens reported by the responses' usage, by model, backend, client and type.",
            ("model", "backend", "client", "type"),
            registry=registry,
        )
        self._available = Gauge(
            "aoaiproxy_backend_available",
            "1 when a backend takes requests, 0 while it cools down or its circuit is open.",
            ("backend",),
            registry=registry,
            multiprocess_mode="livemin",
        )
        self._remaining = Gauge(
            "aoaiproxy_ratelimit_remaining",
            "Azure's x-ratelimit-remaining-requests/-tokens on the latest response.",
            ("backend", "deployment", "kind"),
            registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self._open_streams = Gauge(
            "aoaiproxy_open_streams",
            "Streamed responses being relayed now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._open_connections = Gauge(
            "aoaiproxy_open_connections",
            "Client connections open now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._open_tunnels = Gauge(
            "aoaiproxy_open_tunnels",
            "CONNECT tunnels open now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        tunnel_bytes = Counter(
            "aoaiproxy_tunnel_bytes",
            "Bytes relayed through CONNECT tunnels, up (to the target) and down.",
            ("direction",),
            registry=registry,
        )
        self._tunnel_bytes = {d: tunnel_bytes.labels(d) for d in ("up", "down")}
        self._models = _Bounded(MAX_LABEL_VALUES)
        self._deployments = _Bounded(MAX_LABEL_VALUES)
        # Children by label tuple: one dict lookup per call once a combination is known.
        self._request_children: dict[tuple[str, str, str, int], tuple[Any, Any, Any]] = {}
        self._attempt_children: dict[tuple[str, str], Any] = {}
        self._token_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._available_children: dict[str, Any] = {}
        self._remaining_children: dict[tuple[str, str, str], Any] = {}

    def request_done(
        self, route: str, model: str, backend: str, status: int, duration: float, ttfb: float | None
    ) -> None:
        key = (route, self._models(model), backend, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self._requests.labels(route, key[1], backend, str(status)),
                self._duration.labels(route, key[1], backend),
                self._ttfb.labels(route, key[1], backend),
            )
        count, durations, ttfbs = children
        count.inc()
        durations.observe(duration)
        if ttfb is not None:
            ttfbs.observe(ttfb)

    def attempt(self, backend: str, outcome: str) -> None:
        key = (backend, outcome)
        child = self._attempt_children.get(key)
        if child is None:
            child = self._attempt_children[key] = self._attempts.labels(backend, outcome)
        child.inc()

    def tokens(self, model: str, backend: str, client: str, prompt: int, completion: int) -> None:
        key = (self._models(model), backend, client)
        children = self._token_children.get(key)
        if children is None:
            children = self._token_children[key] = (
                self._tokens.labels(key[0], backend, client, "prompt"),
                self._tokens.labels(key[0], backend, client, "completion"),
            )
        if prompt > 0:
            children[0].inc(prompt)
        if completion > 0:
            children[1].inc(completion)

    def backend_available(self, name: str, up: bool) -> None:
        child = self._available_children.get(name)
        if child is None:
            child = self._available_children[name] = self._available.labels(name)
        child.set(1 if up else 0)

    def ratelimit(self, backend: str, deployment: str, headers: ResponseHeaders) -> None:
        # The last value of each name (as Headers.getRawHeaders(name)[-1] would give).
        last = {name.lower(): value for name, value in header_pairs(headers)}
        for header, kind in _RATELIMIT_HEADERS:
            raw = last.get(header)
            if raw is None:
                continue
            try:
                value = float(raw)
            except (TypeError, ValueError):
                continue
            key = (backend, self._deployments(deployment), kind)
            child = self._remaining_children.get(key)
            if child is None:
                child = self._remaining_children[key] = self._remaining.labels(*key)
            child.set(value)

    def stream_opened(self) -> None:
        self._open_streams.inc()

    def stream_closed(self) -> None:
        self._open_streams.dec()

    def connection_opened(self) -> None:
        self._open_connections.inc()

    def connection_closed(self) -> None:
        self._open_connections.dec()

    def tunnel_opened(self) -> None:
        self._open_tunnels.inc()

    def tunnel_closed(self) -> None:
        self._open_tunnels.dec()

    def tunnel_bytes(self, direction: str, n: int) -> None:
        self._tunnel_bytes[direction].inc(n)


# Several processes.


def prepare_multiproc_dir(path: str) -> Mapping[str, str]:
    """
    Make C{path} ready for a new set of workers: create it, remove the files of a previous run
    (their counters would be added to this one's).  Returns the environment a worker needs.
    """
    os.makedirs(path, mode=0o700, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.remove(os.path.join(path, name))
    return {MULTIPROC_ENV: path}


def worker_exited(path: str, pid: int) -> None:
    """
    A worker is gone: its open counts and per-backend gauges no longer count (its counters
    and histograms do: what it served was served).
    """
    mark_process_dead(pid, path)


def multiprocess_registry(path: str) -> CollectorRegistry:
    """The registry that merges the workers' files in C{path}, for the C{/metrics} listener."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    return registry


# The /metrics listener.


class MetricsResource(Resource):
    """C{GET /metrics}: the registry in Prometheus' text format."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        body = generate_latest(self._registry)
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return body


class _Root(Resource):
    """C{/metrics}, and 404 for anything else."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.putChild(b"metrics", EncodingResourceWrapper(MetricsResource(registry), [GzipEncoderFactory()]))

    def getChild(self, path: bytes, request: Any) -> IResource:
        return pages.notFound()

    def render(self, request: Any) -> bytes:
        rendered: bytes = pages.notFound().render(request)
        return rendered


class _MetricsSite(Site):
    """The metrics listener's site: quiet (a scrape every few seconds is not news)."""

    noisy = False
    displayTracebacks = False

    def log(self, request: Any) -> None:
        pass


def metrics_site(registry: CollectorRegistry) -> Site:
    """The HTTP site that serves C{registry} at C{/metrics} (gzip when the scraper asks)."""
    return _MetricsSite(_Root(registry))


def metrics_service(description: str, registry: CollectorRegistry, reactor: Any) -> service.IService:
    """
    The listener of C{--metrics-listen ENDPOINT} (a Twisted endpoint string), serving
    C{registry}: a L{Metrics}' own, or L{multiprocess_registry} over the workers.  As
    C{strports.service}: a listener that cannot bind stops twistd.
    """
    listening: service.IService = strports.service(description, metrics_site(registry), reactor=reactor)
    return listening
