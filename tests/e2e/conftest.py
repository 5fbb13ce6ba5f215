"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    """The socket systemd would listen on for C{sd_notify} (C{$NOTIFY_SOCKET})."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "notify"))
    s.settimeout(60)  # starting worker processes on a busy machine is slow
    yield s
    s.close()
