"""
Several backends in the request path (SPEC §11, §12), in this process over real loopback sockets
against several fake Azure resources: choice by priority and weight, failover with the same
body bytes (a v1 body spliced per backend, a large multipart body replayed from its file), the
last upstream answer, 429 all_backends_busy, 404 model_not_found, connection failures and
timeouts, a client that leaves, /v1/models, and Entra ID tokens (refresh after a 401, 503
token_unavailable, the wait for the first token).
"""

from __future__ import annotations

import io
import json
import math
import random
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from aoaiproxy import errors, rewrite
from aoaiproxy.backends import TokenSources
from aoaiproxy.backends.cooldown import header_pairs
from aoaiproxy.config import LiveConfig, load_config
from aoaiproxy.forward import Forwarder
from aoaiproxy.gateway import Attempts, Backends, ReplayBody
from aoaiproxy.log import ACCESS_NAMESPACE
from aoaiproxy.metrics import NullMetrics
from aoaiproxy.resource import ApiResource
from aoaiproxy.site import ProxySite
from aoaiproxy.testing import FakeAzure
from aoaiproxy.upstream import UpstreamClient

from .conftest import free_port, wait_until
from .rawnet import get_reactor

CLIENT_KEY = "sk-client-gateway-5c1f"
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


@attrs.define
class Gateway:
    port: IListeningPort
    live: LiveConfig
    backends: Backends
    upstream: UpstreamClient
    access: list[dict[str, Any]] = attrs.Factory(list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"

    async def post(
        self, path: str, body: Any = CHAT, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, bytes]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        h = {"Content-Type": "application/json", "Authorization": f"Bearer {CLIENT_KEY}", **(headers or {})}
        response = await treq.post(self.url + path, data=data, headers=h)
        return response.code, response.headers, await response.content()

    def line(self, n: int = -1) -> dict[str, Any]:
        """The C{n}th access line's fields."""
        return self.access[n]


def backend_table(name: str, fake: FakeAzure, **keys: Any) -> str:
    lines = [f'[[backend]]\nname = "{name}"\nendpoint = "{fake.url}"']
    if keys.pop("entra", False):
        lines.append('auth = "entra"')
    else:
        lines.append(f'api_key = "key-{name}"')
    for key, value in keys.items():
        if isinstance(value, dict):
            pairs = ", ".join(f'"{m}" = "{d}"' for m, d in value.items())
            lines.append(f"{key} = {{ {pairs} }}")
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


@pytest_twisted.async_yield_fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Callable[..., Gateway]]:
    """
    C{gateway(toml, tokens=None, seed=1, **flags)} starts a proxy whose config file holds
    C{toml} (backend tables) and a client key.
    """
    reactor = get_reactor()
    started: list[Gateway] = []
    keys = tmp_path / "client-keys"
    keys.write_text(f"app:{CLIENT_KEY}\n")

    def make(
        toml: str, tokens: TokenSources | None = None, seed: int = 1, recorder: Any = None, **flags: Any
    ) -> Gateway:
        path = tmp_path / f"config-{len(started)}.toml"
        path.write_text(f'client_keys_file = "{keys}"\n' + toml)
        live = LiveConfig(load_config({"config": str(path), **flags}, {}))
        upstream = UpstreamClient(reactor)
        backends = Backends(live, reactor, tokens=tokens, rng=random.Random(seed), recorder=recorder)
        backends.start()
        resource = ApiResource(live, upstream, reactor, backends=backends)
        site = ProxySite(resource, live, reactor, Forwarder(reactor, live, upstream=upstream))
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        gw = Gateway(port, live, backends, upstream)

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == ACCESS_NAMESPACE and "access" in event:
                gw.access.append(event["access"])

        globalLogPublisher.addObserver(observe)
        observers.append(observe)
        started.append(gw)
        return gw

    observers: list[Any] = []
    yield make
    for observe in observers:
        globalLogPublisher.removeObserver(observe)
    for gw in started:
        gw.backends.stop()
        await gw.port.stopListening()
        await gw.upstream.close()


def instances(*fakes: FakeAzure) -> list[str]:
    return [r.instance for f in fakes for r in f.requests]


