"""The answers a fake gives, as values: complete replies, streams, and Azure's error shapes."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator

import attrs

from .records import RecordedRequest

HOLD = object()  # marker in a stream's event sequence: where hold_last_chunk() stops it


def dumps(obj: object) -> bytes:
    """Compact JSON, as Azure writes it."""
    return json.dumps(obj, separators=(",", ":")).encode()


@attrs.frozen
class Reply:
    """A complete (non-streamed) answer."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = (("content-type", "application/json"),)
    writes: int = 1  # more than 1: sent chunked, in that many writes


@attrs.frozen
class Stream:
    """A streamed answer: SSE events, with L{HOLD} where a held stream waits."""

    events: Callable[[], Iterator[bytes | object]]
    content_type: str = "text/event-stream; charset=utf-8"


Answer = Reply | Stream


def json_reply(status: int, obj: object, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(status, dumps(obj), (("content-type", "application/json"), *headers))


def azure_error(status: int, code: str, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return json_reply(status, {"error": {"code": code, "message": message}}, headers)


def openai_error(status: int, message: str, kind: str = "invalid_request_error") -> Reply:
    error = {"message": message, "type": kind, "param": None, "code": None}
    return json_reply(status, {"error": error})


NOT_FOUND = azure_error(404, "404", "Resource not found")
V1_BAD_API_VERSION = azure_error(400, "BadRequest", "API version not supported")
UNAUTHORIZED = azure_error(
    401,
    "401",
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a"
    " valid key for an active subscription and use a correct regional API endpoint for your"
    " resource.",
)
TOKEN_UNAUTHORIZED = azure_error(
    401,
    "401",
    "Unauthorized. Access token is missing, invalid, audience is incorrect"
    " (https://cognitiveservices.azure.com), or have expired.",
    (("www-authenticate", 'Bearer error="invalid_token"'),),
)
DEPLOYMENT_NOT_FOUND = azure_error(
    404,
    "DeploymentNotFound",
    "The API deployment for this resource does not exist. If you created the deployment"
    " within the last 5 minutes, please wait a moment and try again.",
)

OPERATIONS = {
    "chat/completions": "ChatCompletions_Create",
    "completions": "Completions_Create",
    "embeddings": "Embeddings_Create",
    "images/generations": "ImageGenerations_Create",
    "images/edits": "ImageEdits_Create",
    "audio/transcriptions": "Transcriptions_Create",
    "audio/translations": "Translations_Create",
    "audio/speech": "Speech_Create",
}
DEPLOYMENT_ROUTE = re.compile(r"^/openai/deployments/(?P<dep>[^/]+)/(?P<op>" + "|".join(OPERATIONS) + r")$")


def rate_limited(rec: RecordedRequest, seconds: float, headers: tuple[tuple[str, str], ...]) -> Reply:
    """Azure's 429 for ``rec``: its message names the operation, the API version and
    ``seconds`` (rounded up); ``headers`` are the answer's headers (Retry-After and friends)."""
    match = DEPLOYMENT_ROUTE.match(rec.path)
    operation = OPERATIONS[match.group("op")] if match else "Responses_Create"
    version = rec.query.get("api-version", ["v1"])[0]
    message = (
        f"Requests to the {operation} Operation under Azure OpenAI API version {version}"
        " have exceeded token rate limit of your current OpenAI S0 pricing tier. Please"
        f" retry after {math.ceil(seconds)} seconds. Please go here:"
        " https://aka.ms/oai/quotaincrease if you would like to further increase the"
        " default rate limit."
    )
    return json_reply(429, {"error": {"code": "429", "message": message}}, headers)


_SERVER_ERRORS = {
    502: ("BadGateway", "Bad gateway."),
    503: (
        "ServiceUnavailable",
        "The service is temporarily unable to process your request. Please try again later.",
    ),
    504: ("Timeout", "The operation was timeout."),
}


def server_error(status: int) -> Reply:
    """What Azure answers with a 5xx ``status``."""
    if status in _SERVER_ERRORS:
        return azure_error(status, *_SERVER_ERRORS[status])
    return openai_error(
        status,
        "The server had an error processing your request. Sorry about that! You can retry your"
        " request, or contact us through an Azure support request at:"
        " https://go.microsoft.com/fwlink/?linkid=2213926 if you keep seeing this error.",
        kind="server_error",
    )
