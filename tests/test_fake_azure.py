"""Tests for aoaiproxy.testing.FakeAzure, over real loopback with treq."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, ResponseNeverReceived
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from aoaiproxy.testing import (
    COGNITIVE_SERVICES,
    Behaviour,
    FakeAzure,
    FakeManagedIdentity,
    RecordedRequest,
    RemoteFake,
    count_tokens,
    prompt_tokens,
)
from aoaiproxy.testing.sse import FILTER_FRAME

from .rawnet import BodyReader, Connect, parse_response, raw_post, response_done

CHAT = "/openai/deployments/gpt-35-turbo/chat/completions?api-version=2024-10-21"


async def stream(client: HTTPClient, url: str, body: dict[str, Any]) -> tuple[Any, BodyReader]:
    response = await client.post(url, json=body)
    reader = BodyReader()
    response.deliverBody(reader)
    return response, reader


async def held_stream(fake: FakeAzure, client: HTTPClient) -> BodyReader:
    """A chat stream that has received its content chunks and is held before the last one."""
    fake.hold_last_chunk()
    _, reader = await stream(client, fake.url + CHAT, {"stream": True})
    await reader.wait_for(b"chunk2 ")
    return reader


def events(data: bytes) -> list[bytes]:
    """The SSE events of a complete stream, checking that each ends with a blank line."""
    assert data.endswith(b"\n\n")
    return data[:-2].split(b"\n\n")


@pytest_twisted.ensureDeferred
async def test_records_requests(fake: FakeAzure, client: HTTPClient) -> None:
    url = fake.url + "/openai/deployments/d%201/embeddings?api-version=2024-10-21&x=&x=2"
    headers = {"X-Custom": ["a", "b"], "api-key": ["k"], "Content-Type": ["application/json"]}
    response = await client.post(url, data=b'{"input": "hi"}', headers=headers)
    assert response.code == 200
    await response.content()
    [rec] = fake.requests
    assert rec.method == "POST"
    assert rec.path == "/openai/deployments/d 1/embeddings"
    assert rec.raw_uri == "/openai/deployments/d%201/embeddings?api-version=2024-10-21&x=&x=2"
    assert rec.query == {"api-version": ["2024-10-21"], "x": ["", "2"]}
    assert rec.headers["x-custom"] == ["a", "b"]
    assert rec.header("X-CUSTOM") == "a"
    assert rec.header("api-key") == "k"
    assert rec.header("missing") is None
    assert rec.body == b'{"input": "hi"}'
    assert rec.json() == {"input": "hi"}


@pytest_twisted.ensureDeferred
async def test_chat_completion_json(fake: FakeAzure, client: HTTPClient) -> None:
    response = await client.post(fake.url + CHAT, json={"messages": []})
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    assert response.headers.getRawHeaders("apim-request-id")
    assert response.headers.getRawHeaders("x-request-id")
    body = await response.json()
    assert body["id"].startswith("chatcmpl-fake")
    assert body["object"] == "chat.completion"
    assert body["model"] == "gpt-35-turbo"
    [choice] = body["choices"]
    assert choice["message"] == {
        "role": "assistant",
        "content": "Hello from fake Azure (gpt-35-turbo)",
        "refusal": None,
    }
    assert choice["finish_reason"] == "stop"
    assert body["usage"]["total_tokens"] > 0
    assert body["prompt_filter_results"][0]["prompt_index"] == 0


@pytest_twisted.ensureDeferred
async def test_chat_stream_framing(fake: FakeAzure, client: HTTPClient) -> None:
    body = {"stream": True, "stream_options": {"include_usage": True}}
    response, reader = await stream(client, fake.url + CHAT, body)
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/event-stream")
    await reader.done
    frames = events(reader.data)
    assert frames[0] == (
        b'data: {"choices":[],"created":0,"id":"","model":"","object":"",'
        b'"prompt_filter_results":[{"prompt_index":0,"content_filter_results":{}}]}'
    )
    assert frames[-1] == b"data: [DONE]"
    chunks = [json.loads(f.removeprefix(b"data: ")) for f in frames[1:-1]]
    assert [c["choices"][0]["delta"].get("content") for c in chunks[:3]] == [
        "chunk0 ",
        "chunk1 ",
        "chunk2 ",
    ]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[3]["choices"][0]["finish_reason"] == "stop"
    usage = chunks[4]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    assert "prompt_filter_results" not in usage
    assert len(chunks) == 5


@pytest_twisted.ensureDeferred
async def test_stream_options(fake: FakeAzure, client: HTTPClient) -> None:
    fake.filter_frames = False
    fake.stream_interval = 0.001
    fake.stream_chunks = 1
    url = fake.url + "/openai/deployments/inst/completions?api-version=1"
    _, reader = await stream(client, url, {"stream": True})
    await reader.done
    frames = events(reader.data)
    assert len(frames) == 3 and frames[-1] == b"data: [DONE]"
    first = json.loads(frames[0].removeprefix(b"data: "))
    assert first["object"] == "text_completion"
    assert first["choices"][0]["text"] == "chunk0 "


@pytest_twisted.ensureDeferred
async def test_hold_and_release(fake: FakeAzure, client: HTTPClient) -> None:
    reader = await held_stream(fake, client)
    assert fake.held_streams == 1
    assert b'"finish_reason":"stop"' not in reader.data
    assert b"[DONE]" not in reader.data
    assert not reader.done.called
    fake.release()
    assert fake.held_streams == 0
    await reader.done
    assert events(reader.data)[-1] == b"data: [DONE]"
    # release() ends holding: the next stream runs straight through
    _, reader = await stream(client, fake.url + CHAT, {"stream": True})
    await reader.done
    assert reader.data.endswith(b"data: [DONE]\n\n")


@pytest_twisted.ensureDeferred
async def test_wait_connection_closed(fake: FakeAzure, client: HTTPClient) -> None:
    reader = await held_stream(fake, client)
    assert fake.open_connections == 1
    closed = fake.wait_connection_closed()
    assert not closed.called
    reader.transport.stopProducing()  # the client goes away mid-stream
    await closed
    assert fake.open_connections == 0
    assert fake.held_streams == 0


@pytest_twisted.ensureDeferred
async def test_stop_closes_connections(client: HTTPClient) -> None:
    server = FakeAzure(reactor)
    server.listen()
    reader = await held_stream(server, client)
    assert server.open_connections == 1
    await server.stop()
    assert server.open_connections == 0
    await reader.done
    assert reader.reason is not None and not reader.reason.check(ResponseDone)
    assert b"[DONE]" not in reader.data
    await server.stop()  # idempotent


@pytest_twisted.ensureDeferred
async def test_big_stream_backpressure(fake: FakeAzure, client: HTTPClient) -> None:
    fake.big_stream_bytes = 8 * 1024 * 1024
    _, reader = await stream(client, fake.url + CHAT, {"stream": True})
    paused = fake.wait_stream_paused()
    reader.transport.pauseProducing()  # the client stops reading
    await paused
    assert 0 < fake.bytes_sent < fake.big_stream_bytes
    reader.transport.resumeProducing()
    await reader.done
    assert len(reader.data) == fake.bytes_sent >= fake.big_stream_bytes
    assert reader.data.endswith(b"data: [DONE]\n\n")
    assert fake.open_connections == 0


@pytest_twisted.ensureDeferred
async def test_big_stream_cancelled(fake: FakeAzure, client: HTTPClient) -> None:
    fake.big_stream_bytes = 64 * 1024 * 1024
    _, reader = await stream(client, fake.url + CHAT, {"stream": True})
    await reader.wait_for(b"data: ")
    closed = fake.wait_connection_closed()
    reader.transport.stopProducing()
    await closed
    assert fake.bytes_sent < fake.big_stream_bytes


@pytest_twisted.ensureDeferred
async def test_rate_limit_then_default(fake: FakeAzure, client: HTTPClient) -> None:
    fake.rate_limit_next(retry_after=7)
    response = await client.post(fake.url + CHAT, json={})
    assert response.code == 429
    assert response.headers.getRawHeaders("retry-after") == ["7"]
    assert response.headers.getRawHeaders("x-ratelimit-remaining-requests") == ["0"]
    assert response.headers.getRawHeaders("x-ratelimit-remaining-tokens") == ["0"]
    assert response.headers.getRawHeaders("apim-request-id")
    error = (await response.json())["error"]
    assert error["code"] == "429"
    assert "ChatCompletions_Create Operation" in error["message"]
    assert "2024-10-21" in error["message"]
    assert "Please retry after 7 seconds." in error["message"]
    response = await client.post(fake.url + CHAT, json={})
    assert response.code == 200
    await response.content()


@pytest_twisted.ensureDeferred
async def test_deployment_not_found_and_respond_next(fake: FakeAzure, client: HTTPClient) -> None:
    fake.deployment_not_found_next()
    fake.respond_next(500, {"error": {"code": "InternalServerError"}}, {"x-extra": "1"})
    fake.respond_next(200, b"raw", {"Content-Type": "text/plain"})
    response = await client.post(fake.url + CHAT, json={})
    assert response.code == 404
    assert (await response.json())["error"]["code"] == "DeploymentNotFound"
    response = await client.post(fake.url + CHAT, json={})
    assert response.code == 500
    assert response.headers.getRawHeaders("x-extra") == ["1"]
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    assert await response.json() == {"error": {"code": "InternalServerError"}}
    response = await client.get(fake.url + "/anything")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/plain"]
    assert await response.content() == b"raw"
    assert len(fake.requests) == 3


@pytest_twisted.ensureDeferred
async def test_not_found(fake: FakeAzure, client: HTTPClient) -> None:
    for path in (
        "/nope",
        "/openai/deployments/gpt-35-turbo/chat/completions",  # no api-version
        "/openai/v1/unknown",
        "/openai/v1/files/file-missing",
    ):
        response = await client.post(fake.url + path, json={})
        assert response.code == 404, path
        assert (await response.json())["error"]
        assert response.headers.getRawHeaders("x-request-id")


@pytest_twisted.ensureDeferred
async def test_api_key(client: HTTPClient) -> None:
    server = FakeAzure(reactor, api_key="secret")
    server.listen()
    try:
        response = await client.post(server.url + CHAT, json={}, headers={"api-key": "bad"})
        assert response.code == 401
        assert (await response.json())["error"]["code"] == "401"
        for headers in ({"api-key": "secret"}, {"Authorization": "Bearer secret"}):
            response = await client.post(server.url + CHAT, json={}, headers=headers)
            assert response.code == 200
            await response.content()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_deployment_routes(fake: FakeAzure, client: HTTPClient) -> None:
    base = fake.url + "/openai/deployments/dep/"
    q = "?api-version=2024-10-21"
    response = await client.post(base + "embeddings" + q, json={"input": ["a", "b", "c"]})
    assert [e["index"] for e in (await response.json())["data"]] == [0, 1, 2]
    response = await client.post(base + "images/generations" + q, json={"prompt": "cat"})
    assert (await response.json())["data"][0]["url"] == "https://fake/img.png"
    response = await client.post(
        base + "audio/transcriptions" + q,
        data={"model": "whisper", "response_format": "text"},
        files={"file": ("a.wav", "audio/wav", io.BytesIO(b"RIFF"))},
    )
    assert await response.text() == "fake transcription"
    response = await client.post(base + "audio/speech" + q, json={"input": "hi"})
    assert response.headers.getRawHeaders("content-type") == ["audio/mpeg"]
    audio = await response.content()
    assert len(audio) == 64 * 1024
    assert fake.requests[2].form()["model"].text == "whisper"


@pytest_twisted.ensureDeferred
async def test_v1_files_and_responses(fake: FakeAzure, client: HTTPClient) -> None:
    v1 = fake.url + "/openai/v1/"
    upload = b"x" * 300_000
    response = await client.post(
        v1 + "files",
        data={"purpose": "batch"},
        files={"file": ("in.jsonl", "application/jsonl", io.BytesIO(upload))},
    )
    created = await response.json()
    assert created["object"] == "file" and created["bytes"] == len(upload)
    response = await client.get(v1 + f"files/{created['id']}/content")
    assert await response.content() == upload
    response = await client.post(v1 + "responses", json={"model": "gpt-4o", "input": "hi"})
    answer = await response.json()
    assert answer["object"] == "response" and answer["status"] == "completed"
    assert answer["output"][0]["content"][0]["text"] == "Hello from fake Azure (gpt-4o)"
    response = await client.get(v1 + f"responses/{answer['id']}/input_items")
    assert (await response.json())["data"][0]["content"] == "hi"
    body = {"model": "gpt-4o", "input": "hi", "stream": True}
    _, reader = await stream(client, v1 + "responses", body)
    await reader.done
    frames = events(reader.data)
    assert frames[0].startswith(b"event: response.created\ndata: {")
    assert frames[-1].startswith(b"event: response.completed\ndata: {")
    assert sum(f.startswith(b"event: response.output_text.delta\n") for f in frames) == 3


@implementer(IPolicyForHTTPS)
class TrustAnything:
    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return ssl.CertificateOptions(verify=False)


@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_tls(client: HTTPClient) -> None:
    import twisted.test

    pem = Path(twisted.test.__file__).with_name("server.pem").read_bytes()
    server = FakeAzure(reactor)
    server.listen(context_factory=ssl.PrivateCertificate.loadPEM(pem).options())
    pool = HTTPConnectionPool(reactor, persistent=False)
    tls_client = HTTPClient(Agent(reactor, contextFactory=TrustAnything(), pool=pool))
    try:
        assert server.url.startswith("https://127.0.0.1:")
        _, reader = await stream(tls_client, server.url + CHAT, {"stream": True})
        await reader.done
        assert reader.data.endswith(b"data: [DONE]\n\n")
    finally:
        await server.stop()


class MainOutput(ProcessProtocol):
    """The output of C{python -m aoaiproxy.testing}; C{listening} fires after C{lines} lines."""

    def __init__(self, lines: int) -> None:
        self.out = b""
        self.lines = lines
        self.listening: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if self.out.count(b"\n") >= self.lines and not self.listening.called:
            self.listening.callback(None)

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)
        if not self.listening.called:
            self.listening.errback(AssertionError(f"exited early: {self.out!r}"))


@asynccontextmanager
async def main_process(*args: str, lines: int = 1) -> AsyncIterator[MainOutput]:
    """C{python -m aoaiproxy.testing ARGS} from this tree, once it printed C{lines} lines;
    terminated at the end."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    proto = MainOutput(lines)
    command = [sys.executable, "-m", "aoaiproxy.testing", *args]
    process = reactor.spawnProcess(proto, sys.executable, command, env=env)
    try:
        await proto.listening.addTimeout(30, reactor)
        yield proto
    finally:
        if not proto.ended.called:
            process.signalProcess("TERM")
        await proto.ended


