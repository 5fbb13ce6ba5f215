"""
Errors the proxy makes itself, in OpenAI's shape::

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}
"""

from __future__ import annotations

import json

import attrs


@attrs.frozen
class ProxyError(Exception):
    """An error answered by the proxy.  Messages never contain a key."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.param, self.code)

    def __str__(self) -> str:
        return f"{self.status} {self.message}"


def error_body(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> bytes:
    return json.dumps({"error": {"message": message, "type": type, "param": param, "code": code}}).encode(
        "utf-8"
    )


def not_found(method: str, path: str) -> ProxyError:
    return ProxyError(404, f"Invalid URL ({method} {_clip(path)})", code="unknown_url")


def method_not_allowed(method: str, path: str, allowed: tuple[str, ...]) -> ProxyError:
    return ProxyError(
        405,
        f"Method {method} is not allowed on {_clip(path)}; use {', '.join(allowed)}",
        code="method_not_allowed",
        headers=((b"Allow", ", ".join(allowed).encode("ascii")),),
    )


def missing_key() -> ProxyError:
    return ProxyError(
        401,
        "You didn't provide an API key. Provide it as 'Authorization: Bearer KEY' "
        "or as an 'api-key: KEY' header.",
        code="missing_api_key",
    )


def unknown_key() -> ProxyError:
    return ProxyError(401, "Incorrect API key provided.", code="invalid_api_key")


def bad_json() -> ProxyError:
    return ProxyError(
        400,
        "We could not parse the JSON body of your request. The body must be a JSON object.",
        code="invalid_json",
    )


def json_too_complex(limit: int) -> ProxyError:
    return ProxyError(
        400,
        "The JSON body has too many values for the proxy to read: at most about "
        f"{limit} strings, arrays, objects and escaped quotes.",
        code="json_too_complex",
    )


def duplicate_member(name: str) -> ProxyError:
    return ProxyError(
        400, f"The JSON body has more than one {name!r} member.", param=name, code="duplicate_member"
    )


def missing_model() -> ProxyError:
    return ProxyError(400, "You must provide a model parameter.", param="model", code="missing_model")


def bad_model(model: object) -> ProxyError:
    shown = _clip(model if isinstance(model, str) else json.dumps(model), 80)
    return ProxyError(
        400,
        f"The model {shown!r} does not map to a valid deployment name "
        "(letters, digits, '.', '_' and '-', at most 64).",
        param="model",
        code="invalid_model",
    )


def too_large(limit: int) -> ProxyError:
    return ProxyError(
        413, f"Request body is larger than the limit of {limit} bytes.", code="request_too_large"
    )


def bad_path(path: str) -> ProxyError:
    return ProxyError(400, f"Invalid path {_clip(path)!r}.", code="invalid_path")


def internal_error() -> ProxyError:
    return ProxyError(
        500,
        "The proxy failed to handle the request (the error is in its log).",
        type="server_error",
        code="internal_error",
    )


def upstream_unreachable(reason: str) -> ProxyError:
    return ProxyError(502, f"Upstream unreachable: {reason}", type="api_error", code="bad_gateway")


def upstream_timeout(what: str) -> ProxyError:
    return ProxyError(504, f"Upstream timed out: {what}", type="api_error", code="gateway_timeout")


def model_not_found(model: str) -> ProxyError:
    """No backend serves the model (SPEC §11); nothing was sent upstream."""
    return ProxyError(
        404,
        f"The model {_clip(model, 80)!r} does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def all_backends_busy(retry_after: int) -> ProxyError:
    """Every backend serving the model is cooling down after a 429, or its circuit is open."""
    return ProxyError(
        429,
        "Every backend serving this model is rate limited or unavailable; "
        f"retry after {retry_after} seconds.",
        type="rate_limit_error",
        code="all_backends_busy",
        headers=((b"Retry-After", b"%d" % retry_after),),
    )


def token_unavailable(retry_after: int) -> ProxyError:
    """The proxy has no valid Entra ID token for the backend (SPEC §12)."""
    return ProxyError(
        503,
        "The proxy has no valid Entra ID token for the upstream resource; "
        f"retry after {retry_after} seconds.",
        type="api_error",
        code="token_unavailable",
        headers=((b"Retry-After", b"%d" % retry_after),),
    )


def _clip(text: str, n: int = 200) -> str:
    return text if len(text) <= n else text[:n] + "..."
