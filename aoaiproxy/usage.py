"""
Token usage from upstream responses, read from the bytes as they are relayed (SPEC §14).

Three taps, each with the shape of L{aoaiproxy.relay.FilterFrames} (C{feed(data) -> bytes},
C{flush() -> bytes}; the stream taps are L{aoaiproxy.sse.Events} as it is) so that they chain
with it, and a C{usage} attribute that holds the L{Usage} seen (C{None} until then):

    - L{JSONUsage}: a JSON response body (C{usage.prompt_tokens}/C{completion_tokens}, the
      Responses API's C{input_tokens}/C{output_tokens}, embeddings' C{prompt_tokens} only);
    - L{ChatStreamUsage}: a chat (or completions) event stream's usage chunk (C{"choices":[]}
      with C{"usage":{...}}).  With C{strip=True} -- the client did not ask for usage, the proxy
      added C{stream_options.include_usage} upstream -- it removes that chunk and the
      C{"usage":null} member the option adds to every other chunk, so that the client gets the
      bytes it would have got without the proxy;
    - L{ResponsesStreamUsage}: a Responses API stream's C{response.completed} event (or
      C{response.incomplete}/C{response.failed}, which also carry the tokens spent).

L{usage_tap} picks the one for a response (L{aoaiproxy.relay.BodyRelay} relays every API
response through it).  No tap ever raises on what upstream sends: an event or body it cannot
read passes unchanged and yields no usage.  Only events that can carry
usage are parsed as JSON; every other event costs a substring search.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import attrs

from aoaiproxy.sse import Events, event_data

__all__ = [
    "FILTER_RESULTS",
    "Chained",
    "ChatStreamUsage",
    "JSONUsage",
    "ResponsesStreamUsage",
    "Usage",
    "UsageTap",
    "usage_from_object",
    "usage_tap",
]

#: A JSON body up to this size is parsed whole; of a larger one only its last
#: L{JSON_TAIL_BYTES} are kept and searched (the top-level C{usage} is at the end of every
#: OpenAI and Azure body: it follows the data of an embeddings list).
JSON_PARSE_LIMIT = 64 * 1024
JSON_TAIL_BYTES = 64 * 1024


@attrs.frozen
class Usage:
    """Tokens one response reports: C{prompt} (input) and C{completion} (output)."""

    prompt: int
    completion: int


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _from_usage(usage: object) -> Usage | None:
    """L{Usage} from a C{usage} object of either API, or None if it is not one."""
    if not isinstance(usage, dict):
        return None
    if "prompt_tokens" in usage:
        prompt = _count(usage["prompt_tokens"])
        completion = _count(usage.get("completion_tokens", 0))
    else:
        prompt = _count(usage.get("input_tokens"))
        completion = _count(usage.get("output_tokens", 0))
    if prompt is None or completion is None:
        return None
    return Usage(prompt, completion)


def usage_from_object(obj: object) -> Usage | None:
    """The top-level C{usage} of a parsed response (chat, completions, embeddings, responses)."""
    return _from_usage(obj.get("usage")) if isinstance(obj, dict) else None


class UsageTap(Protocol):
    """What the relay drives: bytes in, the bytes for the client out, then the usage seen."""

    usage: Usage | None

    def feed(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class Chained:
    """
    Several taps or filters as one: C{feed} passes each one's output to the next; C{flush}
    flushes each in order, feeding what one releases through the ones after it.
    """

    def __init__(self, *stages: Any) -> None:
        self._stages = stages

    def feed(self, data: bytes) -> bytes:
        for stage in self._stages:
            data = stage.feed(data)
        return data

    def flush(self) -> bytes:
        out = b""
        for stage in self._stages:
            out = stage.feed(out) + stage.flush() if out else stage.flush()
        return out


def _parse(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


_USAGE_KEY = b'"usage":'
_DECODER = json.JSONDecoder()
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_NULL_MEMBER = b',"usage":null'
_NULL_FIRST = b'{"usage":null,'


def _cut_null_member(event: bytes) -> bytes:
    """
    The event without its top-level C{"usage":null} member, found as OpenAI and Azure write
    it (compact JSON: C{,"usage":null} after C{choices}, or first in the object); unchanged if
    it is not there.  The member is the last C{,"usage":} of the event: every member after it
    (C{obfuscation}, Azure's sorted keys end with it) is a scalar, and inside a JSON string
    its quotes would be escaped.
    """
    i = event.rfind(_NULL_MEMBER)
    if i >= 0 and event[i + len(_NULL_MEMBER) : i + len(_NULL_MEMBER) + 1] in (
        b",",
        b"}",
        b" ",
        b"\r",
        b"\n",
    ):
        return event[:i] + event[i + len(_NULL_MEMBER) :]
    i = event.find(_NULL_FIRST)
    if i >= 0:
        return event[: i + 1] + event[i + len(_NULL_FIRST) :]
    return event


def _value_at(text: str, index: int) -> tuple[Any, int] | None:
    """The JSON value that starts at C{index} (after optional whitespace), and where it ends."""
    try:
        return _DECODER.raw_decode(text, _WHITESPACE.match(text, index).end())  # type: ignore[union-attr]
    except ValueError:
        return None


def _cut_usage_member(event: bytes, usage: object) -> bytes | None:
    """
    The event without its top-level C{,"usage":{...}} member (a usage that came on a chunk
    with choices); None if the member cannot be located exactly.
    """
    try:
        text = event.decode("utf-8")
    except UnicodeDecodeError:
        return None
    i = text.rfind(',"usage":')
    found = _value_at(text, i + 9) if i >= 0 else None
    if found is None or found[0] != usage:
        return None
    return (text[:i] + text[found[1] :]).encode("utf-8")


#: What every one of Azure's filter-only frames names (L{aoaiproxy.relay.is_filter_only}).
FILTER_RESULTS = b"prompt_filter_results"


class ChatStreamUsage(Events):
    """
    The usage of a chat or completions event stream (the chunk that
    C{stream_options.include_usage} adds before C{[DONE]}).  With C{strip}, that chunk and the
    C{"usage":null} members are removed from what the client receives; without, every byte
    passes unchanged.  C{drop}: which of the events that name L{FILTER_RESULTS} to remove as
    well, in the same pass (give it L{aoaiproxy.relay.is_filter_only} instead of chaining a
    L{aoaiproxy.relay.FilterFrames}); it is not asked of other events.
    """

    __slots__ = ("_drop", "_strip", "usage")

    def __init__(self, *, strip: bool = False, drop: Callable[[bytes], bool] | None = None) -> None:
        super().__init__()
        self.usage: Usage | None = None
        self._strip = strip
        self._drop = drop

    def feed(self, data: bytes) -> bytes:
        # The usual chunk, one event or several: whole events only (LF only, ending with a
        # blank line), nothing held, and none of them names usage or a filter result, so
        # none would be changed: passed on as it is, with no event split out and read.
        if (
            not self._buffer
            and not self._passing
            and data.endswith(b"\n\n")
            and data.find(b"\r") < 0
            and data.rfind(_USAGE_KEY) < 0
            and (self._drop is None or data.find(FILTER_RESULTS) < 0)
        ):
            return data
        return super().feed(data)

    def event(self, event: bytes) -> bytes:
        drop = self._drop
        if drop is not None and event.find(FILTER_RESULTS) >= 0 and drop(event):
            return b""
        i = event.rfind(_USAGE_KEY)
        if i < 0:
            return event
        if event.startswith(b"null", i + len(_USAGE_KEY)):
            return _cut_null_member(event) if self._strip else event
        obj = _parse(event_data(event))
        usage = usage_from_object(obj)
        if usage is None:
            return event
        self.usage = usage
        if not self._strip:
            return event
        if obj.get("choices") == []:
            return b""
        # Usage on a chunk with choices (not what OpenAI or Azure send): cut the member only.
        cut = _cut_usage_member(event, obj["usage"])
        return event if cut is None else cut


_TERMINAL = re.compile(rb"response\.(?:completed|incomplete|failed)")
_TERMINAL_TYPES = frozenset({"response.completed", "response.incomplete", "response.failed"})


class ResponsesStreamUsage(Events):
    """The usage of a Responses API event stream, from its final C{response.*} event."""

    __slots__ = ("usage",)

    def __init__(self) -> None:
        super().__init__()
        self.usage: Usage | None = None

    def event(self, event: bytes) -> bytes:
        if _TERMINAL.search(event) is None:
            return event
        obj = _parse(event_data(event))
        if isinstance(obj, dict) and obj.get("type") in _TERMINAL_TYPES:
            usage = usage_from_object(obj.get("response"))
            if usage is not None:
                self.usage = usage
        return event


class JSONUsage:
    """
    The usage of a JSON response body.  Bytes pass unchanged; the body is kept up to
    L{JSON_PARSE_LIMIT} and parsed at L{flush}; past it, only its last L{JSON_TAIL_BYTES} are
    kept, and the last C{"usage":} object among them that holds token counts is taken.
    """

    __slots__ = ("_chunks", "_size", "_whole", "usage")

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._whole = True

    def feed(self, data: bytes) -> bytes:
        if data:
            self._chunks.append(data)
            self._size += len(data)
            if self._size > JSON_PARSE_LIMIT:
                self._whole = False
                # Keep the chunks that hold the last JSON_TAIL_BYTES (the first may hold more).
                while self._size - len(self._chunks[0]) >= JSON_TAIL_BYTES:
                    self._size -= len(self._chunks.popleft())
        return data

    def flush(self) -> bytes:
        body = b"".join(self._chunks)
        self._chunks.clear()
        if self._whole:
            self.usage = usage_from_object(_parse(body))
        else:
            self.usage = _usage_in_tail(body[-JSON_TAIL_BYTES:])
        return b""


def _usage_in_tail(tail: bytes) -> Usage | None:
    """The last C{"usage":{...}} in C{tail} whose object holds token counts."""
    text = tail.decode("utf-8", "replace")
    end = len(text)
    while (i := text.rfind('"usage":', 0, end)) >= 0:
        found = _value_at(text, i + 8)
        usage = _from_usage(found[0]) if found is not None else None
        if usage is not None:
            return usage
        end = i
    return None


def _media_type(value: bytes | None) -> bytes:
    return (value or b"").split(b";", 1)[0].strip().lower()


_RESPONSES_API = re.compile(r"^/(?:v1|openai/v1|openai)/responses(?:[/?]|$)")


def usage_tap(
    path: str | bytes,
    content_type: bytes | None,
    content_encoding: bytes | None = None,
    *,
    strip: bool = False,
    drop: Callable[[bytes], bool] | None = None,
) -> UsageTap | None:
    """
    The tap for one upstream response, or None when it carries no usage the proxy can read.
    C{path}: the client's request path (or its L{aoaiproxy.metrics.route_label}): a stream
    from the Responses API (C{/v1/responses...}, passthrough C{/openai/v1/responses...}) has
    its own events.  C{content_type} and C{content_encoding}: the response's headers (a
    compressed body is not read).  C{strip}: the proxy added C{include_usage} to this chat
    stream's request.  C{drop}: as for L{ChatStreamUsage} (chat streams only).
    """
    if content_encoding and _media_type(content_encoding) != b"identity":
        return None
    media = _media_type(content_type)
    if media == b"text/event-stream":
        if isinstance(path, bytes):
            path = path.decode("latin-1")
        if _RESPONSES_API.match(path):
            return ResponsesStreamUsage()
        return ChatStreamUsage(strip=strip, drop=drop)
    if media == b"application/json" or media.endswith(b"+json"):
        return JSONUsage()
    return None
