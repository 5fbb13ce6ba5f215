"""
The request rewrite: pure functions from what a client sent to what goes upstream.

No I/O here.  A request is planned in two steps, because with several backends (SPEC §11) it
may be sent to more than one:

  - L{plan_client}, once per request: the route, method, query, headers and (for JSON routes)
    the body give a L{ClientRequest}: the client's key checked, the model read, the headers
    to forward (without any credential);
  - L{for_backend}, once per attempt: that request for one backend, its deployment and its
    credential (L{backend_auth}) gives an L{Upstream}: the method, URL, headers and body to
    send.

L{plan_upstream} does both for the first backend (the one-backend form with a key).  A body is
read only at its top level (L{jsonbody}), and changed only by splicing: the bytes of the
C{model} value are replaced, every other byte stays as the client sent it.  Errors are
L{ProxyError}s.
"""

from __future__ import annotations

import enum
import hmac
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal
from urllib.parse import unquote

import attrs

from aoaiproxy import errors, jsonbody
from aoaiproxy.config import BackendConfig, Config, valid_deployment
from aoaiproxy.metrics import CLIENT_ANONYMOUS

Header = tuple[bytes, bytes]

#: Hop-by-hop headers (RFC 9110 §7.6.1) and ones the HTTP client sets itself; never relayed.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
#: Besides hop-by-hop ones: the client's headers that the upstream request sets itself.
_NOT_FORWARDED = frozenset({b"host", b"content-length", b"authorization", b"api-key"})
_NOT_FORWARDED_OR_HOP = HOP_BY_HOP | _NOT_FORWARDED

#: Per-deployment operations: client path after /v1/ -> Azure path after deployments/{d}/.
DEPLOYMENT_ROUTES: Mapping[str, str] = {
    "chat/completions": "chat/completions",
    "completions": "completions",
    "embeddings": "embeddings",
    "images/generations": "images/generations",
    "images/edits": "images/edits",
    "audio/transcriptions": "audio/transcriptions",
    "audio/translations": "audio/translations",
    "audio/speech": "audio/speech",
}

#: First path segment after /v1/ of routes served by Azure's v1 API (/openai/v1/...).
V1_API_PREFIXES = frozenset({"responses", "files", "batches", "fine_tuning", "vector_stores"})

#: The top-level members of a JSON body that the proxy reads (for L{plan_client} and, on
#: a chat stream, L{usage_request}: one scan serves both).
BODY_MEMBERS = ("model", "stream", "stream_options")
#: A C{model} value longer than this (raw bytes) is refused without decoding it.
MAX_MODEL_BYTES = 1024

_JWT = re.compile(rb"^eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")


@attrs.frozen
class Upstream:
    """Send this upstream."""

    method: bytes
    url: bytes
    headers: tuple[Header, ...]
    #: A replacement body, or None to send the client's body unchanged.
    body: bytes | None = None
    model: str | None = None
    deployment: str | None = None
    #: Whether Azure's filter-only SSE frames may appear (and so may be dropped).
    azure_stream: bool = False


@attrs.frozen
class Local:
    """Answer from the proxy itself."""

    status: int
    body: bytes
    headers: tuple[Header, ...] = ()


@attrs.frozen
class Route:
    """
    Where a request goes, decided from method and path alone (before any body is read).
    C{kind} says how the body is used; see L{plan}.
    """

    kind: Literal["deployment", "v1api", "passthrough", "openai", "models", "model", "health"]
    #: For "deployment": the Azure operation; for "v1api"/"passthrough"/"openai": the
    #: upstream path; for "model": the model id.
    target: str = ""


