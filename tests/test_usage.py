"""
Token usage from responses (SPEC §14), byte-level: JSON bodies, chat streams (and the rewrite
that hides the usage the proxy asked for), Responses API streams.

The stream samples are written the way OpenAI and Azure serialise chunks (compact JSON; OpenAI
in its own key order, with C{obfuscation} since 2025; Azure with sorted keys and content filter
results), once as a client that did not ask for usage receives them and once as they come
when C{stream_options.include_usage} is set.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aoaiproxy.relay import FilterFrames, is_filter_only
from aoaiproxy.sse import Events
from aoaiproxy.usage import (
    JSON_PARSE_LIMIT,
    Chained,
    ChatStreamUsage,
    JSONUsage,
    ResponsesStreamUsage,
    Usage,
    usage_tap,
)

# OpenAI, 2025 (service_tier, obfuscation).  One chunk's content holds text that looks like
# the member the proxy removes: inside a JSON string its quotes are escaped.
OPENAI_PLAIN = (
    b'data: {"id":"chatcmpl-BzQ1","object":"chat.completion.chunk","created":1753900000,'
    b'"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_34a54ae93c",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},'
    b'"logprobs":null,"finish_reason":null}],"obfuscation":"t5Rw"}\n\n'
    b'data: {"id":"chatcmpl-BzQ1","object":"chat.completion.chunk","created":1753900000,'
    b'"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_34a54ae93c",'
    b'"choices":[{"index":0,"delta":{"content":"{\\"usage\\":null},\\"usage\\":null"},'
    b'"logprobs":null,"finish_reason":null}],"obfuscation":"Vq"}\n\n'
    b'data: {"id":"chatcmpl-BzQ1","object":"chat.completion.chunk","created":1753900000,'
    b'"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_34a54ae93c",'
    b'"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"obfuscation":"p"}\n\n'
    b"data: [DONE]\n\n"
)
OPENAI_WITH_USAGE = (
    b'data: {"id":"chatcmpl-BzQ1","object":"chat.completion.chunk","created":1753900000,'
    b'"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_34a54ae93c",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},'
    b'"logprobs":null,"finish_reason":null}],"usage":null,"obfuscation":"t5Rw"}\n\n'
    b'data: {"id":"chatcmpl-BzQ1","object":"chat.completion.chunk","created":1753900000,'
    b'"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_34a54ae93c",'
    b'"choices":[{"index":0,"delta":{"content":"{\\"usage\\":null},\\"usage\\":null"},'
    b'"logprobs":null,"finish_reason":null}],"usage":null,"obfuscation":"Vq"}\n\n'
    b'data: {"id":"chatcmpl-BzQ1","object":"chat.completion.chunk","created":1753900000,'
    b'"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_34a54ae93c",'
    b'"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null,"obfuscation":"p"}\n\n'
    b'data: {"id":"chatcmpl-BzQ1","object":"chat.completion.chunk","created":1753900000,'
    b'"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_34a54ae93c",'
    b'"choices":[],"usage":{"prompt_tokens":19,"completion_tokens":7,"total_tokens":26,'
    b'"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":'
    b'{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,'
    b'"rejected_prediction_tokens":0}},"obfuscation":"Xk2"}\n\n'
    b"data: [DONE]\n\n"
)

# OpenAI, 2024 (no obfuscation: usage is the object's last member).
OPENAI_2024_PLAIN = (
    b'data: {"id":"chatcmpl-ADx","object":"chat.completion.chunk","created":1727889370,'
    b'"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_f85bea6784","choices":[{"index":0,'
    b'"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-ADx","object":"chat.completion.chunk","created":1727889370,'
    b'"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_f85bea6784","choices":[{"index":0,'
    b'"delta":{"content":"Hi"},"logprobs":null,"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)
OPENAI_2024_WITH_USAGE = (
    b'data: {"id":"chatcmpl-ADx","object":"chat.completion.chunk","created":1727889370,'
    b'"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_f85bea6784","choices":[{"index":0,'
    b'"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],'
    b'"usage":null}\n\n'
    b'data: {"id":"chatcmpl-ADx","object":"chat.completion.chunk","created":1727889370,'
    b'"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_f85bea6784","choices":[{"index":0,'
    b'"delta":{"content":"Hi"},"logprobs":null,"finish_reason":"stop"}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-ADx","object":"chat.completion.chunk","created":1727889370,'
    b'"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_f85bea6784","choices":[],'
    b'"usage":{"prompt_tokens":8,"completion_tokens":1,"total_tokens":9}}\n\n'
    b"data: [DONE]\n\n"
)

# Azure (api-version 2024-10-21): sorted keys, the prompt filter frame first, per-choice
# content filter results.
_FILTERS = (
    b'{"hate":{"filtered":false,"severity":"safe"},"self_harm":{"filtered":false,"severity":"safe"},'
    b'"sexual":{"filtered":false,"severity":"safe"},"violence":{"filtered":false,"severity":"safe"}}'
)
_PROMPT_FILTER = (
    b'"prompt_filter_results":[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,'
    b'"severity":"safe"},"jailbreak":{"filtered":false,"detected":false},"self_harm":{"filtered":false,'
    b'"severity":"safe"},"sexual":{"filtered":false,"severity":"safe"},"violence":{"filtered":false,'
    b'"severity":"safe"}}}]'
)
_TAIL = (
    b'"created":1731000000,"id":"chatcmpl-AR7","model":"gpt-4o-2024-08-06",'
    b'"object":"chat.completion.chunk","system_fingerprint":"fp_04751d0b65"'
)
AZURE_PLAIN = (
    b'data: {"choices":[],"created":0,"id":"","model":"","object":"",' + _PROMPT_FILTER + b"}\n\n"
    b'data: {"choices":[{"content_filter_results":{},"delta":{"content":"","refusal":null,'
    b'"role":"assistant"},"finish_reason":null,"index":0,"logprobs":null}],' + _TAIL + b"}\n\n"
    b'data: {"choices":[{"content_filter_results":' + _FILTERS + b',"delta":{"content":"Hello"},'
    b'"finish_reason":null,"index":0,"logprobs":null}],' + _TAIL + b"}\n\n"
    b'data: {"choices":[{"content_filter_results":{},"delta":{},"finish_reason":"stop","index":0,'
    b'"logprobs":null}],' + _TAIL + b"}\n\n"
    b"data: [DONE]\n\n"
)
AZURE_WITH_USAGE = (
    b'data: {"choices":[],"created":0,"id":"","model":"","object":"",'
    + _PROMPT_FILTER
    + b',"usage":null}\n\n'
    b'data: {"choices":[{"content_filter_results":{},"delta":{"content":"","refusal":null,'
    b'"role":"assistant"},"finish_reason":null,"index":0,"logprobs":null}],' + _TAIL + b',"usage":null}\n\n'
    b'data: {"choices":[{"content_filter_results":' + _FILTERS + b',"delta":{"content":"Hello"},'
    b'"finish_reason":null,"index":0,"logprobs":null}],' + _TAIL + b',"usage":null}\n\n'
    b'data: {"choices":[{"content_filter_results":{},"delta":{},"finish_reason":"stop","index":0,'
    b'"logprobs":null}],' + _TAIL + b',"usage":null}\n\n'
    b'data: {"choices":[],' + _TAIL + b',"usage":{"completion_tokens":2,"completion_tokens_details":'
    b'{"accepted_prediction_tokens":0,"audio_tokens":0,"reasoning_tokens":0,"rejected_prediction_tokens":0},'
    b'"prompt_tokens":23,"prompt_tokens_details":{"audio_tokens":0,"cached_tokens":0},"total_tokens":25}}\n\n'
    b"data: [DONE]\n\n"
)

SAMPLES = {
    "openai": (OPENAI_PLAIN, OPENAI_WITH_USAGE, Usage(19, 7)),
    "openai-2024": (OPENAI_2024_PLAIN, OPENAI_2024_WITH_USAGE, Usage(8, 1)),
    "azure": (AZURE_PLAIN, AZURE_WITH_USAGE, Usage(23, 2)),
}


def run(tap: object, data: bytes, size: int) -> bytes:
    """Feed C{data} to C{tap} in pieces of C{size} bytes, then flush."""
    out = [tap.feed(data[i : i + size]) for i in range(0, len(data), size)]  # type: ignore[attr-defined]
    return b"".join(out) + tap.flush()  # type: ignore[attr-defined]


def test_samples_are_valid_sse_json() -> None:
    """The samples themselves: every data line is JSON, and asking adds exactly one chunk."""
    for plain, with_usage, _ in SAMPLES.values():
        for stream in (plain, with_usage):
            for event in stream.split(b"\n\n")[:-1]:
                assert event.startswith(b"data: ")
                if event != b"data: [DONE]":
                    json.loads(event[6:])
        assert with_usage.count(b"\n\n") == plain.count(b"\n\n") + 1


@pytest.mark.parametrize("name", sorted(SAMPLES))
@pytest.mark.parametrize("size", [1, 7, 64, 1 << 20])
def test_strip_gives_the_stream_without_usage(name: str, size: int) -> None:
    """A stream generated with include_usage, filtered, is byte-identical to one without."""
    plain, with_usage, usage = SAMPLES[name]
    tap = ChatStreamUsage(strip=True)
    assert run(tap, with_usage, size) == plain
    assert tap.usage == usage


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_client_that_asked_gets_every_byte(name: str) -> None:
    _, with_usage, usage = SAMPLES[name]
    tap = ChatStreamUsage(strip=False)
    assert run(tap, with_usage, 5) == with_usage
    assert tap.usage == usage


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_stream_without_usage_passes_unchanged(name: str) -> None:
    """Upstream ignored include_usage: nothing to remove, no usage."""
    plain, _, _ = SAMPLES[name]
    for strip in (True, False):
        tap = ChatStreamUsage(strip=strip)
        assert run(tap, plain, 3) == plain
        assert tap.usage is None


def test_chained_after_filter_frames() -> None:
    """With Azure's filter frames dropped first, the client gets what FilterFrames alone gives."""
    tap = ChatStreamUsage(strip=True)
    chain = Chained(FilterFrames(), tap)
    assert run(chain, AZURE_WITH_USAGE, 11) == run(FilterFrames(), AZURE_PLAIN, 11)
    assert tap.usage == Usage(23, 2)
    # And before it: same bytes.
    tap = ChatStreamUsage(strip=True)
    assert run(Chained(tap, FilterFrames()), AZURE_WITH_USAGE, 11) == run(FilterFrames(), AZURE_PLAIN, 11)


