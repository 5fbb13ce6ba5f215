"""
The fast path of L{aoaiproxy.jsonbody.top_level} (C{bytes} bodies read with C{json}'s C
scanner): on any body, valid or not, it gives the scanner's verdict, the same L{TopLevel} or
the same error; it answers (rather than standing aside) for ordinary bodies; and the bound it
trusts for the scanner's steps holds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aoaiproxy import jsonbody
from aoaiproxy.jsonbody import JSONBodyError, TopLevel
from tests.test_jsonbody import encode, fragments, layouts, objects

PROPERTIES = settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

Outcome = TopLevel | tuple[type, str]


def outcome(read: Callable[[], TopLevel]) -> Outcome:
    try:
        return read()
    except JSONBodyError as e:
        return type(e), str(e)


def scanner(body: bytes, names: Collection[str] | None, max_steps: int) -> Outcome:
    return outcome(lambda: jsonbody._Scanner(body, max_steps).object(names))


def agree(body: bytes, names: Collection[str] | None, max_steps: int = jsonbody.MAX_STEPS) -> TopLevel | None:
    """Assert that top_level and the scanner agree on C{body}; the fast path's answer."""
    assert outcome(lambda: jsonbody.top_level(body, names, max_steps=max_steps)) == scanner(
        body, names, max_steps
    )
    fast = jsonbody._fast_object(body, names, max_steps)
    if fast is not None:
        assert fast == scanner(body, names, max_steps)
    return fast


# What breaks a body, or makes it valid but unusual, spliced in anywhere.
PIECES = [
    b'"',
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b" ",
    b"\t" * 70,
    b" " * 300,
    b"\x00",
    b"\x0b",
    b"\x1f",
    b"\xff",
    b"\xc3",
    b"\xc3\xa9",
    b"\xed\xa0\x80",  # an encoded lone surrogate
    b"NaN",
    b"-Infinity",
    b"Infinity",
    b"1e400",
    b"-0.5E+3",
    b"01",
    b"1.",
    b"1" * 1100,
    b'"\\ud800"',
    b'"\\ud83d\\ude00"',
    b'"\\q"',
    b'"a\x01b"',
    b'"model":"m",',
    b'"model":null,',
    b'"mod\\u0065l":"x",',
    b'"stream":true,',
    b'"' + b"n" * 300 + b'":1,',
    b'"x" \t\n\r : \t 1,',
    b"\xef\xbb\xbf",
    b"[" * 1500 + b"]" * 1500,
    b'{"a":' * 1200 + b"1" + b"}" * 1200,
    b'"' + b'\\"' * 70 + b'"',
    b'"' + b"\\" * 130 + b'"',
    b"true",
    b"nul",
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    body = encode(draw(objects), draw(layouts))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(body)))
        op = draw(st.sampled_from(["insert", "replace", "delete"]))
        piece = draw(st.sampled_from(PIECES))
        if op == "insert":
            body = body[:at] + piece + body[at:]
        elif op == "replace":
            body = body[:at] + piece + body[at + len(piece) :]
        else:
            body = body[:at] + body[at + draw(st.integers(1, 4)) :]
    return body


budgets = st.sampled_from([jsonbody.MAX_STEPS, 5, 40, 200, 600, 2000])
name_sets = st.sampled_from([None, ("model", "stream"), ("stream", "stream_options"), ()])


@PROPERTIES
@given(objects, layouts, name_sets, budgets)
def test_same_verdict_on_json_objects(
    obj: dict[str, Any], layout: dict[str, Any], names: Collection[str] | None, max_steps: int
) -> None:
    agree(encode(obj, layout), names, max_steps)


@PROPERTIES
@given(mutated(), name_sets, budgets)
def test_same_verdict_on_mutated_bodies(body: bytes, names: Collection[str] | None, max_steps: int) -> None:
    agree(body, names, max_steps)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.one_of(st.binary(max_size=80), fragments), name_sets, budgets)
def test_same_verdict_on_any_bytes(body: bytes, names: Collection[str] | None, max_steps: int) -> None:
    agree(body, names, max_steps)


