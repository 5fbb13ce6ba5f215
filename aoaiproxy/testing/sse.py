"""The shapes of the fake's streams (Server-Sent Events), byte for byte.

Chat and completions streams are what Azure sends: a filter-only first frame (C{choices} empty,
only C{prompt_filter_results}; unless the fake's C{filter_frames} is off), content chunks, a
chunk with C{finish_reason}, and C{data: [DONE]}.  With C{"stream_options": {"include_usage":
true}} they are what OpenAI and Azure send then: every chunk carries C{"usage":null} (as its last
member) and a last chunk with empty C{choices} carries the usage, before C{[DONE]}; the
filter-only frame is unchanged.  Responses API streams are typed events ending with
C{response.completed}, whose response carries C{usage}.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from .replies import HOLD, dumps
from .usage import chat_usage, count_tokens

JSONObject = dict[str, Any]

DONE = b"data: [DONE]\n\n"
BIG_EVENT_CONTENT = "x" * 4000


def sse(obj: object, event: str | None = None) -> bytes:
    """One SSE event: an optional C{event:} line, C{data:} with compact JSON, a blank line."""
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + dumps(obj) + b"\n\n"


FILTER_FRAME = sse(
    {
        "choices": [],
        "created": 0,
        "id": "",
        "model": "",
        "object": "",
        "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}],
    }
)


class StreamSettings(Protocol):
    """What a stream's shape depends on (the fake's attributes of these names)."""

    stream_chunks: int
    big_stream_bytes: int | None
    filter_frames: bool


def content_events(settings: StreamSettings, make: Callable[[int, str], bytes]) -> Iterator[bytes]:
    """The content events: C{stream_chunks} of them, or C{big_stream_bytes} worth if that is set.

    ``make(index, text)`` builds one event.
    """
    if settings.big_stream_bytes is None:
        for i in range(settings.stream_chunks):
            yield make(i, f"chunk{i} ")
        return
    size = 0
    for i in itertools.count():
        if size >= settings.big_stream_bytes:
            return
        event = make(i, BIG_EVENT_CONTENT)
        size += len(event)
        yield event


def completion_events(
    settings: StreamSettings,
    *,
    completion_id: str,
    created: int,
    deployment: str,
    chat: bool,
    include_usage: bool,
    prompt: int,
) -> Iterator[bytes | object]:
    """A chat (or legacy completions) stream, with L{HOLD} before its final events."""
    tail: JSONObject = {"usage": None} if include_usage else {}

    def chunk(choices: list[JSONObject], **extra: Any) -> bytes:
        return sse(
            {
                "id": completion_id,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": deployment,
                "system_fingerprint": "fp_fake",
                "choices": choices,
                **(extra or tail),
            }
        )

    def choice_with(content: str | None, finish: str | None, first: bool = False) -> JSONObject:
        choice: JSONObject = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            delta: JSONObject = {"role": "assistant"} if first else {}
            if content is not None:
                delta["content"] = content
            choice["delta"] = delta
        else:
            choice["text"] = content or ""
        choice["content_filter_results"] = {}
        return choice

    completion = 0

    def content_chunk(i: int, content: str) -> bytes:
        nonlocal completion
        completion += count_tokens(content)
        return chunk([choice_with(content, None, first=i == 0)])

    if settings.filter_frames:
        yield FILTER_FRAME
    yield from content_events(settings, content_chunk)
    yield HOLD
    yield chunk([choice_with(None, "stop")])
    if include_usage:
        yield chunk([], usage=chat_usage(prompt, completion))
    yield DONE


def response_events(
    settings: StreamSettings,
    *,
    message_id: str,
    response: Callable[[str, str | None, int], JSONObject],
    on_completed: Callable[[JSONObject], object],
) -> Iterator[bytes | object]:
    """A Responses API stream, with L{HOLD} before its final events.

    ``response(status, text, output_tokens)`` builds the response object (C{text} None: no
    output yet); ``on_completed`` is given the final one as the stream ends.
    """
    seq = itertools.count()
    where = {"item_id": message_id, "output_index": 0, "content_index": 0}

    def event(kind: str, **fields: Any) -> bytes:
        return sse({"type": kind, "sequence_number": next(seq), **fields}, event=kind)

    yield event("response.created", response=response("in_progress", None, 0))
    yield event("response.in_progress", response=response("in_progress", None, 0))
    item: JSONObject = {"type": "message", "id": message_id, "status": "in_progress"}
    item.update(role="assistant", content=[])
    yield event("response.output_item.added", output_index=0, item=item)
    empty = {"type": "output_text", "text": "", "annotations": []}
    yield event("response.content_part.added", **where, part=empty)
    deltas: list[str] = []
    completion = 0

    def delta_event(i: int, delta: str) -> bytes:
        nonlocal completion
        completion += count_tokens(delta)
        if settings.big_stream_bytes is None:  # a big stream's text is not kept
            deltas.append(delta)
        return event("response.output_text.delta", **where, delta=delta, logprobs=[])

    yield from content_events(settings, delta_event)
    yield HOLD
    text = "".join(deltas)
    yield event("response.output_text.done", **where, text=text, logprobs=[])
    part = {"type": "output_text", "text": text, "annotations": []}
    yield event("response.content_part.done", **where, part=part)
    final = response("completed", text, completion)
    yield event("response.output_item.done", output_index=0, item=final["output"][0])
    on_completed(final)
    yield event("response.completed", response=final)
