"""Azure's v1 API under C{/openai/v1/}: responses, files, batches, fine-tuning jobs, vector stores."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from .records import RecordedRequest
from .replies import NOT_FOUND, Answer, Reply, Stream, json_reply, openai_error
from .sse import StreamSettings, response_events
from .usage import count_tokens, prompt_tokens, response_usage

JSONObject = dict[str, Any]


class _Collection:
    """An in-memory store of OpenAI objects of one kind (files, batches, ...)."""

    def __init__(self) -> None:
        self.items: dict[str, JSONObject] = {}

    def add(self, obj: JSONObject) -> Reply:
        self.items[obj["id"]] = obj
        return json_reply(200, obj)

    def listing(self) -> Reply:
        data = list(self.items.values())
        return json_reply(200, list_page(data))

    def get(self, item_id: str) -> JSONObject | None:
        return self.items.get(item_id)


def list_page(data: list[JSONObject]) -> JSONObject:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": False,
    }


class V1Api:
    """The v1 API's objects and routes.  ``new_id(prefix)`` makes ids, ``now()`` timestamps."""

    def __init__(
        self, settings: StreamSettings, new_id: Callable[[str], str], now: Callable[[], int]
    ) -> None:
        self._settings = settings
        self._new_id = new_id
        self._now = now
        self._files = _Collection()
        self._file_contents: dict[str, bytes] = {}
        self._responses = _Collection()
        self._input_items: dict[str, list[JSONObject]] = {}
        self._collections = {
            "batches": (_Collection(), self._new_batch),
            "fine_tuning/jobs": (_Collection(), self._new_fine_tuning_job),
            "vector_stores": (_Collection(), self._new_vector_store),
        }

    def route(self, rec: RecordedRequest, parts: list[str]) -> Answer:
        """The answer to ``rec``, whose path is C{/openai/v1/} and ``parts``."""
        kind, rest = parts[0], parts[1:]
        if kind == "responses":
            return self._responses_route(rec, rest)
        if kind == "files":
            return self._files_route(rec, rest)
        if kind == "fine_tuning" and rest[:1] == ["jobs"]:
            kind, rest = "fine_tuning/jobs", rest[1:]
        if kind not in self._collections:
            return NOT_FOUND
        collection, build = self._collections[kind]
        if rest == [] and rec.method == "POST":
            return collection.add(build(rec.json()))
        if rest == [] and rec.method == "GET":
            return collection.listing()
        obj = collection.get(rest[0]) if rest else None
        if obj is None:
            return NOT_FOUND
        if rest[1:] == [] and rec.method == "GET":
            return json_reply(200, obj)
        if rest[1:] == ["cancel"] and rec.method == "POST" and kind == "batches":
            obj.update(status="cancelling", cancelling_at=self._now())
            return json_reply(200, obj)
        return NOT_FOUND

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

    def _files_route(self, rec: RecordedRequest, rest: list[str]) -> Reply:
        if rest == [] and rec.method == "POST":
            return self._files.add(self._new_file(rec))
        if rest == [] and rec.method == "GET":
            return self._files.listing()
        obj = self._files.get(rest[0]) if rest else None
        if obj is None:
            return openai_error(404, f"No such File object: {rest[0] if rest else ''}")
        if rest[1:] == [] and rec.method == "GET":
            return json_reply(200, obj)
        if rest[1:] == [] and rec.method == "DELETE":
            del self._files.items[obj["id"]]
            return json_reply(200, {"id": obj["id"], "object": "file", "deleted": True})
        if rest[1:] == ["content"] and rec.method == "GET":
            content_type = (("content-type", "application/octet-stream"),)
            return Reply(200, self._file_contents[obj["id"]], content_type)
        return NOT_FOUND

    # -- Responses API -------------------------------------------------------------------------

    def _responses_route(self, rec: RecordedRequest, rest: list[str]) -> Answer:
        if rest == [] and rec.method == "POST":
            return self._create_response(rec.json())
        obj = self._responses.get(rest[0]) if rest else None
        if obj is None:
            return openai_error(404, f"Response with id '{rest[0] if rest else ''}' not found.")
        tail = (rec.method, *rest[1:])
        if tail == ("GET",):
            return json_reply(200, obj)
        if tail == ("DELETE",):
            del self._responses.items[obj["id"]]
            return json_reply(200, {"id": obj["id"], "object": "response", "deleted": True})
        if tail == ("POST", "cancel"):
            obj["status"] = "cancelled"
            return json_reply(200, obj)
        if tail == ("GET", "input_items"):
            return json_reply(200, list_page(self._input_items[obj["id"]]))
        return NOT_FOUND

    def _create_response(self, body: JSONObject) -> Answer:
        response_id = self._new_id("resp_fake")
        message_id = self._new_id("msg_fake")
        model = body["model"]
        prompt = prompt_tokens(body)
        inputs = body.get("input", [])
        if isinstance(inputs, str):
            inputs = [{"type": "message", "role": "user", "content": inputs}]
        self._input_items[response_id] = [
            {"id": self._new_id("msg_in_fake"), "status": "completed", **item} for item in inputs
        ]

        def response(status: str, text: str | None, output_tokens: int) -> JSONObject:
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
                "usage": None if text is None else response_usage(prompt, output_tokens),
                "metadata": body.get("metadata") or {},
            }

        if not body.get("stream"):
            text = f"Hello from fake Azure ({model})"
            return self._responses.add(response("completed", text, count_tokens(text)))

        def events() -> Iterator[bytes | object]:
            return response_events(
                self._settings, message_id=message_id, response=response, on_completed=self._responses.add
            )

        return Stream(events)
