"""
What a request's head alone decides, pure (no I/O): whether the request will be refused, and
whether its route reads a body at all.

L{aoaiproxy.site.ProxyRequest} asks at the end of each head that announces a body, before
any byte of it is read: a request refused here is answered at once (and never gets C{100
Continue}), so that no client stores a body it may not send.  The decisions are the ones the
request would meet later, by the same functions: the forward proxy's
(L{aoaiproxy.forward.policy.admit}: 400, 407, 403) for C{CONNECT} and absolute-form requests,
and for API requests the route (L{aoaiproxy.rewrite.classify}: 404, 405, 400) and the key
(L{aoaiproxy.rewrite.client_credential}: 401).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from aoaiproxy import rewrite
from aoaiproxy.config import Config
from aoaiproxy.errors import ProxyError
from aoaiproxy.forward.policy import Refused, admit

__all__ = ["KEYLESS_PATHS", "Admitted", "body_unused", "judge", "needs_key"]

Header = tuple[bytes, bytes]


@attrs.frozen
class Admitted:
    """
    What the head of an origin-form API request that L{judge} admitted decided, for its route
    to take rather than decide again (L{aoaiproxy.resource.ApiResource}): valid only for the
    same C{config} object (a reload swaps it whole), C{method} and C{path}.
    """

    config: Config
    method: bytes
    #: The request-target without its query.
    path: bytes
    route: rewrite.Route
    #: The request's headers, as L{aoaiproxy.resource.raw_headers} gives them.
    headers: Sequence[Header]
    #: What L{rewrite.client_credential} returned for them.
    presented: bytes | None = attrs.field(repr=False)


#: Origin-form paths whose C{GET} and C{HEAD} are answered without a key: the health check,
#: and the interception CA's certificate (C{/aoaiproxy/ca.pem}).  None of them reads a body.
KEYLESS_PATHS = frozenset({b"/healthz", b"/aoaiproxy/ca.pem"})


def _path(target: bytes) -> bytes:
    return target.split(b"?", 1)[0]


def needs_key(method: bytes, target: bytes) -> bool:
    """
    Whether an origin-form API request must present a key (SPEC §5): every one but CORS
    preflights (C{OPTIONS}) and C{GET}/C{HEAD} of L{KEYLESS_PATHS}.  Which key, if any, is
    accepted is L{aoaiproxy.rewrite.client_credential}'s to say.
    """
    if method == b"OPTIONS":
        return False
    return not (method in (b"GET", b"HEAD") and _path(target) in KEYLESS_PATHS)


def body_unused(method: bytes, target: bytes) -> bool:
    """Whether the route of an origin-form request never reads its body (so it is not stored)."""
    return not needs_key(method, target)


def judge(
    config: Config, method: bytes, target: bytes, headers: Sequence[Header]
) -> ProxyError | Admitted | None:
    """
    The answer a request will get from its head alone (a L{ProxyError}); or, for an
    origin-form API request that its route and key admit, what they decided (L{Admitted});
    None when the head decides neither (its body or its upstream will).  C{target} is the
    request-target as sent; C{headers} the request's.
    """
    origin_form = method != b"CONNECT" and target.startswith(b"/")
    if not origin_form:
        authorization = next((v for n, v in headers if n.lower() == b"proxy-authorization"), None)
        try:
            admitted = admit(config, method, target, authorization)
        except Refused as e:
            return e.error
        if not admitted.api:
            return None
        assert admitted.absolute is not None
        target = admitted.absolute.origin
    if not needs_key(method, target):
        return None
    path = _path(target)
    if config.intercept and path == b"/aoaiproxy/ca.pem":
        # Served by the interception's own route (GET and HEAD only; 405 for the rest).
        return None
    try:
        route = rewrite.classify(config, method.decode("ascii", "replace"), path.decode("latin-1"))
        presented = rewrite.client_credential(config, headers)
    except ProxyError as e:
        return e
    if origin_form:
        return Admitted(config, method, path, route, headers, presented)
    return None