@pytest.mark.parametrize("size", [1, 9, 1 << 20])
def test_drop_in_the_same_pass(size: int) -> None:
    """C{drop=is_filter_only}: one filter does what FilterFrames and the strip do chained."""
    tap = ChatStreamUsage(strip=True, drop=is_filter_only)
    assert run(tap, AZURE_WITH_USAGE, size) == run(FilterFrames(), AZURE_PLAIN, size)
    assert tap.usage == Usage(23, 2)
    # A client that asked for usage: only the filter frame goes.
    tap = ChatStreamUsage(strip=False, drop=is_filter_only)
    assert run(tap, AZURE_WITH_USAGE, size) == run(FilterFrames(), AZURE_WITH_USAGE, size)
    assert run(tap, AZURE_WITH_USAGE, size).count(b"\n\n") == AZURE_WITH_USAGE.count(b"\n\n") - 1


def test_chained_flush_passes_held_bytes_through_later_stages() -> None:
    """An event without its blank line, held by the first stage, still goes through the second."""
    tap = ChatStreamUsage(strip=True)
    chain = Chained(FilterFrames(), tap)
    last = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}'
    assert chain.feed(b'data: {"choices":[{"index":0}],"usage":null}\n\n' + last) == (
        b'data: {"choices":[{"index":0}]}\n\n'
    )
    assert chain.flush() == b""
    assert tap.usage == Usage(3, 4)


