"""
Every use aoaiproxy makes of Twisted's private attributes, in one place.

Twisted offers no public way to do what each function below does.  Each says why it is
needed and the Twisted version whose source it was checked against; when Twisted is upgraded,
these are the lines to re-read (the tests that exercise each are named).

Hooks of Twisted classes that aoaiproxy's subclasses override although their names are
private, also checked against Twisted 26.10:

  - L{aoaiproxy.site.ProxyChannel._respondToBadRequestAndDisconnect}: every malformed
    request reaches this one method of C{HTTPChannel}; ours answers a complete 400 in
    OpenAI's shape and lingers, where Twisted's writes a bare status line and closes
    (tests/test_limits.py).

"""

from __future__ import annotations

from socket import SHUT_WR
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.tcp import Connection
from twisted.python.failure import Failure
from twisted.web import resource
from twisted.web.http import HTTPChannel

__all__ = [
    "body_writable",
    "client_gone",
    "close_through",
    "encodes",
    "half_close_through",
    "pending_write_bytes",
    "pipelined_length",
    "request_line",
    "take_pipelined",
    "write_through",
]


def take_pipelined(channel: HTTPChannel) -> bytes:
    """
    Take the bytes C{channel} received after the request it is handling (a client's
    pipelined bytes: for a CONNECT, the first tunnel bytes), which it keeps to parse once
    that request is done.  They are removed from the channel, so they are handed on once.

    Why: C{HTTPChannel.rawDataReceived} keeps them in the private list C{_dataBuffer} until
    C{requestDone}, and nothing public returns them (C{LineReceiver.clearLineBuffer} returns
    only the bytes not yet split into lines, which this does not include).  Checked against
    Twisted 26.10 (C{HTTPChannel._dataBuffer}, C{_finishRequestBody}, C{rawDataReceived}).
    Tested by tests/test_forward.py (pipelined bytes, in the same segment as the CONNECT head
    and after it).
    """
    buffered: list[bytes] = channel._dataBuffer  # type: ignore[attr-defined]
    data = b"".join(buffered)
    buffered.clear()
    return data


def pipelined_length(channel: HTTPChannel) -> int:
    """
    How many bytes C{channel} holds that the client sent after the request it is handling,
    not parsed yet: those it buffers while the request is handled (as L{take_pipelined}
    takes them) and those still in its line buffer (the rest of the segment that carried
    the end of the request, while that request is processed from inside the line parser).

    Why: both buffers are private (C{HTTPChannel._dataBuffer}, C{LineReceiver._buffer}), and
    nothing public tells whether either holds anything.  Checked against Twisted 26.10.  Used
    by L{aoaiproxy.forward} to close the connection of a refused CONNECT that has tunnel
    bytes behind it; tested by tests/test_forward.py
    (C{test_refused_connect_closes_and_serves_no_pipelined_bytes}, its 407 case).  And by
    L{aoaiproxy.site.ProxyChannel.dataReceived}: a request is read at once only when the
    parser holds nothing of it (tests/test_head.py, tests/test_channel.py).
    """
    buffered: list[bytes] = channel._dataBuffer  # type: ignore[attr-defined]
    unsplit: bytes = channel._buffer  # type: ignore[attr-defined]
    return sum(map(len, buffered)) + len(unsplit)


def request_line(channel: HTTPChannel) -> tuple[bytes, bytes] | None:
    """
    The method and request-target of the request whose head C{channel} is reading, once its
    request line was parsed; None before that.

    Why: a request refused before C{requestReceived} (413 on its announced length, 431)
    has no method or URI yet: C{HTTPChannel.lineReceived} keeps them in C{_command} and
    C{_path} until the request is complete.  Checked against Twisted 26.10.  Used by
    L{aoaiproxy.site.ProxyRequest.gotLength} to judge a request from its head before its body
    is read (tests/test_limits.py, C{test_refused_before_the_body_is_read}), and by
    L{aoaiproxy.log} for such a request's access line (tests/test_service.py,
    C{test_access_line_json_and_refused_requests}).
    """
    command = getattr(channel, "_command", None)
    path = getattr(channel, "_path", None)
    if isinstance(command, bytes) and isinstance(path, bytes):
        return command, path
    return None