def classify(config: Config, method: str, path: str) -> Route:
    """
    Decide the route from the method and the raw path (without query).  Raises a 404, 405 or
    400 L{ProxyError}.
    """
    if path == "/healthz":
        _allow(method, path, ("GET", "HEAD"))
        return Route("health")
    check_path(path)
    if config.mode == "openai":
        return Route("openai", path)
    if path.startswith("/openai/"):
        return Route("passthrough", path)
    if not path.startswith("/v1/"):
        raise errors.not_found(method, path)
    rest = path[4:]
    if rest in DEPLOYMENT_ROUTES:
        _allow(method, path, ("POST",))
        return Route("deployment", DEPLOYMENT_ROUTES[rest])
    if rest == "models":
        _allow(method, path, ("GET", "HEAD"))
        return Route("models")
    if rest.startswith("models/") and rest.count("/") == 1 and rest != "models/":
        _allow(method, path, ("GET", "HEAD"))
        return Route("model", unquote(rest[7:]))
    if rest.split("/", 1)[0] in V1_API_PREFIXES:
        return Route("v1api", "/openai/v1/" + rest)
    raise errors.not_found(method, path)


def _allow(method: str, path: str, allowed: tuple[str, ...]) -> None:
    if method not in allowed:
        raise errors.method_not_allowed(method, path, allowed)


#: A control character, or a space, in a decoded path.
_CONTROL = re.compile("[\x00-\x20\x7f]")


def check_path(path: str) -> None:
    """Refuse paths that could step outside the route once the upstream normalises them."""
    decoded = unquote(path) if "%" in path else path
    segments = decoded.split("/")
    if (
        not path.startswith("/")
        or "." in segments
        or ".." in segments
        or "\\" in decoded
        or "//" in path
        or _CONTROL.search(decoded) is not None
    ):
        raise errors.bad_path(path)


def client_key(headers: Iterable[Header]) -> bytes | None:
    """The key a client presents: C{Authorization: Bearer KEY} or C{api-key: KEY}."""
    api_key = None
    for name, value in headers:
        lname = name.lower()
        if lname == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            token = token.strip()
            if token and scheme.lower() == b"bearer":
                return token
        elif lname == b"api-key":
            value = value.strip()
            if value:
                api_key = value
    return api_key


def key_allowed(presented: bytes, keys: frozenset[str]) -> bool:
    """Whether C{presented} is one of C{keys}, compared in constant time over all keys."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented, key.encode("utf-8"))
    return found


def server_credential(config: Config) -> bool:
    """Whether the proxy sends its own credential upstream (a key or Entra ID), not the client's."""
    for backend in config.backends:
        if backend.auth != "client":
            return True
    return False


def client_credential(config: Config, headers: Iterable[Header]) -> bytes | None:
    """
    Check the client's key; return it when it is what goes upstream (no server credential),
    else None.  Raises a 401 L{ProxyError} for a missing or unknown key.
    """
    presented = client_key(headers)
    if server_credential(config):
        if config.client_keys:
            if presented is None:
                raise errors.missing_key()
            if not key_allowed(presented, config.client_keys):
                raise errors.unknown_key()
        elif not config.allow_anonymous:  # pragma: no cover - refused at start-up
            raise errors.unknown_key()
        return None
    if presented is None:
        raise errors.missing_key()
    return presented


def backend_auth(
    mode: str, backend: BackendConfig, presented: bytes | None, token: str | None
) -> tuple[Header, ...]:
    """
    The credential header for C{backend}: its key (C{api-key} in azure mode, a bearer in
    openai mode), its Entra ID C{token} as a bearer, or (C{auth = "client"}) the client's key
    C{presented} (a JWT, an Entra ID token of the client's, as a bearer).
    """
    if backend.auth == "key":
        assert backend.api_key is not None
        key = backend.api_key.encode("utf-8")
        return ((b"api-key", key),) if mode == "azure" else ((b"Authorization", b"Bearer " + key),)
    if backend.auth == "entra":
        assert token is not None
        return ((b"Authorization", b"Bearer " + token.encode("ascii")),)
    assert presented is not None
    if mode == "openai" or _JWT.match(presented):
        return ((b"Authorization", b"Bearer " + presented),)
    return ((b"api-key", presented),)


