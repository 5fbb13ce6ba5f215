"""
End to end: the rest of the OpenAI API surface (images, audio, Responses, files, batches)
through C{twistd -n aoaiproxy}, driven by the official C{openai} SDK in a thread, against the
fake Azure upstream in this process.  Each test compares what the SDK sent with what the fake
received.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import struct
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import openai
import pytest_twisted
import treq
from twisted.internet.threads import deferToThread

from aoaiproxy.testing import FakeAzure, RecordedRequest

from ..conftest import Daemon

API_VERSION = "2024-10-21"
MAPPER = "dall-e-3=img-prod,whisper-1=whisper-prod,tts-1=tts-prod,gpt-4o=prod-4o"


class SDK:
    """An C{openai.OpenAI} client for the daemon that keeps every request it sent."""

    def __init__(self, daemon: Daemon) -> None:
        self.sent: list[httpx.Request] = []
        http = httpx.Client(event_hooks={"request": [self._keep]}, timeout=60)
        self.client = openai.OpenAI(
            base_url=daemon.url + "/v1", api_key="client-key", max_retries=0, http_client=http
        )

    def _keep(self, request: httpx.Request) -> None:
        request.read()
        self.sent.append(request)

    async def __call__(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one blocking SDK call off the reactor thread."""
        return await deferToThread(call, *args, **kwargs)


def check_sent(
    seen: RecordedRequest, sent: httpx.Request, path: str, query: dict[str, list[str]] | None = None
) -> None:
    """
    The fake got the SDK's request at Azure's C{path} with C{query} (default: the SDK's own
    query, unchanged: no api-version on the v1 API), authenticated with the client's key.
    """
    assert seen.method == sent.method
    assert seen.path == path
    if query is None:
        query = parse_qs(sent.url.query.decode(), keep_blank_values=True)
    assert seen.query == query
    assert "api-version" not in seen.query or seen.path.startswith("/openai/deployments/")
    assert seen.header("api-key") == "client-key"
    assert seen.header("authorization") is None
    assert seen.header("content-type") == sent.headers.get("content-type")


