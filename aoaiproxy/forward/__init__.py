"""
The forward proxy: C{CONNECT host:port} tunnels and absolute-form requests
(C{GET http://host/path}), for an allowlist of destinations.

L{Forwarder.handle} is called by L{aoaiproxy.site.ProxyRequest.process} for every proxy
request.  In order it checks (steps 1-4 are L{policy.admit}, which the site also asks at the
end of the head of a request with a body, to refuse it before reading the body):

 1. the request-target (a malformed one gets 400);
 2. proxy authentication, when C{forward_users} is set (407 with C{Proxy-Authenticate});
    then, with C{--intercept}, a CONNECT to an intercepted host is answered and served over
    TLS by the API itself, never dialled (L{intercept}, its CA in L{ca});
 3. C{http://api.openai.com/...}: rewritten to origin-form and handed back (C{False}) so the
    reverse API serves it (and azure mode converts it);
 4. the allowlist (403);
 5. the destination's addresses: a name is resolved here, every address is checked (a name
    never reaches a loopback, private, link-local, CGNAT, multicast or metadata address unless
    that address is itself listed as C{ip:port}), and the connection goes to the checked
    address, never to the name again (no DNS rebinding);
 6. connect (502 refused or unreachable, 504 timed out), then tunnel or relay.

Errors are OpenAI-shaped JSON with C{Access-Control-Allow-Origin: *}.

The modules: L{policy} (the decisions, pure), L{dial} (resolve, check, connect; the one
failure classification, L{refusal}), L{tunnel} (the byte relay), L{handlers} (the requests).
Secrets are compared with L{aoaiproxy.compare.equal_to_any}.  A CONNECT costs little: its
head's verdict (but for proxy authentication) is remembered per request-target, one timer
bounds resolving and connecting together (an IP literal is not resolved), the connection is
waited for without a Deferred (L{Dialer.dial}) and its protocol is not wrapped, nothing of
it is left in a reference cycle, a tunnel's idleness is one timer checked against the time
of its last byte (not reset per chunk), and its chunks go to the socket at once when
nothing is buffered (L{aoaiproxy._twisted.write_through}).

A refused C{CONNECT} is answered with C{Connection: close} and its connection closed: what
the client sent behind it is tunnel data, never parsed as HTTP (but for a 407 with nothing
behind it, so that the client may retry with credentials on the same connection).
"""

from aoaiproxy._twisted import pending_write_bytes
from aoaiproxy.forward.dial import Connector, Dialer, Resolver, reactor_resolver, refusal, tcp_connector
from aoaiproxy.forward.handlers import Forwarder
from aoaiproxy.forward.policy import (
    OPENAI_API_HOST,
    AbsoluteTarget,
    Admitted,
    Refused,
    address_blocked,
    admit,
    checked_addresses,
    destination_allowed,
    parse_absolute,
    parse_authority,
    proxy_authorized,
    relayed_request_headers,
)
from aoaiproxy.forward.tunnel import TargetFactory, TargetProtocol, Tunnel

__all__ = [
    "OPENAI_API_HOST",
    "AbsoluteTarget",
    "Admitted",
    "Connector",
    "Dialer",
    "Forwarder",
    "Refused",
    "Resolver",
    "TargetFactory",
    "TargetProtocol",
    "Tunnel",
    "address_blocked",
    "admit",
    "checked_addresses",
    "destination_allowed",
    "parse_absolute",
    "parse_authority",
    "pending_write_bytes",
    "proxy_authorized",
    "reactor_resolver",
    "refusal",
    "relayed_request_headers",
    "tcp_connector",
]
