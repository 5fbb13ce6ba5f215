"""
Metrics (SPEC §14): the names, types and labels of the contract, what each call records, the
bounds on label values, the C{/metrics} listener over a real socket, several worker processes
merged into one view, and the example Prometheus/Grafana files naming only exported metrics.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
import yaml
from hypothesis import example as hypothesis_example
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from treq.client import HTTPClient
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from aoaiproxy.metrics import (
    MAX_LABEL_VALUES,
    MULTIPROC_ENV,
    OUTCOMES,
    Metrics,
    NullMetrics,
    Recorder,
    metrics_service,
    metrics_site,
    multiprocess_registry,
    outcome_for_status,
    prepare_multiproc_dir,
    request_route,
    route_label,
    worker_exited,
)

from .conftest import REPO, free_port, get_reactor

# SPEC §14, the contract: name as scraped -> (type, labels).
CONTRACT = {
    "aoaiproxy_requests": ("counter", {"route", "model", "backend", "status"}),
    "aoaiproxy_request_duration_seconds": ("histogram", {"route", "model", "backend"}),
    "aoaiproxy_time_to_first_byte_seconds": ("histogram", {"route", "model", "backend"}),
    "aoaiproxy_upstream_attempts": ("counter", {"backend", "outcome"}),
    "aoaiproxy_tokens": ("counter", {"model", "backend", "client", "type"}),
    "aoaiproxy_backend_available": ("gauge", {"backend"}),
    "aoaiproxy_ratelimit_remaining": ("gauge", {"backend", "deployment", "kind"}),
    "aoaiproxy_open_streams": ("gauge", set()),
    "aoaiproxy_open_connections": ("gauge", set()),
    "aoaiproxy_open_tunnels": ("gauge", set()),
    "aoaiproxy_tunnel_bytes": ("counter", {"direction"}),
}


def exercise(m: Recorder) -> None:
    """Every call once, so that every labelled metric has a sample."""
    m.request_done("/v1/chat/completions", "gpt-4o", "east", 200, 1.5, 0.2)
    m.attempt("east", "ok")
    m.tokens("gpt-4o", "east", "alice", 10, 5)
    m.backend_available("east", True)
    m.ratelimit("east", "prod-4o", Headers({"x-ratelimit-remaining-requests": ["99"]}))
    m.stream_opened()
    m.connection_opened()
    m.tunnel_opened()
    m.tunnel_bytes("up", 1)


def families(registry: CollectorRegistry) -> dict[str, object]:
    return {f.name: f for f in registry.collect()}


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def scrape(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def test_contract_names_types_labels() -> None:
    m = Metrics()
    exercise(m)
    found = {f.name: f for f in m.registry.collect() if f.name.startswith("aoaiproxy_")}
    assert set(found) == set(CONTRACT)
    for name, (kind, labels) in CONTRACT.items():
        family = found[name]
        assert family.type == kind, name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample)
    text = scrape(m.registry)
    for scraped in (
        "aoaiproxy_requests_total",
        "aoaiproxy_tokens_total",
        "aoaiproxy_upstream_attempts_total",
    ):
        assert f"# TYPE {scraped} counter" in text
        assert f"\n{scraped}{{" in text


def test_request_done_counts_and_observes() -> None:
    m = Metrics()
    for _ in range(3):
        m.request_done("/v1/chat/completions", "gpt-4o", "east", 200, 0.3, 0.05)
    m.request_done("/v1/chat/completions", "gpt-4o", "east", 429, 0.01, None)
    m.request_done("CONNECT", "", "", 200, 42.0, None)
    r = m.registry
    labels = {"route": "/v1/chat/completions", "model": "gpt-4o", "backend": "east"}
    assert value(r, "aoaiproxy_requests_total", status="200", **labels) == 3
    assert value(r, "aoaiproxy_requests_total", status="429", **labels) == 1
    assert value(r, "aoaiproxy_requests_total", route="CONNECT", model="", backend="", status="200") == 1
    assert value(r, "aoaiproxy_request_duration_seconds_count", **labels) == 4
    assert value(r, "aoaiproxy_request_duration_seconds_sum", **labels) == pytest.approx(0.91)
    assert value(r, "aoaiproxy_request_duration_seconds_bucket", le="0.25", **labels) == 1
    assert value(r, "aoaiproxy_request_duration_seconds_bucket", le="0.5", **labels) == 4
    # No first byte: no TTFB observation.
    assert value(r, "aoaiproxy_time_to_first_byte_seconds_count", **labels) == 3
    assert value(r, "aoaiproxy_time_to_first_byte_seconds_bucket", le="0.05", **labels) == 3


def test_attempts_tokens_and_tunnels() -> None:
    m = Metrics()
    m.attempt("east", outcome_for_status(429))
    m.attempt("east", outcome_for_status(429))
    m.attempt("west", outcome_for_status(200))
    m.tokens("gpt-4o", "east", "alice", 100, 20)
    m.tokens("gpt-4o", "east", "alice", 1, 2)
    m.tokens("ada", "east", "anonymous", 7, 0)
    m.tunnel_bytes("up", 100)
    m.tunnel_bytes("down", 5000)
    m.tunnel_bytes("down", 1)
    r = m.registry
    assert value(r, "aoaiproxy_upstream_attempts_total", backend="east", outcome="429") == 2
    assert value(r, "aoaiproxy_upstream_attempts_total", backend="west", outcome="ok") == 1
    t = {"model": "gpt-4o", "backend": "east", "client": "alice"}
    assert value(r, "aoaiproxy_tokens_total", type="prompt", **t) == 101
    assert value(r, "aoaiproxy_tokens_total", type="completion", **t) == 22
    e = {"model": "ada", "backend": "east", "client": "anonymous"}
    assert value(r, "aoaiproxy_tokens_total", type="prompt", **e) == 7
    assert value(r, "aoaiproxy_tunnel_bytes_total", direction="up") == 100
    assert value(r, "aoaiproxy_tunnel_bytes_total", direction="down") == 5001


def test_gauges() -> None:
    m = Metrics()
    for _ in range(3):
        m.stream_opened()
        m.connection_opened()
    m.stream_closed()
    m.tunnel_opened()
    m.tunnel_closed()
    m.backend_available("east", False)
    m.backend_available("west", True)
    r = m.registry
    assert value(r, "aoaiproxy_open_streams") == 2
    assert value(r, "aoaiproxy_open_connections") == 3
    assert value(r, "aoaiproxy_open_tunnels") == 0
    assert value(r, "aoaiproxy_backend_available", backend="east") == 0
    assert value(r, "aoaiproxy_backend_available", backend="west") == 1
    m.backend_available("east", True)
    assert value(r, "aoaiproxy_backend_available", backend="east") == 1


def test_ratelimit_from_azure_headers() -> None:
    m = Metrics()
    headers = Headers({"x-ratelimit-remaining-requests": ["119"], "x-ratelimit-remaining-tokens": ["79000"]})
    m.ratelimit("east", "prod-4o", headers)
    m.ratelimit("east", "prod-4o", Headers({"x-ratelimit-remaining-tokens": ["78000"]}))
    m.ratelimit("east", "mini", Headers({"x-ratelimit-remaining-tokens": ["not a number"]}))
    m.ratelimit("east", "mini", Headers())
    r = m.registry
    d = {"backend": "east", "deployment": "prod-4o"}
    assert value(r, "aoaiproxy_ratelimit_remaining", kind="requests", **d) == 119
    assert value(r, "aoaiproxy_ratelimit_remaining", kind="tokens", **d) == 78000
    assert 'deployment="mini"' not in scrape(m.registry)
    # As the upstream client gives them: raw pairs, names as sent, the last value kept.
    m.ratelimit(
        "east",
        "prod-4o",
        [(b"X-RateLimit-Remaining-Requests", b"7"), (b"x-ratelimit-remaining-requests", b"6")],
    )
    assert value(r, "aoaiproxy_ratelimit_remaining", kind="requests", **d) == 6
    assert value(r, "aoaiproxy_ratelimit_remaining", kind="tokens", **d) == 78000


def test_model_label_is_bounded() -> None:
    m = Metrics()
    for i in range(MAX_LABEL_VALUES + 20):
        m.request_done("/v1/embeddings", f"model-{i}", "east", 200, 0.1, 0.1)
        m.tokens(f"model-{i}", "east", "alice", 1, 0)
    m.request_done("/v1/embeddings", "", "east", 400, 0.1, None)  # no model: not counted
    m.request_done("/v1/embeddings", "model-0", "east", 200, 0.1, 0.1)  # known: kept
    m.request_done("/v1/embeddings", "x" * 200, "east", 200, 0.1, 0.1)
    models = {
        s.labels["model"]
        for f in m.registry.collect()
        if f.name in ("aoaiproxy_requests", "aoaiproxy_tokens")
        for s in f.samples
    }
    assert models == {f"model-{i}" for i in range(MAX_LABEL_VALUES)} | {"other", ""}
    r = m.registry
    other = {"route": "/v1/embeddings", "model": "other", "backend": "east", "status": "200"}
    assert value(r, "aoaiproxy_requests_total", **other) == 21
    assert value(r, "aoaiproxy_requests_total", **{**other, "model": "model-0"}) == 2


def test_deployment_label_is_bounded() -> None:
    m = Metrics()
    for i in range(MAX_LABEL_VALUES + 5):
        m.ratelimit("east", f"dep-{i}", Headers({"x-ratelimit-remaining-requests": [str(i)]}))
    deployments = {
        s.labels["deployment"] for s in families(m.registry)["aoaiproxy_ratelimit_remaining"].samples
    }  # type: ignore[attr-defined]
    assert len(deployments) == MAX_LABEL_VALUES + 1
    assert "other" in deployments


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/v1/chat/completions", "/v1/chat/completions"),
        (b"/v1/chat/completions?api-version=1", "/v1/chat/completions"),
        ("/v1/chat/completions/chatcmpl-123/messages", "/v1/chat/completions"),
        ("/v1/completions", "/v1/completions"),
        ("/v1/embeddings", "/v1/embeddings"),
        ("/v1/responses", "/v1/responses"),
        ("/v1/responses/resp_abc/input_items", "/v1/responses"),
        ("/v1/files/file-1/content", "/v1/files"),
        ("/v1/batches/batch_1/cancel", "/v1/batches"),
        ("/v1/fine_tuning/jobs/ftjob-1/events", "/v1/fine_tuning/jobs"),
        ("/v1/vector_stores/vs_1/files", "/v1/vector_stores"),
        ("/v1/models/gpt-4o", "/v1/models"),
        ("/v1/images/generations", "/v1/images/generations"),
        ("/v1/audio/transcriptions", "/v1/audio/transcriptions"),
        ("/openai/deployments/prod/chat/completions", "/openai/*"),
        ("/openai/v1/responses/resp_1", "/openai/*"),
        ("/healthz", "/healthz"),
        ("/aoaiproxy/ca.pem", "/aoaiproxy/ca.pem"),
        ("/v1/chat", "other"),
        ("/v1/unknown/thing", "other"),
        ("/v1", "other"),
        ("/", "other"),
        ("/wp-login.php", "other"),
        ("/openaix", "other"),
        ("*", "other"),
        ("http://api.openai.com/v1/chat/completions", "other"),
    ],
)
def test_route_label(path: str | bytes, label: str) -> None:
    assert route_label(path) == label


SEGMENT = st.sampled_from(["v1", "openai", "chat", "completions", "responses", "r_1", "", "healthz", "?a=b"])


@given(st.lists(SEGMENT, max_size=6), st.integers(0, 300))
@hypothesis_example(["v1", "chat", "completions"], 0)
@hypothesis_example(["v1", "responses", "r_1"], 0)
def test_request_route_of_a_path_is_its_route_label_cached_or_not(segments: list[str], padding: int) -> None:
    """The routes kept for short request-targets are route_label's, on first sight and after."""
    uri = ("/" + "/".join(segments) + "x" * padding).encode()
    assert request_route(b"POST", uri) == route_label(uri)
    assert request_route(b"GET", uri) == route_label(uri)  # (kept, or too long to keep)
    assert request_route(b"CONNECT", uri) == "CONNECT"


