"""
The upstream HTTP client (L{UpstreamClient}): a lean HTTP/1.1 client on the C{httptools}
parser, with a pool of persistent connections.

  - L{client}: requests, retries, timeouts, the error a client sees;
  - L{pool}: idle connections kept for reuse;
  - L{protocol}: one connection on the wire, and the response it reads.
"""

from aoaiproxy.upstream.client import (
    CACHED_CONNECTION_TIMEOUT,
    MAX_PERSISTENT_PER_HOST,
    MAX_RESPONSE_HEAD_BYTES,
    MAX_RESPONSE_HEADERS,
    Endpoints,
    UpstreamClient,
)

__all__ = [
    "CACHED_CONNECTION_TIMEOUT",
    "MAX_PERSISTENT_PER_HOST",
    "MAX_RESPONSE_HEADERS",
    "MAX_RESPONSE_HEAD_BYTES",
    "Endpoints",
    "UpstreamClient",
]
