"""The pure rewrite functions: routes, deployments, api-version, auth, headers."""

from __future__ import annotations

import pytest

from aoaiproxy import rewrite
from aoaiproxy.config import load_config
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


def test_upstream_auth_modes() -> None:
    assert rewrite.upstream_auth(AZ, [(b"Authorization", b"Bearer k")]) == ((b"api-key", b"k"),)
    assert rewrite.upstream_auth(AZ, [(b"api-key", b"k2")]) == ((b"api-key", b"k2"),)
    jwt = b"eyJ0eXAiOiJKV1QifQ.eyJhIjoxfQ.sig"
    assert rewrite.upstream_auth(AZ, [(b"Authorization", b"Bearer " + jwt)]) == (
        (b"Authorization", b"Bearer " + jwt),
    )
    with pytest.raises(ProxyError) as e:
        rewrite.upstream_auth(AZ, [])
    assert e.value.status == 401
    oa = load_config({"mode": "openai"}, {})
    assert rewrite.upstream_auth(oa, [(b"api-key", b"k")]) == ((b"Authorization", b"Bearer k"),)


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