async def _run_main(reactor: Any, client: HTTPClient) -> list[bytes]:
    async with main_process("--port", "0") as proto:
        url = proto.out.split()[-1].decode()
        response = await client.post(url + CHAT, json={})
        assert response.code == 200
        await response.content()
    return proto.out.splitlines()


@pytest_twisted.ensureDeferred
async def test_main_runs_in_foreground(client: HTTPClient) -> None:
    lines = await _run_main(reactor, client)
    assert lines[0].startswith(b"fake Azure OpenAI listening on http://127.0.0.1:")
    assert lines[1].startswith(b"POST " + CHAT.encode())


@pytest.mark.parametrize("arg", ["--help"])
def test_main_help(arg: str, capsys: pytest.CaptureFixture[str]) -> None:
    from aoaiproxy.testing import main

    with pytest.raises(SystemExit):
        main([arg])
    assert "--api-key" in capsys.readouterr().out


# -- several fakes, and what they record ------------------------------------------------------


def port_of(fake: FakeAzure | FakeManagedIdentity) -> int:
    return int(fake.url.rsplit(":", 1)[1])


@pytest_twisted.ensureDeferred
async def test_regions_record_their_own_requests(client: HTTPClient) -> None:
    east = FakeAzure(reactor, name="east", region="eastus")
    west = FakeAzure(reactor, name="west", region="westus")
    east.listen()
    west.listen()
    try:
        assert east.url != west.url
        auth = {"Host": "api.openai.com", "api-key": "k1", "Authorization": "Bearer t1"}
        response = await client.post(east.url + CHAT, json={"n": 1}, headers=auth)
        assert response.headers.getRawHeaders("x-ms-region") == ["eastus"]
        await response.content()
        response = await client.post(west.url + CHAT, json={"n": 2})
        assert response.headers.getRawHeaders("x-ms-region") == ["westus"]
        await response.content()
        [seen_east], [seen_west] = east.requests, west.requests
        assert (seen_east.instance, seen_west.instance) == ("east", "west")
        assert seen_east.host == "api.openai.com"
        assert seen_east.header("api-key") == "k1" and seen_east.header("authorization") == "Bearer t1"
        assert seen_west.host == west.url.removeprefix("http://")
        assert (seen_east.json(), seen_west.json()) == ({"n": 1}, {"n": 2})
        assert east.request_count == west.request_count == 1
        assert 0 < seen_east.received_at <= seen_west.received_at
    finally:
        await east.stop()
        await west.stop()


