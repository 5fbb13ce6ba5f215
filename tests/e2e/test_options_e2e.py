"""
Options as a user types them: boolean flags on C{twistd -n aoaiproxy}'s real command line.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest_twisted
import treq

from aoaiproxy.testing import FakeAzure

from ..conftest import Daemon

SERVER_KEY = "srv-key-DISTINCTIVE-options-5e1f"


@pytest_twisted.ensureDeferred
async def test_boolean_flags_on_the_command_line(
    fake: FakeAzure, start_daemon: Callable[..., Daemon]
) -> None:
    # The start-up error for --token without client keys recommends --allow-anonymous; it once
    # stopped start-up with "--allow-anonymous: 1 is not true or false".
    daemon = start_daemon(
        "--endpoint", fake.url, "--token", SERVER_KEY, "--allow-anonymous", "--keep-filter-frames"
    )
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    response = await treq.post(daemon.url + "/v1/chat/completions", json=body, persistent=False)
    text = (await response.text()).split("\n\n")
    assert response.code == 200
    # --allow-anonymous: no client key needed, the server key goes upstream.
    assert fake.requests[-1].header("api-key") == SERVER_KEY
    # --keep-filter-frames: Azure's filter-only first frame reaches the client.
    first = json.loads(text[0][len("data: ") :])
    assert first["choices"] == [] and "prompt_filter_results" in first
    assert SERVER_KEY not in daemon.log()