def test_crlf_events_and_first_member() -> None:
    tap = ChatStreamUsage(strip=True)
    data = b'data: {"usage":null,"choices":[{"index":0}]}\r\n\r\ndata: [DONE]\r\n\r\n'
    assert run(tap, data, 2) == b'data: {"choices":[{"index":0}]}\r\n\r\ndata: [DONE]\r\n\r\n'


def test_usage_on_a_chunk_with_choices_is_cut_out_of_it() -> None:
    """Usage sent on the last content chunk (some servers do): only the member goes."""
    tap = ChatStreamUsage(strip=True)
    event = (
        b'data: {"choices":[{"delta":{},"finish_reason":"stop","index":0}],'
        b'"usage": {"prompt_tokens":5,"completion_tokens":6},"x":1}\n\n'
    )
    assert (
        run(tap, event, 4) == b'data: {"choices":[{"delta":{},"finish_reason":"stop","index":0}],"x":1}\n\n'
    )
    assert tap.usage == Usage(5, 6)


UNREADABLE = [
    b'data: {"choices":[],"usage":{"prompt_tokens":\n\n',  # truncated JSON
    b'data: {"choices":[],"usage":{"prompt_tokens":"9","completion_tokens":1}}\n\n',  # not a count
    b'data: {"choices":[],"usage":{"prompt_tokens":-1,"completion_tokens":1}}\n\n',
    b'data: {"choices":[],"usage":[1,2]}\n\n',
    b'data: ["usage":{}]\n\n',
    b'data: {"choices":[],"usage":{"prompt_tokens":1}}\xff\xfe\n\n',  # not UTF-8
    b'event: x\ndata: "usage":null\n\n',
    b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}',  # no blank line
]


