"""
The reverse API in azure and openai mode, over real loopback sockets against the fake Azure
upstream: routes, model map, api-version, auth, CORS, local answers and errors.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from collections.abc import Callable
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from aoaiproxy.resource import ApiResource
from aoaiproxy.testing import FakeAzure
from aoaiproxy.upstream import UpstreamClient

from .conftest import Events, ParsedLines, Proxy, get_reactor
from .rawnet import connect, response_done

CHAT = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}]}


async def post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    h = {"Content-Type": "application/json", "Authorization": "Bearer client-key"}
    h.update(headers or {})
    response = await treq.post(url, data=data, headers=h)
    content = await response.content()
    return response.code, response.headers, content


@pytest_twisted.ensureDeferred
async def test_chat_completion_to_deployment(fake: FakeAzure, make_proxy: Callable[..., Proxy]) -> None:
    proxy = make_proxy()
    body = json.dumps(CHAT, indent=1).encode()
    code, headers, content = await post(proxy.url + "/v1/chat/completions?foo=bar", body)
    assert code == 200
    assert json.loads(content)["object"] == "chat.completion"
    assert headers.getRawHeaders("access-control-allow-origin") == ["*"]
    [seen] = fake.requests
    assert seen.method == "POST"
    assert seen.path == "/openai/deployments/gpt-35-turbo/chat/completions"
    assert seen.query == {"foo": ["bar"], "api-version": ["2024-10-21"]}
    assert seen.body == body  # byte for byte
    assert seen.header("api-key") == "client-key"
    assert seen.header("authorization") is None


@pytest_twisted.ensureDeferred
async def test_completions_embeddings_and_unmapped_model(
    fake: FakeAzure, make_proxy: Callable[..., Proxy]
) -> None:
    proxy = make_proxy(model_mapper=["gpt-4o=prod-4o"])
    code, _, _ = await post(proxy.url + "/v1/completions", {"model": "gpt-4o", "prompt": "x"})
    assert code == 200
    code, _, content = await post(
        proxy.url + "/v1/embeddings", {"model": "text-embedding-3-small", "input": ["a", "b"]}
    )
    assert code == 200
    assert len(json.loads(content)["data"]) == 2
    paths = [r.path for r in fake.requests]
    assert paths == [
        "/openai/deployments/prod-4o/completions",
        "/openai/deployments/text-embedding-3-small/embeddings",
    ]


@pytest_twisted.ensureDeferred
async def test_client_api_version_replaced_not_duplicated(
    fake: FakeAzure, make_proxy: Callable[..., Proxy]
) -> None:
    proxy = make_proxy(api_version="2025-01-01-preview")
    url = proxy.url + "/v1/chat/completions?api-version=2023-03-15-preview&x=1"
    code, _, _ = await post(url, CHAT)
    assert code == 200
    assert fake.requests[0].query == {"x": ["1"], "api-version": ["2025-01-01-preview"]}
    assert fake.requests[0].raw_uri.count("api-version") == 1


@pytest_twisted.ensureDeferred
async def test_bad_model_names_are_400_and_not_sent(
    fake: FakeAzure, make_proxy: Callable[..., Proxy]
) -> None:
    proxy = make_proxy()
    for model in ["../admin", "a/b", "..", ".", "x" * 65, "gpt 4", 42, "", "a?b"]:
        code, _, content = await post(proxy.url + "/v1/chat/completions", {"model": model})
        assert code == 400, model
        error = json.loads(content)["error"]
        assert error["param"] == "model"
        assert set(error) == {"message", "type", "param", "code"}
    code, _, content = await post(proxy.url + "/v1/chat/completions", {"messages": []})
    assert code == 400
    assert json.loads(content)["error"]["code"] == "missing_model"
    code, _, content = await post(proxy.url + "/v1/chat/completions", b"{not json")
    assert code == 400
    assert json.loads(content)["error"]["code"] == "invalid_json"
    code, _, content = await post(proxy.url + "/v1/chat/completions", b"[1, 2]")
    assert code == 400
    assert fake.requests == []


@pytest_twisted.ensureDeferred
async def test_missing_key_is_401_and_not_sent(fake: FakeAzure, make_proxy: Callable[..., Proxy]) -> None:
    proxy = make_proxy()
    response = await treq.post(
        proxy.url + "/v1/chat/completions",
        data=json.dumps(CHAT).encode(),
        headers={"Content-Type": "application/json"},
    )
    assert response.code == 401
    error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert fake.requests == []


@pytest_twisted.ensureDeferred
async def test_api_key_header_and_jwt_bearer(fake: FakeAzure, make_proxy: Callable[..., Proxy]) -> None:
    proxy = make_proxy()
    await post(proxy.url + "/v1/chat/completions", CHAT, {"Authorization": "", "api-key": "k2"})
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
    await post(proxy.url + "/v1/chat/completions", CHAT, {"Authorization": f"Bearer {jwt}"})
    assert fake.requests[0].header("api-key") == "k2"
    assert fake.requests[1].header("authorization") == f"Bearer {jwt}"
    assert fake.requests[1].header("api-key") is None


@pytest_twisted.ensureDeferred
async def test_server_key_with_client_keys(
    fake: FakeAzure, make_proxy: Callable[..., Proxy], tmp_path: Any
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nalice-key\n\n  bob-key  \n")
    proxy = make_proxy(token="server-secret", client_keys=str(keys))
    code, _, _ = await post(proxy.url + "/v1/chat/completions", CHAT, {"Authorization": "Bearer bob-key"})
    assert code == 200
    assert fake.requests[0].header("api-key") == "server-secret"
    code, _, content = await post(
        proxy.url + "/v1/chat/completions", CHAT, {"Authorization": "Bearer mallory-key"}
    )
    assert code == 401
    assert b"mallory" not in content and b"server-secret" not in content
    assert len(fake.requests) == 1


@pytest_twisted.ensureDeferred
async def test_openai_mode_relays_unchanged(fake: FakeAzure, make_proxy: Callable[..., Proxy]) -> None:
    proxy = make_proxy(mode="openai")
    body = json.dumps(CHAT).encode()
    fake.respond_next(200, {"id": "x", "object": "chat.completion"})
    code, _, content = await post(proxy.url + "/v1/chat/completions?a=b", body)
    assert code == 200
    assert json.loads(content) == {"id": "x", "object": "chat.completion"}
    [seen] = fake.requests
    assert seen.raw_uri == "/v1/chat/completions?a=b"
    assert seen.header("api-key") is None
    assert seen.header("authorization") == "Bearer client-key"
    assert seen.body == body


@pytest_twisted.ensureDeferred
async def test_azure_shaped_passthrough(fake: FakeAzure, make_proxy: Callable[..., Proxy]) -> None:
    proxy = make_proxy()
    url = proxy.url + "/openai/deployments/mine/chat/completions?api-version=2024-06-01"
    code, _, _ = await post(url, CHAT)
    assert code == 200
    assert fake.requests[0].raw_uri == "/openai/deployments/mine/chat/completions?api-version=2024-06-01"


@pytest_twisted.ensureDeferred
async def test_models_healthz_options_404_405(fake: FakeAzure, make_proxy: Callable[..., Proxy]) -> None:
    proxy = make_proxy(model_mapper=["gpt-4o=prod"])
    auth = {"Authorization": "Bearer k"}
    r = await treq.get(proxy.url + "/v1/models", headers=auth)
    listing = await r.json()
    assert r.code == 200 and listing["object"] == "list"
    assert {"gpt-4o", "gpt-3.5-turbo"} <= {m["id"] for m in listing["data"]}
    assert all(m["object"] == "model" for m in listing["data"])
    r = await treq.get(proxy.url + "/v1/models/gpt-4o", headers=auth)
    assert r.code == 200 and (await r.json())["id"] == "gpt-4o"
    r = await treq.get(proxy.url + "/v1/models/nope", headers=auth)
    assert r.code == 404 and (await r.json())["error"]["code"] == "model_not_found"
    r = await treq.get(proxy.url + "/v1/models")
    assert r.code == 401

    r = await treq.get(proxy.url + "/healthz")
    assert r.code == 200 and await r.json() == {"status": "ok"}
    assert r.headers.getRawHeaders("access-control-allow-origin") == ["*"]

    r = await treq.request(
        "OPTIONS",
        proxy.url + "/v1/chat/completions",
        headers={
            "Origin": "https://chat.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-custom",
        },
    )
    assert r.code == 204
    assert r.headers.getRawHeaders("access-control-allow-headers") == [
        "authorization, content-type, x-custom"
    ]
    assert "POST" in r.headers.getRawHeaders("access-control-allow-methods")[0]
    assert r.headers.getRawHeaders("access-control-max-age")
    assert r.headers.getRawHeaders("access-control-allow-origin") == ["*"]

    r = await treq.post(proxy.url + "/v1/nothing-here", data=b"{}", headers=auth)
    assert r.code == 404
    assert set((await r.json())["error"]) == {"message", "type", "param", "code"}
    r = await treq.get(proxy.url + "/v1/chat/completions", headers=auth)
    assert r.code == 405
    r = await treq.post(proxy.url + "/v1/files/../../admin", data=b"{}", headers=auth)
    assert r.code == 400
    assert (await r.json())["error"]["code"] == "invalid_path"
    assert fake.requests == []


@pytest_twisted.ensureDeferred
async def test_upstream_errors_pass_through(fake: FakeAzure, make_proxy: Callable[..., Proxy]) -> None:
    proxy = make_proxy()
    fake.rate_limit_next(retry_after=7)
    code, headers, content = await post(proxy.url + "/v1/chat/completions", CHAT)
    assert code == 429
    assert headers.getRawHeaders("retry-after") == ["7"]
    assert headers.getRawHeaders("x-ratelimit-remaining-requests")
    assert b"retry after 7 seconds" in content
    assert headers.getRawHeaders("x-aoaiproxy-backend") == ["default"]
    # That deployment now cools down for 7 s (SPEC §11): the proxy answers for it.
    code, headers, content = await post(proxy.url + "/v1/chat/completions", CHAT)
    assert code == 429 and json.loads(content)["error"]["code"] == "all_backends_busy"
    assert headers.getRawHeaders("retry-after") == ["7"]
    assert len(fake.requests) == 1
    fake.deployment_not_found_next()
    code, _, content = await post(proxy.url + "/v1/chat/completions", {**CHAT, "model": "other"})
    assert code == 404
    assert json.loads(content)["error"]["code"] == "DeploymentNotFound"


@pytest_twisted.ensureDeferred
async def test_body_over_max_body_is_413(fake: FakeAzure, make_proxy: Callable[..., Proxy]) -> None:
    proxy = make_proxy(max_body=1000)
    body = json.dumps({"model": "m", "pad": "x" * 2000}).encode()
    code, headers, content = await post(proxy.url + "/v1/chat/completions", body)
    assert code == 413
    assert json.loads(content)["error"]["code"] == "request_too_large"
    assert headers.getRawHeaders("access-control-allow-origin") == ["*"]
    assert fake.requests == []


@pytest_twisted.ensureDeferred
async def test_valid_json_nested_deep_or_with_lone_surrogates_passes_unchanged(
    fake: FakeAzure, make_proxy: Callable[..., Proxy]
) -> None:
    """Before: a RecursionError, answered with Twisted's HTML 500 page and a traceback."""
    proxy = make_proxy()
    body = (
        b'{"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "\\ud83d"}], '
        b'"metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    )
    fake.respond_next(200, {"id": "x", "object": "chat.completion"})
    code, _, content = await post(proxy.url + "/v1/chat/completions", body)
    assert code == 200, content
    [seen] = fake.requests
    assert seen.path == "/openai/deployments/gpt-35-turbo/chat/completions"
    assert seen.body == body


@pytest_twisted.ensureDeferred
async def test_duplicate_model_and_adversarial_structure_are_400_and_not_sent(
    fake: FakeAzure, make_proxy: Callable[..., Proxy]
) -> None:
    proxy = make_proxy()
    # Before: the first was validated and Python's json kept the last, sent upstream.
    code, _, content = await post(
        proxy.url + "/v1/chat/completions", b'{"model": "gpt-4o", "model": "x/../y"}'
    )
    assert code == 400
    assert json.loads(content)["error"]["code"] == "duplicate_member"
    # Before: parsed whole (millions of objects) and sent.
    nested = b'{"model": "gpt-4o", "messages": [' + b"{}," * 300_000 + b"{}]}"
    code, _, content = await post(proxy.url + "/v1/chat/completions", nested)
    assert code == 400
    error = json.loads(content)["error"]
    assert error["code"] == "json_too_complex" and set(error) == {"message", "type", "param", "code"}
    assert fake.requests == []


class Exploding(UpstreamClient):
    """An upstream client with a bug: it raises, with the client's key in the message."""

    def send(self, method: bytes, url: bytes, headers: Any, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"boom with {dict(headers)[b'api-key']!r}")


class Nonsense(UpstreamClient):
    """An upstream client with a bug: it answers with something that is not a response."""

    def send(self, method: bytes, url: bytes, headers: Any, body: Any, receiver: Any, **kwargs: Any) -> Any:
        receiver.answered(object())


@pytest.mark.parametrize("upstream_class", [Exploding, Nonsense])
@pytest_twisted.ensureDeferred
async def test_a_bug_is_a_500_in_openai_shape_logged_once_without_the_key(
    make_proxy: Callable[..., Proxy], upstream_class: type[UpstreamClient]
) -> None:
    """Before: Twisted's HTML page with the message logged (or a 502 blaming the upstream)."""
    reactor = get_reactor()
    proxy = make_proxy()
    broken = ApiResource(proxy.live, upstream_class(reactor), reactor)
    port = reactor.listenTCP(0, Site(broken), interface="127.0.0.1")
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        url = f"http://127.0.0.1:{port.getHost().port}/v1/chat/completions"
        code, headers, content = await post(url, CHAT, {"Authorization": "Bearer client-key"})
    finally:
        globalLogPublisher.removeObserver(events.append)
        await port.stopListening()
    assert code == 500
    assert headers.getRawHeaders("content-type") == ["application/json"]
    assert json.loads(content)["error"]["type"] == "server_error"
    assert b"client-key" not in content
    logged = [
        formatEvent(e) + (e["log_failure"].getTraceback() if "log_failure" in e else "")
        for e in events
        if e.get("log_level") in (LogLevel.error, LogLevel.critical)
    ]
    assert len(logged) == 1, logged
    assert "unexpected" in logged[0] and "/v1/chat/completions" in logged[0]
    assert "client-key" not in logged[0]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("coding", ["gzip", "identity, gzip"])
async def test_an_encoded_event_stream_is_relayed_as_it_is(
    fake: FakeAzure, make_proxy: Callable[..., Proxy], coding: str
) -> None:
    """
    An event stream the upstream encoded is not read as events (no frame filtered, no final
    blank line added): its bytes and its Content-Length are relayed as they came.
    """
    proxy = make_proxy()
    encoded = gzip.compress(b'data: {"choices": []}\n\ndata: [DONE]\n\n')
    fake.respond_next(200, encoded, {"content-type": "text/event-stream", "content-encoding": coding})
    body = json.dumps({**CHAT, "stream": True}).encode()
    agent = Agent(get_reactor())  # not treq: it would decode the body
    response = await agent.request(
        b"POST",
        (proxy.url + "/v1/chat/completions").encode(),
        Headers({"Authorization": ["Bearer client-key"], "Content-Type": ["application/json"]}),
        FileBodyProducer(io.BytesIO(body)),
    )
    assert response.code == 200
    assert await readBody(response) == encoded
    assert response.length == len(encoded)  # Content-Length (Twisted moves it here)
    assert response.headers.getRawHeaders(b"content-encoding") == [coding.encode()]


@pytest_twisted.ensureDeferred
async def test_upstream_cors_origin_is_replaced_by_ours(
    fake: FakeAzure, make_proxy: Callable[..., Proxy]
) -> None:
    proxy = make_proxy()
    fake.respond_next(
        200, {"object": "chat.completion"}, {"Access-Control-Allow-Origin": "https://upstream.example"}
    )
    code, headers, _ = await post(proxy.url + "/v1/chat/completions", CHAT)
    assert code == 200
    assert headers.getRawHeaders("access-control-allow-origin") == ["*"]


@pytest_twisted.ensureDeferred
async def test_a_request_read_at_once_is_served_as_a_parsed_one(
    fake: FakeAzure, make_proxy: Callable[..., Proxy], events: Events
) -> None:
    """
    A request whose head and body come whole in one segment is read at once, without
    twisted.web's parser (the channel's fast path); the same request with bare-LF line ends
    goes through the parser.  The upstream, the client and the access log see the same
    either way (but for the time), on a keep-alive connection that serves the next request
    after it.
    """
    proxy = make_proxy()
    proxy.site.protocol = ParsedLines  # type: ignore[assignment]
    body = json.dumps(CHAT).encode()
    request = (
        b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer client-key\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    health = b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n"
    seen = []
    for count, first in enumerate((request + health, request.replace(b"\r\n", b"\n") + health), 1):
        client = await connect(proxy.port.getHost().port, first)
        raw = await client.wait_for(
            lambda r: r.count(b"HTTP/1.1 200 ") == 2 and response_done(r.rpartition(b"HTTP/1.1 200 ")[2])
        )
        [*_, line, _health_line] = await events.access(2 * count)
        [*_, upstream] = fake.requests
        answer = re.sub(
            rb'((Date|Apim-Request-Id|X-Request-Id): [^\r]*|"(id|created)": ?"?[^,"]*"?)', b"", raw
        )
        channel = next(iter(proxy.site.connections.open))
        lines = channel.parsed_lines  # type: ignore[attr-defined]
        seen.append(
            ((answer, re.sub(r"duration=\S+", "", line), attrs.evolve(upstream, received_at=0.0)), lines)
        )
        await client.abort()
    [(whole, whole_lines), (parsed, parsed_lines)] = seen
    assert whole == parsed
    # Both read at once; or the first parsed (its 6 lines), then the next one, whole in what
    # the parser held, read at once.
    assert (whole_lines, parsed_lines) == (0, 6)
    assert whole[2].body == body and whole[2].query["x"] == ["1"]
