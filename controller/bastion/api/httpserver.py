"""How `bastion serve` runs uvicorn: bounded connections within the descriptor limit, and an
access log without tokens.

uvicorn (0.27 to 0.55 at least) closes a connection only when its keep-alive timer runs out,
and that timer starts after a response: a connection that never sends a byte, or sends its
request head one byte at a time, stays open for ever, and nothing caps how many there are. 1,100
idle connections against the 1,024 descriptors a systemd service gets by default made 300 of
300 normal requests fail for as long as they were held, and the site poller could no longer
open site.yaml. uvicorn's own `limit_concurrency` does not help: it answers 503 to a request
when too many connections are open, so idle connections would turn every real request into a
503 instead of failing it, and it frees no descriptor.

BoundedHttpProtocol, uvicorn's httptools protocol with GRUB's fixes (bastion.api.grubcompat),
adds three bounds:

- head timeout: a connection gets `header_timeout` seconds to deliver a request's whole head,
  counted from when it connected or got its previous answer (uvicorn's keep-alive timeout, 5 s,
  still closes a connection that sends nothing after an answer);
- body timeout: a request's body must arrive within `body_timeout` seconds of its head;
- head size: a request head over MAX_HEAD_BYTES gets 431 and the connection is closed
  (uvicorn's httptools parser keeps every header line it is sent: a 300 MB head was read whole
  and answered, the process at 1.1 GB);
- a connection cap: at most `max_connections` open. A new connection beyond it closes a
  connection that waits on its client: for a request head (an idle or slow one), for the rest
  of a body, or for the client to read an answer it has stopped reading (the transport's
  buffer full) - never one whose request the controller is working on: of the address with the
  most connections open, the one that has waited longest. When that is the new one, or every
  connection is busy, the new one is closed itself. A host that floods the controller with
  connections so recycles only its own: with the longest waiter of any address, a fast enough
  flood (tens of thousands of connections a second here) reached a node's connection in the
  few milliseconds between its connect and its request; and with head-waiters alone, bodies
  that never finish and answers never read held every place, the management listener's too.
  A console WebSocket (bastion.api.consoles) counts as a connection waiting for its head
  until its client has shown the token, and as a busy one after.
- send timeout: an answer whose client reads nothing for `send_timeout` seconds (the
  transport's buffer full all along) is given up and the connection closed.

Each close is counted in bastion_http_connections_closed_total{reason}. The cap fits the
descriptor limit: `serve` raises its soft RLIMIT_NOFILE to the hard limit, keeps RESERVE_FDS
(and two per TFTP transfer with --tftp) for files, SQLite and the device, and allows two
descriptors per connection (a connection that streams an asset holds the file open too).

Every connection starts at BootFront, which answers iPXE's two boot GETs itself (the same
bounds, bytes and log lines) and hands the connection to BoundedHttpProtocol at its first other
request: uvicorn's protocol was a third of the controller's CPU in a storm of new connections.

The access log (uvicorn's, one line per request) prints request lines, and a one-time
Ignition URL's token is in its query: RedactTokens writes `token=(redacted)` instead, as the
event history does.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import re
import resource
import socket
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import STATUS_LINE
from uvicorn.protocols.utils import (
    get_client_addr,
    get_local_addr,
    get_path_with_query_string,
    get_remote_addr,
    is_ssl,
)

from bastion.api.grubcompat import GrubHttpToolsProtocol
from bastion.state.addresses import plain_address

#: Descriptors kept for everything but HTTP connections: stdio, the listening socket, SQLite
#: (database, WAL, shared memory, per thread), site files being read, the device's serial line.
RESERVE_FDS = 64
#: The fewest HTTP connections worth starting with.
MIN_CONNECTIONS = 8
#: uvicorn's own default: how long a connection may sit idle after an answer.
KEEP_ALIVE_S = 5
#: The largest request head taken, request line and headers (nginx's default buffers allow
#: 4 x 8 KiB): a URL of 64 KiB is refused before it (bastion.api.boot), a head this long is not
#: a client's.
MAX_HEAD_BYTES = 65536


class DescriptorLimitError(RuntimeError):
    pass


class ListenerError(RuntimeError):
    pass


@dataclass(frozen=True)
class ConnectionBounds:
    max_connections: int
    header_timeout: float
    body_timeout: float
    send_timeout: float = 60.0


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (what a process may do by itself); the
    soft limit after it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(wanted: int, nofile: int, tftp_transfers: int = 0) -> int:
    """The most HTTP connections that fit `nofile` descriptors (see the module docstring), at
    most `wanted`; DescriptorLimitError when fewer than MIN_CONNECTIONS fit."""
    reserve = RESERVE_FDS + (2 * tftp_transfers + 3 if tftp_transfers else 0)
    fits = (nofile - reserve) // 2
    if fits < MIN_CONNECTIONS:
        raise DescriptorLimitError(
            f"the descriptor limit ({nofile}) leaves room for {max(fits, 0)} HTTP connections; "
            f"at least {MIN_CONNECTIONS} are needed: raise it (ulimit -n, or LimitNOFILE= in the "
            "service unit)"
        )
    return min(wanted, fits)


def bind_listener(address: tuple[str, int], option: str, interface: str | None = None) -> socket.socket:
    """A TCP socket bound to HOST:PORT, as uvicorn binds its own (SO_REUSEADDR), for a server
    with more than one listener (bastion.api.listeners); ListenerError names the option when it
    cannot be bound. `interface`: it takes connections arriving on that interface only
    (SO_BINDTODEVICE, allowed without privileges since Linux 5.7): Linux accepts a connection to
    a local address on any interface (the weak host model), so an address alone does not keep
    another network's hosts out."""
    host, port = address
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise ListenerError(f"{option} {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if interface is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        where = f"{option} {host}:{port}" + (f" on {interface}" if interface else "")
        raise ListenerError(f"{where}: cannot listen: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def peer(transport: Any) -> tuple[str, int] | None:
    """The connection's client as every request's scope names it: uvicorn's get_remote_addr,
    with an IPv4 client of an IPv6 listener as its IPv4 address (plain_address), so that it
    equals a machines.yaml `address:` and a trusted proxy's, and the history names one host one
    way whichever listener it came to."""
    client = get_remote_addr(transport)
    return (plain_address(client[0]), client[1]) if client is not None else None


class BoundedHttpProtocol(GrubHttpToolsProtocol):
    """One HTTP connection, bounded (see the module docstring). `bounds` and `on_close` are set
    on a subclass by bounded_protocol()."""

    bounds: ClassVar[ConnectionBounds]
    on_close: ClassVar[Any] = None  # on_close(reason): counts a connection this class closed
    # fast(scope): the handler that answers this request directly (scope -> Response), or None
    # for the application (bastion.api.boot.fast_app)
    fast: ClassVar[Any] = None

    _timer: asyncio.TimerHandle | None = None
    _waiting_since: float | None = None  # waiting for a request head since (monotonic)
    _head_bytes = 0  # read while waiting for the head
    _body_since: float | None = None  # waiting for the rest of a request body since
    _stalled_since: float | None = None  # the client has read none of the answer since
    _stall_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.client = peer(transport)  # each request's scope takes its client from here
        self._wait_for_head()
        if len(self.connections) > self.bounds.max_connections:
            self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._waiting_since = self._body_since = None
        self._unstall()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stalled_since is None:
            self._stalled_since = time.monotonic()
            self._stall_timer = self.loop.call_later(self.bounds.send_timeout, self._expire_send)

    def resume_writing(self) -> None:
        self._unstall()
        super().resume_writing()

    def _unstall(self) -> None:
        self._stalled_since = None
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _expire_send(self) -> None:
        self._stall_timer = None
        self._close("send-timeout")

    def data_received(self, data: bytes) -> None:
        waiting = self._waiting_since is not None
        super().data_received(data)
        # still no whole head after these bytes (a head that ends in them, and a body after it,
        # is not counted): at most one read's worth past the bound is parsed
        if waiting and self._waiting_since is not None:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse_head()

    def _refuse_head(self) -> None:
        if self.transport.is_closing():
            return
        self._cancel_timer()
        if self.on_close is not None:
            self.on_close("head-too-large")
        body = b"request head over %d bytes\n" % MAX_HEAD_BYTES
        headers = ((b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"%d" % len(body)))
        self.transport.write(response_bytes(431, headers, body, close=True))
        self.transport.close()

    def on_headers_complete(self) -> None:
        self._cancel_timer()
        self._waiting_since = None
        self._body_since = time.monotonic()
        super().on_headers_complete()
        # the body, if any, is due within body_timeout (on_message_complete ends the wait)
        self._timer = self.loop.call_later(self.bounds.body_timeout, self._expire, "body-timeout")

    def on_message_complete(self) -> None:
        self._cancel_timer()
        self._body_since = None
        super().on_message_complete()

    # -- answered past the application (bastion.api.boot.fast_app) -------------------------

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        # uvicorn starts every request's response cycle here, pipelined ones included (one at a
        # time, in order), with its own 503 app when over limit_concurrency: only requests for
        # the application are taken.
        handler = self.fast(cycle.scope) if self.fast is not None and app is self.app else None
        if handler is None:
            super()._start_asgi_task(cycle, app)
            return
        task = self.loop.create_task(self._answer_directly(cycle, handler))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    async def _answer_directly(self, cycle: Any, handler: Any) -> None:
        """What uvicorn's cycle does for an ASGI app's response.start and body, in one write
        (head and body in one segment; uvicorn writes each message as it comes): the default
        headers (date, server), the status line, `connection: close` when the connection
        ends, the access log line, and a 500 when the handler fails."""
        try:
            response = await handler(cycle.scope)
        except Exception as exc:
            cycle.logger.error("Exception in ASGI application\n", exc_info=exc)
            await cycle.send_500_response()
            return
        if cycle.flow.write_paused and not cycle.disconnected:
            await cycle.flow.drain()
        if cycle.disconnected:
            return
        status = response.status_code
        if cycle.access_log:
            cycle.access_logger.info('%s - "%s %s HTTP/%s" %d', get_client_addr(cycle.scope),
                                     "GET", get_path_with_query_string(cycle.scope),
                                     cycle.scope["http_version"], status)  # fmt: skip
        data = response_bytes(status, (*cycle.default_headers, *response.raw_headers),
                              response.body, close=not cycle.keep_alive)  # fmt: skip
        cycle.response_started = cycle.response_complete = True
        cycle.waiting_for_100_continue = False
        cycle.transport.write(data)
        cycle.message_event.set()
        if not cycle.keep_alive:
            cycle.transport.close()
        cycle.on_response()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # uvicorn armed its keep-alive timer: the connection now waits for its next request
        if self.timeout_keep_alive_task is not None:
            self._wait_for_head()

    # -- bounds -------------------------------------------------------------------------------

    def _wait_for_head(self) -> None:
        self._cancel_timer()
        self._waiting_since = time.monotonic()
        self._head_bytes = 0
        self._timer = self.loop.call_later(
            self.bounds.header_timeout, self._expire, "header-timeout"
        )

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, reason: str) -> None:
        self._timer = None
        self._close(reason)

    def _close(self, reason: str) -> None:
        if self.transport.is_closing():
            return
        if self.on_close is not None:
            self.on_close(reason)
        # GRUB's connections end with a reset (grubcompat); every other one closes normally
        self.timeout_keep_alive_handler()

    def _make_room(self) -> None:
        make_room(self, self.bounds.max_connections)

    def handle_websocket_upgrade(self) -> None:
        # uvicorn hands the connection to its WebSocket protocol here: the bounded one, so that
        # a socket that has not shown the token yet can be evicted as a silent connection can
        if self.ws_protocol_class is not None:
            self.ws_protocol_class = bounded_websocket(self.ws_protocol_class, self.on_close)
        super().handle_websocket_upgrade()


#: The ASGI scope extension a WebSocket's application calls once the client has shown the
#: token (bastion.api.consoles): from then on the connection is not evicted to make room.
AUTHENTICATED = "bastion.authenticated"


class _BoundedWebSocket:
    """A mixin over uvicorn's WebSocket protocol (whichever implementation it picked): the
    socket waits on its client, as a connection waiting for a request head does, until its
    application calls scope["extensions"][AUTHENTICATED](). The console's socket is accepted
    before its token arrives (a browser cannot send it in the handshake), and it counts towards
    the connection cap from the upgrade on: without this a host that opened sockets and sent no
    token held places that make_room could not take back, for the token's whole timeout, and
    new boot requests were refused meanwhile."""

    on_close: ClassVar[Any] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._waiting_since: float | None = time.monotonic()
        app = self.app

        async def marked(scope: dict[str, Any], receive: Any, send: Any) -> None:
            scope.setdefault("extensions", {})[AUTHENTICATED] = self.authenticated
            await app(scope, receive, send)

        self.app = marked

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        # as every HTTP connection names its client, so that make_room counts the socket
        # under the same address as that host's other connections
        self.client = peer(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._waiting_since = None
        super().connection_lost(exc)

    def authenticated(self) -> None:
        self._waiting_since = None

    def _close(self, reason: str) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.on_close is not None:
            self.on_close(reason)
        self.transport.close()


@functools.cache
def bounded_websocket(protocol: type[asyncio.Protocol], on_close: Any) -> type[asyncio.Protocol]:
    """uvicorn's WebSocket protocol class `protocol` with _BoundedWebSocket over it (one class
    per pair, made at the first upgrade)."""
    attributes = {"on_close": staticmethod(on_close) if on_close else None}
    return type(f"Bounded{protocol.__name__}", (_BoundedWebSocket, protocol), attributes)


def make_room(new: Any, max_connections: int) -> None:
    """Over the cap: of the connections waiting on their client (`new` too) - for a request
    head, for the rest of a body, or for it to read an answer (its buffer full) - close the one
    whose address has the most connections open, the one that has waited longest among its
    address's, one waiting for a head first: a host that floods the controller recycles its
    own connections, and another host's, however long it takes to send its head, stays. When
    that is the new one, or every other is busy, the new one is closed instead. A connection
    here is either protocol of this module, or a WebSocket (_BoundedWebSocket): its transport,
    client, _waiting_since, _body_since and _stalled_since (None or absent when not waiting so)
    and _close(reason)."""
    open_, per_address, waiting = 0, {}, []
    for c in new.connections:
        if c.transport is None or c.transport.is_closing():
            continue
        open_ += 1
        address = c.client[0] if c.client else None
        per_address[address] = per_address.get(address, 0) + 1
        head = getattr(c, "_waiting_since", None)
        since = head or getattr(c, "_stalled_since", None) or getattr(c, "_body_since", None)
        if since is not None:
            waiting.append((address, since, c, head is not None))
    if open_ <= max_connections:
        return
    victim = new
    if waiting:
        # the most connections first; of an address's, one waiting for a head before one whose
        # body or answer is under way (a node's upload is not given up for its own next
        # connection); then the longest wait. The new one is newest.
        victim = max(waiting, key=lambda w: (per_address[w[0]], w[3], -w[1], w[2] is not new))[2]
    victim._close("refused" if victim is new else "evicted")


class BootFront(asyncio.Protocol):
    """The front of every connection `bastion serve` takes: it answers iPXE's two boot GETs
    (`fast(scope)`, bastion.api.boot.fast_app) itself, and hands the connection to `http` (a
    BoundedHttpProtocol, uvicorn's) at its first request that is anything else, with the
    bytes read so far, as uvicorn hands a connection to its WebSocket protocol.

    In a storm of new connections uvicorn's protocol was about a third of the controller's CPU
    (its parser's callbacks, the request's cycle, timers and flow control, per connection and
    per request): docs/benchmarks-http.md. The front keeps what that protocol does for these
    requests: the same bounds (the head timeout from connecting or from the previous answer,
    uvicorn's keep-alive timeout, the connection cap and whom it evicts, each close counted),
    the answer's bytes (uvicorn's default headers, the status line, the access log line, its
    500 when the handler fails), pipelined requests answered in order, reads paused while the
    transport's buffer is full, and shutdown once the answer in progress is written.

    Only a request it has no doubt about is answered here: `GET <path>[?<query>] HTTP/1.1` in
    RFC 3986's characters (no percent-encoding in the path), header lines of a token, a colon
    and a value without control characters, CRLF line ends, no body (Content-Length 0 at most,
    no Transfer-Encoding), no Expect or Upgrade header, Connection only as `keep-alive` or
    `close`, not GRUB's User-Agent (bastion.api.grubcompat), a head of at most MAX_HEAD bytes,
    not TLS, and one that `fast(scope)` takes. Anything else is uvicorn's to answer, refuse or
    parse."""

    bounds: ClassVar[ConnectionBounds]
    on_close: ClassVar[Any] = None
    fast: ClassVar[Any]
    http: ClassVar[type[BoundedHttpProtocol]]
    MAX_HEAD: ClassVar[int] = 8192
    # up to this many bytes of pipelined requests are read ahead of the answer in progress
    MAX_AHEAD: ClassVar[int] = 65536

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:  # fmt: skip
        self.config = config
        self.server_state = server_state
        self.app_state = app_state
        self.loop = _loop or asyncio.get_event_loop()
        self.connections = server_state.connections
        self.logger = logging.getLogger("uvicorn.error")
        self.access_logger = logging.getLogger("uvicorn.access")
        self.access_log = self.access_logger.hasHandlers()
        self.transport: Any = None
        self.server: tuple[str, int] | None = None
        self.client: tuple[str, int] | None = None
        self._buf = b""
        # One timer for both bounds, moved only when it must fire sooner (a timer set and
        # cancelled per request cost more than the rest of the front): the head is due by
        # _head_by, and after an answer a connection that sends nothing ends at _idle_by
        # (uvicorn's keep-alive); loop time, None when not running.
        self._timer: asyncio.TimerHandle | None = None
        self._head_by: float | None = None
        self._idle_by: float | None = None
        self._waiting_since: float | None = None  # waiting for a request head since (monotonic)
        self._stalled_since: float | None = None  # the client has read none of an answer since
        self._answering: asyncio.Task | None = None
        self._write_paused = False
        self._read_paused = False
        self._closing = False  # shutdown: close once the answer in progress is written
        self._handed = False

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        self.connections.add(self)
        self.transport = transport
        self.server = get_local_addr(transport)
        self.client = peer(transport)
        if is_ssl(transport) or self.config.limit_concurrency is not None:
            self._hand_over()  # uvicorn's scheme and its 503s
            return
        self._wait_for_head(idle=False)
        if len(self.connections) > self.bounds.max_connections:
            make_room(self, self.bounds.max_connections)

    def data_received(self, data: bytes) -> None:
        self._idle_by = None  # a byte ends the keep-alive wait (the head's bound stays)
        self._buf += data
        self._next()

    def eof_received(self) -> bool | None:
        return None  # as uvicorn: the transport closes; an answer in progress is not written

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self._stop_timer()
        if exc is None and self.transport is not None:
            self.transport.close()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._stalled_since = time.monotonic()  # make_room may close it for a new one

    def resume_writing(self) -> None:
        self._write_paused = False
        self._stalled_since = None
        self._next()

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: close now, or once the answer in progress is written."""
        self._closing = True
        if self._answering is None:
            self.transport.close()

    # -- requests ---------------------------------------------------------------------------

    def _next(self) -> None:
        """Answer the next request read, if one is whole and nothing is being answered."""
        if self._answering is not None or self._write_paused or self._handed:
            if len(self._buf) > self.MAX_AHEAD and not self._read_paused and not self._handed:
                self._read_paused = True
                self.transport.pause_reading()
            return
        if self.transport.is_closing():
            return
        if self._read_paused:
            self._read_paused = False
            self.transport.resume_reading()
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > self.MAX_HEAD or buf.count(b"\n") != buf.count(b"\r\n"):
                self._hand_over()  # too long for the front, or bare LFs: uvicorn's parser
            return
        if end > self.MAX_HEAD:
            self._hand_over()
            return
        parsed = self._scope(buf[:end])
        handler = self.fast(parsed[0]) if parsed is not None else None
        if handler is None:
            self._hand_over()
            return
        scope, keep_alive = parsed
        self._buf = buf[end + 4 :]
        self._head_by = self._idle_by = self._waiting_since = None  # (the timer finds nothing due)
        task = self.loop.create_task(self._answer(handler, scope, keep_alive))
        self._answering = task
        self.server_state.tasks.add(task)
        task.add_done_callback(self.server_state.tasks.discard)

    def _scope(self, head: bytes) -> tuple[dict[str, Any], bool] | None:
        """The ASGI scope uvicorn would make of this head, and whether the connection stays
        open after its answer; None when the front leaves it to uvicorn (the docstring)."""
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[0] != b"GET" or parts[2] != b"HTTP/1.1":
            return None
        path, _, query = parts[1].partition(b"?")
        if not _FRONT_PATH.fullmatch(path) or not _FRONT_QUERY.fullmatch(query):
            return None
        headers = []
        keep_alive = True
        for line in lines[1:]:
            m = _FRONT_HEADER.fullmatch(line)
            if m is None:
                return None
            name, value = m.group(1).lower(), m.group(2).rstrip(b" \t")
            if name in _FRONT_REFUSED:
                allowed = _FRONT_REFUSED[name]
                if value.lower() not in allowed:
                    return None
                if name == b"connection" and value.lower() == b"close":
                    keep_alive = False
            elif name == b"user-agent" and value.startswith(b"GRUB"):
                return None
            headers.append((name, value))
        root = self.config.root_path
        scope = {
            "type": "http",
            "asgi": {"version": self.config.asgi_version, "spec_version": "2.3"},
            "http_version": "1.1",
            "server": self.server,
            "client": self.client,
            "scheme": "http",
            "root_path": root,
            "headers": headers,
            "state": self.app_state.copy(),
            "method": "GET",
            "path": root + path.decode("ascii"),
            "raw_path": root.encode("ascii") + path,
            "query_string": query,
        }
        return scope, keep_alive

    async def _answer(self, handler: Any, scope: dict[str, Any], keep_alive: bool) -> None:
        try:
            try:
                response = await handler(scope)
            except Exception as exc:
                self.logger.error("Exception in ASGI application\n", exc_info=exc)
                self._write(response_bytes(500, (*self.server_state.default_headers, *_500_HEADERS),
                                           b"Internal Server Error"), 500, scope)  # fmt: skip
                self.transport.close()
                return
            headers = (*self.server_state.default_headers, *response.raw_headers)
            data = response_bytes(response.status_code, headers, response.body, not keep_alive)
            self._write(data, response.status_code, scope)
        finally:
            self._answering = None
        self.server_state.total_requests += 1
        if self._closing or not keep_alive:
            self.transport.close()
            return
        if self.transport.is_closing():
            return
        # as uvicorn after an answer, the keep-alive wait; and the bound on the next head
        self._wait_for_head(idle=True)
        self._next()

    def _write(self, data: bytes, status: int, scope: dict[str, Any]) -> None:
        if self.transport.is_closing():
            return  # the client has gone (its events are in the history all the same)
        if self.access_log:
            self.access_logger.info('%s - "%s %s HTTP/%s" %d', get_client_addr(scope), "GET",
                                    get_path_with_query_string(scope), "1.1", status)  # fmt: skip
        self.transport.write(data)

    def _hand_over(self) -> None:
        """The connection to uvicorn's protocol (bounded), with what was read of it."""
        self._handed = True
        self._stop_timer()
        self.connections.discard(self)
        protocol = self.http(config=self.config, server_state=self.server_state,
                             app_state=self.app_state, _loop=self.loop)  # fmt: skip
        transport = self.transport
        if self._read_paused:
            transport.resume_reading()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._write_paused:
            protocol.pause_writing()
        if self._buf:
            data, self._buf = self._buf, b""
            protocol.data_received(data)

    # -- bounds -----------------------------------------------------------------------------

    def _wait_for_head(self, idle: bool) -> None:
        now = self.loop.time()
        self._waiting_since = time.monotonic()
        self._head_by = due = now + self.bounds.header_timeout
        if idle:
            self._idle_by = now + self.config.timeout_keep_alive
            due = min(due, self._idle_by)
        timer = self._timer
        if timer is not None:
            if timer.when() <= due:
                return  # it fires first and finds what is due then
            timer.cancel()
        self._timer = self.loop.call_at(due, self._tick)

    def _tick(self) -> None:
        self._timer = None
        now = self.loop.time()
        if self._idle_by is not None and now >= self._idle_by:
            self._stop_timer()
            if not self.transport.is_closing():
                self.transport.close()  # uvicorn's keep-alive timeout: not counted
            return
        if self._head_by is not None and now >= self._head_by:
            self._close("header-timeout")
            return
        due = [t for t in (self._head_by, self._idle_by) if t is not None]
        if due:
            self._timer = self.loop.call_at(min(due), self._tick)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._head_by = self._idle_by = self._waiting_since = None

    def _close(self, reason: str) -> None:
        self._stop_timer()
        if self._handed or self.transport.is_closing():
            return
        if self.on_close is not None:
            self.on_close(reason)
        self.transport.close()


# What the front answers itself (BootFront's docstring): a path and a query in RFC 3986's
# characters (no percent-encoding in the path: uvicorn decodes it), a header line of a token, a
# colon and a value of visible characters, spaces and tabs.
_FRONT_PATH = re.compile(rb"/[A-Za-z0-9._~!$&'()*+,;=:@/-]*")
_FRONT_QUERY = re.compile(rb"[A-Za-z0-9._~!$&'()*+,;=:@/?%-]*")
_FRONT_HEADER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\t\x20-\x7e\x80-\xff]*)")
# headers the front leaves to uvicorn, but for these values (lower case)
_FRONT_REFUSED = {b"content-length": (b"0",), b"transfer-encoding": (), b"expect": (),
                  b"upgrade": (), b"connection": (b"keep-alive", b"close")}  # fmt: skip
