"""
A per-deployment JSON body is read once: L{rewrite.plan_client} keeps its top level
(L{rewrite.ClientRequest.top}), and L{rewrite.usage_request} given it decides as it does reading
the body itself; and the C-speed test that spares the read (no C{true} in the body: not a
stream) decides as the read would.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aoaiproxy import errors, rewrite
from aoaiproxy.config import load_config
from tests.test_jsonbody_fast import mutated

AZ = load_config({"endpoint": "https://r.openai.azure.com"}, {})
KEY = [(b"api-key", b"k")]
CHAT = rewrite.classify(AZ, "POST", "/v1/chat/completions")

PROPERTIES = settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

streams = st.sampled_from(
    [
        b'{"model":"gpt-4o","stream":true}',
        b'{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":false,"x":[1]}}',
        b'{"model":"gpt-4o","stream":true,"stream_options":null,"messages":[{"content":"true"}]}',
        b'{"model":"gpt-4o","stream":false,"messages":[{"content":"true"}]}',
        b'{"model":"gpt-4o","str\\u0065am":true}',
        b'{"model":"gpt-4o","stream":true,"stream":false}',
    ]
)


def mutate(body: bytes, data: st.DataObject) -> bytes:
    at = data.draw(st.integers(0, len(body)))
    piece = data.draw(st.sampled_from([b"", b"true", b'"stream":true,', b" ", b"}", b'"stream_options":{},']))
    return body[:at] + piece + body[at:]


@PROPERTIES
@given(st.one_of(streams, mutated()), st.data())
def test_usage_request_decides_as_ask_for_usage(body: bytes, data: st.DataObject) -> None:
    body = mutate(body, data)
    new, changed = rewrite.ask_for_usage(body)
    expected = (new, True) if changed else (None, False)
    assert rewrite.usage_request(AZ, CHAT, body) == expected
    try:
        client = rewrite.plan_client(AZ, CHAT, b"POST", b"", KEY, body)
    except errors.ProxyError:
        return
    assert client.top is not None
    assert rewrite.usage_request(AZ, CHAT, body, client.top) == expected


def test_a_chat_stream_is_read_once() -> None:
    body = b'{"model":"gpt-4o","stream":true,"stream_options":{"x":1}}'
    client = rewrite.plan_client(AZ, CHAT, b"POST", b"", KEY, body)
    assert client.top is not None
    # Given the top level, the body itself is not read again: a different body of the same
    # length with no stream_options in place shows it.
    decoy = b'{"model":"gpt-4o","stream":true,"streamXoptions":{"x":1}}'
    assert rewrite.usage_request(AZ, CHAT, decoy, client.top) == (
        b'{"model":"gpt-4o","stream":true,"streamXoptions":{"x":1,"include_usage":true}}',
        True,
    )