def strip_hop_by_hop(headers: Iterable[Header], drop: frozenset[bytes] = frozenset()) -> list[Header]:
    """
    C{headers} less hop-by-hop ones (L{HOP_BY_HOP} and those their C{Connection} header
    lists, RFC 9110 §7.6.1) and those named in C{drop} (lower case), in order.
    """
    return _without(headers, HOP_BY_HOP | drop if drop else HOP_BY_HOP)


def _without(headers: Iterable[Header], gone: frozenset[bytes]) -> list[Header]:
    """C{headers} less those named in C{gone} (which has C{connection}) and those it lists."""
    kept = []
    listed: set[bytes] = set()
    for header in headers:
        lname = header[0].lower()
        if lname not in gone:
            kept.append(header)
        elif lname == b"connection":
            listed.update(token.strip().lower() for token in header[1].split(b","))
    if listed:
        return [(name, value) for name, value in kept if name.lower() not in listed]
    return kept


def forward_headers(headers: Iterable[Header], auth: Sequence[Header]) -> tuple[Header, ...]:
    """The client's headers less hop-by-hop, host, length and credentials, plus C{auth}."""
    return (*_without(headers, _NOT_FORWARDED_OR_HOP), *auth)


def query_with_api_version(query: bytes, api_version: str) -> bytes:
    """The client's raw query with any C{api-version} replaced by ours, set exactly once."""
    kept = [
        pair
        for pair in query.split(b"&")
        if pair and unquote(pair.split(b"=", 1)[0].decode("latin-1")) != "api-version"
    ]
    kept.append(b"api-version=" + api_version.encode("ascii"))
    return b"&".join(kept)


#: The only C{api-version} values Azure's v1 API (C{/openai/v1/...}) accepts: none of the
#: dated ones the per-deployment routes need.  Without one it serves the GA C{v1}.
V1_API_VERSIONS = frozenset({"v1", "preview"})


def v1_api_query(query: bytes) -> bytes:
    """
    The query for Azure's v1 API: the client's raw query, less any C{api-version} the v1 API
    does not accept (a dated one), with C{api-version} once at most.  The configured
    (dated) api-version is for the per-deployment routes and is not sent here; a client
    that asks for C{api-version=preview} (or C{v1}) keeps it.
    """
    kept = []
    seen = False
    for pair in query.split(b"&"):
        if not pair:
            continue
        name, _, value = pair.partition(b"=")
        if unquote(name.decode("latin-1")) != "api-version":
            kept.append(pair)
        elif not seen and unquote(value.decode("latin-1")) in V1_API_VERSIONS:
            seen = True
            kept.append(pair)
    return b"&".join(kept)


def deployment_for(config: Config, model: Any) -> str:
    """Map a body's C{model} to a deployment name, or raise a 400."""
    if model is None:
        raise errors.missing_model()
    if not isinstance(model, str):
        raise errors.bad_model(model)
    deployment = config.models.get(model, model)
    if not valid_deployment(deployment):
        raise errors.bad_model(model)
    return deployment


def read_body(body: bytes) -> jsonbody.TopLevel:
    """The top level of a JSON object body (its L{BODY_MEMBERS}), or a 400."""
    try:
        return jsonbody.top_level(body, BODY_MEMBERS)
    except jsonbody.TooComplex as e:
        raise errors.json_too_complex(e.limit) from None
    except jsonbody.JSONBodyError:
        raise errors.bad_json() from None


def model_member(top: jsonbody.TopLevel) -> jsonbody.Member | None:
    """The body's one top-level C{model} member, or None; a 400 if there are several."""
    try:
        return top.get("model")
    except jsonbody.DuplicateMember:
        raise errors.duplicate_member("model") from None


def model_value(body: bytes, member: jsonbody.Member) -> str:
    """The model a body names: a JSON string, else a 400 (C{null}: no model)."""
    raw = member.raw(body)
    if raw == b"null":
        raise errors.missing_model()
    if raw[:1] != b'"' or len(raw) > MAX_MODEL_BYTES:
        raise errors.bad_model(raw[:100].decode("utf-8", "replace"))
    try:
        return jsonbody.string_value(raw)
    except ValueError:
        raise errors.bad_json() from None