plain_names = st.text(st.sampled_from("abcmodelstream_é"), max_size=10)
texts = st.text(st.sampled_from(['"', "\\", "\n", "\x01", "é", "\U0001f600", "}", "a"]), max_size=12)
plain_values = st.recursive(
    st.none() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
plain_objects = st.dictionaries(plain_names, plain_values, max_size=6)


@PROPERTIES
@given(plain_objects, st.sampled_from([None, 2, "\t"]))
def test_ordinary_bodies_take_the_fast_path(obj: dict[str, Any], indent: int | str | None) -> None:
    """Names without escapes, strict JSON values: the fast path answers (it is not a test of nothing)."""
    body = json.dumps(obj, ensure_ascii=False, indent=indent).encode()
    for names in (None, ("model", "stream")):
        assert agree(body, names) is not None


def test_chat_bodies_take_the_fast_path() -> None:
    body = json.dumps(
        {
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": 'say "hi"\n\u00e9\U0001f600'}],
            "stream": True,
            "stream_options": {"include_usage": False},
        },
        ensure_ascii=False,
    ).encode()
    top = agree(body, ("model", "stream", "stream_options"))
    assert top is not None
    assert [m.raw(body) for m in top.members] == [b'"gpt-4o"', b"true", b'{"include_usage": false}']


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "m", "deep": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # deeper than C recursion
        b'{"model": "m", "n": 1' + b"0" * 5000 + b"}",  # more digits than int() takes
        b'{"model": "m", "n": 1' + b"0" * 1100 + b"}",  # longer than MAX_SCALAR
        b'{"model": "m", "a": [1,,2]}',  # not strict JSON: the scanner passes it on
        b'{"model": "m", "a": "\xff\x00"}',
        b'{"m\\u006fdel": "m"}',
        b'{"model": "m"} x',
        b"{ \t}",
        b'{"a": [' + b"{}," * 40_000 + b"{}]}",  # too complex for the budget
    ],
)
def test_what_the_fast_path_leaves_to_the_scanner(body: bytes) -> None:
    for names in (None, ("model",)):
        agree(body, names)


@st.composite
def escape_heavy(draw: st.DrawFn) -> bytes:
    unit = draw(st.sampled_from(['\\"', "\\\\", '\\\\\\"', " ", "[]", "x"]))
    text = unit * draw(st.integers(0, 300))
    obj = {"a": text, "b": [text, {"c": text}], "model": "m"}
    body = json.dumps(obj, indent=draw(st.sampled_from([None, 200]))).encode()
    return body


@PROPERTIES
@given(st.one_of(mutated(), escape_heavy()))
def test_step_bound_holds(body: bytes) -> None:
    """The bound the fast path trusts is one on the scanner's steps (members counted apart)."""
    scan = jsonbody._Scanner(body, 10**9)
    try:
        top = scan.object(None)
    except JSONBodyError:
        return
    bound = jsonbody._step_bound(body) + jsonbody._STEPS_PER_MEMBER * top.count
    assert scan.steps <= bound
    crude = jsonbody._WINDOW // jsonbody._WINDOW_BYTES_PER_STEP + 2
    assert bound <= jsonbody._CRUDE_PER_BYTE * len(body) + crude + 4 * top.count


@settings(max_examples=500, deadline=None, derandomize=True)
@given(
    st.one_of(
        st.text().map(lambda t: json.dumps(t, ensure_ascii=False).encode("utf-8", "surrogatepass")),
        st.lists(
            st.sampled_from([*PIECES[:24], b"a", b'\\"', b"\\u00e9", b"\\ud800", b"\\n"]), max_size=6
        ).map(lambda parts: b'"' + b"".join(parts)),
    )
)
def test_string_value_decodes_as_json_loads(raw: bytes) -> None:
    try:
        expected: Any = json.loads(raw)
    except ValueError:
        expected = ValueError
    try:
        got: Any = jsonbody.string_value(raw)
    except ValueError:
        got = ValueError
    assert got == expected