@pytest_twisted.ensureDeferred
async def test_wait_request_and_clear_requests(fake: FakeAzure, client: HTTPClient) -> None:
    second = fake.wait_request(2)
    response = await client.post(fake.url + CHAT, json={"n": 1})
    await response.content()
    assert not second.called
    response = await client.post(fake.url + CHAT, json={"n": 2})
    await response.content()
    assert (await second).json() == {"n": 2}
    assert (await fake.wait_request(1)).json() == {"n": 1}  # already there
    fake.clear_requests()
    assert fake.requests == [] and fake.request_count == 0


@pytest_twisted.ensureDeferred
async def test_max_recorded_keeps_the_latest(client: HTTPClient) -> None:
    server = FakeAzure(reactor, max_recorded=2)
    server.listen()
    try:
        for n in range(5):
            response = await client.post(server.url + CHAT, json={"n": n})
            await response.content()
        assert server.request_count == 5
        assert 2 <= len(server.requests) <= 4
        assert server.requests[-1].json() == {"n": 4}
    finally:
        await server.stop()


# -- behaviours --------------------------------------------------------------------------------

RETRY_HEADERS = ("retry-after-ms", "x-ms-retry-after-ms", "retry-after")


def retry_headers(response: Any) -> dict[str, list[str] | None]:
    return {name: response.headers.getRawHeaders(name) for name in RETRY_HEADERS}


