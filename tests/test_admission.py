"""
L{aoaiproxy.admission.judge}: what the head of an API request decided is what its route
would decide again (the resource takes it rather than deciding twice), and only under the
configuration that decided it (a reload in between: the resource decides again).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st

from aoaiproxy import admission, rewrite
from aoaiproxy.config import Config, LiveConfig, load_config
from aoaiproxy.errors import ProxyError
from aoaiproxy.testing import FakeAzure

from .conftest import Proxy
from .rawnet import assert_openai_error, parse_response

CONFIGS = [
    load_config({"endpoint": "https://r.example"}, {}),
    load_config({"endpoint": "https://r.example", "token": "server", "allow_anonymous": True}, {}),
    load_config({"endpoint": "https://r.example", "mode": "openai"}, {}),
]

METHODS = st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"])
SEGMENTS = st.sampled_from(
    ["v1", "chat", "completions", "embeddings", "models", "gpt-4o", "files", "responses", "openai",
     "deployments", "healthz", "..", ".", "%2e", "", "a b", "images", "generations"]
)  # fmt: skip
TARGETS = st.builds(
    lambda segments, query: ("/" + "/".join(segments)).encode("latin-1") + query,
    st.lists(SEGMENTS, min_size=1, max_size=4),
    st.sampled_from([b"", b"?api-version=1", b"?a=b&c"]),
)
HEADERS = st.lists(
    st.sampled_from(
        [
            (b"Authorization", b"Bearer k1"),
            (b"Authorization", b"Basic eA=="),
            (b"Authorization", b"Bearer "),
            (b"Api-Key", b"k2"),
            (b"Api-Key", b" "),
            (b"Content-Type", b"application/json"),
        ]
    ),
    max_size=3,
)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.sampled_from(CONFIGS), METHODS, TARGETS, HEADERS)
def test_what_the_head_admits_is_what_the_route_decides(
    config: Config, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    """
    What C{judge} decides from a head is what the route decides without it
    (L{aoaiproxy.resource.ApiResource}: the route, then the key, each may refuse): the same
    refusal, or the same route and key.  None is left to the route.
    """
    verdict = admission.judge(config, method, target, headers)
    if verdict is None:
        return
    path = target.split(b"?", 1)[0]
    try:
        route = rewrite.classify(config, method.decode("ascii"), path.decode("latin-1"))
        presented = rewrite.client_credential(config, headers)
    except ProxyError as decided:
        assert isinstance(verdict, ProxyError), verdict
        assert (verdict.status, verdict.body(), verdict.headers) == (
            decided.status,
            decided.body(),
            decided.headers,
        )
        return
    assert not isinstance(verdict, ProxyError), verdict
    assert verdict.config is config and verdict.method == method and verdict.path == path
    assert verdict.route == route
    assert verdict.headers is headers
    assert verdict.presented == presented


@pytest_twisted.ensureDeferred
async def test_a_reload_between_head_and_body_is_decided_again(
    fake: FakeAzure, make_proxy: Callable[..., Proxy], raw_connect: Any, tmp_path: Path
) -> None:
    """The head is admitted with alice's key; a reload before its body drops her key: 401."""
    before, after = tmp_path / "before", tmp_path / "after"
    before.write_text("alice-key\nbob-key\n")
    after.write_text("bob-key\n")
    proxy = make_proxy(token="server", client_keys=str(before))
    body = b'{"model": "gpt-4o", "messages": []}'
    client = await raw_connect(int(proxy.port.getHost().port))  # type: ignore[attr-defined]
    client.send(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer alice-key\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(body)
    )
    await client.wait_for(b"HTTP/1.1 100 Continue\r\n\r\n")  # the head was judged and admitted
    live: LiveConfig = proxy.live
    live.config = load_config({"endpoint": fake.url, "token": "server", "client_keys": str(after)}, {})
    client.send(body)
    raw = await client.wait_for(lambda r: r.endswith(b"}}"))
    assert_openai_error(parse_response(raw.split(b"\r\n\r\n", 1)[1]), 401, "invalid_api_key")
    assert fake.requests == []