def test_outcomes() -> None:
    assert [outcome_for_status(s) for s in (200, 201, 304, 400, 401, 404, 429, 500, 503)] == [
        "ok",
        "ok",
        "ok",
        "4xx",
        "4xx",
        "4xx",
        "429",
        "5xx",
        "5xx",
    ]
    assert set(OUTCOMES) == {"ok", "429", "5xx", "4xx", "connect_error", "timeout"}


def test_null_metrics_has_every_call() -> None:
    """NullMetrics and Metrics offer the same calls (the request path may hold either)."""

    def calls(cls: type) -> set[str]:
        return {n for n in vars(cls) if not n.startswith("_") and callable(getattr(cls, n))}

    assert calls(NullMetrics) == calls(Metrics)
    exercise(NullMetrics())


def test_instances_do_not_share_a_registry() -> None:
    a, b = Metrics(), Metrics()
    a.attempt("east", "ok")
    assert value(b.registry, "aoaiproxy_upstream_attempts_total", backend="east", outcome="ok") is None


def test_multiprocess_env_set_after_import_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    with pytest.raises(RuntimeError, match=MULTIPROC_ENV):
        Metrics()


# The /metrics listener, over a real socket.


@pytest_twisted.ensureDeferred
async def test_metrics_site_serves_text_format(client: HTTPClient) -> None:
    m = Metrics()
    exercise(m)
    port = await TCP4ServerEndpoint(get_reactor(), 0, interface="127.0.0.1").listen(metrics_site(m.registry))
    try:
        url = f"http://127.0.0.1:{port.getHost().port}"
        response = await client.get(url + "/metrics")
        assert response.code == 200
        assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain; version=")
        body = (await response.content()).decode()
        parsed = {f.name: f for f in text_string_to_metric_families(body)}
        requests = parsed["aoaiproxy_requests"]
        assert requests.type == "counter"
        assert [s.value for s in requests.samples if s.name == "aoaiproxy_requests_total"] == [1.0]
        assert "process_open_fds" in parsed
        assert "_created" not in body  # no second series per child
        # A scraper that asks for gzip gets it (a plain Agent: treq would decode it).
        agent = Agent(get_reactor(), pool=HTTPConnectionPool(get_reactor(), persistent=False))
        gzipped = await agent.request(
            b"GET", (url + "/metrics").encode(), Headers({"Accept-Encoding": ["gzip"]})
        )
        raw = await readBody(gzipped)
        assert gzipped.headers.getRawHeaders(b"content-encoding") == [b"gzip"]
        assert gzip.decompress(raw).decode().count("aoaiproxy_requests_total{") == 1
        for other in ("/", "/v1/chat/completions", "/metricsx"):
            response = await client.get(url + other)
            assert response.code == 404, other
            await response.content()
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_metrics_service_listens_on_its_endpoint(client: HTTPClient) -> None:
    m = Metrics()
    m.attempt("east", "timeout")
    port = free_port()
    service = metrics_service(f"tcp:{port}:interface=127.0.0.1", m.registry, get_reactor())
    service.startService()
    try:
        response = await client.get(f"http://127.0.0.1:{port}/metrics")
        body = (await response.content()).decode()
        assert response.code == 200
        assert 'aoaiproxy_upstream_attempts_total{backend="east",outcome="timeout"} 1.0' in body
    finally:
        await service.stopService()