@pytest_twisted.ensureDeferred
async def test_throttle_sends_exactly_the_headers_given(fake: FakeAzure, client: HTTPClient) -> None:
    fake.throttle(count=2, retry_after_ms=1500, x_ms_retry_after_ms=2500, retry_after=3)
    for _ in range(2):
        response = await client.post(fake.url + CHAT, json={})
        assert response.code == 429
        assert retry_headers(response) == {
            "retry-after-ms": ["1500"],
            "x-ms-retry-after-ms": ["2500"],
            "retry-after": ["3"],
        }
        error = (await response.json())["error"]
        assert error["code"] == "429"
        assert (
            "ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21" in error["message"]
        )
        assert "Please retry after 2 seconds." in error["message"]  # 1.5 s, rounded up
    response = await client.post(fake.url + CHAT, json={})
    assert response.code == 200
    await response.content()
    fake.throttle(count=1)  # no Retry-After of any kind
    response = await client.post(fake.url + CHAT, json={})
    assert response.code == 429
    assert retry_headers(response) == dict.fromkeys(RETRY_HEADERS)
    await response.content()


@pytest_twisted.ensureDeferred
async def test_throttle_with_an_http_date(fake: FakeAzure, client: HTTPClient) -> None:
    fake.throttle(count=1, retry_after_date=30)
    fake.throttle(count=1, retry_after="Wed, 21 Oct 2015 07:28:00 GMT")
    before = time.time()
    response = await client.post(fake.url + CHAT, json={})
    assert response.code == 429
    [date] = response.headers.getRawHeaders("retry-after")
    assert date.endswith(" GMT")
    assert before + 29 <= parsedate_to_datetime(date).timestamp() <= time.time() + 31
    assert "Please retry after 30 seconds." in (await response.json())["error"]["message"]
    response = await client.post(fake.url + CHAT, json={})
    assert response.headers.getRawHeaders("retry-after") == ["Wed, 21 Oct 2015 07:28:00 GMT"]
    await response.content()


@pytest_twisted.ensureDeferred
async def test_server_errors_in_azure_shapes(fake: FakeAzure, client: HTTPClient) -> None:
    expected = {
        500: ("type", "server_error"),
        502: ("code", "BadGateway"),
        503: ("code", "ServiceUnavailable"),
        504: ("code", "Timeout"),
    }
    for status, (field, value) in expected.items():
        fake.fail(status, count=1)
        response = await client.post(fake.url + CHAT, json={})
        assert response.code == status
        assert response.headers.getRawHeaders("content-type") == ["application/json"]
        assert response.headers.getRawHeaders("x-request-id")
        error = (await response.json())["error"]
        assert error[field] == value and error["message"]
    response = await client.post(fake.url + CHAT, json={})
    assert response.code == 200
    await response.content()


async def post_status(client: HTTPClient, url: str, body: dict[str, Any] | None = None) -> int:
    response = await client.post(url, json=body or {})
    await response.content()
    return int(response.code)


@pytest_twisted.ensureDeferred
async def test_behaviours_per_deployment_in_order_until_cleared(fake: FakeAzure, client: HTTPClient) -> None:
    busy = fake.url + CHAT.replace("gpt-35-turbo", "busy")
    fake.throttle(deployment="busy", retry_after_ms=100)  # until cleared
    fake.fail(503, count=1)
    assert fake.behaviours == [
        Behaviour("429", None, "busy", (("retry-after-ms", "100"),)),
        Behaviour("503", 1),
    ]
    assert await post_status(client, fake.url + CHAT) == 503  # the throttle is for "busy" only
    assert await post_status(client, fake.url + CHAT) == 200
    assert [await post_status(client, busy) for _ in range(3)] == [429, 429, 429]
    assert fake.behaviours == [Behaviour("429", None, "busy", (("retry-after-ms", "100"),))]
    fake.clear_behaviours("gpt-35-turbo")
    assert await post_status(client, busy) == 429
    fake.clear_behaviours("busy")
    assert await post_status(client, busy) == 200
    # on the v1 API, the deployment is the body's model
    fake.fail(500, deployment="gpt-4o")
    v1 = fake.url + "/openai/v1/responses"
    assert await post_status(client, v1, {"model": "gpt-4o", "input": "hi"}) == 500
    assert await post_status(client, v1, {"model": "other", "input": "hi"}) == 200
    fake.clear_behaviours()
    assert fake.behaviours == []


@pytest_twisted.ensureDeferred
async def test_unauthorized_requests_consume_no_behaviour(client: HTTPClient) -> None:
    server = FakeAzure(reactor, api_key="secret")
    server.listen()
    try:
        server.throttle(count=1)
        assert await post_status(client, server.url + CHAT) == 401
        response = await client.post(server.url + CHAT, json={}, headers={"api-key": "secret"})
        assert response.code == 429
        await response.content()
    finally:
        await server.stop()


def test_behaviour_parsing() -> None:
    behaviour, region = Behaviour.from_words(
        ["429", "retry-after-ms=1500", "header=x-a: 1", "count=2", "region=east", "deployment=d"]
    )
    assert region == "east"
    assert behaviour == Behaviour("429", 2, "d", (("retry-after-ms", "1500"), ("x-a", "1")))
    assert Behaviour.from_params(behaviour.to_json()) == behaviour
    assert Behaviour.from_params({"kind": "close", "after_bytes": 0}).after_bytes == 0
    for words, message in [
        (["418"], "unknown behaviour '418'"),
        (["429", "count=0"], "count must be at least 1"),
        (["429", "count=x"], "count must be a whole number"),
        (["503", "after-bytes=1"], "after-bytes applies to hang and close only"),
        (["429", "colour=red"], "unknown behaviour keys: colour"),
        (["429", "retry-after-ms=soon"], "retry-after-ms must be a whole number"),
        (["429", "header=novalue"], "header must be NAME:VALUE"),
        (["hang", "oops"], "behaviour settings are key=value"),
    ]:
        with pytest.raises(ValueError, match=message):
            Behaviour.from_words(words)


@pytest_twisted.ensureDeferred
async def test_hang_never_answers(fake: FakeAzure, raw_connect: Connect) -> None:
    fake.hang(count=1)
    hung = await raw_connect(port_of(fake))
    hung.send(raw_post(CHAT, {}))
    await fake.wait_request(1)
    assert fake.hanging_requests == 1
    answered = await raw_connect(port_of(fake))  # count=1: the next request is answered
    answered.send(raw_post(CHAT, {}))
    assert parse_response(await answered.wait_for(response_done)).status == 200
    assert hung.received == b""  # the fake answers in order: the hung request got nothing
    closed = fake.wait_connection_closed()
    await hung.abort()
    await closed
    assert fake.hanging_requests == 0


