"""Token usage the way the fake counts it: deterministic, so that tests can compute it.

The fake's tokenizer is one token per whitespace-separated word (L{count_tokens}).  A request's
prompt tokens are the words of its text: the C{content} of every chat message (a string, or the
C{text} of each content part), a completion's C{prompt}, the Responses API's C{instructions} and
C{input}, an embedding's C{input} (a list of token ids counts one token per id).  Completion
tokens are the words of the answer's text: C{"Hello from fake Azure (DEPLOYMENT)"} has 5; a
stream's are summed over its content chunks, one each (C{"chunk0 "}, ..., or a big stream's
chunks of C{x}s).  None of it depends on the model name or on C{stream_options}, so a proxy that
rewrites those does not change the counts: a test computes them from what it sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

JSONObject = dict[str, Any]

__all__ = ["chat_usage", "count_tokens", "embeddings_usage", "prompt_tokens", "response_usage"]


def count_tokens(text: str) -> int:
    """How many tokens the fake counts in ``text``: its whitespace-separated words."""
    return len(text.split())


def _texts(value: Any) -> Iterator[str]:
    """The text in a prompt, message content or input value, however nested."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item)
    elif isinstance(value, dict):
        for key in ("content", "text"):
            yield from _texts(value.get(key))


def _token_ids(value: Any) -> int | None:
    """How many token ids ``value`` holds if it is a list of ids (or of lists of ids)."""
    if isinstance(value, list) and value and all(isinstance(x, int) for x in value):
        return len(value)
    if isinstance(value, list) and value and all(isinstance(x, list) for x in value):
        counts = [_token_ids(x) for x in value]
        if all(c is not None for c in counts):
            return sum(c or 0 for c in counts)
    return None


def prompt_tokens(body: JSONObject) -> int:
    """The prompt tokens of a request body (chat, completions, embeddings or responses)."""
    total = 0
    for key in ("messages", "prompt", "instructions", "input"):
        value = body.get(key)
        ids = _token_ids(value)
        total += ids if ids is not None else sum(count_tokens(t) for t in _texts(value))
    return total


def chat_usage(prompt: int, completion: int) -> JSONObject:
    """A chat or completions C{usage} object, as Azure sends it."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def embeddings_usage(prompt: int) -> JSONObject:
    """An embeddings C{usage} object."""
    return {"prompt_tokens": prompt, "total_tokens": prompt}


def response_usage(prompt: int, completion: int) -> JSONObject:
    """A Responses API C{usage} object."""
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }
