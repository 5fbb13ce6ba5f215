"""Tests for aoaiproxy.testing.FakeAzure, over real loopback with treq."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from aoaiproxy.testing import FakeAzure

from .rawnet import BodyReader

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


async def _run_main(reactor: Any, client: HTTPClient) -> list[bytes]:
    class Output(ProcessProtocol):
        def __init__(self) -> None:
            self.out = b""
            self.listening: Deferred[None] = Deferred()
            self.ended: Deferred[None] = Deferred()

        def outReceived(self, data: bytes) -> None:
            self.out += data
            if b"\n" in self.out and not self.listening.called:
                self.listening.callback(None)

        def processEnded(self, reason: Failure) -> None:
            self.ended.callback(None)

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    proto = Output()
    args = [sys.executable, "-m", "aoaiproxy.testing", "--port", "0"]
    process = reactor.spawnProcess(proto, sys.executable, args, env=env)
    try:
        await proto.listening
        url = proto.out.split()[-1].decode()
        response = await client.post(url + CHAT, json={})
        assert response.code == 200
        await response.content()
    finally:
        process.signalProcess("TERM")
        await proto.ended
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
