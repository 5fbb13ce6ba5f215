"""
The reverse API: the resource that serves origin-form requests (C{POST /v1/...}).

Data flows one way: request in, route (L{rewrite.classify}), authenticate and read what it
asks for (L{rewrite.plan_client}), send it to one backend after another until one answers
(L{gateway.Attempts}, over L{UpstreamClient}), relay that answer out (L{BodyRelay}).
"""

from __future__ import annotations

import io
import mmap
import sys
import traceback
from collections.abc import Iterable, Sequence
from typing import IO, TYPE_CHECKING, Any, Literal, TypeVar, cast

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, fail
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import Request
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from aoaiproxy import _twisted, errors, rewrite
from aoaiproxy.backends.cooldown import header_pairs
from aoaiproxy.config import Config, LiveConfig
from aoaiproxy.deadlines import Deadlines
from aoaiproxy.errors import ProxyError
from aoaiproxy.gateway import (
    BACKEND_HEADER,
    Answer,
    Attempts,
    Backends,
    ReplayBody,
    discard,
    response_headers,
)
from aoaiproxy.log import note as note
from aoaiproxy.metrics import NullMetrics, Recorder
from aoaiproxy.multipart import form_field
from aoaiproxy.relay import BodyRelay, when_gone
from aoaiproxy.upstream import UpstreamClient

if TYPE_CHECKING:
    from aoaiproxy.admission import Admitted

CORS_METHODS = b"GET, POST, PUT, PATCH, DELETE, OPTIONS"
CORS_DEFAULT_HEADERS = (
    b"Authorization, Content-Type, api-key, OpenAI-Organization, OpenAI-Project, "
    b"OpenAI-Beta, X-Stainless-Arch, X-Stainless-Lang, X-Stainless-OS, "
    b"X-Stainless-Package-Version, X-Stainless-Runtime, X-Stainless-Runtime-Version"
)
CORS_MAX_AGE = b"86400"
#: Large bodies scanned at once, each in a thread of the reactor's pool.
SCAN_THREADS = 1
#: The interpreter's switch interval (seconds) while a scan runs in a thread.
SCAN_SWITCH_INTERVAL = 0.0002

_log = Logger()
_T = TypeVar("_T")


def read_body(content: IO[bytes]) -> bytes | mmap.mmap:
    """
    A request's body to scan (L{jsonbody}): bytes when twisted.web kept it in memory, else a
    read-only map of its file, whose pages are read only as the scan touches them.
    """
    if isinstance(content, io.BytesIO):
        return content.getvalue()
    content.flush()  # what was written through the file's buffer is in the file
    content.seek(0, 2)
    if content.tell() == 0:
        content.seek(0)
        return b""
    content.seek(0)
    return mmap.mmap(content.fileno(), 0, access=mmap.ACCESS_READ)


def _plan(
    config: Config,
    route: rewrite.Route,
    method: bytes,
    query: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    body: bytes | mmap.mmap | None,
    model_from_form: str | None,
    presented: bytes | Literal[rewrite.Unchecked.UNCHECKED] | None,
) -> tuple[rewrite.ClientRequest, bytes | None, bool]:
    """
    L{rewrite.plan_client} and L{rewrite.usage_request} on a request (pure: it may run in a
    thread).  A mapped body is read only through what L{jsonbody} uses of it (C{len},
    indexing, slicing, C{find}, regular expressions), and a spliced body is new bytes.
    """
    scanned = cast(bytes | None, body)
    try:
        client = rewrite.plan_client(
            config, route, method, query, headers, scanned, model_from_form, presented=presented
        )
        asked, strip_usage = rewrite.usage_request(config, route, scanned, client.top)
    except BaseException:
        close_map(body)
        raise
    if client.body is not body:
        close_map(body)
    return client, asked, strip_usage


def close_map(body: object) -> None:
    """Unmap a body mapped by L{read_body} (its file is then freed with the request)."""
    if isinstance(body, mmap.mmap):
        body.close()


def raw_headers(request: Request) -> list[tuple[bytes, bytes]]:
    """The request's headers as (name, value) pairs, in order."""
    return [(name, value) for name, values in request.requestHeaders.getAllRawHeaders() for value in values]