@pytest_twisted.ensureDeferred
async def test_hang_after_headers_and_some_bytes(fake: FakeAzure, raw_connect: Connect) -> None:
    fake.hang(count=1, after_bytes=0)
    fake.hang(count=1, after_bytes=10)
    stalled = await raw_connect(port_of(fake))
    stalled.send(raw_post(CHAT, {"stream": True}))
    head = await stalled.wait_for(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"text/event-stream" in head
    partial = await raw_connect(port_of(fake))
    partial.send(raw_post(CHAT, {}))
    await partial.wait_for(b"\r\n\r\n{")
    answered = await raw_connect(port_of(fake))
    answered.send(raw_post(CHAT, {}))
    whole = parse_response(await answered.wait_for(response_done))
    assert whole.status == 200
    assert stalled.received == head  # headers, and then nothing
    response = parse_response(partial.received)
    assert int(response.headers[b"content-length"]) == len(whole.body)
    assert response.body == whole.body[:10].replace(b"fake3", b"fake2")
    assert fake.hanging_requests == 2


@pytest_twisted.ensureDeferred
async def test_close_before_answering(fake: FakeAzure, raw_connect: Connect, client: HTTPClient) -> None:
    fake.close_connections(count=1)
    closed = await raw_connect(port_of(fake))
    closed.send(raw_post(CHAT, {}))
    await closed.closed
    assert closed.received == b""
    assert fake.request_count == 1
    assert await post_status(client, fake.url + CHAT) == 200
    fake.close_connections(count=1, after_bytes=5)
    cut = await raw_connect(port_of(fake))
    cut.send(raw_post(CHAT, {}))
    await cut.closed
    response = parse_response(cut.received)
    assert response.status == 200 and int(response.headers[b"content-length"]) > 5
    assert response.body == b'{"id"'


def normalised(stream: bytes) -> bytes:
    return re.sub(rb'"(chatcmpl-fake\d+|created":\d+)"?', b"X", stream)


@pytest_twisted.ensureDeferred
async def test_close_after_some_bytes_of_a_stream(fake: FakeAzure, client: HTTPClient) -> None:
    fake.close_connections(count=1, after_bytes=200)
    _, cut = await stream(client, fake.url + CHAT, {"stream": True})
    await cut.done
    assert cut.reason is not None and not cut.reason.check(ResponseDone)
    _, whole = await stream(client, fake.url + CHAT, {"stream": True})
    await whole.done
    assert len(cut.data) == 200
    assert normalised(cut.data) == normalised(whole.data[:200])


# -- the control endpoint ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_control_endpoint_behaviours(fake: FakeAzure, client: HTTPClient) -> None:
    control = fake.url + "/_fake/behaviour"
    throttle = {"kind": "429", "retry-after-ms": 1500, "count": 1, "deployment": "gpt-35-turbo"}
    response = await client.post(control, json=throttle)
    assert response.code == 200
    listed = {"kind": "429", "count": 1, "deployment": "gpt-35-turbo", "headers": {"retry-after-ms": "1500"}}
    assert await response.json() == {"behaviours": [listed]}
    response = await client.post(fake.url + CHAT, json={})
    assert response.code == 429 and response.headers.getRawHeaders("retry-after-ms") == ["1500"]
    await response.content()
    assert await post_status(client, fake.url + CHAT) == 200
    both = [{"kind": "503"}, {"kind": "hang", "after_bytes": 0, "count": 2}]
    response = await client.post(control, json=both)
    assert [(b["kind"], b["count"]) for b in (await response.json())["behaviours"]] == [
        ("503", None),
        ("hang", 2),
    ]
    assert await post_status(client, fake.url + CHAT) == 503
    response = await client.delete(control)
    assert await response.json() == {"behaviours": []}
    assert await post_status(client, fake.url + CHAT) == 200
    for body, message in [
        ({"kind": "418"}, "unknown behaviour '418'"),
        ([{"kind": "503"}, {"kind": "429", "colour": 1}], "unknown behaviour keys: colour"),
        ({"kind": "429", "headers": ["x"]}, "headers must be an object"),
        ("429", "a behaviour is a JSON object"),
    ]:
        response = await client.post(control, json=body)
        assert response.code == 400
        assert message in (await response.json())["error"]["message"]
    response = await client.post(control, data=b"{nope")
    assert response.code == 400 and (await response.json())["error"]["message"] == "the body must be JSON"
    assert fake.behaviours == []  # nothing of a refused request was applied
    assert await post_status(client, fake.url + "/_fake/nope") == 404
    response = await client.put(control, json={})
    assert response.code == 405
    assert "GET, POST, DELETE" in (await response.json())["error"]["message"]
    assert fake.request_count == 4  # the control requests are not recorded


@pytest_twisted.ensureDeferred
async def test_control_endpoint_requests(fake: FakeAzure, client: HTTPClient) -> None:
    response = await client.post(fake.url + CHAT, data=b"\xff{}", headers={"api-key": "k"})
    await response.content()
    response = await client.get(fake.url + "/_fake/requests")
    listing = await response.json()
    assert listing["count"] == 1
    [seen] = [RecordedRequest.from_json(r) for r in listing["requests"]]
    assert seen == fake.requests[0]
    assert seen.body == b"\xff{}" and seen.header("api-key") == "k" and seen.instance == "fake"
    response = await client.delete(fake.url + "/_fake/requests")
    assert await response.json() == {"count": 0, "requests": []}
    assert fake.requests == []
    response = await client.get(fake.url + "/_fake")
    state = await response.json()
    assert state["name"] == "fake" and state["request_count"] == 0 and state["behaviours"] == []


@pytest_twisted.ensureDeferred
async def test_control_endpoint_settings(fake: FakeAzure, client: HTTPClient) -> None:
    settings = fake.url + "/_fake/settings"
    changes = {"stream-chunks": 1, "filter_frames": False, "ratelimit-remaining": [5, 500], "hold": True}
    response = await client.post(settings, json=changes)
    assert response.code == 200
    answer = await response.json()
    assert answer["stream-chunks"] == 1 and answer["filter-frames"] is False and answer["hold"] is True
    response, reader = await stream(client, fake.url + CHAT, {"stream": True})
    assert response.headers.getRawHeaders("x-ratelimit-remaining-requests") == ["5"]
    assert response.headers.getRawHeaders("x-ratelimit-remaining-tokens") == ["500"]
    await reader.wait_for(b"chunk0 ")
    assert fake.held_streams == 1
    response = await client.post(settings, json={"hold": False})
    await response.content()
    await reader.done
    frames = events(reader.data)
    assert len(frames) == 3 and b"prompt_filter_results" not in reader.data
    for bad, message in [
        ({"stream-chunks": -1, "filter-frames": True}, "stream-chunks must be a whole number >= 0"),
        ({"stream-interval": "fast"}, "stream-interval must be a number of seconds"),
        ({"ratelimit-remaining": [1]}, "ratelimit-remaining must be [requests, tokens] or null"),
        ({"require-token": True}, "require-token needs a token endpoint"),
        ({"colour": "red"}, "unknown settings: colour"),
    ]:
        response = await client.post(settings, json=bad)
        assert response.code == 400
        assert message in (await response.json())["error"]["message"]
    assert fake.stream_chunks == 1 and fake.filter_frames is False  # nothing of those applied
    response = await client.post(settings, json={"api-key": "s3cret"})
    assert (await response.json())["api-key"] is True  # set, and never shown
    assert fake.api_key == "s3cret"
    assert await post_status(client, fake.url + CHAT) == 401


# -- token usage -------------------------------------------------------------------------------


def test_token_counting() -> None:
    assert count_tokens(" a  b\nc ") == 3
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "one two three"},
                {"type": "image_url", "image_url": {"url": "https://x/y z"}},
            ],
        },
    ]
    assert prompt_tokens({"model": "m a n y", "messages": messages, "stream_options": {}}) == 5
    assert prompt_tokens({"prompt": ["a b", "c"]}) == 3
    assert prompt_tokens({"input": [[1, 2], [3]]}) == 3
    assert prompt_tokens({"input": [1, 2, 3, 4]}) == 4
    assert prompt_tokens({"input": ["a b", "c"]}) == 3
    responses_input = [{"role": "user", "content": [{"type": "input_text", "text": "hi you"}]}]
    assert prompt_tokens({"instructions": "be brief", "input": responses_input}) == 4
    assert prompt_tokens({}) == 0