@pytest.mark.parametrize("event", UNREADABLE)
def test_unreadable_events_pass_unchanged(event: bytes) -> None:
    tap = ChatStreamUsage(strip=True)
    out = run(tap, event, 3)
    if tap.usage is None:
        assert out == event
    else:  # the last one is a whole usage chunk at the end of the stream: removed
        assert (out, tap.usage) == (b"", Usage(1, 2))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=1, max_value=50), st.booleans())
def test_never_raises_and_only_strips(data: bytes, size: int, strip: bool) -> None:
    """Any bytes: no exception; without strip every byte passes; with it, output is no longer."""
    data = data.replace(b"X", b'"usage":null').replace(b"Y", b'{"choices":[],"usage":{"prompt_tokens":1}}')
    for tap in (ChatStreamUsage(strip=strip), ResponsesStreamUsage()):
        out = run(tap, data, size)
        if not strip or isinstance(tap, ResponsesStreamUsage):
            assert out == data
        else:
            assert len(out) <= len(data)


# The Responses API stream, as the fake (and OpenAI) write it.
RESPONSES_STREAM = (
    b'event: response.created\ndata: {"type":"response.created","sequence_number":0,"response":'
    b'{"id":"resp_1","object":"response","status":"in_progress","output":[],"usage":null}}\n\n'
    b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":1,'
    b'"item_id":"msg_1","output_index":0,"content_index":0,"delta":"response.completed \\"usage\\":1"}\n\n'
    b'event: response.completed\ndata: {"type":"response.completed","sequence_number":2,"response":'
    b'{"id":"resp_1","object":"response","status":"completed","output":[],"usage":{"input_tokens":9,'
    b'"input_tokens_details":{"cached_tokens":0},"output_tokens":12,"output_tokens_details":'
    b'{"reasoning_tokens":0},"total_tokens":21},"metadata":{"usage":"x"}}}\n\n'
)


