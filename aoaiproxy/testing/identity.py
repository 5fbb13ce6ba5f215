"""A fake managed-identity token endpoint (App Service protocol) for azure-identity.

C{azure.identity.ManagedIdentityCredential} (through MSAL) uses the App Service protocol when
C{IDENTITY_ENDPOINT} and C{IDENTITY_HEADER} are set: plain HTTP, C{GET
IDENTITY_ENDPOINT?api-version=2019-08-01&resource=RESOURCE} (and C{client_id}, C{mi_res_id} or
C{object_id} for a user-assigned identity) with the header C{X-IDENTITY-HEADER: IDENTITY_HEADER};
the answer is C{{"access_token", "expires_on" (epoch seconds, a string), "resource",
"token_type": "Bearer", "client_id"}}.  L{FakeManagedIdentity} answers exactly that, with tokens
shaped like Entra's JWTs that live L{FakeManagedIdentity.lifetime} seconds, and that a
L{aoaiproxy.testing.FakeAzure} given it (C{identity=}) requires.  It can be told to fail (an
HTTP status, or hang) and counts the token requests it receives.

Note (MSAL): a token with 5 minutes or less left is never cached, so with a short lifetime every
C{get_token} asks the endpoint; a longer one is served from MSAL's cache until then.

Its control endpoint, C{/_fake/identity}: C{GET} gives C{request_count}, C{issued} (tokens so
far), C{valid} (not yet expired nor revoked), C{lifetime}, C{fail} and C{fail_count} (what the
next token requests get); C{POST} a JSON object with any of C{lifetime} (seconds), C{fail}
(C{400}, C{500}, another 4xx/5xx, C{"hang"}, or null to stop failing), C{count} (how many token
requests fail; absent: until told otherwise), C{revoke} (true: every token issued so far is
refused from now on).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import secrets
import uuid
from collections.abc import Callable
from typing import Any

import attrs

from . import control
from .records import RecordedRequest
from .replies import Reply, json_reply
from .server import FakeServer, HTTPRequest, parse_uri

__all__ = ["FakeManagedIdentity", "IssuedToken"]

JSONObject = dict[str, Any]

TOKEN_PATH = "/msi/token"
API_VERSION = "2019-08-01"
CONTROL_PATH = "/_fake/identity"
TENANT = "00000000-0000-0000-0000-00000000fa4e"

_FAILURES = {
    400: "Unable to load the proper Managed Identity.",
    500: "An unexpected error occured while fetching the AAD Token.",
}


#: Seconds past its expiry that a token is still accepted, as Entra ID's resources allow some
#: clock skew (minutes there; one second here, so that tests stay short).  A request sent with
#: a token in its last moment then does not race its own arrival.
CLOCK_SKEW = 1.0


@attrs.frozen
class IssuedToken:
    """A token the endpoint issued: for C{resource}, to C{client_id}, valid until C{expires_on}
    (seconds since the epoch, the reactor's clock)."""

    token: str = attrs.field(repr=False)
    resource: str
    client_id: str
    expires_on: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _status_reply(status: int, message: str) -> Reply:
    """An error in the App Service token endpoint's shape."""
    return json_reply(status, {"statusCode": status, "message": message, "correlationId": str(uuid.uuid4())})


class FakeManagedIdentity(FakeServer):
    """A managed-identity token endpoint (App Service protocol) on loopback.

    ``lifetime`` is how long a token lives, in seconds (read at each issue: change it any
    time); ``identity_header`` the secret clients must send (random if not given);
    ``client_id`` the identity a token is for when the request names none.  L{requests} holds
    every token request, L{issued} every token issued.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        lifetime: float = 3600.0,
        identity_header: str | None = None,
        client_id: str = "00000000-0000-0000-0000-0000000c11e7",
        name: str = "identity",
        on_request: Callable[[RecordedRequest], None] | None = None,
        max_recorded: int | None = None,
    ) -> None:
        super().__init__(reactor, name=name, on_request=on_request, max_recorded=max_recorded)
        self.lifetime = lifetime
        self.identity_header = identity_header or secrets.token_hex(16)
        self.client_id = client_id
        self.issued: list[IssuedToken] = []
        self._valid: dict[str, IssuedToken] = {}
        self._failure: int | str | None = None
        self._failures_left: int | None = None
        self._signing_key = secrets.token_bytes(32)
        self._ids = itertools.count(1)

    @property
    def endpoint(self) -> str:
        """The C{IDENTITY_ENDPOINT} value: the token URL."""
        return self.url + TOKEN_PATH

    def environ(self) -> dict[str, str]:
        """The environment that points azure-identity's ManagedIdentityCredential here."""
        return {"IDENTITY_ENDPOINT": self.endpoint, "IDENTITY_HEADER": self.identity_header}

    def fail(self, how: int | str | None, count: int | None = None) -> None:
        """Token requests from now on fail: with HTTP status ``how`` (400 and 500 in the App
        Service's words), or never answered (``"hang"``); None: they succeed again.  With
        ``count``, only that many fail."""
        if how is not None and how != "hang" and not (isinstance(how, int) and 400 <= how <= 599):
            raise ValueError(f"fail must be a 4xx or 5xx status, 'hang' or null, not {how!r}")
        if count is not None and count < 1:
            raise ValueError(f"count must be at least 1, not {count}")
        self._failure = how
        self._failures_left = None if how is None else count

    def revoke(self) -> None:
        """Every token issued so far is refused from now on (as if Entra had revoked it)."""
        self._valid.clear()

    def is_valid(self, token: str, audience: str | None = None) -> bool:
        """Whether ``token`` was issued here, is not revoked and has not expired (allowing
        L{CLOCK_SKEW}), and (with ``audience``) was issued for that resource."""
        issued = self._valid.get(token)
        if issued is None or self._reactor.seconds() >= issued.expires_on + CLOCK_SKEW:
            return False
        return audience is None or issued.resource.rstrip("/") == audience.rstrip("/")

    @property
    def valid_tokens(self) -> int:
        """How many tokens are valid right now."""
        now = self._reactor.seconds()
        return sum(now < t.expires_on for t in self._valid.values())

    # -- answering ---------------------------------------------------------------------------

    def _render(self, request: HTTPRequest) -> bytes | int:
        path, _ = parse_uri(request.uri.decode("latin-1"))
        if path.rstrip("/") == CONTROL_PATH:
            return self._write_reply(request, self._control(request))
        rec = self._record(request)
        if path != TOKEN_PATH:
            return self._write_reply(request, _status_reply(404, f"{path} not found"))
        if self._failure is not None:
            how = self._failure
            if self._failures_left is not None:
                self._failures_left -= 1
                if self._failures_left == 0:
                    self._failure = None
            if how == "hang":
                return self._hang(request)
            status = int(how)
            return self._write_reply(request, _status_reply(status, _FAILURES.get(status, "Request failed.")))
        return self._write_reply(request, self._token(rec))

    def _token(self, rec: RecordedRequest) -> Reply:
        if rec.method != "GET":
            return _status_reply(405, "The token endpoint takes GET.")
        if rec.header("x-identity-header") != self.identity_header:
            return _status_reply(401, "The X-IDENTITY-HEADER header is missing or wrong.")
        if rec.query.get("api-version") != [API_VERSION]:
            return _status_reply(400, f"The api-version must be {API_VERSION}.")
        resource = rec.query.get("resource", [""])[0]
        if not resource:
            return _status_reply(400, "The resource parameter is missing.")
        client_id = rec.query.get("client_id", [self.client_id])[0]
        issued = self._issue(resource, client_id)
        answer = {
            "access_token": issued.token,
            "expires_on": str(issued.expires_on),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": client_id,
        }
        return json_reply(200, answer)

    def _issue(self, resource: str, client_id: str) -> IssuedToken:
        now = int(self._reactor.seconds())
        expires_on = int(now + self.lifetime)
        header = {"typ": "JWT", "alg": "HS256", "kid": "fake"}
        claims = {
            "aud": resource,
            "iss": f"https://sts.windows.net/{TENANT}/",
            "iat": now,
            "nbf": now,
            "exp": expires_on,
            "appid": client_id,
            "oid": client_id,
            "tid": TENANT,
            "uti": f"{next(self._ids)}-{secrets.token_hex(4)}",
        }
        signed = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
        signature = hmac.new(self._signing_key, signed.encode(), hashlib.sha256).digest()
        issued = IssuedToken(signed + "." + _b64(signature), resource, client_id, expires_on)
        self.issued.append(issued)
        if self.max_recorded is not None and len(self.issued) > 2 * self.max_recorded:
            del self.issued[: -self.max_recorded]
        for token, old in list(self._valid.items()):  # expired ones can never be valid again
            if old.expires_on + CLOCK_SKEW <= now:
                del self._valid[token]
        self._valid[issued.token] = issued
        return issued

    # -- control endpoint --------------------------------------------------------------------

    def _state(self) -> JSONObject:
        return {
            "name": self.name,
            "request_count": self.request_count,
            "issued": len(self.issued),
            "valid": self.valid_tokens,
            "lifetime": self.lifetime,
            "fail": self._failure,
            "fail_count": self._failures_left,
        }

    def _control(self, request: HTTPRequest) -> Reply:
        method = request.method.decode("latin-1")
        if method not in ("GET", "POST"):
            return control.error(405, f"{CONTROL_PATH} takes GET, POST")
        try:
            if method == "POST":
                self._configure(control.read_json(request))
        except ValueError as e:
            return control.error(400, str(e))
        return json_reply(200, self._state())

    def _configure(self, body: Any) -> None:
        if not isinstance(body, dict):
            raise ValueError("identity settings are a JSON object")
        unknown = sorted(set(body) - {"lifetime", "fail", "count", "revoke"})
        if unknown:
            raise ValueError(f"unknown identity settings: {', '.join(unknown)}")
        lifetime = body.get("lifetime", self.lifetime)
        if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)) or not 0 < lifetime < 1e9:
            raise ValueError("lifetime must be a number of seconds > 0")
        count = body.get("count")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int)):
            raise ValueError("count must be a whole number")
        if "fail" in body or count is not None:
            self.fail(body.get("fail", self._failure), count)
        self.lifetime = float(lifetime)
        if body.get("revoke"):
            self.revoke()
