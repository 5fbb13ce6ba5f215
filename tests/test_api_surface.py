"""
The rest of the OpenAI API surface in azure mode, in process against the fake Azure upstream:
per-deployment image and audio routes (JSON and multipart), Azure's v1 API (responses, files,
batches, fine-tuning, vector stores), and the bodies that must pass unchanged or streamed.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.web import server
from twisted.web.client import ResponseDone
from twisted.web.resource import Resource

from aoaiproxy import multipart, rewrite
from aoaiproxy.testing import FakeAzure

from .conftest import Proxy
from .rawnet import BodyReader

AUTH = {"Authorization": "Bearer client-key"}
API_VERSION = "2024-10-21"


def form(
    fields: list[tuple[str, str | tuple[str, bytes]]],
    boundary: str = "aoaiproxy-test-boundary",
    quoted: bool = False,
) -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type; a tuple value is a file part."""
    out = io.BytesIO()
    for name, value in fields:
        out.write(b"--" + boundary.encode() + b"\r\n")
        if isinstance(value, tuple):
            filename, content = value
            out.write(
                f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n".encode()
            )
            out.write(content)
        else:
            out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}'.encode())
        out.write(b"\r\n")
    out.write(b"--" + boundary.encode() + b"--\r\n")
    b = f'"{boundary}"' if quoted else boundary
    return out.getvalue(), f"multipart/form-data; boundary={b}"


async def send(
    client: HTTPClient,
    method: str,
    url: str,
    body: bytes | None = None,
    content_type: str | None = "application/json",
) -> tuple[int, Any, bytes]:
    headers = dict(AUTH)
    if body is not None and content_type is not None:
        headers["Content-Type"] = content_type
    response = await client.request(method, url, data=body, headers=headers)
    return response.code, response.headers, await response.content()


WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(40))