# Several worker processes, one view.

WORKER = """
import os, sys
from twisted.web.http_headers import Headers
from aoaiproxy.metrics import Metrics

m = Metrics()
n, up, remaining = int(sys.argv[1]), sys.argv[2] == "up", sys.argv[3]
for _ in range(n):
    m.request_done("/v1/chat/completions", "gpt-4o", "east", 200, 0.3, 0.1)
    m.tokens("gpt-4o", "east", "alice", 10, 1)
    m.stream_opened()
m.stream_closed()
m.connection_opened()
m.attempt("east", "429")
m.backend_available("east", up)
m.ratelimit("east", "prod-4o", Headers({"x-ratelimit-remaining-requests": [remaining]}))
print(os.getpid())
"""


def run_worker(directory: Path, *args: str) -> int:
    env = {**os.environ, MULTIPROC_ENV: str(directory), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", WORKER, *args], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    return int(done.stdout)


def merged(directory: Path) -> CollectorRegistry:
    """The workers' files merged as the parent serves them (no sample has a pid label)."""
    registry = multiprocess_registry(str(directory))
    for family in text_string_to_metric_families(scrape(registry)):
        for sample in family.samples:
            assert "pid" not in sample.labels, sample
    return registry


def test_workers_merge_without_pid(tmp_path: Path) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_1.db").write_bytes(b"stale from a previous run")
    env = prepare_multiproc_dir(str(directory))
    assert env == {MULTIPROC_ENV: str(directory)}
    assert list(directory.iterdir()) == []

    first = run_worker(directory, "3", "up", "100")
    second = run_worker(directory, "2", "down", "50")
    assert first != second
    r = merged(directory)
    chat = {"route": "/v1/chat/completions", "model": "gpt-4o", "backend": "east"}
    tokens = {"model": "gpt-4o", "backend": "east", "client": "alice", "type": "prompt"}
    limit = {"backend": "east", "deployment": "prod-4o", "kind": "requests"}
    assert value(r, "aoaiproxy_requests_total", status="200", **chat) == 5
    assert value(r, "aoaiproxy_request_duration_seconds_count", **chat) == 5
    assert value(r, "aoaiproxy_tokens_total", **tokens) == 50
    assert value(r, "aoaiproxy_upstream_attempts_total", backend="east", outcome="429") == 2
    assert value(r, "aoaiproxy_open_streams") == (3 - 1) + (2 - 1)
    assert value(r, "aoaiproxy_open_connections") == 2
    assert value(r, "aoaiproxy_backend_available", backend="east") == 0  # the minimum
    assert value(r, "aoaiproxy_ratelimit_remaining", **limit) == 50  # the latest (second ran last)

    # A worker that died: its open counts and backend view go, what it served stays.
    worker_exited(str(directory), second)
    r = merged(directory)
    assert value(r, "aoaiproxy_requests_total", status="200", **chat) == 5
    assert value(r, "aoaiproxy_open_streams") == 2
    assert value(r, "aoaiproxy_backend_available", backend="east") == 1
    assert value(r, "aoaiproxy_ratelimit_remaining", **limit) == 100


# The example monitoring files name only metrics the daemon exports.

EXAMPLES = REPO / "examples"
#: Series Prometheus makes itself for every target.
SYNTHETIC = {"up"}
_METRIC = re.compile(r"\b(?:aoaiproxy|process|up)\w*\b")


def exported_names() -> set[str]:
    m = Metrics()
    exercise(m)
    return {s.name for f in m.registry.collect() for s in f.samples}


def expressions() -> list[tuple[str, str]]:
    """(file, expression) for every PromQL expression in the example files."""
    found = []
    alerts = yaml.safe_load((EXAMPLES / "prometheus" / "alerts.yml").read_text())
    for group in alerts["groups"]:
        for rule in group["rules"]:
            found.append(("alerts.yml", rule["expr"]))
    dashboard = json.loads((EXAMPLES / "grafana" / "aoaiproxy.json").read_text())

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, item in node.items():
                if key in ("expr", "definition") and isinstance(item, str):
                    found.append(("aoaiproxy.json", item))
                walk(item)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard)
    return found


