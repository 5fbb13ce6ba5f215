"""
The floor of the bench: a bare twisted.web resource that answers every request with the bytes
of a file itself, as fast as twisted.web can (form parsing off, as in the proxy; no access log).

    python bench/floor.py PORT RESPONSE_FILE

It listens on 127.0.0.1:PORT until it is stopped (SIGTERM), and at most an hour.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import reactor  # noqa: E402
from twisted.web import resource, server  # noqa: E402


class Answer(resource.Resource):
    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return self.body


class QuietSite(server.Site):
    def log(self, request: Any) -> None:
        """No access log: the floor is what twisted.web costs with nothing added."""


def main() -> None:
    port, body = int(sys.argv[1]), Path(sys.argv[2]).read_bytes()
    site = QuietSite(Answer(body), parsePOSTFormSubmission=False)
    reactor.listenTCP(port, site, backlog=4096, interface="127.0.0.1")
    reactor.callLater(3600, reactor.stop)
    reactor.run()


if __name__ == "__main__":
    main()