HELLO_TOKENS = 5  # "Hello from fake Azure (DEPLOYMENT)"


def counts(usage: dict[str, Any]) -> tuple[int, int, int]:
    """A chat usage object's (prompt, completion, total) tokens, checking its other members."""
    details = {
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    assert {k: v for k, v in usage.items() if k.endswith("_details")} == details
    return usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]


@pytest_twisted.ensureDeferred
async def test_usage_in_json_answers(fake: FakeAzure, client: HTTPClient) -> None:
    messages = [{"role": "user", "content": "hello there you"}]
    response = await client.post(fake.url + CHAT, json={"messages": messages})
    assert counts((await response.json())["usage"]) == (3, HELLO_TOKENS, 3 + HELLO_TOKENS)
    url = fake.url + "/openai/deployments/inst/completions?api-version=1"
    response = await client.post(url, json={"prompt": "a b"})
    assert counts((await response.json())["usage"]) == (2, HELLO_TOKENS, 2 + HELLO_TOKENS)
    url = fake.url + "/openai/deployments/emb/embeddings?api-version=1"
    response = await client.post(url, json={"input": ["a b", "c"]})
    assert (await response.json())["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    body = {"model": "gpt-4o", "instructions": "x", "input": "one two"}
    response = await client.post(fake.url + "/openai/v1/responses", json=body)
    answer = await response.json()
    assert answer["usage"] == {
        "input_tokens": 3,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": HELLO_TOKENS,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 3 + HELLO_TOKENS,
    }


@pytest_twisted.ensureDeferred
async def test_chat_stream_include_usage_is_openais_shape(fake: FakeAzure, client: HTTPClient) -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "one two"}], "stream": True}
    _, plain = await stream(client, fake.url + CHAT, body)
    await plain.done
    body["stream_options"] = {"include_usage": True}
    _, with_usage = await stream(client, fake.url + CHAT, body)
    await with_usage.done
    frames = events(with_usage.data)
    assert frames[0] + b"\n\n" == FILTER_FRAME  # Azure's filter-only frame, unchanged
    assert frames[-1] == b"data: [DONE]"
    chunks, usage_frame = frames[1:-2], frames[-2]
    assert len(chunks) == 4 and all(f.endswith(b',"usage":null}') for f in chunks)
    last = json.loads(usage_frame.removeprefix(b"data: "))
    assert last["choices"] == [] and counts(last["usage"]) == (2, 3, 5)
    assert list(last)[-2:] == ["choices", "usage"]
    # Without what include_usage adds, it is byte for byte the stream of a client that did not ask.
    stripped = with_usage.data.replace(b',"usage":null}', b"}").replace(usage_frame + b"\n\n", b"")
    assert normalised(stripped) == normalised(plain.data)
    assert b'"usage"' not in plain.data


@pytest_twisted.ensureDeferred
async def test_responses_stream_ends_with_usage(fake: FakeAzure, client: HTTPClient) -> None:
    body = {"model": "gpt-4o", "input": "one two three", "stream": True}
    _, reader = await stream(client, fake.url + "/openai/v1/responses", body)
    await reader.done
    last = events(reader.data)[-1]
    assert last.startswith(b"event: response.completed\ndata: ")
    completed = json.loads(last.split(b"data: ", 1)[1])["response"]
    assert completed["usage"]["input_tokens"] == 3
    assert completed["usage"]["output_tokens"] == fake.stream_chunks
    assert completed["output"][0]["content"][0]["text"] == "chunk0 chunk1 chunk2 "


# -- the managed-identity token endpoint -------------------------------------------------------

SCOPE = COGNITIVE_SERVICES + "/.default"
JWT = re.compile(r"^eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")  # aoaiproxy.rewrite's


@pytest_twisted.async_yield_fixture
async def identity() -> AsyncIterator[FakeManagedIdentity]:
    endpoint = FakeManagedIdentity(reactor, lifetime=60)
    endpoint.listen()
    yield endpoint
    await endpoint.stop()


