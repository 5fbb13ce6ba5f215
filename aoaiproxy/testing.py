"""A fake Azure OpenAI upstream on a real loopback socket, for tests and demos.

Like ``treq.testing``, this module is part of the public package: the project's tests run the
proxy against it, and ``python -m aoaiproxy.testing --port 8081`` lets users try the proxy without
an Azure resource.

It answers what Azure OpenAI answers, in Azure's shapes: the per-deployment routes
(``/openai/deployments/{dep}/chat/completions`` and friends, ``api-version`` required) and the
v1 API under ``/openai/v1/`` (responses, files, batches, fine-tuning jobs, vector stores). Every
request is recorded in :attr:`FakeAzure.requests`; answers can be scripted with
:meth:`FakeAzure.respond_next` and friends; streams can be held, slowed down or made big.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import re
import struct
import sys
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from typing import IO, Any, Protocol, cast
from urllib.parse import parse_qs, unquote

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    IPushProducer,
)
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web import http, server
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from zope.interface import implementer

__all__ = ["FakeAzure", "FormPart", "RecordedRequest", "main"]

JSONObject = dict[str, Any]

_AUDIO_BYTES = bytes(i * 7 % 251 for i in range(64 * 1024))
_AUDIO_WRITES = 4
_BIG_EVENT_CONTENT = "x" * 4000
_WRITE_BATCH = 256 * 1024
_HOLD = object()  # marker in a stream's event sequence: where hold_last_chunk() stops it

_AUDIO_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
_OPERATIONS = {
    "chat/completions": "ChatCompletions_Create",
    "completions": "Completions_Create",
    "embeddings": "Embeddings_Create",
    "images/generations": "ImageGenerations_Create",
    "images/edits": "ImageEdits_Create",
    "audio/transcriptions": "Transcriptions_Create",
    "audio/translations": "Translations_Create",
    "audio/speech": "Speech_Create",
}
_DEPLOYMENT_ROUTE = re.compile(r"^/openai/deployments/(?P<dep>[^/]+)/(?P<op>" + "|".join(_OPERATIONS) + r")$")
_V1_PREFIX = "/openai/v1/"


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _sse(obj: object, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + _dumps(obj) + b"\n\n"


_DONE = b"data: [DONE]\n\n"
_FILTER_FRAME = _sse(
    {
        "choices": [],
        "created": 0,
        "id": "",
        "model": "",
        "object": "",
        "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}],
    }
)
_PROMPT_FILTER_RESULTS = [
    {
        "prompt_index": 0,
        "content_filter_results": {
            "hate": {"filtered": False, "severity": "safe"},
            "self_harm": {"filtered": False, "severity": "safe"},
            "sexual": {"filtered": False, "severity": "safe"},
            "violence": {"filtered": False, "severity": "safe"},
        },
    }
]


@attrs.frozen
class RecordedRequest:
    """One request as FakeAzure received it."""

    method: str
    path: str
    query: dict[str, list[str]]
    raw_uri: str
    headers: dict[str, list[str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)

    def form(self) -> dict[str, FormPart]:
        """The body parsed as multipart/form-data: field name -> part (last one wins)."""
        return {part.name: part for part in _parse_multipart(self)}


@attrs.frozen
class FormPart:
    """One part of a multipart/form-data body."""

    name: str
    filename: str | None
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


def _parse_multipart(rec: RecordedRequest) -> list[FormPart]:
    match = re.search(r'boundary="?([^";]+)"?', rec.header("content-type") or "")
    if match is None:
        return []
    parts: list[FormPart] = []
    for chunk in rec.body.split(b"--" + match.group(1).encode())[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, content = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        disposition = ""
        for line in head.decode("utf-8", "replace").split("\r\n"):
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-disposition":
                disposition = value
        name = re.search(r'\bname="([^"]*)"', disposition)
        filename = re.search(r'\bfilename="([^"]*)"', disposition)
        parts.append(
            FormPart(
                name=name.group(1) if name else "",
                filename=filename.group(1) if filename else None,
                content=content.removesuffix(b"\r\n"),
            )
        )
    return parts


@attrs.frozen
class _Reply:
    """A complete (non-streamed) answer."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = (("content-type", "application/json"),)
    writes: int = 1  # more than 1: sent chunked, in that many writes


