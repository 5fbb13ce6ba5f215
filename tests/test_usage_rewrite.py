"""
The one request-body change besides the model (SPEC §14): a chat stream whose client did not
ask for usage asks for it upstream (L{rewrite.ask_for_usage}, L{rewrite.with_usage}); and the
client key's name that labels tokens (L{rewrite.client_name}).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aoaiproxy import rewrite
from aoaiproxy.config import load_config

ASKED = b'"stream_options":{"include_usage":true}'


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # No stream_options: added after the last member, every other byte as sent.
        (
            b'{"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi"}]}',
            b'{"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi"}],'
            + ASKED
            + b"}",
        ),
        (b'{"stream":true}', b'{"stream":true,' + ASKED + b"}"),
        (b'{"stream":true}\n', b'{"stream":true,' + ASKED + b"}\n"),
        # null is no options.
        (
            b'{"stream": true, "stream_options": null, "n": 1e400}',
            b'{"stream": true, "stream_options": {"include_usage":true}, "n": 1e400}',
        ),
        # Merged into the client's object, its other members kept as sent.
        (
            b'{"stream":true,"stream_options":{"include_obfuscation": false}}',
            b'{"stream":true,"stream_options":{"include_obfuscation": false,"include_usage":true}}',
        ),
        (
            b'{"stream":true,"stream_options":{ }}',
            b'{"stream":true,"stream_options":{"include_usage":true }}',
        ),
        # The client said no: it still gets no usage (the proxy strips it), Azure sends it.
        (
            b'{"stream":true,"stream_options":{"include_usage":false}}',
            b'{"stream":true,"stream_options":{"include_usage":true}}',
        ),
        (
            b'{"stream_options":{"include_usage" : null, "x": 1}, "stream":true}',
            b'{"stream_options":{"include_usage" : true, "x": 1}, "stream":true}',
        ),
    ],
)
def test_asks_for_usage(body: bytes, expected: bytes) -> None:
    assert rewrite.ask_for_usage(body) == (expected, True)
    parsed = json.loads(expected)
    assert parsed["stream_options"]["include_usage"] is True


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "gpt-4o", "messages": []}',  # not a stream
        b'{"stream": false, "stream_options": null}',
        b'{"stream": "true"}',
        b'{"stream": true, "stream_options": {"include_usage": true}}',  # asked: every byte as sent
        b'{"stream": true, "stream_options": {"include_usage": true, "include_obfuscation": false}}',
        # What cannot be read is left to the upstream to judge, unchanged.
        b'{"stream": true, "stream_options": "yes"}',
        b'{"stream": true, "stream_options": [1]}',
        b'{"stream": true, "stream_options": {"include_usage": false, "include_usage": true}}',
        b'{"stream": true, "stream_options": {}, "stream_options": {}}',
        b'{"stream": true, "stream_options": {"include_usage": false}',
        b'{"stream": true',
        b"[]",
        b"",
        b'{"stream": true, "a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
    ],
)
def test_leaves_alone(body: bytes) -> None:
    assert rewrite.ask_for_usage(body) == (body, False)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=8).filter(lambda k: k not in ("stream", "stream_options")),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=10),
            lambda inner: (
                st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
            ),
            max_leaves=8,
        ),
        max_size=5,
    ),
    st.one_of(
        st.none(), st.just({}), st.dictionaries(st.sampled_from(["include_usage", "x"]), st.booleans())
    ),
    st.booleans(),
)
def test_only_stream_options_changes(rest: dict[str, Any], options: Any, spaced: bool) -> None:
    """Decoded, the new body is the old one with include_usage true: nothing else changed."""
    body_obj: dict[str, Any] = {**rest, "stream": True}
    if options is not None:
        body_obj["stream_options"] = options
    body = json.dumps(body_obj, separators=None if spaced else (",", ":")).encode()
    new, changed = rewrite.ask_for_usage(body)
    asked = isinstance(options, dict) and options.get("include_usage") is True
    assert changed is not asked
    decoded = json.loads(new)
    assert decoded == {**body_obj, "stream_options": {**(options or {}), "include_usage": True}}
    if not changed:
        assert new == body


AZ = load_config({"endpoint": "https://r.openai.azure.com"}, {})
KEY = [(b"api-key", b"k"), (b"Accept-Encoding", b"gzip")]
STREAM = b'{"model": "gpt-4o", "stream": true, "messages": []}'


def planned(config: Any, path: str, body: bytes) -> tuple[rewrite.Upstream, bool]:
    route = rewrite.classify(config, "POST", path)
    upstream = rewrite.plan_upstream(config, route, b"POST", b"", KEY, body)
    return rewrite.with_usage(config, route, upstream, body)


def encoding(upstream: rewrite.Upstream) -> list[bytes]:
    return [v for n, v in upstream.headers if n.lower() == b"accept-encoding"]


def test_with_usage_on_azure_chat_streams() -> None:
    chat = rewrite.classify(AZ, "POST", "/v1/chat/completions")
    assert rewrite.usage_request(AZ, chat, STREAM) == (STREAM[:-1] + b"," + ASKED + b"}", True)
    assert rewrite.usage_request(AZ, chat, None) == (None, False)  # a multipart body: not read
    upstream, strip = planned(AZ, "/v1/chat/completions", STREAM)
    assert strip
    assert upstream.body == STREAM[:-1] + b"," + ASKED + b"}"
    assert encoding(upstream) == [b"identity"]  # the usage chunk must be readable
    # --keep-filter-frames does not ask for identity by itself: the usage does.
    keep = load_config({"endpoint": "https://r.openai.azure.com", "keep_filter_frames": True}, {})
    upstream, strip = planned(keep, "/v1/chat/completions", STREAM)
    assert strip and encoding(upstream) == [b"identity"]


@pytest.mark.parametrize(
    ("flags", "path", "body"),
    [
        ({}, "/v1/chat/completions", b'{"model": "gpt-4o", "messages": []}'),
        (
            {},
            "/v1/chat/completions",
            b'{"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true}}',
        ),
        ({}, "/v1/completions", STREAM),  # SPEC §14: chat streams
        ({}, "/v1/responses", STREAM),  # its usage comes in response.completed anyway
        ({}, "/openai/deployments/gpt-4o/chat/completions", STREAM),  # Azure-shaped: unchanged
        ({"api_version": "2024-06-01"}, "/v1/chat/completions", STREAM),  # no stream_options then
        ({"mode": "openai", "endpoint": "https://api.openai.com"}, "/v1/chat/completions", STREAM),
    ],
)
def test_with_usage_leaves_other_requests(flags: dict[str, Any], path: str, body: bytes) -> None:
    config = load_config({"endpoint": "https://r.openai.azure.com", **flags}, {})
    route = rewrite.classify(config, "POST", path)
    upstream = rewrite.plan_upstream(
        config, route, b"POST", b"", KEY, body if route.kind != "openai" else None
    )
    assert rewrite.with_usage(config, route, upstream, body) == (upstream, False)


def test_client_name(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("alice:sk-alice\nsk-unnamed\n# comment\nbob: sk-bob\n")
    config = load_config(
        {"endpoint": "https://r.openai.azure.com", "token": "server", "client_keys": str(keys)}, {}
    )
    assert rewrite.client_name(config, [(b"Authorization", b"Bearer sk-alice")]) == "alice"
    assert rewrite.client_name(config, [(b"api-key", b"sk-bob")]) == "bob"
    assert rewrite.client_name(config, [(b"api-key", b"sk-unnamed")]) == "key2"
    assert rewrite.client_name(config, [(b"api-key", b"sk-alicex")]) == "anonymous"
    assert rewrite.client_name(config, []) == "anonymous"
    assert rewrite.client_name(AZ, [(b"api-key", b"sk-alice")]) == "anonymous"