async def get_token(
    client: HTTPClient, identity: FakeManagedIdentity, resource: str = COGNITIVE_SERVICES, **query: str
) -> Any:
    params = {"api-version": "2019-08-01", "resource": resource, **query}
    headers = {"X-IDENTITY-HEADER": identity.identity_header, "Metadata": "true"}
    return await client.get(identity.endpoint, params=params, headers=headers)


def claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))  # type: ignore[no-any-return]


@pytest_twisted.ensureDeferred
async def test_token_endpoint_protocol(identity: FakeManagedIdentity, client: HTTPClient) -> None:
    assert identity.environ() == {
        "IDENTITY_ENDPOINT": identity.url + "/msi/token",
        "IDENTITY_HEADER": identity.identity_header,
    }
    response = await get_token(client, identity)
    assert response.code == 200
    answer = await response.json()
    assert set(answer) == {"access_token", "expires_on", "resource", "token_type", "client_id"}
    assert answer["token_type"] == "Bearer" and answer["resource"] == COGNITIVE_SERVICES
    token = answer["access_token"]
    assert JWT.match(token)
    assert isinstance(answer["expires_on"], str)  # epoch seconds, as a string
    expires_on = int(answer["expires_on"])
    assert 59 <= expires_on - time.time() <= 61
    assert claims(token)["aud"] == COGNITIVE_SERVICES and claims(token)["exp"] == expires_on
    assert identity.issued[-1].token == token and identity.issued[-1].expires_on == expires_on
    assert token not in repr(identity.issued[-1])
    assert identity.is_valid(token, COGNITIVE_SERVICES) and identity.is_valid(token)
    assert not identity.is_valid(token, "https://management.azure.com")
    assert not identity.is_valid(token + "x")
    response = await get_token(client, identity, client_id="my-identity")
    assert (await response.json())["client_id"] == "my-identity"
    assert identity.valid_tokens == 2
    refusals = [
        (client.get(identity.endpoint, params={"api-version": "2019-08-01", "resource": "r"}), 401),
        (get_token(client, identity, **{"api-version": "2017-09-01"}), 400),
        (get_token(client, identity, resource=""), 400),
        (client.get(identity.url + "/elsewhere"), 404),
    ]
    for request, status in refusals:
        response = await request
        assert response.code == status
        error = await response.json()
        assert error["statusCode"] == status and error["message"]
    assert identity.request_count == 6 and len(identity.issued) == 2


@pytest_twisted.ensureDeferred
async def test_token_endpoint_fails_on_demand(
    identity: FakeManagedIdentity, client: HTTPClient, raw_connect: Connect
) -> None:
    identity.fail(500, count=1)
    response = await get_token(client, identity)
    assert response.code == 500
    assert (await response.json())["message"] == "An unexpected error occured while fetching the AAD Token."
    assert (await get_token(client, identity)).code == 200
    identity.fail(400)
    for _ in range(2):
        response = await get_token(client, identity)
        assert response.code == 400
        assert (await response.json())["message"] == "Unable to load the proper Managed Identity."
    identity.fail(None)
    assert (await get_token(client, identity)).code == 200
    identity.fail("hang", count=1)
    hung = await raw_connect(port_of(identity))
    hung.send(b"GET /msi/token HTTP/1.1\r\nHost: x\r\n\r\n")
    await identity.wait_request()
    assert identity.hanging_requests == 1
    assert (await get_token(client, identity)).code == 200
    assert hung.received == b""
    with pytest.raises(ValueError, match="fail must be"):
        identity.fail(200)


@pytest_twisted.ensureDeferred
async def test_token_endpoint_control(identity: FakeManagedIdentity, client: HTTPClient) -> None:
    old = (await (await get_token(client, identity)).json())["access_token"]
    control = identity.url + "/_fake/identity"
    response = await client.post(control, json={"fail": 500, "count": 1})
    state = await response.json()
    assert (state["fail"], state["fail_count"], state["valid"]) == (500, 1, 1)
    assert (await get_token(client, identity)).code == 500
    response = await client.post(control, json={"lifetime": 10, "revoke": True})
    assert (await response.json())["valid"] == 0
    assert not identity.is_valid(old)
    answer = await (await get_token(client, identity)).json()
    assert 9 <= int(answer["expires_on"]) - time.time() <= 11
    for bad in ({"fail": "sometimes"}, {"lifetime": 0}, {"colour": 1}, {"count": "x"}):
        response = await client.post(control, json=bad)
        assert response.code == 400, bad
    response = await client.get(control)
    state = await response.json()
    assert state["request_count"] == 3 and state["issued"] == 2 and state["lifetime"] == 10