# -- choice -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_requests_spread_by_weight(
    regions: dict[str, FakeAzure], gateway: Callable[..., Gateway]
) -> None:
    east, west = regions["east"], regions["west"]
    gw = gateway(backend_table("east", east, weight=3) + backend_table("west", west, weight=1))
    served = []
    for _ in range(80):
        code, headers, _ = await gw.post("/v1/embeddings", {"model": "emb", "input": "x"})
        assert code == 200
        served.append(headers.getRawHeaders("x-aoaiproxy-backend")[0])
    assert served.count("east") + served.count("west") == 80
    assert 48 <= served.count("east") <= 72  # about 3/4
    assert len(east.requests) == served.count("east")
    assert {r.header("api-key") for r in east.requests} == {"key-east"}
    assert {r.header("api-key") for r in west.requests} == {"key-west"}
    assert gw.line()["backend"] == served[-1] and gw.line()["attempts"] == 1


@pytest_twisted.ensureDeferred
async def test_lower_priority_number_first_and_failover_on_429_with_the_same_bytes(
    regions: dict[str, FakeAzure], gateway: Callable[..., Gateway]
) -> None:
    east, west = regions["east"], regions["west"]
    gw = gateway(backend_table("east", east, priority=0) + backend_table("west", west, priority=1))
    code, headers, _ = await gw.post("/v1/chat/completions")
    assert code == 200 and headers.getRawHeaders("x-aoaiproxy-backend") == ["east"]

    east.throttle(count=1, retry_after_ms=60_000)
    body = json.dumps(CHAT, indent=2).encode() + b"  "
    code, headers, content = await gw.post("/v1/chat/completions?x=1", body)
    assert code == 200, content
    assert headers.getRawHeaders("x-aoaiproxy-backend") == ["west"]
    assert json.loads(content)["object"] == "chat.completion"
    assert east.requests[-1].body == west.requests[-1].body == body
    assert east.requests[-1].raw_uri == west.requests[-1].raw_uri
    line = gw.line()
    assert (line["backend"], line["attempts"], line["deployment"], line["status"]) == (
        "west",
        2,
        "gpt-4o",
        200,
    )

    # east cools down for a minute: west serves, east sees nothing.
    for _ in range(3):
        code, headers, _ = await gw.post("/v1/chat/completions")
        assert headers.getRawHeaders("x-aoaiproxy-backend") == ["west"]
    assert len(east.requests) == 2
    # Another model on east is not cooling.
    code, headers, _ = await gw.post("/v1/chat/completions", {**CHAT, "model": "gpt-4o-mini"})
    assert headers.getRawHeaders("x-aoaiproxy-backend") == ["east"]


@pytest_twisted.ensureDeferred
async def test_v1_body_gets_each_backends_deployment(
    regions: dict[str, FakeAzure], gateway: Callable[..., Gateway]
) -> None:
    east, west = regions["east"], regions["west"]
    gw = gateway(
        backend_table("east", east, priority=0, models={"gpt-4o": "east-4o"})
        + backend_table("west", west, priority=1, models={"gpt-4o": "west-4o"})
    )
    east.fail(503, count=1)
    body = b'{"input": "\\ud83d 1e400", "model" : "gpt-4o", "n": 1E2}'
    code, headers, _ = await gw.post("/v1/responses", body)
    assert code == 200 and headers.getRawHeaders("x-aoaiproxy-backend") == ["west"]
    assert east.requests[-1].body == body.replace(b'"gpt-4o"', b'"east-4o"')
    assert west.requests[-1].body == body.replace(b'"gpt-4o"', b'"west-4o"')
    code, _, _ = await gw.post("/v1/chat/completions")
    assert code == 200
    assert east.requests[-1].path == "/openai/deployments/east-4o/chat/completions"
    assert gw.line()["deployment"] == "east-4o"