# -- per-deployment routes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "body", "content_type", "deployment"),
    [
        (
            "images/generations",
            b'{"model": "dall-e-3",  "prompt": "a red cube", "n": 1}',
            "application/json",
            "img-prod",
        ),
        (
            "images/edits",
            *form([("image", ("cube.png", b"\x89PNG\r\n--x")), ("prompt", "bluer"), ("model", "dall-e-2")]),
            "dall-e-2",
        ),
        (
            "audio/transcriptions",
            *form([("file", ("a.wav", WAV)), ("model", "whisper-1"), ("language", "en")]),
            "whisper-prod",
        ),
        ("audio/translations", *form([("model", "whisper-1"), ("file", ("a.wav", WAV))]), "whisper-prod"),
        (
            "audio/speech",
            b'{"model":"tts-1","voice":"alloy","input":"hello"}',
            "application/json",
            "tts-prod",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_deployment_routes(
    fake: FakeAzure,
    make_proxy: Callable[..., Proxy],
    client: HTTPClient,
    operation: str,
    body: bytes,
    content_type: str,
    deployment: str,
) -> None:
    proxy = make_proxy(model_mapper=["dall-e-3=img-prod,whisper-1=whisper-prod,tts-1=tts-prod"])
    url = f"{proxy.url}/v1/{operation}?api-version=2023-05-15&user=u1"
    code, headers, content = await send(client, "POST", url, body, content_type)
    assert code == 200, content
    [seen] = fake.requests
    assert seen.method == "POST"
    assert seen.path == f"/openai/deployments/{deployment}/{operation}"
    assert seen.raw_uri.endswith(f"?user=u1&api-version={API_VERSION}")
    assert seen.query == {"user": ["u1"], "api-version": [API_VERSION]}
    assert seen.header("api-key") == "client-key"
    assert seen.header("authorization") is None
    assert seen.header("content-type") == content_type
    assert seen.body == body  # byte for byte, multipart not re-encoded
    assert headers.getRawHeaders("access-control-allow-origin") == ["*"]
    if operation == "audio/speech":
        assert headers.getRawHeaders("content-type") == ["audio/mpeg"]
        assert len(content) == 64 * 1024


@pytest.mark.parametrize(
    ("name", "fields", "quoted"),
    [
        ("model first", [("model", "whisper-1"), ("file", ("a.wav", WAV)), ("language", "en")], False),
        # Short fields before it: the closing delimiter of one part opens the next.
        (
            "model last",
            [("language", "en"), ("prompt", "x"), ("file", ("a.wav", WAV)), ("model", "whisper-1")],
            False,
        ),
        (
            "model after a big file",
            [("file", ("big.wav", bytes(range(256)) * 1200)), ("model", "whisper-1")],
            False,
        ),
        ("quoted boundary", [("file", ("a.wav", WAV)), ("model", "whisper-1")], True),
    ],
)
@pytest_twisted.ensureDeferred
async def test_multipart_model_field(
    fake: FakeAzure,
    make_proxy: Callable[..., Proxy],
    client: HTTPClient,
    name: str,
    fields: list[tuple[str, str | tuple[str, bytes]]],
    quoted: bool,
) -> None:
    proxy = make_proxy(model_mapper=["whisper-1=whisper-prod"])
    body, content_type = form(fields, boundary="b0und:ary 1" if quoted else "abc123", quoted=quoted)
    code, _, content = await send(client, "POST", proxy.url + "/v1/audio/transcriptions", body, content_type)
    assert code == 200, content
    [seen] = fake.requests
    assert seen.path == "/openai/deployments/whisper-prod/audio/transcriptions"
    assert seen.body == body
    assert seen.header("content-type") == content_type
    assert seen.form()["model"].text == "whisper-1"


@pytest_twisted.ensureDeferred
async def test_multipart_without_model_is_400_and_not_sent(
    fake: FakeAzure, make_proxy: Callable[..., Proxy], client: HTTPClient
) -> None:
    proxy = make_proxy()
    url = proxy.url + "/v1/audio/transcriptions"
    # No model; a "model" only inside a file's bytes or as a filename does not count.
    body, content_type = form([("file", ("model", b'name="model"\r\n\r\nx')), ("language", "en")])
    code, _, content = await send(client, "POST", url, body, content_type)
    assert code == 400
    error = json.loads(content)["error"]
    assert (error["code"], error["param"]) == ("missing_model", "model")
    body, _ = form([("model", "whisper-1")])
    code, _, _ = await send(client, "POST", url, body, "multipart/form-data")  # no boundary
    assert code == 400
    body, content_type = form([("model", "../x"), ("file", ("a.wav", WAV))])
    code, _, content = await send(client, "POST", url, body, content_type)
    assert code == 400 and json.loads(content)["error"]["param"] == "model"
    assert fake.requests == []


def test_form_field_windows() -> None:
    """The scan finds the field wherever the chunk edges fall, reading in bounded windows."""
    ct = b"multipart/form-data; boundary=XyZ"
    for pad in range(multipart.CHUNK - 300, multipart.CHUNK + 50, 7):
        body, _ = form([("file", ("f", b"\0" * pad)), ("model", "m-1")], boundary="XyZ")
        assert multipart.form_field(io.BytesIO(body), ct, b"model") == "m-1", pad
    body, _ = form([("file", ("f", b"\0" * 3 * multipart.CHUNK)), ("model", "m-2")], boundary="XyZ")

    class Counting(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:
            assert n is not None and 0 < n <= multipart.CHUNK
            return super().read(n)

    assert multipart.form_field(Counting(body), ct, b"model") == "m-2"
    assert multipart.form_field(io.BytesIO(body), ct, b"language") is None
    long_value, _ = form([("model", "x" * (multipart.MAX_VALUE + 1))], boundary="XyZ")
    assert multipart.form_field(io.BytesIO(long_value), ct, b"model") is None


# -- Azure's v1 API ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_v1_model_replaced_only_when_mapped(
    fake: FakeAzure, make_proxy: Callable[..., Proxy], client: HTTPClient
) -> None:
    proxy = make_proxy(model_mapper=["gpt-4o=prod-4o"])
    mapped = {"model": "gpt-4o", "input": "héllo ☃", "metadata": {"model": "gpt-4o"}, "store": True}
    code, _, content = await send(
        client, "POST", proxy.url + "/v1/responses", json.dumps(mapped, ensure_ascii=False).encode()
    )
    assert code == 200, content
    assert json.loads(content)["model"] == "prod-4o"
    unmapped = b'{ "model" : "o4-mini",\n  "input": "h\\u00e9llo",   "store": false }'
    code, _, content = await send(client, "POST", proxy.url + "/v1/responses?include=x", unmapped)
    assert code == 200, content
    first, second = fake.requests
    assert (first.path, first.raw_uri) == ("/openai/v1/responses", "/openai/v1/responses")
    assert first.json() == {**mapped, "model": "prod-4o"}  # only the top-level model
    assert second.raw_uri == "/openai/v1/responses?include=x"
    assert second.body == unmapped  # byte for byte
    for seen in fake.requests:
        assert seen.header("api-key") == "client-key"
        assert seen.header("content-type") == "application/json"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", "/openai/v1/files"),
        # The v1 API accepts no dated api-version: the configured one is not added and a
        # client's dated one is dropped; "preview" and "v1" are kept, once.
        ("?api-version=2024-10-21&limit=2", "/openai/v1/files?limit=2"),
        ("?api-version=preview&api-version=2024-10-21", "/openai/v1/files?api-version=preview"),
        ("?limit=1&api-version=v1&api-version=preview", "/openai/v1/files?limit=1&api-version=v1"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_v1_api_version(
    fake: FakeAzure, make_proxy: Callable[..., Proxy], client: HTTPClient, query: str, expected: str
) -> None:
    proxy = make_proxy(api_version="2025-04-01-preview")
    code, _, _ = await send(client, "GET", proxy.url + "/v1/files" + query)
    assert code == 200
    assert [r.raw_uri for r in fake.requests] == [expected]


@pytest_twisted.ensureDeferred
async def test_fake_v1_api_refuses_dated_api_version(fake: FakeAzure, client: HTTPClient) -> None:
    """As Azure's v1 API does; an Azure-shaped /openai/v1/ request is relayed as it is."""
    for query, status in [("", 200), ("?api-version=preview", 200), ("?api-version=2024-10-21", 400)]:
        code, _, _ = await send(client, "GET", fake.url + "/openai/v1/files" + query)
        assert code == status, query


def test_v1_api_query() -> None:
    assert rewrite.v1_api_query(b"") == b""
    assert rewrite.v1_api_query(b"a=1&&api%2Dversion=2024-10-21&b") == b"a=1&b"
    assert rewrite.v1_api_query(b"api-version=previe%77") == b"api-version=previe%77"


@pytest_twisted.ensureDeferred
async def test_v1_routes_without_body(
    fake: FakeAzure, make_proxy: Callable[..., Proxy], client: HTTPClient
) -> None:
    """GET, DELETE and body-less POSTs reach Azure's v1 API as they are, with no body."""
    proxy = make_proxy()
    v1 = proxy.url + "/v1/"
    code, _, content = await send(client, "POST", v1 + "responses", b'{"model":"gpt-4o","input":"hi"}')
    response_id = json.loads(content)["id"]
    body, content_type = form([("purpose", "batch"), ("file", ("in.jsonl", b'{"a": 1}\n'))])
    code, _, content = await send(client, "POST", v1 + "files", body, content_type)
    assert code == 200
    file_id = json.loads(content)["id"]
    del fake.requests[:]
    calls = [
        ("GET", f"responses/{response_id}?include=reasoning.encrypted_content", 200),
        ("GET", f"responses/{response_id}/input_items?limit=5", 200),
        ("POST", f"responses/{response_id}/cancel", 200),
        ("DELETE", f"responses/{response_id}", 200),
        ("GET", "files?purpose=batch", 200),
        ("GET", f"files/{file_id}", 200),
        ("DELETE", f"files/{file_id}", 200),
        ("GET", "batches", 200),
        ("GET", "fine_tuning/jobs?limit=3", 200),
        ("GET", "vector_stores", 200),
    ]
    for method, path, status in calls:
        code, headers, content = await send(client, method, v1 + path)
        assert code == status, (method, path, content)
        assert headers.getRawHeaders("access-control-allow-origin") == ["*"]
    assert [(r.method, r.raw_uri) for r in fake.requests] == [
        (method, "/openai/v1/" + path) for method, path, _ in calls
    ]
    for seen in fake.requests:
        assert seen.body == b""
        assert seen.header("api-key") == "client-key"
        if seen.method != "POST":
            assert seen.header("content-length") is None
            assert seen.header("transfer-encoding") is None


@pytest_twisted.ensureDeferred
async def test_v1_json_collections(
    fake: FakeAzure, make_proxy: Callable[..., Proxy], client: HTTPClient
) -> None:
    proxy = make_proxy(model_mapper=["gpt-35-turbo-0125=ft-base"])
    v1 = proxy.url + "/v1/"
    batch = b'{"input_file_id":"file-1","endpoint":"/v1/chat/completions","completion_window":"24h"}'
    job = b'{"model": "gpt-35-turbo-0125", "training_file": "file-2"}'
    store = b'{"name": "docs", "model": "not-a-deployment"}'
    answers = []
    for path, body in [("batches", batch), ("fine_tuning/jobs", job), ("vector_stores", store)]:
        code, _, content = await send(client, "POST", v1 + path, body)
        assert code == 200, content
        answers.append(json.loads(content))
    code, _, content = await send(client, "POST", v1 + f"batches/{answers[0]['id']}/cancel")
    assert code == 200 and json.loads(content)["status"] == "cancelling"
    seen_batch, seen_job, seen_store, seen_cancel = fake.requests
    assert seen_batch.path == "/openai/v1/batches" and seen_batch.body == batch
    assert seen_job.path == "/openai/v1/fine_tuning/jobs"
    assert seen_job.json() == {"model": "ft-base", "training_file": "file-2"}
    assert seen_store.path == "/openai/v1/vector_stores" and seen_store.body == store
    assert (seen_cancel.path, seen_cancel.body) == (f"/openai/v1/batches/{answers[0]['id']}/cancel", b"")


@pytest_twisted.ensureDeferred
async def test_v1_bad_json_and_bad_model(
    fake: FakeAzure, make_proxy: Callable[..., Proxy], client: HTTPClient
) -> None:
    proxy = make_proxy()
    code, _, content = await send(client, "POST", proxy.url + "/v1/responses", b'{"model": "a/b"}')
    assert code == 400 and json.loads(content)["error"]["param"] == "model"
    code, _, content = await send(client, "POST", proxy.url + "/v1/responses", b"{nope")
    assert code == 400 and json.loads(content)["error"]["code"] == "invalid_json"
    # Whatever its type claims, a body on these routes is a JSON object whose model is checked
    # (before: a text/plain body skipped the check and reached Azure).
    code, _, content = await send(
        client, "POST", proxy.url + "/v1/responses", b'{"model": "a/b"}', "text/plain"
    )
    assert code == 400 and json.loads(content)["error"]["param"] == "model"
    code, _, content = await send(client, "POST", proxy.url + "/v1/batches", b"{nope", "text/plain")
    assert code == 400 and json.loads(content)["error"]["code"] == "invalid_json"
    code, _, content = await send(client, "POST", proxy.url + "/v1/responses", b'{"model":"m","model":"m"}')
    assert code == 400 and json.loads(content)["error"]["code"] == "duplicate_member"
    assert fake.requests == []
    # ... and one sent as text/plain, curl's form type or none at all is mapped as any other.
    proxy = make_proxy(model_mapper=["gpt-4o=prod-4o"])
    for content_type in ["text/plain", "application/x-www-form-urlencoded", None]:
        code, _, content = await send(
            client, "POST", proxy.url + "/v1/responses", b'{"model":"gpt-4o","input":"x"}', content_type
        )
        assert code == 200, content
    assert [r.body for r in fake.requests] == [b'{"model":"prod-4o","input":"x"}'] * 3


@pytest_twisted.ensureDeferred
async def test_v1_mapping_changes_no_other_byte(
    fake: FakeAzure, make_proxy: Callable[..., Proxy], client: HTTPClient
) -> None:
    """
    Before: the body was re-encoded: 1e400 became Infinity (invalid JSON), 1E2 became 100.0,
    and a lone surrogate (JavaScript's JSON.stringify of a broken emoji) was a 500 HTML page.
    """
    proxy = make_proxy(model_mapper=["gpt-4o=prod-4o"])
    rest = b', "input": "\\\\ud83d \\ud83d \\u00e9", "temperature": 1E2, "seed": 1e400, "top_p": 1.0}'
    fake.respond_next(200, {"id": "resp_1", "object": "response"})
    code, _, content = await send(client, "POST", proxy.url + "/v1/responses", b'{"model":"gpt-4o"' + rest)
    assert code == 200, content
    [seen] = fake.requests
    assert seen.body == b'{"model":"prod-4o"' + rest


# -- streamed bodies ---------------------------------------------------------------------------


class HeldUpstream(Resource):
    """An upstream that sends the first half of a body, then waits for C{release}."""

    isLeaf = True

    def __init__(self, first: bytes, rest: bytes, content_type: bytes) -> None:
        super().__init__()
        self.first, self.rest, self.content_type = first, rest, content_type
        self.release: Deferred[None] = Deferred()
        self.paths: list[bytes] = []

    def render(self, request: Any) -> int:
        self.paths.append(request.uri)
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"content-length", b"%d" % (len(self.first) + len(self.rest)))
        request.write(self.first)

        def finish(_: None) -> None:
            request.write(self.rest)
            request.finish()

        self.release.addCallback(finish)
        return server.NOT_DONE_YET


@pytest.mark.parametrize(
    ("method", "path", "body", "upstream_path"),
    [
        ("GET", "/v1/files/file-1/content", None, b"/openai/v1/files/file-1/content"),
        (
            "POST",
            "/v1/audio/speech",
            b'{"model": "tts-1", "input": "hi", "voice": "alloy"}',
            b"/openai/deployments/tts-1/audio/speech?api-version=" + API_VERSION.encode(),
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_binary_bodies_are_streamed(
    make_proxy: Callable[..., Proxy],
    client: HTTPClient,
    method: str,
    path: str,
    body: bytes | None,
    upstream_path: bytes,
) -> None:
    """The client has the first half of a download while the upstream still holds the rest."""
    first, rest = bytes(range(256)) * 2048 + b"<end of first half>", b"\xff" * 300_000
    upstream = HeldUpstream(first, rest, b"application/octet-stream")
    port = reactor.listenTCP(0, server.Site(upstream), interface="127.0.0.1")  # type: ignore[attr-defined]
    try:
        proxy = make_proxy(endpoint=f"http://127.0.0.1:{port.getHost().port}")
        response = await client.request(method, proxy.url + path, data=body, headers=AUTH)
        assert response.code == 200
        assert response.length == len(first) + len(rest)
        reader = BodyReader()
        response.deliverBody(reader)
        await reader.wait_for(b"<end of first half>")
        assert reader.data == first
        upstream.release.callback(None)
        await reader.done
        assert reader.reason is not None and reader.reason.check(ResponseDone)
        assert reader.data == first + rest
        assert upstream.paths == [upstream_path]
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_responses_stream_passes_unchanged(
    fake: FakeAzure, make_proxy: Callable[..., Proxy], client: HTTPClient
) -> None:
    """
    Responses events are not chat chunks: the filter-only-frame filter leaves every one of
    them alone, even one that mentions prompt_filter_results or has an empty choices list.
    """
    proxy = make_proxy()
    before = fake.bytes_sent
    response = await client.post(
        proxy.url + "/v1/responses",
        data=b'{"model": "gpt-4o", "input": "hi", "stream": true}',
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream; charset=utf-8"]
    data = await response.content()
    assert len(data) == fake.bytes_sent - before  # every byte the upstream sent
    events = data.split(b"\n\n")
    assert events.pop() == b""  # ends with a blank line
    kinds = [json.loads(e.split(b"data: ", 1)[1])["type"] for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == fake.stream_chunks

    odd = (
        b"event: response.output_text.delta\r\n"
        b'data: {"type":"response.output_text.delta","delta":"prompt_filter_results","choices":[]}\r\n\r\n'
        b'data: {"choices":[],"prompt_filter_results":[{"prompt_index":0}],"type":"response.note"}\r\n\r\n'
        b'event: response.completed\ndata: {"type":"response.completed"}'
    )
    fake.respond_next(200, odd, {"content-type": "text/event-stream"})
    code, _, data = await send(client, "POST", proxy.url + "/v1/responses", b'{"model":"m","stream":true}')
    assert code == 200
    assert data == odd + b"\n\n"  # unchanged, and the missing blank line added