def is_stream(body: bytes, top: jsonbody.TopLevel) -> bool:
    """Whether a body asks for a stream (C{"stream": true} at its top level)."""
    for member in top.members:
        if member.name == "stream" and member.raw(body) == b"true":
            return True
    return False


def identity_encoding(headers: Sequence[Header]) -> tuple[Header, ...]:
    """C{headers} asking for an unencoded response: C{Accept-Encoding: identity}."""
    kept = [(n, v) for n, v in headers if n.lower() != b"accept-encoding"]
    return (*kept, (b"Accept-Encoding", b"identity"))


def deployment_url(endpoint: str, api_version: str, deployment: str, operation: str, query: bytes) -> bytes:
    return (
        f"{endpoint}/openai/deployments/{deployment}/{operation}".encode("ascii")
        + b"?"
        + query_with_api_version(query, api_version)
    )


def plain_url(endpoint: str, path: str, query: bytes) -> bytes:
    url = endpoint.encode("ascii") + path.encode("latin-1")
    return url + b"?" + query if query else url


def models_list(names: Iterable[str]) -> Local:
    """C{/v1/models}: the models of every backend (L{aoaiproxy.backends.Pool.models})."""
    data = [_model_object(name) for name in names]
    return _json(200, {"object": "list", "data": data})


def model_object(names: Iterable[str], model: str) -> Local:
    if model not in names:
        raise errors.model_not_found(model)
    return _json(200, _model_object(model))


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "azure-openai"}


def _json(status: int, value: Any) -> Local:
    return Local(status, json.dumps(value).encode("utf-8"), ((b"Content-Type", b"application/json"),))


HEALTH = Local(200, b'{"status": "ok"}', ((b"Content-Type", b"application/json"),))


def is_json(content_type: bytes | None) -> bool:
    return content_type is None or b"json" in content_type.split(b";", 1)[0].lower()


@attrs.frozen
class ClientRequest:
    """
    What a client's request asks for, whichever backend serves it (L{plan_client}); each
    attempt makes it an L{Upstream} for one backend (L{for_backend}).
    """

    route: Route
    method: bytes
    query: bytes
    #: The client's headers to forward: no credential (each backend adds its own).
    headers: tuple[Header, ...]
    #: The client's key, when it is what goes upstream (no server credential), else None.
    presented: bytes | None = attrs.field(repr=False)
    #: The model the request names; None when it names none (files, batches, passthrough).
    model: str | None = None
    #: A JSON body whose C{model} member is spliced per backend (the v1 API), else None.
    body: bytes | None = attrs.field(default=None, repr=False, eq=False)
    member: jsonbody.Member | None = attrs.field(default=None, eq=False)
    #: Whether Azure's filter-only SSE frames may appear (and so may be dropped).
    azure_stream: bool = False
    #: The top level of a per-deployment request's JSON body (its L{BODY_MEMBERS}), for
    #: L{usage_request}; None when the body was not read.
    top: jsonbody.TopLevel | None = attrs.field(default=None, repr=False, eq=False)


class Unchecked(enum.Enum):
    """The type of L{UNCHECKED}."""

    UNCHECKED = "unchecked"


#: L{plan_client}'s C{presented} when the client's key is checked there.
UNCHECKED = Unchecked.UNCHECKED