@attrs.frozen
class _Stream:
    """A streamed answer: SSE events, with _HOLD where a held stream waits."""

    events: Callable[[], Iterator[bytes | object]]
    content_type: str = "text/event-stream; charset=utf-8"


_Answer = _Reply | _Stream
_Script = Callable[[RecordedRequest], _Reply]


def _json_reply(status: int, obj: object, headers: tuple[tuple[str, str], ...] = ()) -> _Reply:
    return _Reply(status, _dumps(obj), (("content-type", "application/json"), *headers))


def _azure_error(status: int, code: str, message: str) -> _Reply:
    return _json_reply(status, {"error": {"code": code, "message": message}})


def _openai_error(status: int, message: str) -> _Reply:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    return _json_reply(status, {"error": error})


_NOT_FOUND = _azure_error(404, "404", "Resource not found")
_V1_BAD_API_VERSION = _azure_error(400, "BadRequest", "API version not supported")
_UNAUTHORIZED = _azure_error(
    401,
    "401",
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a"
    " valid key for an active subscription and use a correct regional API endpoint for your"
    " resource.",
)


def _usage(prompt: int = 9, completion: int = 12) -> JSONObject:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class _HTTPRequest(Protocol):
    """What FakeAzure uses of a twisted.web request (whose methods are untyped)."""

    uri: bytes
    method: bytes
    content: IO[bytes]
    requestHeaders: Headers

    def setResponseCode(self, code: int) -> None: ...
    def setHeader(self, name: str, value: str) -> None: ...
    def write(self, data: bytes) -> None: ...
    def finish(self) -> None: ...
    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def notifyFinish(self) -> Deferred[None]: ...


class _Connection(ProtocolWrapper):
    """Tracks one client connection (see _ConnectionTracker)."""


class _ConnectionTracker(WrappingFactory):
    """Wraps the Site to count open connections and notice when one closes."""

    protocol = _Connection
    noisy = False

    def __init__(self, site: server.Site) -> None:
        super().__init__(site)  # type: ignore[no-untyped-call]
        self.closed_waiters: list[Deferred[None]] = []
        self.all_closed_waiters: list[Deferred[None]] = []

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        super().unregisterProtocol(p)  # type: ignore[no-untyped-call]
        waiters, self.closed_waiters = self.closed_waiters, []
        if not self.protocols:
            waiters += self.all_closed_waiters
            self.all_closed_waiters = []
        for d in waiters:
            d.callback(None)


