"""Fake Azure OpenAI resources and a fake Entra ID token endpoint on real loopback sockets.

Like ``treq.testing``, this package is part of the public package: the project's tests run the
proxy against it, and ``python -m aoaiproxy.testing`` (or ``aoaiproxy-fake-azure``) lets users
try the proxy without an Azure resource.

  - L{FakeAzure} (L{aoaiproxy.testing.azure}): one Azure OpenAI resource, one per "region" (each
    its own instance, name and port), answering in Azure's shapes with deterministic token
    C{usage} (L{aoaiproxy.testing.usage}: one token per word); every request is recorded in
    L{FakeAzure.requests} as a L{RecordedRequest} (method, path, query, headers with C{Host},
    C{api-key} and C{Authorization}, body, the instance that received it); answers can be
    scripted (L{FakeAzure.respond_next}), replaced by behaviours (429 with given headers, 5xx,
    hang, close: L{Behaviour}, L{FakeAzure.throttle}, L{FakeAzure.fail}, L{FakeAzure.hang},
    L{FakeAzure.close_connections}); streams can be held, slowed down or made big
    (L{aoaiproxy.testing.sse} has their exact shapes).
  - L{FakeManagedIdentity} (L{aoaiproxy.testing.identity}): the managed-identity token endpoint
    azure-identity uses with C{IDENTITY_ENDPOINT} and C{IDENTITY_HEADER}, issuing short-lived
    tokens that a L{FakeAzure} given it requires.

Command line
============

  python -m aoaiproxy.testing [--port PORT]... [--regions NAME=PORT[,NAME=PORT]...]
        [--api-key KEY] [--stream-chunks N] [--stream-interval SECONDS]
        [--behaviour KIND [KEY=VALUE]...]... [--identity-port PORT]
        [--identity-header SECRET] [--token-lifetime SECONDS] [--require-token] [--quiet]

Starts one fake per C{--port} (default 8081; 0 picks a free port) and per C{NAME=PORT} of
C{--regions}, and prints one line per fake, its URL last:

  fake Azure OpenAI listening on http://127.0.0.1:8081        (a single --port)
  fake Azure OpenAI east listening on http://127.0.0.1:8081   (named: --regions, several --port)

then one line per request received (C{east: POST /openai/... (123 bytes)}; not with
C{--quiet}).  Several C{--port}s are named C{fake1}, C{fake2}, ...; a named fake answers with
C{x-ms-region: NAME}.  With C{--identity-port}, a token endpoint runs too and two more lines
give its URL and the environment for azure-identity:

  fake managed identity listening on http://127.0.0.1:8090/msi/token
  IDENTITY_ENDPOINT=http://127.0.0.1:8090/msi/token IDENTITY_HEADER=...

Every fake accepts that endpoint's tokens; C{--require-token} makes them required (or
C{--api-key}).  C{--behaviour} puts a behaviour in force from the start, on every fake or on
C{region=NAME}, for example:

  --behaviour 429 retry-after-ms=1500 count=2 region=east
  --behaviour 503 deployment=gpt-4o
  --behaviour 429 "retry-after=Wed, 21 Oct 2026 07:28:00 GMT"
  --behaviour hang after-bytes=0        (status and headers, then nothing)
  --behaviour close count=1             (reset the connection, answer nothing)

Behaviours: KIND is C{429}, C{500}, C{502}, C{503}, C{504} (any 5xx), C{hang} or C{close}; keys:
C{count} (how many requests; default until cleared), C{deployment} (only requests for it),
C{retry-after-ms}, C{x-ms-retry-after-ms}, C{retry-after} (sent as given: seconds or an HTTP
date), C{retry-after-date} (an HTTP date that many seconds after the answer), C{header=NAME:VALUE}
(more headers), C{after-bytes} (hang and close: after the status, headers and N body bytes).
The first behaviour in force that applies to an authenticated request answers it and counts it
(a request refused with 401 consumes none).

Control endpoint
================

Each fake answers C{/_fake/...} on its own port (JSON; not recorded, no behaviour applies):

  GET    /_fake                     its state: name, request_count, behaviours, settings, ...
  GET    /_fake/requests            {"count": N, "requests": [...]} (body in base64)
  DELETE /_fake/requests            forget them, restart the count
  POST   /_fake/behaviour           {"kind": "429", "retry-after-ms": 1500, "count": 2} or a list
  GET    /_fake/behaviour           those in force, with the counts they have left
  DELETE /_fake/behaviour           end them all (?deployment=NAME: those for NAME)
  POST   /_fake/settings            {"stream-chunks": 5, "stream-interval": 0.1,
                                     "big-stream-bytes": null, "filter-frames": true,
                                     "api-key": null, "require-token": true,
                                     "token-audience": "https://cognitiveservices.azure.com",
                                     "ratelimit-remaining": [99, 9000], "hold": false}
  GET    /_fake/settings            the settings (api-key: whether one is set)

Behaviour objects take the keys above (C{kind}, C{count}, ...; C{"headers": {NAME: VALUE}}).
The token endpoint answers C{/_fake/identity}: C{GET} its state (request_count, issued, valid,
lifetime, fail); C{POST {"lifetime": 10, "fail": 500, "count": 1, "revoke": true}} (C{fail}:
400, 500, another status, "hang", or null).  L{RemoteFake} drives all of it from a test.
"""

from .azure import COGNITIVE_SERVICES, FakeAzure
from .cli import main
from .faults import Behaviour
from .identity import FakeManagedIdentity, IssuedToken
from .records import FormPart, RecordedRequest
from .remote import RemoteFake
from .usage import count_tokens, prompt_tokens

__all__ = [
    "COGNITIVE_SERVICES",
    "Behaviour",
    "FakeAzure",
    "FakeManagedIdentity",
    "FormPart",
    "IssuedToken",
    "RecordedRequest",
    "RemoteFake",
    "count_tokens",
    "main",
    "prompt_tokens",
]