def pending_write_bytes(transport: Any) -> int:
    """
    Bytes a transport holds that the kernel has not taken yet, through any wrappers (TLS,
    protocol wrappers) down to the socket: a measure for tests of backpressure.

    Why: no interface tells how much a transport buffers.  C{FileDescriptor} keeps
    C{dataBuffer}, C{offset} and the private C{_tempDataLen}; C{TLSMemoryBIOProtocol} the
    private C{_appSendBuffer}; wrappers their inner C{transport}.  Checked against Twisted
    26.10.  Used by L{aoaiproxy.forward.tunnel} (a tunnel still flushing to a slow reader is
    not at rest on a graceful stop) and by tests/test_forward.py (a stalled reader).
    """
    total = 0
    while transport is not None:
        own = getattr(transport, "__dict__", {})
        total += len(own.get("dataBuffer", b"")) - own.get("offset", 0)
        total += own.get("_tempDataLen", 0)
        total += sum(len(b) for b in own.get("_appSendBuffer", ()) or ())
        transport = own.get("transport")
    return total


def write_through(transport: Any, data: bytes) -> None:
    """
    C{transport.write(data)}, but straight to the socket when C{transport} is a plain TCP
    connection with nothing buffered, as its next C{doWrite} would have sent it; what the
    kernel does not take (or any error) goes to C{transport.write}, so ordering, buffering,
    backpressure and error handling stay Twisted's.

    Why: C{FileDescriptor.write} only buffers, and sends on the next reactor iteration after
    registering for writability (and unregisters after): for a relay of 64 KiB chunks that
    is two more epoll changes, a reactor turn and a producer pause and resume every other
    chunk, about a third of the tunnel's CPU per byte.  Whether anything is buffered is
    private (C{FileDescriptor.dataBuffer}, C{offset}, C{_tempDataLen}; the write side closing:
    C{_writeDisconnecting}), and only a C{tcp.Connection} that has not started TLS writes
    what it is given to its socket (C{getHandle()}).  Checked against Twisted 26.10
    (C{FileDescriptor.write}, C{doWrite}, C{loseWriteConnection}, C{tcp.Connection.writeSomeData}).
    Used by L{aoaiproxy.forward.tunnel} (every chunk) and L{aoaiproxy.site.ProxyRequest.establish}
    (the C{200} of a CONNECT); tested by tests/test_write_through.py and tests/test_forward.py
    (the relays, the stalled reader).
    """
    if _writes_at_once(transport):
        try:
            sent = transport.socket.send(data)  # (getHandle() returns it: a call fewer)
        except OSError:  # EAGAIN, or an error that transport.write's doWrite reports
            sent = 0
        if sent == len(data):
            return
        if sent:
            data = data[sent:]
    transport.write(data)


def half_close_through(transport: Any) -> None:
    """
    C{transport.loseWriteConnection()}, but at once (the socket's C{shutdown} of its write
    side) when C{transport} is a plain TCP connection with nothing buffered, as its next
    C{doWrite} would have done, C{writeConnectionLost} of its protocol included; else (TLS,
    bytes still buffered, a test double) Twisted's own, after the buffered bytes.

    Why: C{loseWriteConnection} only registers for writability; the shutdown comes on the
    next reactor turn, after an empty C{send} and two epoll changes: four system calls and a
    turn for every tunnel that half-closes (a CONNECT client that leaves: ~5 % of its CPU).
    Whether anything is buffered is private (as for L{write_through}).  Twisted is not told
    that the write side is closed (its private C{_writeDisconnected}): the caller must write
    nothing more on C{transport}, only close it (C{loseConnection} then closes it as usual).
    Checked against Twisted 26.10 (C{FileDescriptor.loseWriteConnection}, C{doWrite},
    C{tcp.Connection._closeWriteConnection}).  Used by L{aoaiproxy.forward.tunnel} (an end
    passed on to the other side); tested by tests/test_write_through.py and
    tests/test_forward.py (C{test_tunnel_half_close}, both ways).
    """
    if not _writes_at_once(transport):
        transport.loseWriteConnection()
        return
    try:
        transport.socket.shutdown(SHUT_WR)
    except OSError:  # as Twisted's: a connection that is gone reports it when read
        pass
    protocol = transport.protocol
    if IHalfCloseableProtocol.providedBy(protocol):
        protocol.writeConnectionLost()


