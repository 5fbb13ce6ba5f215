"""The pure rewrite functions: routes, deployments, api-version, auth, headers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from aoaiproxy import relay, rewrite
from aoaiproxy.config import Config, load_config
from aoaiproxy.errors import ProxyError
from aoaiproxy.relay import FilterFrames, is_filter_only

AZ = load_config({"endpoint": "https://r.openai.azure.com"}, {})


def test_query_api_version_set_once_and_client_query_kept() -> None:
    q = rewrite.query_with_api_version(b"a=1&api-version=old&api%2Dversion=x&b=%20", "V")
    assert q == b"a=1&b=%20&api-version=V"
    assert rewrite.query_with_api_version(b"", "V") == b"api-version=V"


@pytest.mark.parametrize(
    ("method", "path", "kind", "target"),
    [
        ("POST", "/v1/chat/completions", "deployment", "chat/completions"),
        ("POST", "/v1/embeddings", "deployment", "embeddings"),
        ("POST", "/v1/audio/speech", "deployment", "audio/speech"),
        ("POST", "/v1/responses", "v1api", "/openai/v1/responses"),
        ("GET", "/v1/files/file-1/content", "v1api", "/openai/v1/files/file-1/content"),
        (
            "POST",
            "/openai/deployments/x/chat/completions",
            "passthrough",
            "/openai/deployments/x/chat/completions",
        ),
        ("GET", "/v1/models", "models", ""),
        ("GET", "/v1/models/gpt-4o", "model", "gpt-4o"),
        ("GET", "/healthz", "health", ""),
    ],
)
def test_classify(method: str, path: str, kind: str, target: str) -> None:
    route = rewrite.classify(AZ, method, path)
    assert (route.kind, route.target) == (kind, target)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/chat/completions", 405),
        ("POST", "/v1/models", 405),
        ("POST", "/v2/chat", 404),
        ("POST", "/", 404),
        ("POST", "/v1/files/../x", 400),
        ("POST", "/v1/files/%2e%2e/x", 400),
        ("POST", "/openai//x", 400),
        ("POST", "/openai/a%0d%0ab", 400),
    ],
)
def test_classify_errors(method: str, path: str, status: int) -> None:
    with pytest.raises(ProxyError) as e:
        rewrite.classify(AZ, method, path)
    assert e.value.status == status


def test_deployment_mapping_and_validation() -> None:
    assert rewrite.deployment_for(AZ, "gpt-3.5-turbo") == "gpt-35-turbo"
    assert rewrite.deployment_for(AZ, "gpt-4o-mini") == "gpt-4o-mini"
    for bad in [None, 1, "", ".", "..", "a/b", "a b", "x" * 65, "a:b", "é"]:
        with pytest.raises(ProxyError):
            rewrite.deployment_for(AZ, bad)


def upstream_auth(config: Config, headers: list[tuple[bytes, bytes]]) -> tuple[tuple[bytes, bytes], ...]:
    """What the first backend gets: the client's key checked, then the backend's credential."""
    presented = rewrite.client_credential(config, headers)
    return rewrite.backend_auth(config.mode, config.backends[0], presented, None)


def test_upstream_auth_modes() -> None:
    assert upstream_auth(AZ, [(b"Authorization", b"Bearer k")]) == ((b"api-key", b"k"),)
    assert upstream_auth(AZ, [(b"api-key", b"k2")]) == ((b"api-key", b"k2"),)
    jwt = b"eyJ0eXAiOiJKV1QifQ.eyJhIjoxfQ.sig"
    assert upstream_auth(AZ, [(b"Authorization", b"Bearer " + jwt)]) == (
        (b"Authorization", b"Bearer " + jwt),
    )
    with pytest.raises(ProxyError) as e:
        upstream_auth(AZ, [])
    assert e.value.status == 401
    oa = load_config({"mode": "openai"}, {})
    assert upstream_auth(oa, [(b"api-key", b"k")]) == ((b"Authorization", b"Bearer k"),)


def test_server_credentials_check_the_client_key_and_send_their_own(tmp_path: Path) -> None:
    keys = tmp_path / "client-keys"
    keys.write_text("c1\n")
    served = load_config(
        {"endpoint": "https://r.openai.azure.com", "token": "srv", "client_keys": str(keys)}, {}
    )
    assert rewrite.client_credential(served, [(b"api-key", b"c1")]) is None
    for wrong in ([(b"api-key", b"other")], []):
        with pytest.raises(ProxyError) as e:
            rewrite.client_credential(served, wrong)
        assert e.value.status == 401
    assert upstream_auth(served, [(b"Authorization", b"Bearer c1")]) == ((b"api-key", b"srv"),)
    entra = load_config(
        {"endpoint": "https://r.openai.azure.com", "auth": "entra", "client_keys": str(keys)}, {}
    )
    assert rewrite.client_credential(entra, [(b"api-key", b"c1")]) is None
    with pytest.raises(ProxyError):
        rewrite.client_credential(entra, [(b"api-key", b"eyJhbGciOi.e30.sig")])  # not a client key
    assert rewrite.backend_auth("azure", entra.backends[0], None, "tok") == (
        (b"Authorization", b"Bearer tok"),
    )


def test_forward_headers_drop_hop_by_hop_and_credentials() -> None:
    headers = [
        (b"Connection", b"keep-alive, X-Private"),
        (b"X-Private", b"1"),
        (b"Keep-Alive", b"5"),
        (b"Proxy-Authorization", b"Basic x"),
        (b"Host", b"proxy"),
        (b"Content-Length", b"3"),
        (b"Authorization", b"Bearer client"),
        (b"api-key", b"client"),
        (b"Accept-Encoding", b"br"),
        (b"OpenAI-Beta", b"assistants=v2"),
    ]
    out = rewrite.forward_headers(headers, [(b"api-key", b"server")])
    assert out == ((b"Accept-Encoding", b"br"), (b"OpenAI-Beta", b"assistants=v2"), (b"api-key", b"server"))


def test_plan_v1_replaces_only_mapped_model() -> None:
    route = rewrite.classify(AZ, "POST", "/v1/responses")
    auth = [(b"api-key", b"k")]
    up = rewrite.plan_upstream(AZ, route, b"POST", b"", auth, b'{"model": "gpt-3.5-turbo", "input": "x"}')
    assert up.url == b"https://r.openai.azure.com/openai/v1/responses"
    assert up.body is not None and b'"gpt-35-turbo"' in up.body and b'"input": "x"' in up.body
    up = rewrite.plan_upstream(AZ, route, b"POST", b"", auth, b'{"model":"mine","input":"x"}')
    assert up.body is None  # unmapped: the client's bytes go unchanged


def test_filter_only_frames() -> None:
    azure_first = (
        b'data: {"choices":[],"created":0,"id":"","model":"","object":"",'
        b'"prompt_filter_results":[{"prompt_index":0,"content_filter_results":{}}]}\n\n'
    )
    usage = b'data: {"id":"c","choices":[],"usage":{"total_tokens":3}}\n\n'
    content = b'data: {"id":"c","choices":[{"delta":{"content":"hi"}}]}\n\n'
    assert is_filter_only(azure_first)
    assert not is_filter_only(usage) and not is_filter_only(content)
    f = FilterFrames()
    stream = azure_first + content + usage + b"data: [DONE]\n\n"
    # Fed one byte at a time, the output is the same as fed whole.
    out = b"".join(f.feed(stream[i : i + 1]) for i in range(len(stream))) + f.flush()
    assert out == content + usage + b"data: [DONE]\n\n"
    f = FilterFrames()
    assert f.feed(azure_first.replace(b"\n", b"\r\n") + content) == content


V1 = rewrite.classify(AZ, "POST", "/v1/responses")
CHAT = rewrite.classify(AZ, "POST", "/v1/chat/completions")
KEY = [(b"api-key", b"k")]


def plan(route: rewrite.Route, body: bytes, headers: list[tuple[bytes, bytes]] = KEY, **flags: Any) -> Any:
    config = load_config({"endpoint": "https://r.openai.azure.com", **flags}, {})
    return rewrite.plan_upstream(config, route, b"POST", b"", headers, body)


def test_v1_rewrite_replaces_only_the_model_bytes() -> None:
    """Numbers, escapes, lone surrogates and deep nesting reach Azure exactly as sent."""
    rest = (
        b', "n": 1e400, "m": 1E2, "f": -0.0, "s": "\\ud83d \\u00e9 \xc3\xa9", '
        b'"deep": ' + b"[" * 5000 + b"]" * 5000 + b', "x": {"model": "gpt-3.5-turbo"}}'
    )
    body = b'{"model" :  "gpt-3.5-turbo"' + rest
    up = plan(V1, body)
    assert up.body == b'{"model" :  "gpt-35-turbo"' + rest
    assert (up.model, up.deployment) == ("gpt-3.5-turbo", "gpt-35-turbo")
    # Escaped in the client's spelling: the value is decoded, then replaced whole.
    up = plan(V1, b'{"input": [], "model": "gpt-3.5-turbo\\u002d0125"}')
    assert up.body == b'{"input": [], "model": "gpt-35-turbo-0125"}'


def test_deeply_nested_or_surrogate_bodies_on_deployment_routes() -> None:
    body = b'{"model": "gpt-4o", "messages": ' + b"[" * 5000 + b"]" * 5000 + b', "s": "\\udc00"}'
    up = plan(CHAT, body)
    assert up.body is None and up.deployment == "gpt-4o"  # the client's bytes go as they are


@pytest.mark.parametrize("route", [CHAT, V1], ids=["deployment", "v1"])
@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"model": "gpt-4o", "model": "../../x"}', "duplicate_member"),
        (b'{"model": "gpt-4o", "mod\\u0065l": "gpt-4o"}', "duplicate_member"),
        (b'{"model": "gpt-4o", "a": [' + b"{}," * 200_000 + b"{}]}", "json_too_complex"),
        (b'{"model": "gpt-4o"} x', "invalid_json"),
        (b'{"model": "gpt-4o", "a": [1, 2}', "invalid_json"),
        (b'{"model": "' + b"x" * 2000 + b'"}', "invalid_model"),
        (b'{"model": ' + b"[" * 3000 + b"]" * 3000 + b"}", "invalid_model"),
        (b'{"model": 42}', "invalid_model"),
        (b'{"model": null}', "missing_model"),
    ],
)
def test_bodies_refused_with_400(route: rewrite.Route, body: bytes, code: str) -> None:
    with pytest.raises(ProxyError) as e:
        plan(route, body)
    assert (e.value.status, e.value.code) == (400, code)
    assert len(e.value.message) < 300


def test_streams_ask_azure_for_an_unencoded_response() -> None:
    """The filter reads chat streams, so they are asked for without gzip (SPEC §7)."""
    gzip = [*KEY, (b"Accept-Encoding", b"gzip, deflate")]
    stream = b'{"model": "gpt-4o", "stream": true, "messages": []}'
    passthrough = rewrite.classify(AZ, "POST", "/openai/deployments/d/chat/completions")

    def encoding(up: Any) -> list[bytes]:
        return [v for n, v in up.headers if n.lower() == b"accept-encoding"]

    assert encoding(plan(CHAT, stream, gzip)) == [b"identity"]
    assert encoding(plan(passthrough, stream, gzip)) == [b"identity"]
    # Not a stream, no filter (kept frames, Responses events, openai mode): as the client asked.
    assert encoding(plan(CHAT, b'{"model": "gpt-4o", "stream": false}', gzip)) == [b"gzip, deflate"]
    assert encoding(plan(CHAT, stream, gzip, keep_filter_frames=True)) == [b"gzip, deflate"]
    assert encoding(plan(V1, stream, gzip)) == [b"gzip, deflate"]
    assert encoding(plan(passthrough, b"{not json", gzip)) == [b"gzip, deflate"]
    openai = rewrite.classify(load_config({"mode": "openai"}, {}), "POST", "/v1/chat/completions")
    assert encoding(plan(openai, stream, gzip, mode="openai")) == [b"gzip, deflate"]


AZURE_FIRST = (
    b'data: {"choices":[],"created":0,"id":"","model":"","object":"",'
    b'"prompt_filter_results":[{"prompt_index":0,"content_filter_results":{}}]}'
)
CONTENT = b'data: {"id":"c","choices":[{"delta":{"content":"hi"}}]}'


@pytest.mark.parametrize("end", [b"\n\r\n", b"\r\n\n", b"\r\n\r", b"\n\r", b"\r\r\n", b"\r\r", b"\n\n"])
def test_filter_sees_every_kind_of_event_end(end: bytes) -> None:
    """SSE lines end with CRLF, LF or CR; an event ends at an empty line, whatever the mix."""
    stream = AZURE_FIRST + end + CONTENT + end + b"data: [DONE]" + end
    for size in (1, 2, 3, len(stream)):
        f = FilterFrames()
        out = b"".join(f.feed(stream[i : i + size]) for i in range(0, len(stream), size)) + f.flush()
        assert out == CONTENT + end + b"data: [DONE]" + end, size


def test_filter_passes_events_it_cannot_read() -> None:
    """Never an exception (it would reset the client's stream): such an event passes unchanged."""
    deep = b'data: {"choices":[],"prompt_filter_results":' + b"[" * 100_000 + b"]" * 100_000 + b"}\n\n"
    odd = [
        deep,
        b'data: {"choices":[],"prompt_filter_results":[],"choices":[]}\n\n',
        b'data: {"choices":[],"prompt_filter_results":[], "usage": {"total_tokens": 3}}\n\n',
        b'data: {"choices":[ ],"prompt_filter_results":[]} trailing\n\n',
        b"data: prompt_filter_results\n\n",
        b'data: {"choices":[],"prompt_filter_results":"\xff"\n\n',
    ]
    f = FilterFrames()
    assert f.feed(b"".join(odd)) == b"".join(odd)
    multiline = b'data: {"choices":[],\ndata: "prompt_filter_results":[]}\n\n'
    assert FilterFrames().feed(multiline) == b""


def test_filter_holds_at_most_one_short_event() -> None:
    """A long event is passed on as it arrives (memory stays bounded), and its end still seen."""
    from aoaiproxy.relay import MAX_HELD_EVENT

    f = FilterFrames()
    start = b'data: {"choices":[{"delta":{"content":"' + b"x" * MAX_HELD_EVENT
    assert f.feed(start) == start
    assert f.feed(b"yyy") == b"yyy"
    assert f.feed(b'"}}]}\r\n') == b'"}}]}\r\n'
    # The end falls across chunks; what follows is filtered again.
    assert f.feed(b"\r") == b"\r"
    assert f.feed(b"\n" + AZURE_FIRST + b"\n\n" + CONTENT + b"\n\n") == b"\n" + CONTENT + b"\n\n"
    assert f.flush() == b""


@pytest.mark.parametrize(
    ("tail", "added"),
    [
        (b"x\n\n", b""),
        (b"\n\r\n", b""),
        (b"x\r\n\n", b""),
        (b"\r\n\r\n", b""),
        (b"x\r\r", b""),
        (b"xx\r\n", b"\r\n"),
        (b"xxx\n", b"\n"),
        (b"xxx\r", b"\r"),
        (b"xxxx", b"\n\n"),
    ],
)
def test_final_blank_line(tail: bytes, added: bytes) -> None:
    assert relay._missing_blank_line(tail) == added
