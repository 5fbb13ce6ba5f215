"""L{FakeAzure}: one fake Azure OpenAI resource ("region") on a loopback port.

It answers what Azure OpenAI answers, in Azure's shapes: the per-deployment routes
(``/openai/deployments/{dep}/chat/completions`` and friends, ``api-version`` required) and the
v1 API under ``/openai/v1/`` (responses, files, batches, fine-tuning jobs, vector stores), with
deterministic token C{usage} (L{aoaiproxy.testing.usage}).  Every request is recorded; answers
can be scripted (L{FakeAzure.respond_next}), replaced by behaviours (429, 5xx, hang, close:
L{aoaiproxy.testing.faults}), streams held, slowed down or made big; C{/_fake/...} is its
control endpoint (L{aoaiproxy.testing.control}).
"""

from __future__ import annotations

import base64
import itertools
import struct
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.web import server
from zope.interface import implementer

from . import control
from .faults import Behaviour, Behaviours
from .records import RecordedRequest
from .replies import (
    DEPLOYMENT_NOT_FOUND,
    DEPLOYMENT_ROUTE,
    HOLD,
    NOT_FOUND,
    TOKEN_UNAUTHORIZED,
    UNAUTHORIZED,
    V1_BAD_API_VERSION,
    Answer,
    Reply,
    Stream,
    dumps,
    json_reply,
    openai_error,
    rate_limited,
)
from .server import FakeServer, HTTPRequest
from .sse import completion_events
from .usage import chat_usage, count_tokens, embeddings_usage, prompt_tokens
from .v1 import V1Api

if TYPE_CHECKING:
    from .identity import FakeManagedIdentity

__all__ = ["COGNITIVE_SERVICES", "FakeAzure"]

JSONObject = dict[str, Any]
Script = Callable[[RecordedRequest], Reply]

COGNITIVE_SERVICES = "https://cognitiveservices.azure.com"

_AUDIO_BYTES = bytes(i * 7 % 251 for i in range(64 * 1024))
_AUDIO_WRITES = 4
_WRITE_BATCH = 256 * 1024

_AUDIO_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
_V1_PREFIX = "/openai/v1/"
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


@implementer(IPushProducer)
class _StreamProducer:
    """Writes one streamed answer, honouring backpressure, interval, hold and stop.

    With ``cut`` = (N, close), it sends the first N bytes of the stream and then stops writing
    (the request hangs) or, with ``close``, closes the connection.
    """

    def __init__(
        self,
        fake: FakeAzure,
        request: HTTPRequest,
        events: Iterator[object],
        cut: tuple[int, bool] | None = None,
    ) -> None:
        self._fake = fake
        self._request = request
        self._events = events
        self._cut = cut
        self._budget = None if cut is None else cut[0]
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
        if self._budget == 0:
            self._request.write(b"")  # the status and headers
            self._stop_short()
            return
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

    def _stop_short(self) -> None:
        """The cut: stop here, leaving the request hanging or closing its connection."""
        assert self._cut is not None
        self._close()
        self._request.unregisterProducer()
        if self._cut[1]:
            self._request.transport.loseConnection()
        else:
            self._fake._hang(self._request)

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
            if event is HOLD:
                self._held = self._hold
                continue
            assert isinstance(event, bytes)
            if self._budget is not None and len(event) >= self._budget:
                self._request.write(event[: self._budget])
                self._fake.bytes_sent += self._budget
                self._stop_short()
                return
            if self._budget is not None:
                self._budget -= len(event)
            self._request.write(event)
            self._fake.bytes_sent += len(event)
            written += len(event)
            if interval > 0 or written >= _WRITE_BATCH:
                self._delayed = self._fake._reactor.callLater(interval, self._timer_fired)
                return