@pytest.mark.parametrize("size", [1, 13, 1 << 20])
def test_responses_stream_usage(size: int) -> None:
    tap = ResponsesStreamUsage()
    assert run(tap, RESPONSES_STREAM, size) == RESPONSES_STREAM
    assert tap.usage == Usage(9, 12)


def test_responses_incomplete_counts_too() -> None:
    tap = ResponsesStreamUsage()
    event = (
        b'data: {"type":"response.incomplete","response":'
        b'{"usage":{"input_tokens":4,"output_tokens":100}}}\n\n'
    )
    assert run(tap, event, 10) == event
    assert tap.usage == Usage(4, 100)


CHAT_JSON = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"\\"usage\\":{\\"prompt_tokens\\":1}"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":11,"completion_tokens":3,"total_tokens":14},"system_fingerprint":"fp_x"}'
)


@pytest.mark.parametrize(
    ("body", "usage"),
    [
        (CHAT_JSON, Usage(11, 3)),
        (
            b'{"object":"list","data":[],"model":"ada","usage":{"prompt_tokens":5,"total_tokens":5}}',
            Usage(5, 0),
        ),
        (
            b'{"object":"response","usage":{"input_tokens":9,"output_tokens":12,"total_tokens":21}}',
            Usage(9, 12),
        ),
        (b'{"error":{"message":"quota","code":"429"}}', None),
        (b"not json", None),
        (b"", None),
        (b"[1, 2]", None),
    ],
)
def test_json_body(body: bytes, usage: Usage | None) -> None:
    tap = JSONUsage()
    assert run(tap, body, 4) == body
    assert tap.usage == usage


