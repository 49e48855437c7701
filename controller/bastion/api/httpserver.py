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
- a connection cap: at most `max_connections` open. A new connection beyond it closes a
  connection waiting for a request head (an idle or slow one, never one whose request is being
  answered): of the address with the most connections open, the one that has waited longest.
  When that is the new one, or every connection is busy, the new one is closed itself. A host
  that floods the controller with connections so recycles only its own: with the longest
  waiter of any address, a fast enough flood (tens of thousands of connections a second here)
  reached a node's connection in the few milliseconds between its connect and its request.

Each close is counted in bastion_http_connections_closed_total{reason}. The cap fits the
descriptor limit: `serve` raises its soft RLIMIT_NOFILE to the hard limit, keeps RESERVE_FDS
(and two per TFTP transfer with --tftp) for files, SQLite and the device, and allows two
descriptors per connection (a connection that streams an asset holds the file open too).

The access log (uvicorn's, one line per request) prints request lines, and a one-time
Ignition URL's token is in its query: RedactTokens writes `token=(redacted)` instead, as the
event history does.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import re
import resource
import socket
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import STATUS_LINE
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from bastion.api.grubcompat import GrubHttpToolsProtocol

#: Descriptors kept for everything but HTTP connections: stdio, the listening socket, SQLite
#: (database, WAL, shared memory, per thread), site files being read, the device's serial line.
RESERVE_FDS = 64
#: The fewest HTTP connections worth starting with.
MIN_CONNECTIONS = 8
#: uvicorn's own default: how long a connection may sit idle after an answer.
KEEP_ALIVE_S = 5


class DescriptorLimitError(RuntimeError):
    pass


class ListenerError(RuntimeError):
    pass


@dataclass(frozen=True)
class ConnectionBounds:
    max_connections: int
    header_timeout: float
    body_timeout: float


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

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._wait_for_head()
        if len(self.connections) > self.bounds.max_connections:
            self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._waiting_since = None
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        self._cancel_timer()
        self._waiting_since = None
        super().on_headers_complete()
        # the body, if any, is due within body_timeout (on_message_complete ends the wait)
        self._timer = self.loop.call_later(self.bounds.body_timeout, self._expire, "body-timeout")

    def on_message_complete(self) -> None:
        self._cancel_timer()
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
        head = [STATUS_LINE[status]]
        for name, value in (*cycle.default_headers, *response.raw_headers):
            head += (name, b": ", value, b"\r\n")
        if not cycle.keep_alive:
            head.append(b"connection: close\r\n")
        head += (b"\r\n", response.body)
        cycle.response_started = cycle.response_complete = True
        cycle.waiting_for_100_continue = False
        cycle.transport.write(b"".join(head))
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
        """Over the cap: of the connections waiting for a request head (this new one too),
        close the one whose address has the most connections open, the one that has waited
        longest among its address's: a host that floods the controller recycles its own
        connections, and another host's, however long it takes to send its head, stays. When
        that is this new one, or every other is busy, the new one is closed instead."""
        open_, per_address, waiting = 0, {}, []
        for c in self.connections:
            if c.transport.is_closing():
                continue
            open_ += 1
            address = c.client[0] if c.client else None
            per_address[address] = per_address.get(address, 0) + 1
            since = getattr(c, "_waiting_since", None)
            if since is not None:
                waiting.append((address, since, c))
        if open_ <= self.bounds.max_connections:
            return
        victim = self
        if waiting:  # the most connections first, then the longest wait; the new one is newest
            victim = max(waiting, key=lambda w: (per_address[w[0]], -w[1], w[2] is not self))[2]
        victim._close("refused" if victim is self else "evicted")


def bounded_protocol(bounds: ConnectionBounds, on_close: Any = None, fast: Any = None) -> type[BoundedHttpProtocol]:
    """BoundedHttpProtocol with these bounds, for uvicorn's `http=`; `fast(scope)` gives the
    handler for a request answered past the application's middleware (bastion.api.boot.fast_app)."""
    attributes = {"bounds": bounds, "on_close": staticmethod(on_close) if on_close else None,
                  "fast": staticmethod(fast) if fast else None}  # fmt: skip
    return type("BastionHttpProtocol", (BoundedHttpProtocol,), attributes)


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
