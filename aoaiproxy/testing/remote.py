"""L{RemoteFake}: drive a fake running in another process through its control endpoint."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .records import RecordedRequest

JSONObject = dict[str, Any]

__all__ = ["RemoteFake"]


class RemoteFake:
    """A fake (C{python -m aoaiproxy.testing}) at ``url``, seen through C{/_fake/...}.

    ``url`` is a fake's URL or the token endpoint's (C{IDENTITY_ENDPOINT}, for L{identity}).

    The calls block (plain C{urllib}): make them from a test's own thread, or from the reactor
    thread only when the fake runs in another process.  Keyword names may use underscores for
    the dashes of the control endpoint's keys (C{retry_after_ms=1500}).  A refused call raises
    ValueError with the fake's message.
    """

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        parts = urllib.parse.urlsplit(url)
        self.url = f"{parts.scheme}://{parts.netloc}"  # the control endpoint is at the root
        self.timeout = timeout

    def _call(self, method: str, path: str, body: object = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise ValueError(json.loads(e.read())["error"]["message"]) from None

    def state(self) -> JSONObject:
        """C{GET /_fake}."""
        result: JSONObject = self._call("GET", "/_fake")
        return result

    def requests(self) -> list[RecordedRequest]:
        """Every request the fake has recorded."""
        return [RecordedRequest.from_json(r) for r in self._call("GET", "/_fake/requests")["requests"]]

    def clear_requests(self) -> None:
        self._call("DELETE", "/_fake/requests")

    def add_behaviour(self, kind: str, **params: Any) -> list[JSONObject]:
        """Put a behaviour in force (C{kind} and keys as C{POST /_fake/behaviour}); returns
        those in force."""
        result: list[JSONObject] = self._call("POST", "/_fake/behaviour", {"kind": kind, **params})[
            "behaviours"
        ]
        return result

    def clear_behaviours(self, deployment: str | None = None) -> None:
        query = "" if deployment is None else f"?deployment={urllib.parse.quote(deployment)}"
        self._call("DELETE", "/_fake/behaviour" + query)

    def settings(self, **changes: Any) -> JSONObject:
        """Change settings (none: just read them); returns them all."""
        result: JSONObject = self._call("POST" if changes else "GET", "/_fake/settings", changes or None)
        return result

    def identity(self, **changes: Any) -> JSONObject:
        """For a token endpoint's URL: C{/_fake/identity} (C{lifetime}, C{fail}, C{count},
        C{revoke}); returns its state."""
        result: JSONObject = self._call("POST" if changes else "GET", "/_fake/identity", changes or None)
        return result