class FakeAzure(FakeServer):
    """A fake Azure OpenAI resource listening on loopback.

    ``reactor`` must provide IReactorTCP and IReactorTime (and IReactorSSL to listen with TLS).
    ``name`` names the instance in its records (L{RecordedRequest.instance}); ``region`` is the
    C{x-ms-region} it answers with.  With ``api_key``, a request without ``api-key: KEY`` or
    ``Authorization: Bearer KEY`` gets Azure's 401 (and does not consume a scripted answer).
    With ``identity`` (a L{FakeManagedIdentity}) and ``require_token`` (its default then), a
    request needs ``Authorization: Bearer TOKEN`` with a token that endpoint issued for
    L{token_audience} and that has not expired (or the ``api_key``, when there is one), else it
    gets Azure's 401 for tokens.  ``on_request`` is called with every request as it is recorded;
    ``max_recorded`` bounds L{requests}.

    What it does with a request, in order: the control endpoint (C{/_fake/...}, not recorded);
    authentication (a refused request gets its 401 and consumes nothing); the first behaviour
    in force for it (L{add_behaviour}); the next scripted answer (L{respond_next} and friends);
    the normal answer.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        api_key: str | None = None,
        on_request: Callable[[RecordedRequest], None] | None = None,
        name: str = "fake",
        region: str = "East US",
        identity: FakeManagedIdentity | None = None,
        require_token: bool | None = None,
        max_recorded: int | None = None,
    ) -> None:
        super().__init__(reactor, name=name, on_request=on_request, max_recorded=max_recorded)
        self.api_key = api_key
        self.region = region
        self.identity = identity
        self.require_token = identity is not None if require_token is None else require_token
        self.token_audience: str | None = COGNITIVE_SERVICES
        self.stream_chunks = 3
        self.stream_interval = 0.0
        self.filter_frames = True
        self.big_stream_bytes: int | None = None
        self.ratelimit_remaining: tuple[int, int] | None = None
        self.bytes_sent = 0
        self._hold = False
        self._streams: set[_StreamProducer] = set()
        self._pause_waiters: list[Deferred[None]] = []
        self._script: deque[Script] = deque()
        self._behaviours = Behaviours()
        self._ids = itertools.count(1)
        self._v1 = V1Api(self, self._new_id, self._now)

    def stop(self) -> Deferred[None]:
        """Stop listening, end every stream and abort every open connection.

        Fires once the ports are closed and every connection is gone.
        """
        for stream in list(self._streams):
            stream.stopProducing()
        return super().stop()

    # -- scripting ---------------------------------------------------------------------------

    def respond_next(
        self, status: int, body: bytes | JSONObject, headers: dict[str, str] | None = None
    ) -> None:
        """The next request gets exactly this answer (FIFO with the other ``*_next``)."""
        raw = body if isinstance(body, bytes) else dumps(body)
        extra = tuple((headers or {}).items())
        if not any(name.lower() == "content-type" for name, _ in extra):
            extra = (("content-type", "application/json"), *extra)
        reply = Reply(status, raw, extra)
        self._script.append(lambda _: reply)

    def rate_limit_next(self, retry_after: int = 7) -> None:
        """The next request gets Azure's 429 with ``retry-after: retry_after``."""
        headers = (
            ("retry-after", str(retry_after)),
            ("retry-after-ms", str(retry_after * 1000)),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-remaining-tokens", "0"),
        )
        self._script.append(lambda rec: rate_limited(rec, retry_after, headers))

    def deployment_not_found_next(self) -> None:
        """The next request gets Azure's 404 DeploymentNotFound."""
        self._script.append(lambda _: DEPLOYMENT_NOT_FOUND)

    # -- behaviours --------------------------------------------------------------------------

    def add_behaviour(self, behaviour: Behaviour) -> None:
        """Put ``behaviour`` in force (after those already in force: the first that applies to
        a request is used and counted)."""
        self._behaviours.add(behaviour)

    def clear_behaviours(self, deployment: str | None = None) -> None:
        """End every behaviour, or those set for ``deployment``.  Requests already hanging
        keep hanging (until their connection closes or L{stop})."""
        self._behaviours.clear(deployment)

    @property
    def behaviours(self) -> list[Behaviour]:
        """The behaviours in force, each with the count it has left (None: until cleared)."""
        return self._behaviours.current()

    def throttle(
        self,
        count: int | None = None,
        deployment: str | None = None,
        *,
        retry_after_ms: int | None = None,
        x_ms_retry_after_ms: int | None = None,
        retry_after: int | str | None = None,
        retry_after_date: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """The next ``count`` requests (None: until cleared) for ``deployment`` (None: any) get
        Azure's 429 with exactly these headers: ``retry_after`` is sent as given (seconds, or
        an HTTP date string), ``retry_after_date`` as the HTTP date that many seconds after
        the answer."""
        given = {
            "retry-after-ms": retry_after_ms,
            "x-ms-retry-after-ms": x_ms_retry_after_ms,
            "retry-after": retry_after,
            "retry-after-date": retry_after_date,
        }
        params = {key: value for key, value in given.items() if value is not None}
        self._add("429", count, deployment, headers=dict(headers or {}), **params)

    def fail(self, status: int = 503, count: int | None = None, deployment: str | None = None) -> None:
        """The next ``count`` requests (None: until cleared) for ``deployment`` (None: any) get
        Azure's ``status`` (a 5xx) error."""
        self._add(str(status), count, deployment)

    def hang(
        self, count: int | None = None, deployment: str | None = None, after_bytes: int | None = None
    ) -> None:
        """The next ``count`` requests are never answered: not at all (``after_bytes`` None),
        or after the status, headers and ``after_bytes`` bytes of the body."""
        self._add("hang", count, deployment, **({} if after_bytes is None else {"after-bytes": after_bytes}))

    def close_connections(
        self, count: int | None = None, deployment: str | None = None, after_bytes: int | None = None
    ) -> None:
        """The next ``count`` requests get their connection closed: reset before any answer
        (``after_bytes`` None), or closed after the status, headers and ``after_bytes`` bytes."""
        self._add("close", count, deployment, **({} if after_bytes is None else {"after-bytes": after_bytes}))

    def _add(self, kind: str, count: int | None, deployment: str | None, **params: Any) -> None:
        params.update(kind=kind, count=count, deployment=deployment)
        self.add_behaviour(Behaviour.from_params({k: v for k, v in params.items() if v is not None}))

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
    def holding(self) -> bool:
        """Whether streams started now are held (setting it is :meth:`hold_last_chunk` or
        :meth:`release`)."""
        return self._hold

    @holding.setter
    def holding(self, hold: bool) -> None:
        if hold:
            self.hold_last_chunk()
        else:
            self.release()

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

    def _authorized(self, rec: RecordedRequest) -> Reply | None:
        """None if ``rec`` may pass, else the 401 it gets."""
        authorization = rec.header("authorization") or ""
        scheme, _, token = authorization.partition(" ")
        if self.api_key is not None and (
            rec.header("api-key") == self.api_key or authorization == f"Bearer {self.api_key}"
        ):
            return None
        if (
            self.identity is not None
            and scheme.lower() == "bearer"
            and self.identity.is_valid(token, self.token_audience)
        ):
            return None
        if self.identity is not None and self.require_token:
            return TOKEN_UNAUTHORIZED
        return None if self.api_key is None else UNAUTHORIZED

    def _answer(self, rec: RecordedRequest) -> Answer:
        """The answer to an authorized ``rec`` that no behaviour changes."""
        if self._script:
            return self._script.popleft()(rec)
        try:
            return self._route(rec)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return openai_error(400, f"Invalid request: {e!r}")

    def _render(self, request: HTTPRequest) -> bytes | int:
        if request.uri.startswith(control.PREFIX):
            return self._write_reply(request, control.handle(self, request))
        rec = self._record(request)
        refused = self._authorized(rec)
        behaviour = None if refused is not None else self._behaviours.take(_deployment_of(rec))
        cut: tuple[int, bool] | None = None
        if behaviour is not None and behaviour.status is None:
            if behaviour.after_bytes is None and behaviour.kind == "hang":
                return self._hang(request)
            if behaviour.after_bytes is None:
                request.transport.abortConnection()
                return server.NOT_DONE_YET
            cut = (behaviour.after_bytes, behaviour.kind == "close")
        answer: Answer
        if refused is not None:
            answer = refused
        elif behaviour is not None and behaviour.status is not None:
            answer = behaviour.reply(rec, self._reactor.seconds())
        else:
            answer = self._answer(rec)
        request_id = str(uuid.uuid4())
        request.setHeader("apim-request-id", request_id)
        request.setHeader("x-request-id", request_id)
        request.setHeader("x-ms-region", self.region)
        if self.ratelimit_remaining is not None and (isinstance(answer, Stream) or answer.status < 400):
            request.setHeader("x-ratelimit-remaining-requests", str(self.ratelimit_remaining[0]))
            request.setHeader("x-ratelimit-remaining-tokens", str(self.ratelimit_remaining[1]))
        if isinstance(answer, Stream):
            request.setHeader("content-type", answer.content_type)
            request.setHeader("cache-control", "no-cache")
            _StreamProducer(self, request, answer.events(), cut).start()
            return server.NOT_DONE_YET
        if cut is not None:
            return self._cut_reply(request, answer, *cut)
        return self._write_reply(request, answer)

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids)}"

    def _now(self) -> int:
        return int(self._reactor.seconds())

    def _route(self, rec: RecordedRequest) -> Answer:
        match = DEPLOYMENT_ROUTE.match(rec.path)
        if match is not None:
            if rec.method != "POST" or "api-version" not in rec.query:
                return NOT_FOUND
            return self._deployment(rec, match.group("dep"), match.group("op"))
        if rec.path.startswith(_V1_PREFIX):
            # The v1 API takes no dated api-version: only v1 (the default) or preview.
            if any(v not in ("v1", "preview") for v in rec.query.get("api-version", [])):
                return V1_BAD_API_VERSION
            return self._v1.route(rec, rec.path[len(_V1_PREFIX) :].strip("/").split("/"))
        return NOT_FOUND

    # -- per-deployment API ------------------------------------------------------------------

    def _deployment(self, rec: RecordedRequest, dep: str, op: str) -> Answer:
        if op in ("chat/completions", "completions"):
            return self._completion(rec, dep, chat=op == "chat/completions")
        if op == "embeddings":
            return self._embeddings(rec, dep)
        if op.startswith("images/"):
            fields = rec.json() if op == "images/generations" else rec.form_fields()
            return self._images(fields)
        if op == "audio/speech":
            fmt = rec.json().get("response_format", "mp3")
            content_type = _AUDIO_TYPES.get(fmt, "audio/mpeg")
            return Reply(200, _AUDIO_BYTES, (("content-type", content_type),), _AUDIO_WRITES)
        return self._transcription(rec, op)

    def _completion(self, rec: RecordedRequest, dep: str, *, chat: bool) -> Answer:
        body = rec.json()
        if not isinstance(body, dict):
            raise TypeError("body must be a JSON object")
        completion_id = self._new_id("chatcmpl-fake" if chat else "cmpl-fake")
        created = self._now()
        prompt = prompt_tokens(body)
        text = f"Hello from fake Azure ({dep})"
        if not body.get("stream"):
            choice: JSONObject = {"index": 0, "finish_reason": "stop", "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": text, "refusal": None}
            else:
                choice["text"] = text
            choice["content_filter_results"] = {}
            return json_reply(
                200,
                {
                    "id": completion_id,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": created,
                    "model": dep,
                    "system_fingerprint": "fp_fake",
                    "choices": [choice],
                    "usage": chat_usage(prompt, count_tokens(text)),
                    "prompt_filter_results": _PROMPT_FILTER_RESULTS,
                },
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def events() -> Iterator[bytes | object]:
            return completion_events(
                self,
                completion_id=completion_id,
                created=created,
                deployment=dep,
                chat=chat,
                include_usage=include_usage,
                prompt=prompt,
            )

        return Stream(events)

    def _embeddings(self, rec: RecordedRequest, dep: str) -> Reply:
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
        usage = embeddings_usage(prompt_tokens(body))
        return json_reply(200, {"object": "list", "data": data, "model": dep, "usage": usage})

    def _images(self, fields: dict[str, Any]) -> Reply:
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
        return json_reply(200, {"created": self._now(), "data": data})

    def _transcription(self, rec: RecordedRequest, op: str) -> Reply:
        fields = rec.form_fields()
        text = "fake transcription" if op == "audio/transcriptions" else "fake translation"
        fmt = fields.get("response_format", "json")
        if fmt in ("text", "srt", "vtt"):
            return Reply(200, text.encode(), (("content-type", "text/plain; charset=utf-8"),))
        if fmt == "verbose_json":
            task = "transcribe" if op == "audio/transcriptions" else "translate"
            verbose = {"task": task, "language": "english", "duration": 1.0, "text": text}
            return json_reply(200, {**verbose, "segments": []})
        return json_reply(200, {"text": text})


def _deployment_of(rec: RecordedRequest) -> str | None:
    """The deployment ``rec`` is for: from the path, or the v1 API body's C{model}."""
    match = DEPLOYMENT_ROUTE.match(rec.path)
    if match is not None:
        return match.group("dep")
    if rec.path.startswith(_V1_PREFIX) and rec.body[:1] == b"{":
        try:
            model = rec.json().get("model")
        except ValueError:
            return None
        return model if isinstance(model, str) else None
    return None
