"""The controller's TFTP server: the site's `tftp/` directory, read-only, for files too big for
the device (a Raspberry Pi 4's start4.elf and RPI_EFI.fd: megabytes at blksize 1024, where a
real board's SPI Ethernet approaches the Pi's 30 s per-file limit). Started by
`bastion serve --tftp ADDR:PORT`; the device points the Pi bootloader's next-server here
(site.yaml `device.rpi.next_server`, docs/device.md).

Theory of operation
-------------------
This is a CPython shell around the firmware's own TFTP engine, `firmware/tftp.py`: one engine
for the device and the controller, so both refuse, negotiate and transfer alike.

- **A request** on the listening socket (read with a bounded recvfrom, RFC 2347's 512 bytes) is
  parsed by `tftp.parse_request` (a malformed one is counted and gets no reply) and checked by
  `tftp.check`: writes, other modes, names with `..`, absolute names, bad option values, each
  refused with the device's TFTP error and text. On top, the file must resolve (symbolic links
  followed) to a regular file inside the root: a link out of it is refused like `..` (ERROR 2),
  a missing name or a directory is ERROR 1. Refusals go out from the listening socket.
- **A request from the address and port of a running transfer** is that transfer's duplicate
  only while it is at its start: the same datagram, no ACK has moved the transfer, its last
  block not sent (RFC 1350: a client without an answer sends its request again); it is
  dropped, and the transfer's timer resends the answer. Any other ends that transfer
  ("superseded", quietly) and starts a new one: edk2 and the Pi bootloader fetch file after
  file from one port, and when the last ACK of one is lost, its transfer would otherwise
  keep the port for up to max_silence (20 s) and drop every request from it.
- **A transfer** is a `tftp.Transfer` with a socket of its own, bound to the listen address and
  connected to the client (the kernel drops every other sender: RFC 1350's unknown transfer ID
  needs no code). The shell only moves datagrams: a client datagram goes to
  `on_packet(mv, n, now)`, a passed deadline to `on_timeout(now)`; each returns the length of
  the packet it built into the transfer's buffer (0: nothing to send), and after either the
  shell sends `more()` until it returns 0 — the rest of the window (RFC 7440). The engine
  ignores duplicate and stale ACKs (only its timer resends: the Sorcerer's Apprentice fix),
  reads each block from the file when it builds it, and says when the transfer is done.
- **Time** is the engine's: milliseconds from `firmware.compat.ticks_ms` (on CPython the
  monotonic clock), passed as `now` to every call and compared only with `ticks_diff`.
- **The loop** is one thread around one `selectors` selector (epoll on Linux): the listener, a
  wake-up socket for `stop()`, and every transfer's socket. It sleeps until a datagram comes or
  the earliest deadline passes, handles the datagrams, then the timers (an ACK that came in
  time is never resent for). Transfers are swept for passed deadlines only once the earliest
  deadline seen (`_due`) has passed; a new transfer's deadline and one an ACK brings earlier
  lower it (after a backed-off resend the next block waits the base timeout again: a `_due`
  left at the backed-off one made every later loss cost 2 or 4 s instead of 1). Every datagram
  is handled inside one `except Exception` that counts it, so no datagram can stop the server.

Bounds (named, with what happens when they are hit):
- `max_transfers` (64): one more read first ends the transfer whose client has been silent
  longest, if that is over EVICT_AFTER_MS (3 s: result `evicted`, its client gets ERROR 0, as
  on the device), and takes its slot; else it is dropped unanswered (tftp.busy, a `dropped`
  event): its client sends it again after its timeout; an ERROR would end an edk2 boot
  (PXE-E23).
- `max_blksize` (1468, one Ethernet frame; at most 65464, RFC 2348): a larger blksize asked is
  lowered to it in the OACK. A transfer's buffer is 4 + its blksize (at least 4 + 512, room for
  any OACK or ERROR).
- `max_window` (64, RFC 7440 allows 1..65535): a larger windowsize asked is lowered to it. The
  window costs no memory here (blocks are read as they are sent); it bounds the burst a client
  must absorb (Linux's default receive buffer holds 92 datagrams of 1468-byte blocks) and what
  one lost block costs (the window from it is sent again).
- `timeout` (1 s) and `retries` (5): the engine's resend timer, doubling per resend up to 4 s;
  a timeout the client negotiated (RFC 2349) is used as asked, without backoff.

Each transfer is recorded in the event history as kind `tftp`, source `controller`, with the
payloads the device's tftp events carry (stage start / end / refused; file, client, bytes,
result ...), so the timeline and the dashboard show both alike.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import stat
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from firmware import tftp
from firmware.compat import ticks_diff, ticks_ms
from firmware.log import Budget

log = logging.getLogger("bastion.tftpd")

MAX_REQUEST = 512  # RFC 2347: a request, options included, fits in 512 bytes (as the device)
MAX_BLKSIZE = 65464  # RFC 2348: 8..65464; 4 + 65464 fits a UDP datagram over IPv4
ETHERNET_BLKSIZE = 1468  # 1500 (Ethernet MTU) - 20 (IPv4) - 8 (UDP) - 4 (TFTP header)
MAX_WINDOW = 65535  # RFC 7440: 1..65535
DEFAULT_WINDOW = 64
_MIN_BUF = 4 + 512  # a transfer's buffer also holds its OACK and a read error's ERROR
#: Transfers at once by default; each holds a socket and a file (bastion.api.httpserver counts
#: them in the descriptor budget)
MAX_TRANSFERS = 64
MSG_BUSY = b"busy: every transfer slot taken"  # a dropped request's event says so
REFUSAL_EVENTS = 20  # refused or dropped requests recorded a second; the rest counted
EVICT_AFTER_MS = 3000  # a client silent this long gives its slot to a new request (the device's)
MSG_NO_SOCKET = b"out of sockets; try again"

Record = Callable[..., Any]


class _Policy:
    """What tftp.check reads from the device's config."""

    def __init__(self, root: str, max_blksize: int, max_window: int):
        self.tftp_root = root
        self.tftp_max_blksize = max_blksize
        self.tftp_max_window = max_window


