"""
Reading a JSON body's top level (L{aoaiproxy.jsonbody}): it agrees with C{json.loads} on every
JSON object, never fails otherwise than with L{JSONBodyError}, splices members leaving every
other byte as it was, and costs neither memory nor Python work in proportion to an adversarial
body's structure.
"""

from __future__ import annotations

import base64
import json
import mmap
import os
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aoaiproxy import jsonbody
from aoaiproxy.jsonbody import DuplicateMember, JSONBodyError, NotAnObject, TooComplex

PROPERTIES = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

# Strings rich in what matters to a scanner: quotes, backslashes, brackets, non-ASCII.
tricky_text = st.text(st.sampled_from(['"', "\\", "[", "]", "{", "}", ",", ":", "a", "é", "\n", "\ud83d"]))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), tricky_text
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(tricky_text.filter(lambda k: len(k) < 8), inner, max_size=4),
    ),
    max_leaves=25,
)
objects = st.dictionaries(st.one_of(tricky_text, st.sampled_from(["model", "stream"])), values, max_size=6)
layouts = st.sampled_from(
    [
        {},
        {"indent": 2},
        {"separators": (",", ":")},
        {"separators": (" ,\n\t", " \r\n: ")},
        {"ensure_ascii": False, "indent": "\t"},
    ]
)


def encode(obj: Any, layout: dict[str, Any]) -> bytes:
    """C{obj} as JSON; escaped where a lone surrogate would make it invalid UTF-8."""
    try:
        return json.dumps(obj, **layout).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, **{**layout, "ensure_ascii": True}).encode("utf-8")


@PROPERTIES
@given(objects, layouts)
def test_agrees_with_json_loads(obj: dict[str, Any], layout: dict[str, Any]) -> None:
    body = encode(obj, layout)
    top = jsonbody.top_level(body)
    assert [m.name for m in top.members] == list(obj)
    assert top.count == len(obj)
    for member in top.members:
        assert json.loads(member.raw(body)) == obj[member.name]
        assert body[member.key_start : member.key_start + 1] == b'"'
    kept = jsonbody.top_level(body, ("model", "stream"))
    assert [m.name for m in kept.members] == [k for k in obj if k in ("model", "stream")]
    assert kept.count == len(obj)


@PROPERTIES
@given(objects, layouts, values)
def test_set_member_splices(obj: dict[str, Any], layout: dict[str, Any], value: Any) -> None:
    body = encode(obj, layout)
    new_value = json.dumps(value).encode()
    out = jsonbody.set_member(body, "stream_options", new_value)
    assert json.loads(out) == {**obj, "stream_options": value}
    if "stream_options" not in obj:
        # Added: the client's bytes are all there, in order, around the one insertion.
        at = jsonbody.top_level(body).insert_at
        inserted = len(out) - len(body)
        assert out[:at] + out[at + inserted :] == body


# Bodies a scanner can trip on: arbitrary bytes, and JSON-ish fragments.
fragments = st.lists(
    st.sampled_from(
        [
            "{",
            "}",
            "[",
            "]",
            '"',
            "\\",
            '\\"',
            ",",
            ":",
            " ",
            "\r\n",
            "model",
            '"model"',
            "1e5",
            "-",
            "true",
            "nul",
            "é",
            "\x00",
        ]
    ),
    max_size=30,
).map(lambda parts: "".join(parts).encode())


@settings(max_examples=800, deadline=None, derandomize=True)
@given(st.one_of(st.binary(max_size=80), fragments))
def test_any_bytes_are_read_or_refused_cleanly(body: bytes) -> None:
    try:
        top = jsonbody.top_level(body, max_steps=40)
    except JSONBodyError:
        return
    try:
        parsed = json.loads(body)
    except ValueError:
        return  # what is nested is not validated, by design
    assert isinstance(parsed, dict)
    assert {m.name for m in top.members} == set(parsed)