def wav_bytes(seconds: float = 0.25, rate: int = 16000) -> bytes:
    """A real WAV file: a 440 Hz tone, 16-bit mono."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        frames = (int(8000 * math.sin(2 * math.pi * 440 * i / rate)) for i in range(int(seconds * rate)))
        w.writeframes(b"".join(struct.pack("<h", f) for f in frames))
    return out.getvalue()


@pytest_twisted.ensureDeferred
async def test_images_and_audio(fake: FakeAzure, start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon("--endpoint", fake.url, "--model-mapper", MAPPER)
    sdk = SDK(daemon)
    deployment_query = {"api-version": [API_VERSION]}

    image = await sdk(sdk.client.images.generate, model="dall-e-3", prompt="a red cube", n=1)
    assert image.data[0].url == "https://fake/img.png"
    seen, sent = fake.requests[-1], sdk.sent[-1]
    check_sent(seen, sent, "/openai/deployments/img-prod/images/generations", deployment_query)
    assert seen.body == sent.content
    assert seen.json() == {"model": "dall-e-3", "prompt": "a red cube", "n": 1}

    wav = wav_bytes()
    transcription = await sdk(
        sdk.client.audio.transcriptions.create,
        model="whisper-1",
        file=("hello.wav", wav, "audio/wav"),
        language="en",
    )
    assert transcription.text == "fake transcription"
    seen, sent = fake.requests[-1], sdk.sent[-1]
    check_sent(seen, sent, "/openai/deployments/whisper-prod/audio/transcriptions", deployment_query)
    assert sent.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert seen.body == sent.content  # the client's multipart body, not re-encoded
    fields = seen.form()
    assert {name: part.text for name, part in fields.items() if name != "file"} == {
        "model": "whisper-1",
        "language": "en",
    }
    assert (fields["file"].filename, fields["file"].content) == ("hello.wav", wav)

    # Speech: binary, streamed to the client as it arrives; the same bytes the fake sends.
    direct = await treq.post(
        fake.url + f"/openai/deployments/x/audio/speech?api-version={API_VERSION}",
        json={"input": "hi"},
    )
    expected = await direct.content()
    del fake.requests[-1]

    def speech() -> tuple[list[bytes], str]:
        with sdk.client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input="hello there", response_format="mp3"
        ) as response:
            return list(response.iter_bytes()), response.headers["content-type"]

    chunks, content_type = await sdk(speech)
    assert b"".join(chunks) == expected and len(expected) == 64 * 1024
    assert content_type == "audio/mpeg"
    seen, sent = fake.requests[-1], sdk.sent[-1]
    check_sent(seen, sent, "/openai/deployments/tts-prod/audio/speech", deployment_query)
    assert seen.body == sent.content
    assert seen.json() == {
        "model": "tts-1",
        "voice": "alloy",
        "input": "hello there",
        "response_format": "mp3",
    }


@pytest_twisted.ensureDeferred
async def test_responses(fake: FakeAzure, start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon("--endpoint", fake.url, "--model-mapper", MAPPER)
    sdk = SDK(daemon)

    response = await sdk(sdk.client.responses.create, model="gpt-4o", input="Say hi", instructions="Be brief")
    assert response.output_text == "Hello from fake Azure (prod-4o)"
    seen, sent = fake.requests[-1], sdk.sent[-1]
    check_sent(seen, sent, "/openai/v1/responses")  # the v1 API: no dated api-version
    assert seen.json() == {**json.loads(sent.content), "model": "prod-4o"}

    # An unmapped model: the body is not touched at all.
    await sdk(sdk.client.responses.create, model="o4-mini", input=[{"role": "user", "content": "x"}])
    assert fake.requests[-1].body == sdk.sent[-1].content

    retrieved = await sdk(sdk.client.responses.retrieve, response.id)
    assert retrieved.id == response.id and retrieved.output_text == response.output_text
    items = await sdk(sdk.client.responses.input_items.list, response.id)
    assert [item.role for item in items.data] == ["user"]  # type: ignore[union-attr]
    cancelled = await sdk(sdk.client.responses.cancel, response.id)
    assert cancelled.status == "cancelled"
    await sdk(sdk.client.responses.delete, response.id)
    assert [(r.method, r.path, r.body) for r in fake.requests[-4:]] == [
        ("GET", f"/openai/v1/responses/{response.id}", b""),
        ("GET", f"/openai/v1/responses/{response.id}/input_items", b""),
        ("POST", f"/openai/v1/responses/{response.id}/cancel", b""),
        ("DELETE", f"/openai/v1/responses/{response.id}", b""),
    ]
    for seen, sent in zip(fake.requests[-4:], sdk.sent[-4:], strict=True):
        check_sent(seen, sent, seen.path)

    def stream() -> list[Any]:
        with sdk.client.responses.create(model="gpt-4o", input="Stream it", stream=True) as events:
            return list(events)

    events = await sdk(stream)
    kinds = [event.type for event in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * fake.stream_chunks,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output_text == "chunk0 chunk1 chunk2 "
    seen, sent = fake.requests[-1], sdk.sent[-1]
    check_sent(seen, sent, "/openai/v1/responses")
    assert seen.json() == {**json.loads(sent.content), "model": "prod-4o"}
    assert seen.json()["stream"] is True


@pytest_twisted.ensureDeferred
async def test_files_and_batches(fake: FakeAzure, start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon("--endpoint", fake.url, "--api-version", "2025-04-01-preview")
    sdk = SDK(daemon)
    line = {
        "custom_id": "1",
        "method": "POST",
        "url": "/chat/completions",
        "body": {"model": "gpt-4o-batch", "messages": [{"role": "user", "content": "hi"}]},
    }
    data = (json.dumps(line) + "\n").encode() * 3

    uploaded = await sdk(sdk.client.files.create, file=("batch.jsonl", data), purpose="batch")
    assert (uploaded.bytes, uploaded.filename, uploaded.purpose) == (len(data), "batch.jsonl", "batch")
    seen, sent = fake.requests[-1], sdk.sent[-1]
    check_sent(seen, sent, "/openai/v1/files")
    assert seen.body == sent.content
    assert seen.form()["purpose"].text == "batch"
    assert seen.form()["file"].content == data

    content = await sdk(sdk.client.files.content, uploaded.id)
    assert content.content == data
    seen, sent = fake.requests[-1], sdk.sent[-1]
    check_sent(seen, sent, f"/openai/v1/files/{uploaded.id}/content", {})
    assert seen.body == b""

    batch = await sdk(
        sdk.client.batches.create,
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"team": "a"},
    )
    assert (batch.input_file_id, batch.status) == (uploaded.id, "validating")
    seen, sent = fake.requests[-1], sdk.sent[-1]
    check_sent(seen, sent, "/openai/v1/batches", {})
    assert seen.body == sent.content
    assert seen.json() == {
        "input_file_id": uploaded.id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "metadata": {"team": "a"},
    }
    listing = await sdk(sdk.client.files.list)
    assert [f.id for f in listing.data] == [uploaded.id]
    assert fake.requests[-1].raw_uri == "/openai/v1/files"


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux >= 4.0), if allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@pytest_twisted.ensureDeferred
async def test_20mb_uploads_pass_with_bounded_memory(
    fake: FakeAzure, start_daemon: Callable[..., Daemon]
) -> None:
    """
    A 20 MB upload (files and transcription) reaches Azure byte for byte while the daemon's
    peak RSS grows far less than the body: it is spooled to a temporary file, scanned for
    its model in windows and sent from the file.
    """
    daemon = start_daemon("--endpoint", fake.url, "--model-mapper", MAPPER)
    sdk = SDK(daemon)
    pid = daemon.proc.pid
    # Warm up every code path (imports, temporary files, pools) with 300 KB bodies.
    small = os.urandom(300_000)
    await sdk(sdk.client.files.create, file=("warm.jsonl", small), purpose="batch")
    await sdk(sdk.client.audio.transcriptions.create, model="whisper-1", file=("warm.wav", small))

    big = os.urandom(20 * 1024 * 1024)
    digest = hashlib.sha256(big).hexdigest()
    growth = {}
    for name, call, kwargs, path in [
        ("files", sdk.client.files.create, {"purpose": "batch"}, "/openai/v1/files"),
        (
            "transcription",
            sdk.client.audio.transcriptions.create,
            {"model": "whisper-1"},
            "/openai/deployments/whisper-prod/audio/transcriptions",
        ),
    ]:
        before = memory_kib(pid)
        baseline = before["VmRSS"] if reset_peak(pid) else before["VmHWM"]
        await sdk(call, file=("big.bin", big), **kwargs)
        growth[name] = memory_kib(pid)["VmHWM"] - baseline
        seen, sent = fake.requests[-1], sdk.sent[-1]
        assert seen.path == path
        assert len(seen.body) == len(sent.content) > len(big)
        assert hashlib.sha256(seen.body).digest() == hashlib.sha256(sent.content).digest()
        assert hashlib.sha256(seen.form()["file"].content).hexdigest() == digest
        del seen, sent
        sdk.sent.clear()
        fake.requests.clear()
    print(f"daemon peak RSS growth for a 20 MiB upload: {growth} KiB")
    for name, kib in growth.items():
        assert kib < 12 * 1024, (name, kib)