def test_big_json_body_reads_the_tail() -> None:
    """An embeddings list of many MB: usage from its end, without keeping the body."""
    item = b'{"object":"embedding","index":0,"embedding":"' + b"A" * 6000 + b'"},'
    body = (
        b'{"object":"list","data":['
        + item * (4 * JSON_PARSE_LIMIT // len(item))
        + b'{"object":"embedding","index":1,"embedding":"AAAA"}],"model":"ada-002",'
        b'"usage":{"prompt_tokens":4096,"total_tokens":4096}}'
    )
    tap = JSONUsage()
    assert run(tap, body, 16384) == body
    assert tap.usage == Usage(4096, 0)


def test_big_responses_body_skips_a_later_usage_that_is_not_one() -> None:
    """C{metadata} (string values) follows C{usage} in a response object."""
    body = (
        b'{"object":"response","output":[{"type":"message","content":[{"type":"output_text","text":"'
        + b"x" * (2 * JSON_PARSE_LIMIT)
        + b'"}]}],"usage":{"input_tokens":7,"output_tokens":70000,"total_tokens":70007},'
        b'"user":null,"metadata":{"usage":"high"}}'
    )
    tap = JSONUsage()
    run(tap, body, 8192)
    assert tap.usage == Usage(7, 70000)


@pytest.mark.parametrize(
    ("route", "content_type", "encoding", "kind"),
    [
        ("/v1/chat/completions", b"text/event-stream; charset=utf-8", None, ChatStreamUsage),
        ("/v1/completions", b"text/event-stream", None, ChatStreamUsage),
        ("/v1/responses", b"text/event-stream", None, ResponsesStreamUsage),
        ("/v1/responses/resp_1?stream=true", b"text/event-stream", None, ResponsesStreamUsage),
        (b"/openai/v1/responses", b"text/event-stream", None, ResponsesStreamUsage),
        ("/openai/responses?api-version=preview", b"text/event-stream", None, ResponsesStreamUsage),
        ("/openai/deployments/responses/chat/completions", b"text/event-stream", None, ChatStreamUsage),
        ("/v1/responsesx", b"text/event-stream", None, ChatStreamUsage),
        ("/v1/embeddings", b"application/json", None, JSONUsage),
        ("/v1/chat/completions", b"Application/JSON; charset=utf-8", b"identity", JSONUsage),
        ("/v1/chat/completions", b"application/json", b"gzip", None),
        ("/v1/audio/speech", b"audio/mpeg", None, None),
        ("/v1/files", None, None, None),
    ],
)
def test_usage_tap_choice(
    route: str, content_type: bytes | None, encoding: bytes | None, kind: type | None
) -> None:
    tap = usage_tap(route, content_type, encoding, strip=True)
    assert (type(tap) if tap is not None else None) is kind


def test_usage_tap_passes_strip_on() -> None:
    tap = usage_tap("/v1/chat/completions", b"text/event-stream", strip=True)
    assert tap is not None
    assert run(tap, OPENAI_WITH_USAGE, 100) == OPENAI_PLAIN
    tap = usage_tap("/v1/chat/completions", b"text/event-stream")
    assert tap is not None
    assert run(tap, OPENAI_WITH_USAGE, 100) == OPENAI_WITH_USAGE
    tap = usage_tap("/v1/chat/completions", b"text/event-stream", strip=True, drop=is_filter_only)
    assert tap is not None
    assert run(tap, AZURE_WITH_USAGE, 100) == run(FilterFrames(), AZURE_PLAIN, 100)


@pytest.mark.parametrize("end", [b"\r\n\r\n", b"\r\n\n", b"\n\r\n", b"\r\r", b"\r\n\r"])
def test_every_kind_of_event_end(end: bytes) -> None:
    """SSE lines end with CRLF, LF or CR, in any mix (L{aoaiproxy.sse.Events}, as FilterFrames)."""
    plain, with_usage = (s.replace(b"\n\n", end) for s in (OPENAI_2024_PLAIN, OPENAI_2024_WITH_USAGE))
    for size in (1, 7, len(with_usage)):
        tap = ChatStreamUsage(strip=True)
        assert run(tap, with_usage, size) == plain, size
        assert tap.usage == Usage(8, 1)


def test_an_event_that_breaks_its_reader_passes_unchanged() -> None:
    class Broken(ChatStreamUsage):
        def event(self, event: bytes) -> bytes:
            raise RuntimeError("a bug")

    assert run(Broken(strip=True), OPENAI_WITH_USAGE, 50) == OPENAI_WITH_USAGE


class _EventByEvent(ChatStreamUsage):
    """L{ChatStreamUsage} without its whole-chunk shortcut: every chunk split and read by L{Events}."""

    def feed(self, data: bytes) -> bytes:
        return Events.feed(self, data)


_SAMPLES = [OPENAI_WITH_USAGE, OPENAI_PLAIN, AZURE_WITH_USAGE, AZURE_PLAIN, OPENAI_2024_WITH_USAGE]


@settings(max_examples=300)
@given(
    st.lists(st.sampled_from(_SAMPLES), min_size=1, max_size=3).map(b"".join),
    st.lists(st.integers(0, 100_000), max_size=12),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
def test_whole_chunk_shortcut_gives_the_event_by_event_verdicts(
    stream: bytes, cuts: list[int], strip: bool, drop: bool, crlf: bool
) -> None:
    """
    The shortcut of L{ChatStreamUsage.feed} (a chunk of whole events that none of which names
    usage or a filter result passes as it is) gives the bytes and the usage that reading each
    event gives: cut anywhere, on event ends or not, with CRLF line ends, each option.
    """
    if crlf:
        stream = stream.replace(b"\n", b"\r\n")
    # Cut where hypothesis says or, when it says nowhere, on every event end (the usual
    # chunk: one event each).
    end = b"\r\n\r\n" if crlf else b"\n\n"
    ends = [i + len(end) for i in range(len(stream)) if stream.startswith(end, i)] if not cuts else []
    points = sorted({c % (len(stream) + 1) for c in cuts} | set(ends))
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    options: dict[str, Any] = {"strip": strip, "drop": is_filter_only if drop else None}
    fast, slow = ChatStreamUsage(**options), _EventByEvent(**options)
    assert [fast.feed(c) for c in chunks] == [slow.feed(c) for c in chunks]
    assert fast.flush() == slow.flush()
    assert fast.usage == slow.usage