def plan_client(
    config: Config,
    route: Route,
    method: bytes,
    query: bytes,
    headers: Sequence[Header],
    body: bytes | None,
    model_from_form: str | None = None,
    *,
    presented: bytes | Literal[Unchecked.UNCHECKED] | None = UNCHECKED,
) -> ClientRequest:
    """
    Check the client's key and read what the request asks for (once per request).

    @param body: the client's body when the route needs to look into it (JSON routes, and a
        JSON body on an Azure-shaped route, for C{stream}), else None.
    @param model_from_form: the C{model} field of a multipart body, read by the caller.
    @param presented: what L{client_credential} returned for C{headers} under C{config}, when
        the caller has it (L{aoaiproxy.admission.Admitted}); by default it is checked here.
    """
    if presented is UNCHECKED:
        presented = client_credential(config, headers)
    out_headers = forward_headers(headers, ())
    # Azure's filter-only frames are dropped from chat streams (relay.FilterFrames), which
    # cannot read an encoded stream: ask for none when the body asks for a stream.
    filtered = not config.keep_filter_frames
    if route.kind == "deployment":
        if model_from_form is not None:
            model = model_from_form
        else:
            body = body or b""
            top = read_body(body)
            member = model_member(top)
            if member is None:
                raise errors.missing_model()
            model = model_value(body, member)
            if filtered and is_stream(body, top):
                out_headers = identity_encoding(out_headers)
            return ClientRequest(
                route, method, query, out_headers, presented, model, azure_stream=True, top=top
            )
        return ClientRequest(route, method, query, out_headers, presented, model, azure_stream=True)
    if route.kind == "v1api":
        if body:
            top = read_body(body)
            member = model_member(top)
            if member is not None:
                model = model_value(body, member)
                return ClientRequest(route, method, query, out_headers, presented, model, body, member)
        # No chat-completion chunks here (Responses streams typed events): nothing to drop.
        return ClientRequest(route, method, query, out_headers, presented)
    # passthrough (/openai/...) and openai mode: unchanged but for authentication (and, for
    # an Azure stream whose frames are filtered, the encoding asked for).
    azure_stream = config.mode == "azure"
    if azure_stream and filtered and body:
        try:
            if is_stream(body, jsonbody.top_level(body, ("stream",))):
                out_headers = identity_encoding(out_headers)
        except jsonbody.JSONBodyError:
            pass  # not read here: Azure judges the body
    return ClientRequest(route, method, query, out_headers, presented, azure_stream=azure_stream)


def for_backend(
    config: Config,
    client: ClientRequest,
    backend: BackendConfig,
    deployment: str | None,
    auth: Sequence[Header],
) -> Upstream:
    """
    The request to send to C{backend} (one attempt): its endpoint, its C{deployment} for the
    client's model (None when the request names none) and its credential C{auth}
    (L{backend_auth}).  L{Upstream.body} is None when the client's body goes unchanged.
    """
    route = client.route
    headers = (*client.headers, *auth)
    if route.kind == "deployment":
        assert deployment is not None
        url = deployment_url(backend.endpoint, config.api_version, deployment, route.target, client.query)
        return Upstream(client.method, url, headers, None, client.model, deployment, azure_stream=True)
    if route.kind == "v1api":
        new_body = None
        if client.body is not None and client.member is not None and deployment is not None:
            if deployment != client.model:
                value = json.dumps(deployment).encode("ascii")
                new_body = jsonbody.replace_value(client.body, client.member, value)
        url = plain_url(backend.endpoint, route.target, v1_api_query(client.query))
        return Upstream(client.method, url, headers, new_body, client.model, deployment)
    url = plain_url(backend.endpoint, route.target, client.query)
    return Upstream(client.method, url, headers, azure_stream=client.azure_stream)


def plan_upstream(
    config: Config,
    route: Route,
    method: bytes,
    query: bytes,
    headers: Sequence[Header],
    body: bytes | None,
    model_from_form: str | None = None,
) -> Upstream:
    """
    L{plan_client} and L{for_backend} for the first backend, through the global model map
    (the one-backend form with a key, or the client's own; no Entra ID token here).
    """
    client = plan_client(config, route, method, query, headers, body, model_from_form)
    backend = config.backends[0]
    deployment = None if client.model is None else deployment_for(config, client.model)
    auth = backend_auth(config.mode, backend, client.presented, None)
    return for_backend(config, client, backend, deployment, auth)


def client_name(config: Config, headers: Iterable[Header]) -> str:
    """
    The name of the client key a request presents (SPEC §5: C{NAME:KEY} lines, else
    C{keyN}), for metrics and the access line: C{anonymous} when the proxy has no client
    keys or the key is none of them.  Compared in constant time over all keys, as
    L{key_allowed}.
    """
    presented = client_key(headers)
    found = CLIENT_ANONYMOUS
    if presented is not None:
        for key, name in config.client_names.items():
            if hmac.compare_digest(presented, key.encode("utf-8")):
                found = name
    return found