@pytest.mark.parametrize("window", [3, 4, 5, 64, jsonbody._WINDOW])
def test_strings_dense_with_escaped_quotes(window: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past a few dozen escaped quotes a string is read in windows: every edge case of one."""
    monkeypatch.setattr(jsonbody, "_WINDOW", window)
    for n in range(0, 300, 7):
        text = ('\\"' * n + '"\\\\' * (n % 5) + "x" * (n % 3) + "\\") * 2
        obj = {"a": text, "b": [text, {"c": text}], "model": "m", text[:9]: text}
        body = json.dumps(obj).encode()
        top = jsonbody.top_level(body)
        assert [m.name for m in top.members] == list(obj), n
        assert [json.loads(m.raw(body)) for m in top.members] == list(obj.values())


def test_runs_of_backslashes_before_a_quote() -> None:
    for n in [1, 2, 63, 64, 65, 255, 256, 257, 5000]:
        text = "\\" * n
        body = json.dumps({"a": text, "b": [text], "model": "m"}).encode()
        assert jsonbody.top_level(body, ("model",)).get("model") is not None, n


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[]",
        b'"model"',
        b"{",
        b'{"model"}',
        b'{"model": }',
        b'{"model": "x",}',
        b'{"model": "x" "y": 1}',
        b'{"model": "x"} {}',
        b'{"model": "x"}]',
        b'{"a": [1, 2}',
        b'{"a": {"b": [}]}',
        b'{"a": "unterminated}',
        b'{"a": tru}',
        b'{"a": 01}',
        b'{"a": 1.}',
        b'{"a": 1' + b"0" * 2000 + b"}",
        b"{'model': 'x'}",
        b'{"a\x00b": 1, "a\\q": 2}',
        b'{"model": "x"}\x0b',
    ],
)
def test_not_an_object(body: bytes) -> None:
    with pytest.raises(NotAnObject):
        jsonbody.top_level(body)


def test_forms_json_accepts() -> None:
    for body in [
        b'\xef\xbb\xbf {"model":"m"} \r\n',
        b'{"model":"m","n":NaN,"i":-Infinity,"e":1E+2,"big":1e400,"neg":-0.5e-3}',
        b'{"\\u006dodel": "m"}',
        b'{\n\t"model"\n:\n"m"\n}',
    ]:
        top = jsonbody.top_level(body, ("model",))
        member = top.get("model")
        assert member is not None and member.raw(body) == b'"m"', body


def test_duplicates_are_seen_whatever_the_spelling() -> None:
    body = b'{"model": "ok", "x": 1, "mod\\u0065l": "../evil"}'
    top = jsonbody.top_level(body, ("model",))
    assert [m.raw(body) for m in top.named("model")] == [b'"ok"', b'"../evil"']
    with pytest.raises(DuplicateMember):
        top.get("model")
    with pytest.raises(DuplicateMember):
        jsonbody.set_member(body, "model", b'"y"')


def test_replace_and_add_keep_every_other_byte() -> None:
    body = (
        b'{ "model" : "gpt-4o" ,"n": 1e400, "m": 1E2, "s": "\\ud83d", '
        b'"deep": ' + b"[" * 5000 + b"]" * 5000 + b" }"
    )
    top = jsonbody.top_level(body, ("model",))
    member = top.get("model")
    assert member is not None
    out = jsonbody.replace_value(body, member, b'"prod"')
    assert out == body.replace(b'"gpt-4o"', b'"prod"', 1)
    added = jsonbody.add_member(out, jsonbody.top_level(out), "stream_options", b'{"include_usage":true}')
    assert added == out.replace(b"]]] }", b']]],"stream_options":{"include_usage":true} }')
    assert jsonbody.set_member(b"{ }", "a", b"1") == b'{"a":1 }'
    assert jsonbody.set_member(b'{"a":0}', "a", b"[1]") == b'{"a":[1]}'


def test_decode_small_values_only() -> None:
    body = b'{"a": [1, {"b": null}], "s": "' + b"x" * 5000 + b'", "bad": [1,,2]}'
    top = jsonbody.top_level(body)
    a, s, bad = top.members
    assert jsonbody.decode(body, a) == [1, {"b": None}]
    with pytest.raises(NotAnObject):
        jsonbody.decode(body, s)
    with pytest.raises(NotAnObject):
        jsonbody.decode(body, bad)


ADVERSARIAL = {
    "nested objects": (b'{"model": "m", "a": [', b"{},", b"{}]}"),
    "nested strings": (b'{"model": "m", "a": [', b'"ab",', b'"ab"]}'),
    "deep": (b'{"model": "m", "a": ', b"[", b"]"),
    "escaped quotes": (b'{"model": "m", "a": "', b'\\"', b'"}'),
    "backslashes": (b'{"model": "m", "a": "', b"\\\\", b'"}'),
    "members": (b'{"model": "m"', b',"a":1', b"}"),
    "whitespace": (b'{"model": "m"', b" ", b"}"),
}


def adversarial(name: str, size: int) -> bytes:
    prefix, unit, suffix = ADVERSARIAL[name]
    count = (size - len(prefix) - len(suffix)) // len(unit)
    if name == "deep":
        return prefix + b"[" * (count // 2) + b"]" * (count // 2) + b"}"
    return prefix + unit * count + suffix


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_bodies_cost_bounded_work_and_no_memory(name: str) -> None:
    """
    Bodies of the default C{--max-body} whose structure makes C{json.loads} build millions of
    objects (or its string scanner crawl): refused once the step budget is spent, having
    allocated far less than the body's size (C{json.loads} allocates many times it).
    """
    body = adversarial(name, 64 * 2**20)
    tracemalloc.start()
    try:
        with pytest.raises(TooComplex) as e:
            jsonbody.top_level(body, ("model",))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert e.value.limit == jsonbody.MAX_STEPS
    assert peak < 2**20, peak
    # Within the budget, the same shapes are read.
    small = adversarial(name, 20_000)
    member = jsonbody.top_level(small, ("model",)).get("model")
    assert member is not None and member.raw(small) == b'"m"'


def test_legitimate_large_bodies_pass_without_copies() -> None:
    image = base64.b64encode(os.urandom(15 * 2**20))  # 20 MiB of base64
    chat = (
        b'{"model": "gpt-4o", "messages": [{"role": "user", "content": [{"type": "text", "text": '
        b'"what is \\"this\\"?\\n{[(\\\\"}, {"type": "image_url", "image_url": {"url": '
        b'"data:image/png;base64,' + image + b'"}}]}], "stream": true}'
    )
    tokens = b",".join(b"[" + b",".join(b"%d" % (i * 31 + j) for j in range(146)) + b"]" for i in range(2048))
    embeddings = b'{"input": [' + tokens + b'], "model": "text-embedding-3-small"}'
    for body, model in [(chat, b'"gpt-4o"'), (embeddings, b'"text-embedding-3-small"')]:
        tracemalloc.start()
        try:
            top = jsonbody.top_level(body, ("model", "stream"))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        member = top.get("model")
        assert member is not None and member.raw(body) == model
        assert peak < 2**20, peak
    stream = jsonbody.top_level(chat, ("stream",)).get("stream")
    assert stream is not None and stream.raw(chat) == b"true"


@pytest.mark.parametrize(
    "body",
    [
        b'\xef\xbb\xbf {"model": "gpt-4o", "messages": [{"role": "user", "content": "a \\" b"}]}',
        b'{"messages": [[], {}, [{"a": "]}"}]], "str\\u0065am": true, "model": null}',
        b'{"input": "' + b"A" * 300_000 + b'", "model": "m"}',
    ],
)
def test_a_mapped_file_reads_as_bytes(body: bytes, tmp_path: Any) -> None:
    """A read-only map of a body's file (how the resource scans a large body) reads as its bytes."""
    path = tmp_path / "body"
    path.write_bytes(body)
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert jsonbody.top_level(mapped) == jsonbody.top_level(body)  # type: ignore[arg-type]


def test_a_refused_mapped_body_is_read_only_near_where_it_stops(tmp_path: Any) -> None:
    """Refused for its structure: the scan touches the start of a 16 MiB map, not all of it."""
    body = b'{"messages": [' + b"{}," * (16 * 1024 * 1024 // 3) + b'{}], "model": "gpt-4o"}'
    path = tmp_path / "body"
    path.write_bytes(body)
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        with pytest.raises(TooComplex):
            jsonbody.top_level(mapped)  # type: ignore[arg-type]
        # mincore is not in Python's mmap: what the scan read is its pages' residency.
        # Drop them from the map, scan again, and count those touched through /proc.
        mapped.madvise(mmap.MADV_DONTNEED)
        before = _rss_file_kib()
        with pytest.raises(TooComplex):
            jsonbody.top_level(mapped)  # type: ignore[arg-type]
        assert _rss_file_kib() - before < 4 * 1024


def _rss_file_kib() -> int:
    """This process's resident file-backed memory (KiB)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")