@pytest_twisted.ensureDeferred
async def test_a_large_multipart_body_is_replayed_from_its_file(
    regions: dict[str, FakeAzure], gateway: Callable[..., Gateway]
) -> None:
    east, west = regions["east"], regions["west"]
    gw = gateway(backend_table("east", east, priority=0) + backend_table("west", west, priority=1))
    audio = bytes(i * 31 % 256 for i in range(400_000))  # over twisted.web's in-memory limit
    boundary = "b0undary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + audio
        + f"\r\n--{boundary}--\r\n".encode()
    )
    east.fail(500, count=1)
    code, headers, content = await gw.post(
        "/v1/audio/transcriptions", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert code == 200, content
    assert headers.getRawHeaders("x-aoaiproxy-backend") == ["west"]
    assert east.requests[-1].body == body and west.requests[-1].body == body
    assert west.requests[-1].path == "/openai/deployments/whisper/audio/transcriptions"


# -- when nothing is left -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_last_upstream_answer_unchanged_then_all_backends_busy(
    regions: dict[str, FakeAzure], gateway: Callable[..., Gateway]
) -> None:
    east, west = regions["east"], regions["west"]
    gw = gateway(backend_table("east", east, priority=0) + backend_table("west", west, priority=1))
    east.fail(503, count=1)
    west.throttle(count=1, retry_after_ms=2900, headers={"x-west": "yes"})
    before = time.time()
    code, headers, content = await gw.post("/v1/chat/completions")
    after = time.time()
    assert code == 429
    assert headers.getRawHeaders("x-west") == ["yes"] and headers.getRawHeaders("retry-after-ms") == ["2900"]
    assert headers.getRawHeaders("x-aoaiproxy-backend") == ["west"]
    assert json.loads(content)["error"]["code"] == "429"  # Azure's body, as it came
    assert gw.line()["attempts"] == 2

    # west cools for 2.9 s; east's circuit counts one failure but is closed: east is tried.
    code, headers, _ = await gw.post("/v1/chat/completions")
    assert code == 200 and headers.getRawHeaders("x-aoaiproxy-backend") == ["east"]

    east.throttle(count=1, retry_after_ms=2900)
    code, _, _ = await gw.post("/v1/chat/completions")
    assert code == 429  # east's own, west still cooling
    seen = len(instances(east, west))
    start = time.time()
    code, headers, content = await gw.post("/v1/chat/completions")
    end = time.time()
    assert code == 429
    error = json.loads(content)["error"]
    assert error["code"] == "all_backends_busy" and error["type"] == "rate_limit_error"
    # Seconds, rounded up, until the soonest (west) returns.
    retry_after = int(headers.getRawHeaders("retry-after")[0])
    assert math.ceil(before + 2.9 - end) <= retry_after <= math.ceil(after + 2.9 - start)
    assert headers.getRawHeaders("x-aoaiproxy-backend") is None
    assert len(instances(east, west)) == seen  # nothing sent
    assert gw.line()["attempts"] == 0 and gw.line()["error"] == "all_backends_busy"