@pytest_twisted.ensureDeferred
async def test_fake_azure_requires_tokens_it_trusts(
    identity: FakeManagedIdentity, client: HTTPClient
) -> None:
    server = FakeAzure(reactor, identity=identity)
    server.listen()
    try:
        response = await client.post(server.url + CHAT, json={})
        assert response.code == 401
        assert "Access token is missing, invalid" in (await response.json())["error"]["message"]
        good = (await (await get_token(client, identity)).json())["access_token"]
        other = (await (await get_token(client, identity, "https://management.azure.com")).json())[
            "access_token"
        ]
        identity.lifetime = -2  # born expired, past the allowance for clock skew
        expired = (await (await get_token(client, identity)).json())["access_token"]

        async def status(**headers: str) -> int:
            response = await client.post(server.url + CHAT, json={}, headers=headers)
            await response.content()
            return int(response.code)

        assert await status(Authorization=f"Bearer {good}") == 200
        assert server.requests[-1].header("authorization") == f"Bearer {good}"
        assert await status(Authorization=f"Bearer {other}") == 401  # another audience
        assert await status(Authorization=f"Bearer {expired}") == 401
        assert await status(**{"api-key": good}) == 401
        server.api_key = "k"
        assert await status(**{"api-key": "k"}) == 200
        assert await status(Authorization=f"Bearer {good}") == 200
        identity.revoke()
        assert await status(Authorization=f"Bearer {good}") == 401
        server.api_key = None
        server.require_token = False
        assert await status() == 200
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_azure_identity_managed_identity_credential(
    identity: FakeManagedIdentity, client: HTTPClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """azure-identity's own ManagedIdentityCredential gets its tokens from the fake."""
    from azure.core.exceptions import ClientAuthenticationError
    from azure.identity import ManagedIdentityCredential

    for name in ("AZURE_CLIENT_ID", "MSI_ENDPOINT", "IDENTITY_SERVER_THUMBPRINT", "IMDS_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in identity.environ().items():
        monkeypatch.setenv(name, value)
    identity.lifetime = 10  # under MSAL's 5 minutes: never cached
    credential = ManagedIdentityCredential()
    first = await deferToThread(credential.get_token, SCOPE)
    second = await deferToThread(credential.get_token, SCOPE)
    assert identity.request_count == 2 and first.token != second.token
    assert first.expires_on == identity.issued[0].expires_on
    assert identity.is_valid(second.token, COGNITIVE_SERVICES)
    [seen, _] = identity.requests
    assert seen.query == {"api-version": ["2019-08-01"], "resource": [COGNITIVE_SERVICES]}
    assert seen.header("x-identity-header") == identity.identity_header
    identity.lifetime = 3600  # a long-lived token is served from MSAL's cache
    third = await deferToThread(credential.get_token, SCOPE)
    fourth = await deferToThread(credential.get_token, SCOPE)
    assert identity.request_count == 3 and fourth.token == third.token
    server = FakeAzure(reactor, identity=identity)
    server.listen()
    try:
        response = await client.post(
            server.url + CHAT, json={}, headers={"Authorization": f"Bearer {third.token}"}
        )
        assert response.code == 200
        await response.content()
    finally:
        await server.stop()
    identity.fail(400)
    with pytest.raises(ClientAuthenticationError, match="Unable to load the proper Managed Identity"):
        await deferToThread(ManagedIdentityCredential().get_token, SCOPE)


# -- the command line --------------------------------------------------------------------------


def listening_urls(out: bytes) -> dict[str, str]:
    """name -> URL from C{fake Azure OpenAI NAME listening on URL} lines."""
    found = re.findall(rb"^fake Azure OpenAI (\S+) listening on (\S+)$", out, re.MULTILINE)
    return {name.decode(): url.decode() for name, url in found}


@pytest_twisted.ensureDeferred
async def test_main_regions_identity_and_control(client: HTTPClient) -> None:
    args = ["--regions", "east=0,west=0", "--identity-port", "0", "--require-token", "--token-lifetime", "10"]
    args += ["--behaviour", "429", "retry-after-ms=1500", "count=1", "region=east"]
    async with main_process(*args, lines=4) as proto:
        lines = proto.out.decode().splitlines()
        urls = listening_urls(proto.out)
        assert list(urls) == ["east", "west"] and urls["east"] != urls["west"]
        assert lines[2].startswith("fake managed identity listening on http://127.0.0.1:")
        env = dict(item.split("=", 1) for item in lines[3].split())
        assert set(env) == {"IDENTITY_ENDPOINT", "IDENTITY_HEADER"}
        assert env["IDENTITY_ENDPOINT"] == lines[2].split()[-1]
        response = await client.get(
            env["IDENTITY_ENDPOINT"],
            params={"api-version": "2019-08-01", "resource": COGNITIVE_SERVICES},
            headers={"X-IDENTITY-HEADER": env["IDENTITY_HEADER"]},
        )
        token = (await response.json())["access_token"]
        auth = {"Authorization": f"Bearer {token}"}

        async def status(url: str, headers: dict[str, str]) -> tuple[int, list[str] | None]:
            response = await client.post(url + CHAT, json={}, headers=headers)
            await response.content()
            return response.code, response.headers.getRawHeaders("retry-after-ms")

        assert await status(urls["east"], {}) == (401, None)  # consumes no behaviour
        assert await status(urls["east"], auth) == (429, ["1500"])
        assert await status(urls["east"], auth) == (200, None)
        assert await status(urls["west"], auth) == (200, None)
        west = RemoteFake(urls["west"])
        behaviours = await deferToThread(west.add_behaviour, "503", count=1)
        assert behaviours == [{"kind": "503", "count": 1, "deployment": None, "headers": {}}]
        assert await status(urls["west"], auth) == (503, None)
        assert await status(urls["west"], auth) == (200, None)
        seen = await deferToThread(RemoteFake(urls["east"]).requests)
        assert [(r.instance, r.header("authorization")) for r in seen] == [
            ("east", None),
            ("east", f"Bearer {token}"),
            ("east", f"Bearer {token}"),
        ]
        with pytest.raises(ValueError, match="unknown behaviour '418'"):
            await deferToThread(west.add_behaviour, "418")
        token_endpoint = RemoteFake(env["IDENTITY_ENDPOINT"])
        state = await deferToThread(token_endpoint.identity, revoke=True)
        assert state["issued"] == 1 and state["valid"] == 0 and state["lifetime"] == 10
        assert await status(urls["west"], auth) == (401, None)
    request_lines = [line for line in proto.out.decode().splitlines()[4:]]
    assert request_lines[0].startswith("identity: GET /msi/token?")
    assert request_lines[1].startswith("east: POST " + CHAT)


@pytest_twisted.ensureDeferred
async def test_main_several_ports(client: HTTPClient) -> None:
    async with main_process(
        "--port", "0", "--port", "0", "--behaviour", "close", "--quiet", lines=2
    ) as proto:
        urls = listening_urls(proto.out)
        assert list(urls) == ["fake1", "fake2"]
        for url in urls.values():
            with pytest.raises(ResponseNeverReceived):
                await client.post(url + CHAT, json={})
        settings = await deferToThread(RemoteFake(urls["fake1"]).settings, stream_chunks=1)
        assert settings["stream-chunks"] == 1
    assert len(proto.out.splitlines()) == 2  # --quiet


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--behaviour", "418"], "unknown behaviour '418'"),
        (["--behaviour", "429", "region=north"], "no region 'north'"),
        (["--require-token"], "--require-token needs --identity-port"),
        (["--regions", "east"], "regions are NAME=PORT"),
        (["--regions", "a=1,a=2"], "region names must be unique"),
    ],
)
def test_main_refuses_bad_arguments(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from aoaiproxy.testing import main

    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_main_help_documents_the_control_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    from aoaiproxy.testing import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for text in ("--regions", "--behaviour", "POST   /_fake/behaviour", "/_fake/identity", "IDENTITY_HEADER"):
        assert text in out
    assert "C{" not in out and "L{" not in out