def test_example_files_name_only_exported_metrics() -> None:
    exported = exported_names() | SYNTHETIC
    exprs = expressions()
    assert len(exprs) > 20
    used = set()
    for where, expr in exprs:
        # Label values and matchers are strings: only what is outside quotes names metrics.
        bare = re.sub(r'"[^"]*"', '""', expr)
        names = set(_METRIC.findall(bare))
        assert names, f"{where}: no aoaiproxy metric in {expr!r}"
        assert names <= exported, f"{where}: {sorted(names - exported)} not exported, in {expr!r}"
        used |= names
    # Every metric of the contract shows somewhere.
    for name in CONTRACT:
        assert any(u.startswith(name) for u in used), name


def test_prometheus_config_scrapes_metrics_and_loads_the_rules() -> None:
    config = yaml.safe_load((EXAMPLES / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"


def test_readme_metrics_section() -> None:
    """The README's Metrics section: valid reStructuredText, every metric of the contract."""
    import docutils.core

    readme = (REPO / "README.rst").read_text()
    text = readme.split("\nMetrics\n-------\n", 1)[1].split("\n-----", 1)[0].rsplit("\n", 1)[0]
    docutils.core.publish_doctree(text, settings_overrides={"report_level": 2, "halt_level": 2})
    for name, (kind, _) in CONTRACT.items():
        scraped = name + "_total" if kind == "counter" else name
        assert f"``{scraped}``" in text, name
    for example in ("prometheus/prometheus.yml", "prometheus/alerts.yml", "grafana/aoaiproxy.json"):
        assert f"``examples/{example}``" in text and (EXAMPLES / example).exists(), example