@pytest_twisted.ensureDeferred
async def test_a_model_no_backend_serves_is_404_and_never_sent(
    regions: dict[str, FakeAzure], gateway: Callable[..., Gateway]
) -> None:
    east, west = regions["east"], regions["west"]
    gw = gateway(
        backend_table("east", east, models={"gpt-4o": "e4o"})
        + backend_table("west", west, models={"mini": "m"})
    )
    code, _, content = await gw.post("/v1/chat/completions", {**CHAT, "model": "gpt-5"})
    assert code == 404
    error = json.loads(content)["error"]
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    assert instances(east, west) == []
    response = await treq.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    assert [m["id"] for m in (await response.json())["data"]] == ["gpt-4o", "mini"]
    response = await treq.get(gw.url + "/v1/models/mini", headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    assert response.code == 200
    response = await treq.get(gw.url + "/v1/models/gpt-5", headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    assert response.code == 404 and (await response.json())["error"]["code"] == "model_not_found"
    response = await treq.get(gw.url + "/v1/models")
    assert response.code == 401


@pytest_twisted.ensureDeferred
async def test_other_4xx_are_answered_at_once(
    regions: dict[str, FakeAzure], gateway: Callable[..., Gateway]
) -> None:
    east, west = regions["east"], regions["west"]
    gw = gateway(backend_table("east", east, priority=0) + backend_table("west", west, priority=1))
    east.deployment_not_found_next()
    code, headers, content = await gw.post("/v1/chat/completions")
    assert code == 404 and json.loads(content)["error"]["code"] == "DeploymentNotFound"
    assert headers.getRawHeaders("x-aoaiproxy-backend") == ["east"]
    assert west.requests == []


@pytest_twisted.ensureDeferred
async def test_refused_connections_fail_over_then_502_then_the_circuits_open(
    regions: dict[str, FakeAzure], gateway: Callable[..., Gateway]
) -> None:
    east = regions["east"]
    dead = f"http://127.0.0.1:{free_port()}"
    gw = gateway(
        f'[[backend]]\nname = "dead"\nendpoint = "{dead}"\napi_key = "k"\npriority = 0\n'
        + backend_table("east", east, priority=1)
    )
    code, headers, _ = await gw.post("/v1/chat/completions")
    assert code == 200 and headers.getRawHeaders("x-aoaiproxy-backend") == ["east"]
    assert gw.line()["attempts"] == 2
    east.close_connections()  # now every connection to east is reset too
    code, headers, content = await gw.post("/v1/chat/completions")
    assert code == 502 and json.loads(content)["error"]["code"] == "bad_gateway"
    assert headers.getRawHeaders("x-aoaiproxy-backend") == ["east"]
    code, _, _ = await gw.post("/v1/chat/completions")
    assert code == 502 and gw.line()["attempts"] == 2
    assert not gw.backends.pool.available("dead")  # its third failure in a row
    code, _, _ = await gw.post("/v1/chat/completions")
    assert code == 502 and gw.line()["attempts"] == 1  # east alone
    # Three failures in a row each: both circuits are open, nothing is tried.
    seen = len(east.requests)
    code, headers, content = await gw.post("/v1/chat/completions")
    assert code == 429 and json.loads(content)["error"]["code"] == "all_backends_busy"
    assert int(headers.getRawHeaders("retry-after")[0]) >= 1
    assert len(east.requests) == seen
    assert not gw.backends.pool.available("dead") and not gw.backends.pool.available("east")


@pytest_twisted.ensureDeferred
async def test_a_timeout_fails_over(regions: dict[str, FakeAzure], gateway: Callable[..., Gateway]) -> None:
    east, west = regions["east"], regions["west"]
    gw = gateway(
        backend_table("east", east, priority=0) + backend_table("west", west, priority=1),
        upstream_timeout=0.5,
    )
    east.hang(count=1)
    code, headers, _ = await gw.post("/v1/chat/completions")
    assert code == 200 and headers.getRawHeaders("x-aoaiproxy-backend") == ["west"]
    west.hang(count=1)
    east.hang(count=1)
    code, headers, content = await gw.post("/v1/chat/completions")
    assert code == 504 and json.loads(content)["error"]["code"] == "gateway_timeout"


@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_ends_the_attempt_and_frees_the_probe(
    regions: dict[str, FakeAzure], gateway: Callable[..., Gateway]
) -> None:
    east = regions["east"]
    gw = gateway(backend_table("east", east), max_cooldown=0.2)
    east.close_connections(count=3)
    for _ in range(3):
        code, _, _ = await gw.post("/v1/chat/completions")
        assert code == 502
    assert not gw.backends.pool.available("east")
    await wait_until(lambda: gw.backends.pool.available("east"), "the circuit half-open")
    east.hang(count=1)
    d = treq.post(
        gw.url + "/v1/chat/completions",
        data=json.dumps(CHAT).encode(),
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
    )
    await east.wait_request(4)
    assert not gw.backends.pool.available("east")  # the probe is out
    closed = east.wait_connection_closed()
    d.cancel()
    await closed  # the upstream request was cancelled
    await wait_until(lambda: gw.backends.pool.available("east"), "the probe freed")
    code, _, _ = await gw.post("/v1/chat/completions")
    assert code == 200


@pytest_twisted.ensureDeferred
async def test_requests_naming_no_model_go_to_the_first_backend(
    regions: dict[str, FakeAzure], gateway: Callable[..., Gateway]
) -> None:
    east, west = regions["east"], regions["west"]
    gw = gateway(backend_table("west", west, priority=1) + backend_table("east", east, priority=0))
    code, headers, _ = await gw.post("/openai/deployments/d/chat/completions?api-version=2024-10-21", CHAT)
    assert code == 200 and headers.getRawHeaders("x-aoaiproxy-backend") == ["east"]
    response = await treq.get(gw.url + "/v1/files", headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    assert response.code == 200
    assert [r.path for r in east.requests] == ["/openai/deployments/d/chat/completions", "/openai/v1/files"]
    assert west.requests == []
    east.fail(503, count=1)  # no failover for these
    code, _, _ = await gw.post("/openai/deployments/d/chat/completions?api-version=2024-10-21", CHAT)
    assert code == 503 and west.requests == []


# -- Entra ID -----------------------------------------------------------------------------------


@attrs.frozen
class Token:
    token: str
    expires_on: int


class Credentials:
    """A credential factory: each get_token answers the next script step (a token or an error)."""

    def __init__(self, *steps: str | Exception) -> None:
        self.steps = list(steps)
        self.made = 0

    def __call__(self) -> Credentials:
        self.made += 1
        return self

    def get_token(self, *scopes: str) -> Token:
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if isinstance(step, Exception):
            raise step
        return Token(step, int(time.time() + 3600))

    def close(self) -> None:
        pass


def tokens(
    credentials: Credentials, run: Callable[[Callable[[], Any]], Deferred[Any]] = maybeDeferred
) -> TokenSources:
    return TokenSources(get_reactor(), run, credentials)


@pytest_twisted.ensureDeferred
async def test_entra_token_sent_and_a_401_refreshes_it_once(
    regions: dict[str, FakeAzure], gateway: Callable[..., Gateway]
) -> None:
    east = regions["east"]
    east.api_key = "token-2"  # the fake takes the second token only
    gw = gateway(backend_table("east", east, entra=True), tokens=tokens(Credentials("token-1", "token-2")))
    code, _, content = await gw.post("/v1/chat/completions")
    assert code == 200, content
    assert [r.header("authorization") for r in east.requests] == ["Bearer token-1", "Bearer token-2"]
    assert [r.header("api-key") for r in east.requests] == [None, None]
    assert gw.line()["attempts"] == 2 and gw.line()["backend"] == "east"
    # A 401 with a token just fetched is relayed (no second refresh in a row).
    east.api_key = "token-3"
    code, _, _ = await gw.post("/v1/chat/completions")
    assert code == 401


@pytest_twisted.ensureDeferred
async def test_no_token_is_503_token_unavailable_and_nothing_sent(
    regions: dict[str, FakeAzure], gateway: Callable[..., Gateway]
) -> None:
    east = regions["east"]
    gw = gateway(
        backend_table("east", east, entra=True), tokens=tokens(Credentials(RuntimeError("no identity here")))
    )
    code, headers, content = await gw.post("/v1/chat/completions")
    assert code == 503
    assert json.loads(content)["error"]["code"] == "token_unavailable"
    assert 1 <= int(headers.getRawHeaders("retry-after")[0]) <= 30
    assert headers.getRawHeaders("x-aoaiproxy-backend") == ["east"]
    assert east.requests == []


@pytest_twisted.ensureDeferred
async def test_requests_wait_for_the_first_token(
    regions: dict[str, FakeAzure], gateway: Callable[..., Gateway]
) -> None:
    east = regions["east"]
    east.api_key = "token-1"
    pending: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def later(f: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        pending.append((f, d))
        return d

    gw = gateway(backend_table("east", east, entra=True), tokens=tokens(Credentials("token-1"), later))
    answer = gw.post("/v1/chat/completions")
    d = Deferred.fromCoroutine(answer)
    await wait_until(lambda: gw.backends.waiting_for_tokens == 1, "the request waiting")
    assert len(pending) == 1 and not d.called and east.requests == []
    f, fetched = pending.pop()
    fetched.callback(f())
    code, _, _ = await d
    assert code == 200
    assert [r.header("authorization") for r in east.requests] == ["Bearer token-1"]


def test_several_backends_need_client_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[[backend]]\nname = "a"\nendpoint = "https://a.example"\napi_key = "k"\n'
        '[[backend]]\nname = "b"\nendpoint = "https://b.example"\nauth = "entra"\n'
    )
    with pytest.raises(Exception, match="client-keys"):
        load_config({"config": str(path)}, {})


def test_replay_body_gives_each_attempt_its_own_reader_of_the_file() -> None:
    body = bytes(range(256)) * 1000
    with tempfile.TemporaryFile() as f:
        f.write(body)  # still in the file object's buffer: the views see it anyway
        replay = ReplayBody(f)
        first, second = replay.fresh(), replay.fresh()
        assert not isinstance(first, bytes) and not isinstance(second, bytes) and first is not None
        assert second is not None
        assert first.seek(0, 2) == len(body) and first.seek(0) == 0
        assert first.read(1000) == body[:1000]
        assert second.read(10) == body[:10]  # its own place, untouched by the first
        assert first.read() == body[1000:]
        second.close()  # a view cannot close the request's file
        assert not f.closed
    with pytest.raises(ValueError):
        first.read(1)  # the request's file is gone: never read another file's descriptor
    small = io.BytesIO(b"small body")
    assert ReplayBody(small).fresh() == b"small body"
    assert ReplayBody(b"bytes").fresh() == b"bytes" and ReplayBody(None).fresh() is None


class Recording(NullMetrics):
    recording = True

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def attempt(self, backend: str, outcome: str) -> None:
        self.calls.append(("attempt", backend, outcome))

    def backend_available(self, name: str, up: bool) -> None:
        self.calls.append(("available", name, up))

    def ratelimit(self, backend: str, deployment: str, headers: Any) -> None:
        tokens = [v for n, v in header_pairs(headers) if n.lower() == b"x-ratelimit-remaining-tokens"]
        self.calls.append(("ratelimit", backend, deployment, tokens or None))


@pytest_twisted.ensureDeferred
async def test_metrics_hear_of_each_attempt(
    regions: dict[str, FakeAzure], gateway: Callable[..., Gateway]
) -> None:
    east, west = regions["east"], regions["west"]
    recorder = Recording()
    gw = gateway(
        backend_table("east", east, priority=0, models={"gpt-4o": "e4o"})
        + backend_table("west", west, priority=1),
        recorder=recorder,
    )
    assert recorder.calls == [("available", "east", True), ("available", "west", True)]
    recorder.calls.clear()
    west.ratelimit_remaining = (5, 900)
    east.fail(503, count=1)
    code, _, _ = await gw.post("/v1/chat/completions")
    assert code == 200
    assert recorder.calls == [
        ("ratelimit", "east", "e4o", None),
        ("attempt", "east", "5xx"),
        ("available", "east", True),  # one failure: its circuit is still closed
        ("ratelimit", "west", "gpt-4o", [b"900"]),
        ("attempt", "west", "ok"),
        ("available", "west", True),
    ]
    recorder.calls.clear()
    await east.stop()
    code, _, _ = await gw.post("/v1/chat/completions")
    assert code == 200
    assert recorder.calls[:2] == [("attempt", "east", "connect_error"), ("available", "east", True)]


class Scripted:
    """
    An upstream client whose first request fails before C{send} returns (a connection
    refused at once) and whose later ones wait; it notes which it was asked to cancel.
    """

    def __init__(self) -> None:
        self.urls: list[bytes] = []
        self.cancelled: list[int] = []

    def send(self, method: bytes, url: bytes, headers: Any, body: Any, receiver: Any, **timeouts: Any) -> Any:
        number = len(self.urls)
        self.urls.append(url)
        if number == 0:
            receiver.failed(errors.upstream_unreachable("connection refused"))
        cancelled = self.cancelled

        class Pending:
            def cancel(self) -> None:
                cancelled.append(number)

        return Pending()


def scripted_attempts(tmp_path: Path) -> tuple[Attempts, Scripted, Backends]:
    """The attempts of a chat request over two backends (east, then west), sent to L{Scripted}."""
    path = tmp_path / "config.toml"
    path.write_text(
        "allow_anonymous = true\n"
        '[[backend]]\nname = "east"\nendpoint = "https://east.example"\napi_key = "k"\n'
        '[[backend]]\nname = "west"\nendpoint = "https://west.example"\napi_key = "k"\npriority = 1\n'
    )
    live = LiveConfig(load_config({"config": str(path)}, {}))
    clock = Clock()
    backends = Backends(live, clock, tokens=TokenSources(clock, None), rng=random.Random(1))
    route = rewrite.classify(live.config, "POST", "/v1/chat/completions")
    client = rewrite.plan_client(live.config, route, b"POST", b"", [], b'{"model": "gpt-4o"}')
    upstream = Scripted()
    attempts = Attempts(backends, upstream, live.config, client, ReplayBody(client.body))  # type: ignore[arg-type]
    return attempts, upstream, backends


def test_an_attempt_that_fails_inside_send_is_not_the_one_cancelled(tmp_path: Path) -> None:
    """
    The upstream client may report a failure before C{send} returns: the next attempt, sent
    from inside it, is the one in flight, and the one a client that leaves cancels.
    """
    attempts, upstream, backends = scripted_attempts(tmp_path)
    d = attempts.start()
    assert [url.split(b"/")[2] for url in upstream.urls] == [b"east.example", b"west.example"]
    outcome: list[Any] = []
    d.addErrback(outcome.append)
    d.cancel()
    assert upstream.cancelled == [1]
    assert outcome[0].check(CancelledError)
    assert backends.pool.available("east")  # one connection failure: not enough to open its circuit


def test_run_reports_nothing_once_cancelled(tmp_path: Path) -> None:
    """L{Attempts.run} (the resource's way, without a Deferred): a cancel ends it silently."""
    attempts, upstream, _ = scripted_attempts(tmp_path)
    reported: list[Any] = []
    attempts.run(reported.append, reported.append)
    assert not attempts.over
    attempts.cancel()
    attempts.cancel()  # the client's leaving is heard once
    assert attempts.over
    assert upstream.cancelled == [1]
    assert reported == []