class _Served:
    """One running transfer: the engine's Transfer, its connected socket, and what the end
    event says."""

    __slots__ = ("client", "name", "out", "peer", "request", "rx", "sock", "transfer")

    def __init__(self, transfer: tftp.Transfer, sock: socket.socket, peer: tuple[str, int],
                 name: str, request: bytes):
        self.transfer = transfer
        self.sock = sock
        self.peer = peer  # (ip, port) and the request's datagram: what a duplicate repeats
        self.request = request
        self.name = name
        self.client = peer[0]
        self.out = memoryview(transfer.buf)  # every packet is built here
        self.rx = bytearray(4)  # ACK n or ERROR n is all a read server needs of a datagram


class TftpService:
    """A read-only TFTP server for `root` on (host, port), in a thread of its own.

    max_transfers  transfers at once; one more is dropped unanswered (tftp.busy)
    max_blksize    largest block size granted, 8..65464 (default 1468: one Ethernet frame)
    max_window     largest RFC 7440 windowsize granted, 1..65535 (default 64)
    timeout        seconds before an OACK or a window is sent again, doubling per resend up to
                   4x (a client's timeout option is used as asked instead)
    retries        resends of one packet before a transfer is given up (result "timeout")
    record         record(kind, source=..., payload=...): the event history; its failures are
                   counted (tftp.record_failed), never raised
    counters       tftp.request, tftp.malformed, tftp.refused, tftp.busy, tftp.duplicate_request,
                   tftp.bad_packet, tftp.ok, tftp.failed, tftp.resend, tftp.dup_ack,
                   tftp.send_failed (a refusal that could not be sent), tftp.socket_error (the
                   listener's recvfrom failed), tftp.error (a bug caught on one datagram),
                   tftp.record_failed, tftp.superseded (a transfer ended by its client's next
                   request). The names are the tftpy-based server's; none was dropped.
    End results: ok, timeout, client error N, socket error, read error, evicted, superseded
    (its client asked for a file again from the same port), cancelled (stop()), error (a bug
    caught on a timeout).
    """

    def __init__(
        self,
        root: Path | str,
        host: str = "0.0.0.0",
        port: int = 69,
        record: Record | None = None,
        max_transfers: int = MAX_TRANSFERS,
        max_blksize: int = ETHERNET_BLKSIZE,
        max_window: int = DEFAULT_WINDOW,
        timeout: float = 1.0,
        retries: int = 5,
    ):
        if not 8 <= max_blksize <= MAX_BLKSIZE:
            raise ValueError(f"max_blksize {max_blksize}: must be 8..{MAX_BLKSIZE} (RFC 2348)")
        if not 1 <= max_window <= MAX_WINDOW:
            raise ValueError(f"max_window {max_window}: must be 1..{MAX_WINDOW} (RFC 7440)")
        self.root = Path(root)
        self.host = host
        self.port = port
        self.record = record
        self.max_transfers = max_transfers
        self.max_blksize = max_blksize
        self.max_window = max_window
        self.timeout = timeout
        self.retries = retries
        self.counters: dict[str, int] = {}
        self._policy = _Policy(str(self.root), max_blksize, max_window)
        self._timeout_ms = max(1, round(timeout * 1000))
        self._served: dict[socket.socket, _Served] = {}
        self._by_peer: dict[tuple[str, int], _Served] = {}
        self._due = 0  # ticks: no deadline of a running transfer is earlier than this
        # refused/dropped requests' events: REFUSAL_EVENTS a second, the device's token bucket
        # (it counts the rest in tftp.events_suppressed, through self.count)
        self._refusals = Budget(self, "tftp", interval_ms=1000 // REFUSAL_EVENTS, capacity=REFUSAL_EVENTS)
        self._pktinfo = False  # (start) the listener says which address each request came to
        self._sel: selectors.BaseSelector | None = None
        self._sock: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None  # (host, port) once bound

    # --- life -----------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind (an OSError such as EADDRINUSE is raised here, to the caller) and serve in a
        daemon thread."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"TFTP root {self.root}: not a directory")
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((self.host, self.port))
            # On a wildcard address, a transfer's socket must answer from the address the
            # request came to (tftpy drops the rest, and edk2's Mtftp4 filters by it): Linux
            # says which with each datagram (IP_PKTINFO). Elsewhere, the kernel's choice.
            self._pktinfo = self.host in ("", "0.0.0.0") and sys.platform.startswith("linux")
            if self._pktinfo:
                sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.address = sock.getsockname()
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel = selectors.DefaultSelector()
        self._sel.register(sock, selectors.EVENT_READ)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._serve, name="tftp", daemon=True)
        self._thread.start()
        log.info("TFTP: serving %s on %s:%d", self.root, *self.address)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """End every transfer (result "cancelled"), close the sockets, join the thread."""
        self._stopping.set()
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def active(self) -> int:
        return len(self._served)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    # --- the loop -------------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._sel is not None
        try:
            while not self._stopping.is_set():
                self._once()
        finally:
            for s in list(self._served.values()):
                s.transfer.finish("cancelled")
                self._end(s)
            self._sel.close()
            for sock in (self._sock, self._wake_r, self._wake_w):
                if sock is not None:
                    sock.close()

    def _once(self) -> None:
        assert self._sel is not None
        wait = None  # no transfer: sleep until a request or stop()
        if self._served:
            wait = max(0, ticks_diff(self._due, ticks_ms())) / 1000
        for key, _ in self._sel.select(wait):
            served = self._served.get(key.fileobj)  # type: ignore[call-overload]
            try:
                if served is not None:
                    self._on_datagram(served)
                elif key.fileobj is self._sock:
                    self._on_request()
                # else the wake-up socket: the loop's condition sees _stopping
            except Exception:  # one datagram's bug must not take the server down
                self.count("tftp.error")
                log.exception("TFTP: error handling a datagram (dropped)")
        # Timers after datagrams: an ACK that came before its deadline is taken first.
        if self._served:
            now = ticks_ms()
            if ticks_diff(self._due, now) <= 0:
                self._sweep(now)

    def _sweep(self, now: int) -> None:
        """Call on_timeout for every transfer whose deadline has passed; set _due to the
        earliest deadline left."""
        due = now + 60_000
        for s in list(self._served.values()):
            t = s.transfer
            if ticks_diff(t.deadline, now) <= 0:
                try:
                    self._send(s, t.on_timeout(now))
                except Exception:
                    self.count("tftp.error")
                    log.exception("TFTP: error on a timeout")
                    t.finish("error")
                if t.done:
                    self._end(s)
                    continue
            if ticks_diff(t.deadline, due) < 0:
                due = t.deadline
        self._due = due

    # --- requests on the listening socket -------------------------------------------------

    def _on_request(self) -> None:
        assert self._sock is not None
        local = None  # the address the request came to, when the listener is a wildcard
        try:
            if self._pktinfo:
                data, ancillary, _, peer = self._sock.recvmsg(MAX_REQUEST, _PKTINFO_SPACE)
                local = _local_address(ancillary)
            else:
                data, peer = self._sock.recvfrom(MAX_REQUEST)  # longer: cut, then malformed
        except OSError:
            self.count("tftp.socket_error")
            return
        self.count("tftp.request")
        try:
            req = tftp.parse_request(data)
        except tftp.Malformed:
            self.count("tftp.malformed")
            return
        old = self._by_peer.get(peer)
        if old is not None:
            if _sent_again(old, data):
                # The client sent its request again before our first answer reached it: the
                # transfer's timer resends that answer; a second transfer would be a stranger.
                self.count("tftp.duplicate_request")
                return
            # A new request from the port of a running transfer: its client has left that one
            # (edk2 and the Pi bootloader fetch file after file from one port, and the last
            # ACK of a file may be lost). Ended quietly: an ERROR to the port would reach the
            # new transfer's client.
            old.transfer.finish("superseded")
            self.count("tftp.superseded")
            self._end(old)
        try:
            self._start(req, peer, local, data)
        except tftp.Refused as e:
            self._refuse(req, peer, e.code, e.msg)

    def _refuse(self, req: tftp.Request, peer: tuple[str, int], code: int, msg: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.sendto(_error(code, msg), peer)
        except OSError:
            self.count("tftp.send_failed")
        self.count("tftp.refused")
        self._refusal("refused", _text(req.name), peer[0], code=code, reason=_text(msg),
                      name_bytes=len(req.name))  # fmt: skip

    def _open(self, req: tftp.Request) -> tuple[Any, int]:
        root = os.path.realpath(self.root)
        path = os.path.realpath(req.path)
        if not path.startswith(root + os.sep):  # a symbolic link out of the root
            raise tftp.Refused(tftp.E_ACCESS, tftp.MSG_BAD_NAME)
        try:
            # Unbuffered: the engine's readinto fills its buffer straight from the file.
            f = open(path, "rb", buffering=0)  # noqa: SIM115 -- the transfer owns it
        except OSError:
            raise tftp.Refused(tftp.E_NOT_FOUND, tftp.MSG_NOT_FOUND) from None
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            f.close()
            raise tftp.Refused(tftp.E_NOT_FOUND, tftp.MSG_NOT_FOUND)
        return f, st.st_size

    def _start(self, req: tftp.Request, peer: tuple[str, int], local: str | None,
               req_bytes: bytes) -> None:
        assert self._sel is not None and self.address is not None
        tftp.check(req, self._policy)
        if len(self._served) >= self.max_transfers:
            self._give_way()
        if len(self._served) >= self.max_transfers:
            # Dropped, not refused: edk2 takes any TFTP ERROR as final (PXE-E23), and so do
            # curl and tftp-hpa's client; one without an answer sends it again after its
            # timeout, as after a loss (RFC 1350). As the device's firmware does.
            self.count("tftp.busy")
            self._refusal("dropped", _text(req.name), peer[0], code=0, reason=_text(MSG_BUSY),
                          name_bytes=len(req.name))  # fmt: skip
            return
        f, size = self._open(req)
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        except OSError:
            f.close()
            raise tftp.Refused(tftp.E_UNDEFINED, MSG_NO_SOCKET) from None
        try:
            sock.bind((local or self.address[0], 0))  # replies come from the address asked
            sock.connect(peer)
        except OSError:
            sock.close()
            f.close()
            raise tftp.Refused(tftp.E_UNDEFINED, MSG_NO_SOCKET) from None
        t = tftp.Transfer(bytearray(max(_MIN_BUF, 4 + req.blksize)), self._timeout_ms,
                          self.retries)
        try:
            n = t.start(req, f, size, ticks_ms())  # the transfer owns f from here
        except Exception:
            sock.close()
            f.close()
            raise
        s = _Served(t, sock, peer, _text(req.name), req_bytes)
        self._served[sock] = s
        self._by_peer[peer] = s
        self._sel.register(sock, selectors.EVENT_READ)
        if len(self._served) == 1 or ticks_diff(t.deadline, self._due) < 0:
            self._due = t.deadline
        self._send(s, n)
        self._event("start", s.name, s.client, blksize=t.blksize, tsize=size, window=t.window)
        if t.done:
            self._end(s)

    def _give_way(self) -> None:
        """Every slot taken: end the transfer whose client has been silent longest, beyond
        EVICT_AFTER_MS ("evicted"; its client gets ERROR 0), as the device does. 64 requests
        never answered held every slot for max_silence (20 s), and sent again, for ever."""
        now = ticks_ms()
        old, longest = None, EVICT_AFTER_MS
        for s in self._served.values():
            silent = ticks_diff(now, s.transfer.since)
            if not s.transfer.done and silent > longest:
                old, longest = s, silent
        if old is None:
            return
        old.transfer.finish("evicted")
        self.count("tftp.evicted")
        try:
            old.sock.send(_error(tftp.E_UNDEFINED, tftp.MSG_EVICTED))
        except OSError:
            pass  # the client may be gone: nothing to say
        self._end(old)

    # --- a transfer's own socket ----------------------------------------------------------

    def _on_datagram(self, s: _Served) -> None:
        t = s.transfer
        try:
            n = s.sock.recv_into(s.rx)
        except OSError:  # e.g. ECONNREFUSED: the client's port has closed
            # Linux reports that error before the datagrams that came ahead of it, such as a
            # client's last ACK before it exited: take one that is already there, if any.
            try:
                n = s.sock.recv_into(s.rx, 0, socket.MSG_DONTWAIT)
            except OSError:
                n = -1
        if n < 0:
            t.finish("socket error")
        else:
            try:
                n = t.on_packet(s.rx, n, ticks_ms())
            except tftp.Malformed:  # short, or not an ACK or ERROR
                self.count("tftp.bad_packet")
                return
            if ticks_diff(t.deadline, self._due) < 0:  # (before the send: the bound is never late)
                self._due = t.deadline
            self._send(s, n)
        if t.done:
            self._end(s)

    def _send(self, s: _Served, n: int) -> None:
        """Send the packet of length n the engine built, then the rest of its window."""
        out, send, more = s.out, s.sock.send, s.transfer.more
        try:
            while n:
                send(out[:n])
                n = more()
        except OSError:
            s.transfer.finish("socket error")

    def _end(self, s: _Served) -> None:
        assert self._sel is not None
        if self._served.pop(s.sock, None) is None:
            return
        self._by_peer.pop(s.peer, None)
        t = s.transfer
        try:
            self._sel.unregister(s.sock)
        finally:
            s.sock.close()
            t.close()  # closes the file
        result = t.result
        if result == "aborted":
            result = f"client error {t.client_error}"
        self.count("tftp.ok" if result == "ok" else "tftp.failed")
        if t.resends:
            self.count("tftp.resend", t.resends)
        if t.dup_acks:
            self.count("tftp.dup_ack", t.dup_acks)
        self._event(
            "end", s.name, s.client, bytes=t.bytes_acked(), ms=ticks_diff(ticks_ms(), t.started),
            result=result, resends=t.resends, dup_acks=t.dup_acks,
        )

    def _refusal(self, stage: str, name: str, client: str, **fields: Any) -> None:
        """A refused or dropped request's event, at most REFUSAL_EVENTS a second (after a burst
        of as many): a flood of bad requests wrote 6,500 events a second (a commit each), and
        the history's bound then dropped every boot's timeline within seconds. The rest are
        counted (tftp.events_suppressed), said in the log when a run of them begins, and
        their number is the next recorded one's `suppressed`, as on the device."""
        budget = self._refusals
        if budget.take():
            if budget.suppressed:
                fields["suppressed"] = budget.suppressed
                budget.suppressed = 0
            self._event(stage, name, client, **fields)
        elif budget.suppressed == 1:
            log.warning("TFTP: refused or dropped requests beyond %d a second are not recorded, "
                        "only counted (tftp.events_suppressed)", REFUSAL_EVENTS)  # fmt: skip

    def _event(self, stage: str, name: str, client: str, **fields: Any) -> None:
        if self.record is None:
            return
        payload = {"stage": stage, "file": name, "client": client, **fields}
        try:
            self.record("tftp", source="controller", payload=payload)
        except Exception:  # a full disk must not stop the transfers
            self.count("tftp.record_failed")
            log.exception("TFTP: cannot record an event")


# Linux's IP_PKTINFO (in.h; Python's socket module does not name it) and its struct in_pktinfo:
# int ipi_ifindex; struct in_addr ipi_spec_dst (the local address to answer from, for a unicast
# the one it came to); struct in_addr ipi_addr
_IP_PKTINFO = 8
_PKTINFO_SPACE = socket.CMSG_SPACE(12)


def _local_address(ancillary: list[tuple[int, int, bytes]]) -> str | None:
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == _IP_PKTINFO and len(data) >= 12:
            return socket.inet_ntoa(data[4:8])
    return None


def _sent_again(s: _Served, data: bytes) -> bool:
    """Whether a request from the client of transfer s is that transfer's own request sent
    again: the same datagram while the transfer is at its start, no ACK having moved it and
    its last block not sent (the client has no answer yet; RFC 1350 section 2: a client that
    times out retransmits its last packet, before the first reply its request, from its
    port). Once an ACK has moved it, the client has its transfer ID and never asks for it
    again; once its last block is out, the same request from that port is the file asked
    for once more."""
    t = s.transfer
    at_start = t.acked < (0 if t.oack else 1)  # an OACK is block 0 (acked starts at -1)
    last_sent = t.last and t.sent >= t.last
    return data == s.request and at_start and not last_sent


def _error(code: int, msg: bytes) -> bytes:
    """A TFTP ERROR packet (the engine's build_error, into a buffer of its own)."""
    buf = bytearray(5 + len(msg))
    return bytes(buf[: tftp.build_error(buf, code, msg)])


def _text(b: bytes) -> str:
    try:
        return b.decode()
    except UnicodeError:
        return repr(b)
