"""What a fake server received: one L{RecordedRequest} per request, with its parsed forms."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import attrs

JSONObject = dict[str, Any]


@attrs.frozen
class RecordedRequest:
    """One request as a fake server received it.

    C{instance} is the name of the fake that received it (several fakes, one per "region", can
    run at once); C{received_at} is the reactor's clock then.  C{headers} holds every header as
    sent, C{api-key}, C{Authorization} and C{Host} among them, names lower-cased.
    """

    method: str
    path: str
    query: dict[str, list[str]]
    raw_uri: str
    headers: dict[str, list[str]]
    body: bytes
    instance: str = ""
    received_at: float = 0.0

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        values = self.headers.get(name.lower())
        return values[0] if values else None

    @property
    def host(self) -> str | None:
        """The C{Host} the request was addressed to (as the client sent it), or None."""
        return self.header("host")

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)

    def form(self) -> dict[str, FormPart]:
        """The body parsed as multipart/form-data: field name -> part (last one wins)."""
        return {part.name: part for part in _parse_multipart(self)}

    def form_fields(self) -> dict[str, str]:
        """The multipart/form-data fields that are not files, as text."""
        return {name: part.text for name, part in self.form().items() if part.filename is None}

    def to_json(self) -> JSONObject:
        """This record as JSON (the body in base64), as the control endpoint returns it."""
        fields = attrs.asdict(self)
        fields["body"] = base64.b64encode(self.body).decode()
        return fields

    @classmethod
    def from_json(cls, obj: JSONObject) -> RecordedRequest:
        """The inverse of L{to_json}: a record fetched from a fake in another process."""
        return cls(**{**obj, "body": base64.b64decode(obj["body"])})


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