def write_error(request: Request, error: ProxyError) -> None:
    """Answer with an OpenAI-shaped error (the request must not have started a response)."""
    body = error.body()
    request.setResponseCode(error.status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", b"%d" % len(body))
    for name, value in error.headers:
        request.setHeader(name, value)
    note(request, error=error.code)
    if request.method != b"HEAD":
        request.write(body)
    request.finish()


def nonempty_body(content: IO[bytes] | None) -> IO[bytes] | None:
    """A request's body file, rewound, or None when it is empty (nothing to send)."""
    if content is None:
        return None
    content.seek(0, 2)
    empty = content.tell() == 0
    content.seek(0)
    return None if empty else content


def relayed_head(
    raw: Iterable[tuple[bytes, bytes]],
) -> tuple[dict[bytes, tuple[bytes, list[bytes]]], bytes, bool]:
    """
    What L{relay_response} takes of an upstream response's headers C{raw} (pairs, in order):
    the headers to relay, less hop-by-hop ones, each name with its values (grouped whatever
    the case of the name, as a C{Headers} groups them, in order of first sight; keyed by the
    name in lower case); the first C{Content-Type} (lower case, C{b""} if none); whether a
    C{Content-Encoding} other than C{identity} applies.
    """
    grouped: dict[bytes, tuple[bytes, list[bytes]]] = {}
    for name, value in rewrite.strip_hop_by_hop(raw):
        lower = name.lower()
        group = grouped.get(lower)
        if group is None:
            grouped[lower] = (name, [value])
        else:
            group[1].append(value)
    group = grouped.get(b"content-type")
    content_type = group[1][0].lower() if group is not None else b""
    group = grouped.get(b"content-encoding")
    codings = b",".join(group[1]).lower() if group is not None else b""
    encoded = bool(codings) and any(c.strip() not in (b"", b"identity") for c in codings.split(b","))
    return grouped, content_type, encoded


def relay_response(
    response: IResponse,
    request: Request,
    reactor: Any,
    idle_timeout: float,
    *,
    deadlines: Deadlines,
    event_streams: bool = False,
    filter_frames: bool = False,
    backend: str | None = None,
    usage: bool = False,
    strip_usage: bool = False,
    cors_set: bool = False,
) -> None:
    """
    Relay an upstream response to the client: its status, its headers but hop-by-hop ones
    (SPEC §6), C{Access-Control-Allow-Origin: *}, then its body (L{BodyRelay}).  A client
    that left while the headers were awaited gets nothing, and the upstream body is not read.

    @param event_streams: treat an unencoded C{text/event-stream} body as Server-Sent
        Events: its length may change (a final blank line is added), so no C{Content-Length}.
    @param filter_frames: and drop Azure's filter-only frames from it.
    @param backend: the backend that answered, for C{x-aoaiproxy-backend} (SPEC §11).
    @param usage: read the token usage (L{aoaiproxy.relay.body_filter}); C{strip_usage}: the
        proxy asked for it (L{rewrite.usage_request}), so it is removed from the client's stream.
    @param cors_set: C{Access-Control-Allow-Origin: *} was set already (L{ApiResource.render}).
    @param deadlines: where the body's inactivity timer is kept (the caller's, shared by its
        relays).
    """
    if _twisted.client_gone(request):
        # Close the upstream connection rather than leave its body unread.
        discard(response)
        return
    request.setResponseCode(response.code, response.phrase)
    # The upstream client keeps Connection and the other connection-control headers out of a
    # response's headers (and the names its Connection header lists); the rest of the
    # hop-by-hop set is dropped here.  Its raw pairs, when it has them, make no Headers.
    relayed, content_type, encoded = relayed_head(header_pairs(response_headers(response)))
    headers = request.responseHeaders  # what request.setHeader sets, one call less each
    for name, values in relayed.values():
        headers.setRawHeaders(name, values)
    if not cors_set or b"access-control-allow-origin" in relayed:
        headers.setRawHeaders(b"Access-Control-Allow-Origin", [b"*"])
    if backend is not None:
        headers.setRawHeaders(BACKEND_HEADER, [backend.encode("ascii")])
    request.defaultContentType = None  # type: ignore[attr-defined]
    event_stream = event_streams and content_type.startswith(b"text/event-stream") and not encoded
    if not event_stream and isinstance(response.length, int):
        headers.setRawHeaders(b"Content-Length", [b"%d" % response.length])
    note(request, upstream_status=response.code)
    if request.method == b"HEAD" or response.code in (204, 304):
        request.finish()
        return
    relay = BodyRelay(
        request,
        reactor,
        idle_timeout,
        event_stream=event_stream,
        filter_frames=event_stream and filter_frames,
        usage=usage,
        strip_usage=strip_usage,
        deadlines=deadlines,
    )
    relay.relay_from(response)


class ApiResource(Resource):
    """
    Serves every origin-form request.

    @param backends: the backend pool and token sources (the daemon's, started by it); by
        default one of its own, started here.
    @param recorder: the metrics the request path records (default: none).
    """

    isLeaf = True

    def __init__(
        self,
        live: LiveConfig,
        upstream: UpstreamClient,
        reactor: Any,
        *,
        backends: Backends | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        super().__init__()
        self._live = live
        self._upstream = upstream
        self._reactor = reactor
        self._recorder: Recorder = recorder if recorder is not None else NullMetrics()
        if backends is None:
            backends = Backends(live, reactor, recorder=self._recorder)
            backends.start()
        self._backends = backends
        #: The inactivity timers of the bodies it relays.
        self._deadlines = Deadlines(reactor)
        self._scans = DeferredSemaphore(SCAN_THREADS)
        self._scanning = 0
        self._interval = sys.getswitchinterval()

    def render(self, request: Request) -> bytes | int:
        headers = request.responseHeaders  # what request.setHeader sets, one call less each
        headers.setRawHeaders(b"Access-Control-Allow-Origin", [b"*"])
        headers.setRawHeaders(b"Server", [b"aoaiproxy"])
        try:
            self._render(request)
        except ProxyError as e:
            write_error(request, e)
        except Exception:
            self._unexpected(Failure(), request)
        return NOT_DONE_YET

    def _render(self, request: Request) -> None:
        config = self._live.config
        if request.method == b"OPTIONS":
            self._preflight(request)
            return
        admitted: Admitted | None = getattr(request, "admitted", None)
        presented: bytes | Literal[rewrite.Unchecked.UNCHECKED] | None = rewrite.UNCHECKED
        if (
            admitted is not None
            and admitted.config is config
            and admitted.method == request.method
            and admitted.path == request.path
        ):
            # Its head was judged (site.ProxyRequest) under this configuration: its route,
            # headers and key are what the same functions would give again.
            route = admitted.route
            headers = admitted.headers
            presented = admitted.presented
        else:
            route = rewrite.classify(
                config, request.method.decode("ascii", "replace"), request.path.decode("latin-1")
            )
            headers = raw_headers(request)
        if route.kind == "health":
            self._local(request, rewrite.HEALTH)
            return
        if route.kind in ("models", "model"):
            if presented is rewrite.UNCHECKED:
                rewrite.client_credential(config, headers)
            names = self._backends.models()
            if route.kind == "models":
                self._local(request, rewrite.models_list(names))
            else:
                self._local(request, rewrite.model_object(names, route.target))
            return

        content = request.content
        assert content is not None
        query = request.uri.split(b"?", 1)[1] if b"?" in request.uri else b""
        content_type = request.getHeader(b"content-type")
        body: bytes | mmap.mmap | None = None
        model_from_form: str | None = None
        multipart = content_type is not None and content_type.lower().startswith(b"multipart/")
        if route.kind in ("deployment", "v1api") and request.method in (b"POST", b"PUT", b"PATCH"):
            if multipart:
                # A per-deployment form names its deployment in "model"; the v1 API's uploads
                # (files) have no model to map and are sent as they are, unscanned.
                if route.kind == "deployment":
                    model_from_form = form_field(content, content_type or b"", b"model")
                    content.seek(0)
                    if model_from_form is None:
                        if presented is rewrite.UNCHECKED:
                            rewrite.client_credential(config, headers)  # a 401 comes before a 400
                        raise errors.missing_model()
            else:
                # Any other body on these routes must be a JSON object, whatever its type
                # claims: a JSON body sent as text/plain still has its model checked.
                body = read_body(content)
        elif (
            route.kind == "passthrough"
            and request.method == b"POST"
            and not config.keep_filter_frames
            and not multipart
            and rewrite.is_json(content_type)
        ):
            body = read_body(content)  # only to see whether it asks for a stream
        plan = (config, route, request.method, query, headers, body, model_from_form, presented)
        if body is None or isinstance(body, bytes):
            self._send(_plan(*plan), request, config, content)
            return
        # A large body is scanned from its file's pages in a thread (a few at a time), so that
        # an adversarial one costs the reactor nothing (SPEC §16).
        # A client that leaves frees its body's map (and so its file) at once.
        request.notifyFinish().addErrback(lambda _: close_map(body))
        d = self._scans.run(self._plan_in_thread, request, *plan)
        d.addCallback(self._send, request, config, content)
        d.addErrback(self._failed, request)

    def _plan_in_thread(
        self, request: Request, *plan: Any
    ) -> Deferred[tuple[rewrite.ClientRequest, bytes | None, bool]]:
        if _twisted.client_gone(request):
            return fail(CancelledError())  # it left while waiting for a thread
        if not self._scanning:
            # The reactor waits for the interpreter lock after each system call while a scan
            # holds it: for at most this long, not the default 5 ms.
            self._interval = sys.getswitchinterval()
            sys.setswitchinterval(SCAN_SWITCH_INTERVAL)
        self._scanning += 1
        d = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), _plan, *plan)
        d.addBoth(self._scanned)
        return d

    def _scanned(self, result: _T) -> _T:
        self._scanning -= 1
        if not self._scanning:
            sys.setswitchinterval(self._interval)
        return result

    def _send(
        self,
        planned: tuple[rewrite.ClientRequest, bytes | None, bool],
        request: Request,
        config: Config,
        content: IO[bytes],
    ) -> None:
        """The request is read and planned: send it to the backends, one after another."""
        client, asked, strip_usage = planned
        if _twisted.client_gone(request):
            return  # it left while its body was scanned
        note(request, model=client.model)
        if isinstance(client.body, mmap.mmap):  # kept to splice its model per backend
            request.notifyFinish().addBoth(lambda _: close_map(client.body))
        if asked is not None:
            client = attrs.evolve(client, headers=rewrite.identity_encoding(client.headers))
        # The body each attempt sends: what was read (or rewritten), else the client's file.
        if asked is not None:
            replay = ReplayBody(asked)
        elif isinstance(client.body, bytes):
            replay = ReplayBody(client.body)
        elif request.method in (b"GET", b"HEAD", b"DELETE", b"OPTIONS"):
            replay = ReplayBody(nonempty_body(content))
        else:
            content.seek(0)
            replay = ReplayBody(content)
        attempts = Attempts(self._backends, self._upstream, config, client, replay)

        def answered(answer: Answer) -> None:
            try:
                self._answer(answer, request, client, config, strip_usage)
            except Exception:
                self._unexpected(Failure(), request)  # a bug while relaying

        # A failure in the attempts is a bug; cancelled (the client left), they report nothing.
        attempts.run(answered, lambda f: self._unexpected(f, request))
        if not attempts.over:
            when_gone(request, attempts.cancel)

    def _failed(self, failure: Failure, request: Request) -> None:
        """A body scanned in a thread was refused (the proxy's error), or a bug."""
        if _twisted.client_gone(request):
            return  # it left (and its body's map was closed under the scan)
        if failure.check(ProxyError):
            self._error(request, cast(ProxyError, failure.value))
        else:
            self._unexpected(failure, request)

    def _answer(
        self,
        answer: Answer,
        request: Request,
        client: rewrite.ClientRequest,
        config: Config,
        strip_usage: bool,
    ) -> None:
        """The attempts are over: relay the upstream's answer, or write the proxy's error."""
        # No attempt will send the body again: a long stream does not keep it (nor its file).
        content = request.content
        if content is not None:
            request.content = None
            content.close()
        if answer.backend is not None:
            note(request, attempts=answer.attempts, backend=answer.backend, deployment=answer.deployment)
        else:
            note(request, attempts=answer.attempts)
        if answer.response is None:
            assert answer.error is not None
            self._error(request, answer.error)
            return
        relay_response(
            answer.response,
            request,
            self._reactor,
            config.upstream_timeout,
            event_streams=True,
            filter_frames=client.azure_stream and not config.keep_filter_frames,
            backend=answer.backend,
            usage=True,
            strip_usage=strip_usage,
            cors_set=True,
            deadlines=self._deadlines,
        )

    def _error(self, request: Request, error: ProxyError) -> None:
        """Write the proxy's error, unless the client left or a response has begun."""
        if _twisted.client_gone(request) or request.finished:
            return
        if request.startedWriting:  # pragma: no cover - defensive
            request.channel.transport.abortConnection()  # type: ignore[union-attr]
            return
        write_error(request, error)

    def _unexpected(self, failure: Failure, request: Request) -> None:
        """
        A bug: log it once (its type and where, never its message, which might hold a value
        such as a key) and answer 500 in OpenAI's shape, or cut a response already started.
        """
        _log.error(
            "unexpected {error} serving {method} {path}:\n{where}",
            error=type(failure.value).__name__,
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1")[:200],
            where="".join(traceback.format_tb(failure.getTracebackObject())).rstrip(),
        )
        if _twisted.client_gone(request) or request.finished:
            return
        if request.startedWriting:  # type: ignore[attr-defined]
            request.channel.transport.abortConnection()  # type: ignore[union-attr]
            return
        write_error(request, errors.internal_error())

    def _preflight(self, request: Request) -> None:
        request.setResponseCode(204)
        request.setHeader(b"Access-Control-Allow-Methods", CORS_METHODS)
        asked = request.getHeader(b"access-control-request-headers")
        request.setHeader(b"Access-Control-Allow-Headers", asked or CORS_DEFAULT_HEADERS)
        request.setHeader(b"Access-Control-Max-Age", CORS_MAX_AGE)
        request.setHeader(b"Vary", b"Access-Control-Request-Headers")
        request.defaultContentType = None  # type: ignore[attr-defined]
        request.finish()

    def _local(self, request: Request, answer: rewrite.Local) -> None:
        request.setResponseCode(answer.status)
        for name, value in answer.headers:
            request.setHeader(name, value)
        request.setHeader(b"Content-Length", b"%d" % len(answer.body))
        if request.method != b"HEAD":
            request.write(answer.body)
        request.finish()