# uvicorn's 500 (RequestResponseCycle.send_500_response), after its default headers
_500_HEADERS = ((b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"21"),
                (b"connection", b"close"))  # fmt: skip


def response_bytes(status: int, headers: Any, body: bytes, close: bool = False) -> bytes:
    """An answer as uvicorn writes it: its status line, `name: value` lines (default headers
    first), `connection: close` when the connection ends and it was not among them, the body."""
    head = [STATUS_LINE[status]]
    for name, value in headers:
        head += (name, b": ", value, b"\r\n")
    if close:
        head.append(b"connection: close\r\n")
    head += (b"\r\n", body)
    return b"".join(head)


def bounded_protocol(bounds: ConnectionBounds, on_close: Any = None, fast: Any = None) -> type[asyncio.Protocol]:
    """The protocol for uvicorn's `http=`: BoundedHttpProtocol with these bounds, behind a
    BootFront when `fast(scope)` gives the handlers of requests answered past the application's
    middleware (bastion.api.boot.fast_app); a connection the front hands over still answers
    those past the middleware."""
    attributes = {"bounds": bounds, "on_close": staticmethod(on_close) if on_close else None,
                  "fast": staticmethod(fast) if fast else None}  # fmt: skip
    http = type("BastionHttpProtocol", (BoundedHttpProtocol,), attributes)
    if fast is None:
        return http
    return type("BastionBootFront", (BootFront,), {**attributes, "http": http})


# -- the access log -----------------------------------------------------------------------------

_TOKEN_PARAM = re.compile(r"(?i)((?:^|[?&])token=)[^&\s]*")


def redact_tokens(path: str) -> str:
    """'/ignition?token=abc&mac=x' -> '/ignition?token=(redacted)&mac=x'."""
    return _TOKEN_PARAM.sub(r"\1(redacted)", path)


class RedactTokens(logging.Filter):
    """uvicorn.access records carry (client, method, path with query, HTTP version, status) as
    their args: the path loses its token."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], redact_tokens(args[2]), *args[3:])
        return True


def log_config() -> dict[str, Any]:
    """uvicorn's logging configuration with RedactTokens on its access log."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_tokens"] = {"()": RedactTokens}
    config["handlers"]["access"].setdefault("filters", []).append("redact_tokens")
    return config
