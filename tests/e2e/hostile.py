"""
A hostile client, run as its own process by tests/e2e/test_hostile_e2e.py: C{CONNECTIONS}
connections to a proxy, each sending C{HEAD} and C{BODY} as fast as the proxy takes them, for
C{SECONDS} seconds; then C{BODY} again and again (C{REPEAT=body}: an endless body), or whole
requests again (C{REPEAT=request}).  A connection the proxy closes is opened again.  Prints
one JSON line: the bytes sent, the connections opened, the answers' status lines.

    python hostile.py PORT CONNECTIONS SECONDS HEAD_FILE BODY_FILE REPEAT
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import sys
import time


class Attacker:
    def __init__(self, port: int, head: bytes, body: bytes, repeat: str) -> None:
        self.port = port
        self.head = head
        self.body = body
        self.again = body if repeat == "body" else head + body
        self.selector = selectors.DefaultSelector()
        self.opened = 0
        self.sent = 0
        self.statuses: dict[str, int] = {}
        self._pending: dict[socket.socket, memoryview] = {}

    def open(self) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", self.port))
        self.opened += 1
        self._pending[sock] = memoryview(self.head + self.body)
        self.selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)

    def close(self, sock: socket.socket) -> None:
        self.selector.unregister(sock)
        self._pending.pop(sock, None)
        sock.close()

    def step(self, sock: socket.socket, events: int) -> bool:
        """Send and read what the socket allows; False when it is done (closed)."""
        try:
            if events & selectors.EVENT_READ:
                data = sock.recv(65536)
                if not data:
                    return False
                if data.startswith(b"HTTP/1.1 "):
                    status = data.split(b"\r\n", 1)[0].decode("latin-1")
                    self.statuses[status] = self.statuses.get(status, 0) + 1
            if events & selectors.EVENT_WRITE:
                pending = self._pending[sock]
                count = sock.send(pending[:262144])
                self.sent += count
                pending = pending[count:]
                self._pending[sock] = pending if len(pending) else memoryview(self.again)
        except OSError:
            return False
        return True

    def run(self, connections: int, seconds: float) -> None:
        for _ in range(connections):
            self.open()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for key, events in self.selector.select(timeout=0.1):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                if not self.step(sock, events):
                    self.close(sock)
                    self.open()
        for key in list(self.selector.get_map().values()):
            self.close(key.fileobj)  # type: ignore[arg-type]


def main() -> None:
    port, connections, seconds, head_file, body_file, repeat = sys.argv[1:7]
    os.nice(10)  # the proxy and the test's probes come first
    with open(head_file, "rb") as f:
        head = f.read()
    with open(body_file, "rb") as f:
        body = f.read()
    attacker = Attacker(int(port), head, body, repeat)
    attacker.run(int(connections), float(seconds))
    print(json.dumps({"sent": attacker.sent, "opened": attacker.opened, "statuses": attacker.statuses}))


if __name__ == "__main__":
    main()