#: What a chat stream's request gets so that Azure reports its usage (SPEC §14).
INCLUDE_USAGE = b'{"include_usage":true}'
#: The first api-version of Azure's per-deployment API that takes C{stream_options}; an older
#: one answers 400 to it ("Unknown parameter"), so none is added there.
STREAM_OPTIONS_SINCE = "2024-08-01"


def ask_for_usage(body: bytes, top: jsonbody.TopLevel | None = None) -> tuple[bytes, bool]:
    """
    A chat-completions request body that asks for a stream but not for its usage, with
    C{"stream_options": {"include_usage": true}} added (merged into its C{stream_options}
    object, whose other members are kept), every other byte as the client sent it; and
    whether it was changed, so that the usage chunk and the C{"usage":null} members this
    adds are removed from the client's stream (L{aoaiproxy.usage.ChatStreamUsage}).

    Unchanged (and C{False}): not a stream; C{include_usage} already true; a body or a
    C{stream_options} that cannot be read, or that is not an object or null (the upstream
    judges those, as the client sent them).

    @param top: the body's top level, read with its C{stream} and C{stream_options} members
        (L{ClientRequest.top}), else None: it is read here.
    """
    try:
        if top is None:
            top = jsonbody.top_level(body, ("stream", "stream_options"))
        if not is_stream(body, top):
            return body, False
        member = top.get("stream_options")
        if member is None:
            return jsonbody.add_member(body, top, "stream_options", INCLUDE_USAGE), True
        raw = member.raw(body)
        if raw == b"null":
            return jsonbody.replace_value(body, member, INCLUDE_USAGE), True
        options = jsonbody.top_level(raw, ("include_usage",))
        include = options.get("include_usage")
        if include is None:
            merged = jsonbody.add_member(raw, options, "include_usage", b"true")
        elif include.raw(raw) == b"true":
            return body, False
        else:  # false or null: the client said no; it still gets no usage
            merged = jsonbody.replace_value(raw, include, b"true")
        return jsonbody.replace_value(body, member, merged), True
    except jsonbody.JSONBodyError:
        return body, False


def usage_request(
    config: Config, route: Route, body: bytes | None, top: jsonbody.TopLevel | None = None
) -> tuple[bytes | None, bool]:
    """
    For an Azure chat-completions request whose client did not ask for its stream's usage:
    the body that asks for it (L{ask_for_usage}) and C{True} (the client's stream must have
    the usage removed); for any other request, C{(None, False)}: the body as it is.  The
    request must also ask for an unencoded response (L{identity_encoding}): the usage chunk
    is read and removed from it.

    @param top: C{body}'s top level as L{plan_client} read it (L{ClientRequest.top}), so that
        it is not read again; None: it is read here if need be.
    """
    if (
        route.kind != "deployment"
        or route.target != "chat/completions"
        or body is None
        or config.api_version < STREAM_OPTIONS_SINCE
        # Not a stream (which needs a member whose value is true), or no "stream" member, not
        # even one whose name has an escape: no scan (C speed).
        or (
            isinstance(body, bytes)
            and (b"true" not in body or (b'"stream"' not in body and b"\\" not in body))
        )
    ):
        return None, False
    new_body, changed = ask_for_usage(body, top)
    return (new_body, True) if changed else (None, False)


def with_usage(config: Config, route: Route, upstream: Upstream, body: bytes | None) -> tuple[Upstream, bool]:
    """
    L{usage_request} applied to a planned upstream request (whose body is the client's,
    C{body}): returns it asking for the usage and an unencoded stream, or unchanged, and
    whether the client's stream must have the usage removed (C{strip_usage}).
    """
    new_body, strip = usage_request(config, route, body if upstream.body is None else None)
    if new_body is None:
        return upstream, False
    return attrs.evolve(upstream, body=new_body, headers=identity_encoding(upstream.headers)), strip