class _FormlessRequest(server.Request):
    """A request that keeps the body as bytes (no form parsing into request.args)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]


class _Site(server.Site):
    requestFactory = _FormlessRequest
    noisy = False

    def log(self, request: http.Request) -> None:
        """No access log: FakeAzure.on_request is the hook for that."""


@implementer(IPushProducer)
class _StreamProducer:
    """Writes one streamed answer, honouring backpressure, interval, hold and stop."""

    def __init__(self, fake: FakeAzure, request: _HTTPRequest, events: Iterator[object]) -> None:
        self._fake = fake
        self._request = request
        self._events = events
        self._hold = fake._hold
        self._paused = False
        self._held = False
        self._done = False
        self._running = False
        self._delayed: IDelayedCall | None = None

    def start(self) -> None:
        self._fake._streams.add(self)
        self._request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self._request.registerProducer(self, True)
        self._step()

    @property
    def held(self) -> bool:
        return self._held

    def release(self) -> None:
        self._hold = False
        if self._held:
            self._held = False
            self._step()

    def pauseProducing(self) -> None:
        if not self._paused:
            self._paused = True
            waiters, self._fake._pause_waiters = self._fake._pause_waiters, []
            for d in waiters:
                d.callback(None)

    def resumeProducing(self) -> None:
        self._paused = False
        if self._delayed is None and not self._held:
            self._step()

    def stopProducing(self) -> None:
        self._close()

    def _close(self) -> None:
        self._done = True
        self._fake._streams.discard(self)
        if self._delayed is not None and self._delayed.active():
            self._delayed.cancel()
        self._delayed = None

    def _timer_fired(self) -> None:
        self._delayed = None
        self._step()

    def _step(self) -> None:
        if self._running:
            return
        self._running = True
        try:
            self._write_some()
        finally:
            self._running = False

    def _write_some(self) -> None:
        written = 0
        interval = self._fake.stream_interval
        while not (self._done or self._paused or self._held):
            event = next(self._events, None)
            if event is None:
                self._close()
                self._request.unregisterProducer()
                self._request.finish()
                return
            if event is _HOLD:
                self._held = self._hold
                continue
            assert isinstance(event, bytes)
            self._request.write(event)
            self._fake.bytes_sent += len(event)
            written += len(event)
            if interval > 0 or written >= _WRITE_BATCH:
                self._delayed = self._fake._reactor.callLater(interval, self._timer_fired)
                return


class _Collection:
    """An in-memory store of OpenAI objects of one kind (files, batches, ...)."""

    def __init__(self) -> None:
        self.items: dict[str, JSONObject] = {}

    def add(self, obj: JSONObject) -> _Reply:
        self.items[obj["id"]] = obj
        return _json_reply(200, obj)

    def listing(self) -> _Reply:
        data = list(self.items.values())
        return _json_reply(200, _list_page(data))

    def get(self, item_id: str) -> JSONObject | None:
        return self.items.get(item_id)


def _list_page(data: list[JSONObject]) -> JSONObject:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": False,
    }


class _FakeAzureResource(Resource):
    isLeaf = True

    def __init__(self, fake: FakeAzure) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._fake = fake

    def render(self, request: server.Request) -> bytes | int:
        return self._fake._render(cast(_HTTPRequest, request))


class FakeAzure:
    """A fake Azure OpenAI resource listening on loopback.

    ``reactor`` must provide IReactorTCP and IReactorTime (and IReactorSSL to listen with TLS).
    With ``api_key``, a request without ``api-key: KEY`` or ``Authorization: Bearer KEY`` gets
    Azure's 401 (and does not consume a scripted answer). ``on_request`` is called with every
    request as it is recorded.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        api_key: str | None = None,
        on_request: Callable[[RecordedRequest], None] | None = None,
    ) -> None:
        self._reactor = reactor
        self.api_key = api_key
        self.on_request = on_request
        self.requests: list[RecordedRequest] = []
        self.stream_chunks = 3
        self.stream_interval = 0.0
        self.filter_frames = True
        self.big_stream_bytes: int | None = None
        self.bytes_sent = 0
        self._hold = False
        self._streams: set[_StreamProducer] = set()
        self._pause_waiters: list[Deferred[None]] = []
        self._script: deque[_Script] = deque()
        self._ids = itertools.count(1)
        self._ports: list[IListeningPort] = []
        self._url: str | None = None
        self._tracker = _ConnectionTracker(
            _Site(_FakeAzureResource(self))  # type: ignore[no-untyped-call]
        )
        self._files = _Collection()
        self._file_contents: dict[str, bytes] = {}
        self._responses = _Collection()
        self._input_items: dict[str, list[JSONObject]] = {}
        self._collections = {
            "batches": (_Collection(), self._new_batch),
            "fine_tuning/jobs": (_Collection(), self._new_fine_tuning_job),
            "vector_stores": (_Collection(), self._new_vector_store),
        }

    # -- listening and connections ---------------------------------------------------------

    def listen(
        self,
        port: int = 0,
        interface: str = "127.0.0.1",
        context_factory: IOpenSSLServerConnectionCreator | IOpenSSLContextFactory | None = None,
    ) -> IListeningPort:
        """Listen on ``interface:port`` (TLS if ``context_factory``) and set :attr:`url`."""
        listening: IListeningPort
        if context_factory is None:
            listening = self._reactor.listenTCP(port, self._tracker, interface=interface)
        else:
            listening = self._reactor.listenSSL(port, self._tracker, context_factory, interface=interface)
        self._ports.append(listening)
        host = f"[{interface}]" if ":" in interface else interface
        scheme = "http" if context_factory is None else "https"
        address = listening.getHost()
        assert isinstance(address, (IPv4Address, IPv6Address))
        self._url = f"{scheme}://{host}:{address.port}"
        return listening

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (or ``https://``) of the latest :meth:`listen`."""
        if self._url is None:
            raise RuntimeError("FakeAzure.listen() has not been called")
        return self._url

    @property
    def open_connections(self) -> int:
        """How many client connections are open right now."""
        return len(self._tracker.protocols)

    def wait_connection_closed(self) -> Deferred[None]:
        """A Deferred that fires the next time any client connection closes."""
        d: Deferred[None] = Deferred()
        self._tracker.closed_waiters.append(d)
        return d

    def stop(self) -> Deferred[None]:
        """Stop listening, end every stream and abort every open connection.

        Fires once the ports are closed and every connection is gone.
        """
        waits: list[Deferred[None]] = [d for p in self._ports if (d := p.stopListening())]
        self._ports = []
        for stream in list(self._streams):
            stream.stopProducing()
        if self._tracker.protocols:
            closed: Deferred[None] = Deferred()
            self._tracker.all_closed_waiters.append(closed)
            waits.append(closed)
            for conn in list(self._tracker.protocols):
                conn.transport.abortConnection()
        if not waits:
            return succeed(None)
        return gatherResults(waits).addCallback(lambda _: None)

    # -- scripting ---------------------------------------------------------------------------

    def respond_next(
        self, status: int, body: bytes | JSONObject, headers: dict[str, str] | None = None
    ) -> None:
        """The next request gets exactly this answer (FIFO with the other ``*_next``)."""
        raw = body if isinstance(body, bytes) else _dumps(body)
        extra = tuple((headers or {}).items())
        if not any(name.lower() == "content-type" for name, _ in extra):
            extra = (("content-type", "application/json"), *extra)
        reply = _Reply(status, raw, extra)
        self._script.append(lambda _: reply)

    def rate_limit_next(self, retry_after: int = 7) -> None:
        """The next request gets Azure's 429 with ``retry-after: retry_after``."""

        def reply(rec: RecordedRequest) -> _Reply:
            match = _DEPLOYMENT_ROUTE.match(rec.path)
            operation = _OPERATIONS[match.group("op")] if match else "Responses_Create"
            version = rec.query.get("api-version", ["v1"])[0]
            message = (
                f"Requests to the {operation} Operation under Azure OpenAI API version {version}"
                " have exceeded token rate limit of your current OpenAI S0 pricing tier. Please"
                f" retry after {retry_after} seconds. Please go here:"
                " https://aka.ms/oai/quotaincrease if you would like to further increase the"
                " default rate limit."
            )
            return _json_reply(
                429,
                {"error": {"code": "429", "message": message}},
                (
                    ("retry-after", str(retry_after)),
                    ("retry-after-ms", str(retry_after * 1000)),
                    ("x-ratelimit-remaining-requests", "0"),
                    ("x-ratelimit-remaining-tokens", "0"),
                ),
            )

        self._script.append(reply)

    def deployment_not_found_next(self) -> None:
        """The next request gets Azure's 404 DeploymentNotFound."""
        reply = _azure_error(
            404,
            "DeploymentNotFound",
            "The API deployment for this resource does not exist. If you created the deployment"
            " within the last 5 minutes, please wait a moment and try again.",
        )
        self._script.append(lambda _: reply)

    # -- stream control ----------------------------------------------------------------------

    def hold_last_chunk(self) -> None:
        """Streams started from now on stop before their final events until :meth:`release`."""
        self._hold = True

    def release(self) -> None:
        """Let every held stream finish, and stop holding new ones."""
        self._hold = False
        for stream in list(self._streams):
            stream.release()

    @property
    def held_streams(self) -> int:
        """How many streams are waiting for :meth:`release` right now."""
        return sum(stream.held for stream in self._streams)

    def wait_stream_paused(self) -> Deferred[None]:
        """A Deferred that fires the next time backpressure pauses a stream.

        That is, when a client (the proxy) stops reading and the transport's buffer fills up.
        """
        d: Deferred[None] = Deferred()
        self._pause_waiters.append(d)
        return d

    # -- request handling --------------------------------------------------------------------

    def _record(self, request: _HTTPRequest) -> RecordedRequest:
        raw_uri = request.uri.decode("latin-1")
        path, _, query = raw_uri.partition("?")
        request.content.seek(0)
        headers: dict[str, list[str]] = {}
        for name, values in request.requestHeaders.getAllRawHeaders():
            key = name.decode("latin-1").lower()
            headers.setdefault(key, []).extend(v.decode("latin-1") for v in values)
        return RecordedRequest(
            method=request.method.decode("latin-1"),
            path=unquote(path),
            query=parse_qs(query, keep_blank_values=True),
            raw_uri=raw_uri,
            headers=headers,
            body=request.content.read(),
        )

    def _authorized(self, rec: RecordedRequest) -> bool:
        if self.api_key is None:
            return True
        return rec.header("api-key") == self.api_key or (
            rec.header("authorization") == f"Bearer {self.api_key}"
        )

    def _render(self, request: _HTTPRequest) -> bytes | int:
        rec = self._record(request)
        self.requests.append(rec)
        if self.on_request is not None:
            self.on_request(rec)
        answer: _Answer
        if not self._authorized(rec):
            answer = _UNAUTHORIZED
        elif self._script:
            answer = self._script.popleft()(rec)
        else:
            try:
                answer = self._route(rec)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                answer = _openai_error(400, f"Invalid request: {e!r}")
        request_id = str(uuid.uuid4())
        request.setHeader("apim-request-id", request_id)
        request.setHeader("x-request-id", request_id)
        request.setHeader("x-ms-region", "East US")
        if isinstance(answer, _Stream):
            request.setHeader("content-type", answer.content_type)
            request.setHeader("cache-control", "no-cache")
            _StreamProducer(self, request, answer.events()).start()
            return server.NOT_DONE_YET
        request.setResponseCode(answer.status)
        for name, value in answer.headers:
            request.setHeader(name, value)
        if answer.writes == 1:
            request.setHeader("content-length", str(len(answer.body)))
            return answer.body
        size = -(-len(answer.body) // answer.writes)
        for start in range(0, len(answer.body), size):
            request.write(answer.body[start : start + size])
        request.finish()
        return server.NOT_DONE_YET

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids)}"

    def _now(self) -> int:
        return int(self._reactor.seconds())

    def _route(self, rec: RecordedRequest) -> _Answer:
        match = _DEPLOYMENT_ROUTE.match(rec.path)
        if match is not None:
            if rec.method != "POST" or "api-version" not in rec.query:
                return _NOT_FOUND
            return self._deployment(rec, match.group("dep"), match.group("op"))
        if rec.path.startswith(_V1_PREFIX):
            # The v1 API takes no dated api-version: only v1 (the default) or preview.
            if any(v not in ("v1", "preview") for v in rec.query.get("api-version", [])):
                return _V1_BAD_API_VERSION
            return self._v1(rec, rec.path[len(_V1_PREFIX) :].strip("/").split("/"))
        return _NOT_FOUND

    # -- per-deployment API ------------------------------------------------------------------

    def _deployment(self, rec: RecordedRequest, dep: str, op: str) -> _Answer:
        if op in ("chat/completions", "completions"):
            return self._completion(rec, dep, chat=op == "chat/completions")
        if op == "embeddings":
            return self._embeddings(rec, dep)
        if op.startswith("images/"):
            fields = rec.json() if op == "images/generations" else _form_fields(rec)
            return self._images(fields)
        if op == "audio/speech":
            fmt = rec.json().get("response_format", "mp3")
            content_type = _AUDIO_TYPES.get(fmt, "audio/mpeg")
            return _Reply(200, _AUDIO_BYTES, (("content-type", content_type),), _AUDIO_WRITES)
        return self._transcription(rec, op)

    def _completion(self, rec: RecordedRequest, dep: str, *, chat: bool) -> _Answer:
        body = rec.json()
        if not isinstance(body, dict):
            raise TypeError("body must be a JSON object")
        completion_id = self._new_id("chatcmpl-fake" if chat else "cmpl-fake")
        created = self._now()
        text = f"Hello from fake Azure ({dep})"
        if not body.get("stream"):
            choice: JSONObject = {"index": 0, "finish_reason": "stop", "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": text, "refusal": None}
            else:
                choice["text"] = text
            choice["content_filter_results"] = {}
            return _json_reply(
                200,
                {
                    "id": completion_id,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": created,
                    "model": dep,
                    "system_fingerprint": "fp_fake",
                    "choices": [choice],
                    "usage": _usage(),
                    "prompt_filter_results": _PROMPT_FILTER_RESULTS,
                },
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(choices: list[JSONObject], **extra: Any) -> bytes:
            return _sse(
                {
                    "id": completion_id,
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created,
                    "model": dep,
                    "system_fingerprint": "fp_fake",
                    "choices": choices,
                    **extra,
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

        def events() -> Iterator[bytes | object]:
            yield from self._stream_head()
            yield from self._content_events(
                lambda i, content: chunk([choice_with(content, None, first=i == 0)])
            )
            yield _HOLD
            yield chunk([choice_with(None, "stop")])
            if include_usage:
                yield chunk([], usage=_usage(9, self.stream_chunks))
            yield _DONE

        return _Stream(events)

    def _stream_head(self) -> Iterator[bytes]:
        if self.filter_frames:
            yield _FILTER_FRAME

    def _content_events(self, make: Callable[[int, str], bytes]) -> Iterator[bytes]:
        """The content events: stream_chunks of them, or big_stream_bytes worth if that is set.

        ``make(index, text)`` builds one event.
        """
        if self.big_stream_bytes is None:
            for i in range(self.stream_chunks):
                yield make(i, f"chunk{i} ")
            return
        size = 0
        for i in itertools.count():
            if size >= self.big_stream_bytes:
                return
            event = make(i, _BIG_EVENT_CONTENT)
            size += len(event)
            yield event

    def _embeddings(self, rec: RecordedRequest, dep: str) -> _Reply:
        body = rec.json()
        inputs = body["input"]
        many = isinstance(inputs, list) and not all(isinstance(x, int) for x in inputs)
        count = len(inputs) if many else 1
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index in range(count):
            vector = [round(0.001 * (index + 1) * (k + 1), 6) for k in range(8)]
            embedding: object = vector
            if as_base64:
                embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        usage = {"prompt_tokens": 5 * count, "total_tokens": 5 * count}
        return _json_reply(200, {"object": "list", "data": data, "model": dep, "usage": usage})

    def _images(self, fields: dict[str, Any]) -> _Reply:
        count = int(fields.get("n") or 1)
        as_b64 = fields.get("response_format") == "b64_json"
        data = []
        for _ in range(count):
            item: JSONObject = {"revised_prompt": fields.get("prompt")}
            if as_b64:
                item["b64_json"] = base64.b64encode(b"\x89PNG fake").decode()
            else:
                item["url"] = "https://fake/img.png"
            data.append(item)
        return _json_reply(200, {"created": self._now(), "data": data})

    def _transcription(self, rec: RecordedRequest, op: str) -> _Reply:
        fields = _form_fields(rec)
        text = "fake transcription" if op == "audio/transcriptions" else "fake translation"
        fmt = fields.get("response_format", "json")
        if fmt in ("text", "srt", "vtt"):
            return _Reply(200, text.encode(), (("content-type", "text/plain; charset=utf-8"),))
        if fmt == "verbose_json":
            task = "transcribe" if op == "audio/transcriptions" else "translate"
            verbose = {"task": task, "language": "english", "duration": 1.0, "text": text}
            return _json_reply(200, {**verbose, "segments": []})
        return _json_reply(200, {"text": text})

    # -- v1 API --------------------------------------------------------------------------------

    def _v1(self, rec: RecordedRequest, parts: list[str]) -> _Answer:
        kind, rest = parts[0], parts[1:]
        if kind == "responses":
            return self._responses_route(rec, rest)
        if kind == "files":
            return self._files_route(rec, rest)
        if kind == "fine_tuning" and rest[:1] == ["jobs"]:
            kind, rest = "fine_tuning/jobs", rest[1:]
        if kind not in self._collections:
            return _NOT_FOUND
        collection, build = self._collections[kind]
        if rest == [] and rec.method == "POST":
            return collection.add(build(rec.json()))
        if rest == [] and rec.method == "GET":
            return collection.listing()
        obj = collection.get(rest[0]) if rest else None
        if obj is None:
            return _NOT_FOUND
        if rest[1:] == [] and rec.method == "GET":
            return _json_reply(200, obj)
        if rest[1:] == ["cancel"] and rec.method == "POST" and kind == "batches":
            obj.update(status="cancelling", cancelling_at=self._now())
            return _json_reply(200, obj)
        return _NOT_FOUND

    def _new_batch(self, body: JSONObject) -> JSONObject:
        now = self._now()
        batch: JSONObject = {
            "id": self._new_id("batch_fake"),
            "object": "batch",
            "endpoint": body["endpoint"],
            "errors": None,
            "input_file_id": body["input_file_id"],
            "completion_window": body.get("completion_window", "24h"),
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "expires_at": now + 86400,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
        }
        for stamp in ("in_progress", "finalizing", "completed", "failed", "expired"):
            batch[f"{stamp}_at"] = None
        batch.update(cancelling_at=None, cancelled_at=None)
        return batch

    def _new_fine_tuning_job(self, body: JSONObject) -> JSONObject:
        return {
            "id": self._new_id("ftjob-fake"),
            "object": "fine_tuning.job",
            "created_at": self._now(),
            "error": None,
            "fine_tuned_model": None,
            "finished_at": None,
            "hyperparameters": {"n_epochs": "auto", "batch_size": "auto"},
            "model": body["model"],
            "organization_id": "org-fake",
            "result_files": [],
            "seed": body.get("seed", 0),
            "status": "validating_files",
            "trained_tokens": None,
            "training_file": body["training_file"],
            "validation_file": body.get("validation_file"),
            "method": {"type": "supervised"},
        }

    def _new_vector_store(self, body: JSONObject) -> JSONObject:
        now = self._now()
        counts = dict.fromkeys(("in_progress", "completed", "failed", "cancelled"), 0)
        return {
            "id": self._new_id("vs_fake"),
            "object": "vector_store",
            "created_at": now,
            "name": body.get("name") or "",
            "usage_bytes": 0,
            "file_counts": {**counts, "total": 0},
            "status": "completed",
            "expires_after": body.get("expires_after"),
            "expires_at": None,
            "last_active_at": now,
            "metadata": body.get("metadata") or {},
        }

    def _new_file(self, rec: RecordedRequest) -> JSONObject:
        form = rec.form()
        upload = form["file"]
        file_id = self._new_id("file-fake")
        self._file_contents[file_id] = upload.content
        return {
            "id": file_id,
            "object": "file",
            "bytes": len(upload.content),
            "created_at": self._now(),
            "filename": upload.filename or "file",
            "purpose": form["purpose"].text,
            "status": "processed",
            "status_details": None,
        }

    def _files_route(self, rec: RecordedRequest, rest: list[str]) -> _Reply:
        if rest == [] and rec.method == "POST":
            return self._files.add(self._new_file(rec))
        if rest == [] and rec.method == "GET":
            return self._files.listing()
        obj = self._files.get(rest[0]) if rest else None
        if obj is None:
            return _openai_error(404, f"No such File object: {rest[0] if rest else ''}")
        if rest[1:] == [] and rec.method == "GET":
            return _json_reply(200, obj)
        if rest[1:] == [] and rec.method == "DELETE":
            del self._files.items[obj["id"]]
            return _json_reply(200, {"id": obj["id"], "object": "file", "deleted": True})
        if rest[1:] == ["content"] and rec.method == "GET":
            content_type = (("content-type", "application/octet-stream"),)
            return _Reply(200, self._file_contents[obj["id"]], content_type)
        return _NOT_FOUND

    # -- Responses API -------------------------------------------------------------------------

    def _responses_route(self, rec: RecordedRequest, rest: list[str]) -> _Answer:
        if rest == [] and rec.method == "POST":
            return self._create_response(rec.json())
        obj = self._responses.get(rest[0]) if rest else None
        if obj is None:
            return _openai_error(404, f"Response with id '{rest[0] if rest else ''}' not found.")
        tail = (rec.method, *rest[1:])
        if tail == ("GET",):
            return _json_reply(200, obj)
        if tail == ("DELETE",):
            del self._responses.items[obj["id"]]
            return _json_reply(200, {"id": obj["id"], "object": "response", "deleted": True})
        if tail == ("POST", "cancel"):
            obj["status"] = "cancelled"
            return _json_reply(200, obj)
        if tail == ("GET", "input_items"):
            return _json_reply(200, _list_page(self._input_items[obj["id"]]))
        return _NOT_FOUND

    def _create_response(self, body: JSONObject) -> _Answer:
        response_id = self._new_id("resp_fake")
        message_id = self._new_id("msg_fake")
        model = body["model"]
        inputs = body.get("input", [])
        if isinstance(inputs, str):
            inputs = [{"type": "message", "role": "user", "content": inputs}]
        self._input_items[response_id] = [
            {"id": self._new_id("msg_in_fake"), "status": "completed", **item} for item in inputs
        ]

        def response(status: str, text: str | None) -> JSONObject:
            output = []
            if text is not None:
                part = {"type": "output_text", "text": text, "annotations": []}
                output.append(
                    {
                        "type": "message",
                        "id": message_id,
                        "status": "completed",
                        "role": "assistant",
                        "content": [part],
                    }
                )
            return {
                "id": response_id,
                "object": "response",
                "created_at": self._now(),
                "status": status,
                "error": None,
                "incomplete_details": None,
                "instructions": body.get("instructions"),
                "max_output_tokens": body.get("max_output_tokens"),
                "model": model,
                "output": output,
                "parallel_tool_calls": True,
                "previous_response_id": body.get("previous_response_id"),
                "store": body.get("store", True),
                "temperature": body.get("temperature", 1.0),
                "text": {"format": {"type": "text"}},
                "tool_choice": "auto",
                "tools": [],
                "top_p": body.get("top_p", 1.0),
                "truncation": "disabled",
                "usage": None if text is None else _response_usage(),
                "metadata": body.get("metadata") or {},
            }

        if not body.get("stream"):
            return self._responses.add(response("completed", f"Hello from fake Azure ({model})"))

        def events() -> Iterator[bytes | object]:
            seq = itertools.count()
            where = {"item_id": message_id, "output_index": 0, "content_index": 0}

            def event(kind: str, **fields: Any) -> bytes:
                return _sse({"type": kind, "sequence_number": next(seq), **fields}, event=kind)

            yield event("response.created", response=response("in_progress", None))
            yield event("response.in_progress", response=response("in_progress", None))
            item: JSONObject = {"type": "message", "id": message_id, "status": "in_progress"}
            item.update(role="assistant", content=[])
            yield event("response.output_item.added", output_index=0, item=item)
            empty = {"type": "output_text", "text": "", "annotations": []}
            yield event("response.content_part.added", **where, part=empty)
            deltas: list[str] = []

            def delta_event(i: int, delta: str) -> bytes:
                if self.big_stream_bytes is None:  # a big stream's text is not kept
                    deltas.append(delta)
                return event("response.output_text.delta", **where, delta=delta, logprobs=[])

            yield from self._content_events(delta_event)
            yield _HOLD
            text = "".join(deltas)
            yield event("response.output_text.done", **where, text=text, logprobs=[])
            part = {"type": "output_text", "text": text, "annotations": []}
            yield event("response.content_part.done", **where, part=part)
            final = response("completed", text)
            yield event("response.output_item.done", output_index=0, item=final["output"][0])
            self._responses.add(final)
            yield event("response.completed", response=final)

        return _Stream(events)


def _response_usage() -> JSONObject:
    return {
        "input_tokens": 9,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 12,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 21,
    }


def _form_fields(rec: RecordedRequest) -> dict[str, str]:
    return {name: part.text for name, part in rec.form().items() if part.filename is None}


def main(argv: list[str] | None = None) -> None:
    """Run a FakeAzure in the foreground: ``python -m aoaiproxy.testing --port 8081``."""
    parser = argparse.ArgumentParser(
        prog="python -m aoaiproxy.testing", description="A fake Azure OpenAI endpoint."
    )
    parser.add_argument("--port", type=int, default=8081, help="TCP port (0: any free port)")
    parser.add_argument("--interface", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--api-key", default=None, help="require this api-key")
    parser.add_argument("--stream-chunks", type=int, default=3, help="content chunks per stream")
    parser.add_argument("--stream-interval", type=float, default=0.0, help="seconds between chunks")
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    def log_request(rec: RecordedRequest) -> None:
        print(f"{rec.method} {rec.raw_uri} ({len(rec.body)} bytes)", flush=True)

    fake = FakeAzure(reactor, api_key=args.api_key, on_request=log_request)
    fake.stream_chunks = args.stream_chunks
    fake.stream_interval = args.stream_interval
    fake.listen(args.port, args.interface)
    print(f"fake Azure OpenAI listening on {fake.url}", flush=True)
    reactor.run()  # type: ignore[attr-defined]
    sys.stdout.flush()


if __name__ == "__main__":
    main()