def close_through(transport: Any) -> None:
    """
    C{transport.loseConnection()}, but at once when C{transport} is a plain TCP connection
    with nothing buffered and no producer registered: its C{connectionLost} (the socket
    closed, then its protocol's C{connectionLost}) is called now, as the next C{doWrite}
    would have called it; else (TLS, bytes still buffered, a producer, a test double)
    Twisted's own, after the buffered bytes.  So the protocol's C{connectionLost} may run
    before this returns.

    Why: C{loseConnection} only registers for writability; the close comes on the next
    reactor turn, after two epoll changes: for a CONNECT whose client leaves at once, four
    system calls and two reactor dispatches (~6 % of its CPU).  Whether anything is
    buffered is private (as for L{write_through}).  What this calls is what
    C{FileDescriptor.loseConnection} itself calls when the write side is already closed
    (C{connectionLost} with C{ConnectionDone}, whose first step is to stop reading and
    writing), and the reason is one shared failure, as the reactor's own for a connection it
    finds closed.
    Checked against Twisted 26.10 (C{FileDescriptor.loseConnection}, C{doWrite},
    C{tcp.Connection.connectionLost}).  Used by L{aoaiproxy.forward.tunnel} (both sides of a
    closing tunnel); tested by tests/test_write_through.py and tests/test_forward.py.
    """
    if _writes_at_once(transport) and transport.producer is None:
        transport.connectionLost(_DONE)  # (it stops reading and writing first)
    else:
        transport.loseConnection()


#: The reason of every connection L{close_through} closes (as the reactor's C{faildict}).
_DONE = Failure(ConnectionDone())


def _writes_at_once(transport: Any) -> bool:
    """
    Whether C{transport} is a plain TCP connection, open, whose write side is not closing,
    with nothing buffered: what it is given next goes to its socket at once.
    """
    return (
        isinstance(transport, Connection)
        and not transport.TLS
        and transport.connected != 0
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not transport._tempDataLen
        and len(transport.dataBuffer) == transport.offset
    )


def encodes(leaf: object) -> bool:
    """
    Whether C{leaf} is a resource that encodes its responses (gzip: C{EncodingResourceWrapper}),
    which C{server.Request.process} asks before rendering it.

    Why: the interface it asks is private (C{twisted.web.resource._IEncodingResource}), and so
    is where the request keeps the encoder.  Checked against Twisted 26.10
    (C{server.Request.process}).  Used by L{aoaiproxy.site.ProxySite.leaf}: a request whose
    root resource encodes is processed by Twisted's own C{process}; tested by
    tests/test_channel.py (C{test_leaf_root_is_processed_like_twisted}).
    """
    return bool(resource._IEncodingResource.providedBy(leaf))


def client_gone(request: Any) -> bool:
    """
    Whether C{request}'s connection was lost (C{Request._disconnected}).

    Why: the public signs do not serve here.  C{request.channel} is None after
    C{connectionLost}, but a finished request has no C{channel} attribute at all (C{_cleanup}
    deletes it); C{notifyFinish()} answers later, with a L{Deferred}, where the relay and the
    resource must know now (and per chunk, L{aoaiproxy.site.ProxyRequest.write}).  Checked
    against Twisted 26.10 (C{Request.connectionLost}, C{Request.write}).  Exercised by
    tests/test_streaming.py and tests/test_reverse.py (clients that leave).
    """
    gone: bool = request._disconnected
    return gone


def body_writable(request: Any) -> bool:
    """
    Whether C{request.write(data)} would frame C{data} as the next piece of a body whose head
    is out and pass it to the channel, and do nothing else: the head was written, the request
    is neither finished nor disconnected, and no encoder (gzip) changes its bytes.  Then
    C{Request.write} adds C{len(data)} to C{sentLength} and writes C{toChunk(data)} (chunked)
    or C{data} to the channel, which L{aoaiproxy.site.ProxyRequest.write} does itself for a
    stream's chunk (five calls fewer per chunk).

    Why: whether the client left (C{_disconnected}) and the encoder (C{_encoder}) are private.
    Checked against Twisted 26.10 (C{http.Request.write}, C{server.Request.write}: a request
    being faked as HEAD never starts writing).  Tested by tests/test_response_write.py.
    """
    return bool(
        request.startedWriting
        and not request.finished
        and not request._disconnected
        and request._encoder is None
    )
