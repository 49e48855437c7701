"""The controller's TFTP server: the site's `tftp/` directory, read-only, for files too big for
the device (a Raspberry Pi 4's start4.elf and RPI_EFI.fd: megabytes at blksize 1024, where a
real board's SPI Ethernet approaches the Pi's 30 s per-file limit). Started by
`bastion serve --tftp ADDR:PORT`; the device points the Pi bootloader's next-server here
(site.yaml `device.rpi.next_server`, docs/device.md).

Who does what
-------------
- **Requests** go through the firmware's own code: `firmware.tftp.parse_request` (parse or
  raise Malformed) and `firmware.tftp.check` (writes, other modes, names with `..`, absolute
  names, bad option values), so the controller refuses exactly what the device refuses, with
  the same TFTP errors and texts. On top, the file must resolve (symbolic links followed) to a
  regular file inside the root: a link out of it is refused like `..` (ERROR 2), a missing
  name or a directory is ERROR 1.
- **Transfers** are tftpy's: its packet codec, a `TftpContextServer` per transfer and its
  `TftpStateExpectACK` (DATA, ACK, duplicate ACKs ignored). Options per RFC 2347: blksize
  (RFC 2348, 8..65464, lowered to `max_blksize`), tsize and timeout (RFC 2349; a negotiated
  timeout becomes that transfer's retransmission timeout). tftpy 0.8 has no windowsize
  (RFC 7440), so it is left out of the OACK: the client then runs lock-step, as the RFC says.
- **The loop** is ours, not `tftpy.TftpServer.listen`, which serves writes unless told
  otherwise, opens whatever `os.path.exists` (a directory ends the server with
  IsADirectoryError), follows symbolic links out of the root, lets any exception but
  TftpException out of the loop (a 3-byte ACK is a struct.error), handles datagrams from a
  transfer's wrong peer, and can only be stopped at its next select timeout. Here every
  datagram is handled inside one `except Exception` that counts it; each transfer has its own
  socket bound to the listen address and connected to the client (the kernel drops every other
  sender); `stop()` wakes the loop at once.

Each transfer is recorded in the event history as kind `tftp`, source `controller`, with the
payloads the device's tftp events carry (stage start / end / refused; file, client, bytes,
result ...), so the timeline and the dashboard show both alike.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tftpy.TftpContexts import TftpContextServer
from tftpy.TftpPacketFactory import TftpPacketFactory
from tftpy.TftpPacketTypes import TftpPacketACK, TftpPacketDAT, TftpPacketERR
from tftpy.TftpShared import TftpTimeoutExpectACK
from tftpy.TftpStates import TftpState, TftpStateExpectACK

from firmware import tftp as policy

log = logging.getLogger("bastion.tftp")

_MAX_REQUEST = 512  # RFC 2347: a request, options included, fits in 512 bytes (as the device)
_MAX_DATAGRAM = 65536
_O_BLKSIZE, _O_TSIZE, _O_TIMEOUT = 1, 2, 4  # firmware.tftp's OACK bits
MSG_BUSY = b"busy: too many transfers at once; try again"

Record = Callable[..., Any]


class _Checks:
    """What firmware.tftp.check reads from the device's config."""

    def __init__(self, root: str, max_blksize: int):
        self.tftp_root = root
        self.tftp_max_blksize = max_blksize
        self.tftp_max_window = 1  # tftpy sends one block per ACK


class _Transfer:
    """One read transfer: a tftpy server context plus what the events and the timer need."""

    def __init__(self, ctx: TftpContextServer, name: str, client: str, size: int, timeout: float):
        self.ctx = ctx
        self.name = name
        self.client = client
        self.size = size
        self.timeout = timeout
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.tries = 0
        self.resends = 0
        self.dup_acks = 0


class TftpService:
    """A read-only TFTP server for `root` on (host, port), in a thread of its own.

    max_transfers  transfers at once; one more is refused with ERROR 0 "busy" (tftp.busy)
    max_blksize    largest block size granted (default 1468: one Ethernet frame, as the device)
    timeout        seconds before a DATA or OACK is sent again (a client's timeout option wins)
    retries        resends of one packet before a transfer is given up (result "timeout")
    record         record(kind, source=..., payload=...): the event history; its failures are
                   counted (tftp.record_failed), never raised
    counters       tftp.request, tftp.malformed, tftp.refused, tftp.busy, tftp.duplicate_request,
                   tftp.bad_packet, tftp.ok, tftp.failed, tftp.resend, tftp.dup_ack, tftp.error
                   (a bug caught on one datagram), tftp.socket_error, tftp.record_failed
    """

    def __init__(
        self,
        root: Path | str,
        host: str = "0.0.0.0",
        port: int = 69,
        record: Record | None = None,
        max_transfers: int = 64,
        max_blksize: int = 1468,
        timeout: float = 1.0,
        retries: int = 5,
    ):
        self.root = Path(root)
        self.host = host
        self.port = port
        self.record = record
        self.max_transfers = max_transfers
        self.timeout = timeout
        self.retries = retries
        self.counters: dict[str, int] = {}
        self._checks = _Checks(str(self.root), max_blksize)
        self._factory = TftpPacketFactory()
        self._transfers: dict[socket.socket, _Transfer] = {}
        self._by_client: dict[tuple[str, int], _Transfer] = {}
        self._sock: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None  # (host, port) once bound
        quiet = logging.getLogger("tftpy")
        if quiet.level == logging.NOTSET:  # tftpy logs every packet at INFO; keep its errors
            quiet.setLevel(logging.ERROR)

    # --- life -----------------------------------------------------------------------------

    def start(self) -> TftpService:
        """Bind (an OSError such as EADDRINUSE is raised here, to the caller) and serve in a
        daemon thread."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"TFTP root {self.root}: not a directory")
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.address = sock.getsockname()
        self._wake_r, self._wake_w = socket.socketpair()
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

    def __enter__(self) -> TftpService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def active(self) -> int:
        return len(self._transfers)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    # --- the loop -------------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._sock is not None and self._wake_r is not None
        try:
            while not self._stopping.is_set():
                self._once()
        finally:
            for t in list(self._transfers.values()):
                self._end(t, "cancelled")
            for s in (self._sock, self._wake_r, self._wake_w):
                if s is not None:
                    s.close()

    def _once(self) -> None:
        now = time.monotonic()
        wait = 1.0
        for t in self._transfers.values():
            wait = min(wait, max(0.0, t.deadline - now))
        readable, _, _ = select.select(
            [self._sock, self._wake_r, *self._transfers], [], [], wait
        )
        for sock in readable:
            if sock is self._wake_r:
                continue
            try:
                if sock is self._sock:
                    self._on_request()
                else:
                    t = self._transfers.get(sock)
                    if t is not None:
                        self._on_packet(t)
            except Exception:  # one datagram's bug must not take the server down
                self.count("tftp.error")
                log.exception("TFTP: error handling a datagram (dropped)")
        now = time.monotonic()
        for t in list(self._transfers.values()):
            if now >= t.deadline:
                try:
                    self._on_timeout(t, now)
                except Exception:
                    self.count("tftp.error")
                    log.exception("TFTP: error on a timeout")
                    self._end(t, "error")

    # --- requests on the listening socket -------------------------------------------------

    def _on_request(self) -> None:
        assert self._sock is not None
        try:
            data, client = self._sock.recvfrom(_MAX_DATAGRAM)
        except OSError:
            self.count("tftp.socket_error")
            return
        self.count("tftp.request")
        try:
            req = policy.parse_request(data[:_MAX_REQUEST])
        except policy.Malformed:
            self.count("tftp.malformed")
            return
        if client in self._by_client:
            # The client sent its request again before our first answer reached it: the
            # transfer's timer resends that answer; a second transfer would be a stranger.
            self.count("tftp.duplicate_request")
            return
        try:
            self._start(req, client)
        except policy.Refused as e:
            self._refuse(req, client, e.code, e.msg)

    def _refuse(self, req: policy.Request, client: tuple[str, int], code: int, msg: bytes) -> None:
        assert self._sock is not None
        buf = bytearray(5 + len(msg))
        n = policy.build_error(buf, code, msg)
        try:
            self._sock.sendto(buf[:n], client)
        except OSError:
            self.count("tftp.send_failed")
        self.count("tftp.refused")
        self._event("refused", _text(req.name), client[0], code=code, reason=_text(msg),
                    name_bytes=len(req.name))

    def _open(self, req: policy.Request) -> tuple[Any, int]:
        root = os.path.realpath(self.root)
        path = os.path.realpath(req.path)
        if not path.startswith(root + os.sep):  # a symbolic link out of the root
            raise policy.Refused(policy.E_ACCESS, policy.MSG_BAD_NAME)
        try:
            f = open(path, "rb")  # noqa: SIM115 -- the transfer owns it until _end
        except OSError:
            raise policy.Refused(policy.E_NOT_FOUND, policy.MSG_NOT_FOUND) from None
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            f.close()
            raise policy.Refused(policy.E_NOT_FOUND, policy.MSG_NOT_FOUND)
        return f, st.st_size

    def _start(self, req: policy.Request, client: tuple[str, int]) -> None:
        policy.check(req, self._checks)
        if len(self._transfers) >= self.max_transfers:
            self.count("tftp.busy")
            raise policy.Refused(policy.E_UNDEFINED, MSG_BUSY)
        f, size = self._open(req)
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((self.address[0], 0))  # replies come from the address asked
            sock.connect(client)
        except OSError:
            f.close()
            raise policy.Refused(policy.E_UNDEFINED, b"out of sockets; try again") from None
        timeout = float(req.timeout) if req.timeout else self.timeout
        ctx = TftpContextServer(client[0], client[1], timeout, str(self.root),
                                retries=self.retries, flock=False)
        ctx.sock.close()  # tftpy's own socket is unbound; ours is bound and connected
        ctx.sock = sock
        ctx.tidport = client[1]
        ctx.fileobj = f
        ctx.file_to_transfer = _text(req.name)
        ctx.metrics.start_time = time.time()
        options: dict[str, Any] = {}
        if req.oack & _O_BLKSIZE:
            options["blksize"] = req.blksize
        if req.oack & _O_TSIZE:
            options["tsize"] = str(size)
        if req.oack & _O_TIMEOUT:
            options["timeout"] = str(req.timeout)
        ctx.options = options or {"blksize": 512}
        t = _Transfer(ctx, _text(req.name), client[0], size, timeout)
        self._transfers[sock] = t
        self._by_client[client] = t
        self._event("start", t.name, t.client, blksize=ctx.getBlocksize(), tsize=size, window=1)
        try:
            first = TftpState(ctx)
            if options:
                first.sendOACK()  # next_block stays 0: the client's ACK 0 answers it
            else:
                ctx.next_block = 1
                ctx.pending_complete = first.sendDAT()
        except OSError:
            self._end(t, "socket error")
            return
        ctx.state = TftpStateExpectACK(ctx)

    # --- a transfer's own socket ----------------------------------------------------------

    def _on_packet(self, t: _Transfer) -> None:
        ctx = t.ctx
        try:
            data = ctx.sock.recv(_MAX_DATAGRAM)
        except OSError:  # e.g. ECONNREFUSED: the client's port has closed
            self._end(t, "socket error")
            return
        try:
            pkt = self._factory.parse(data)
        except Exception:  # tftpy raises TftpException, struct.error, UnicodeError ...
            self.count("tftp.bad_packet")
            return
        if isinstance(pkt, TftpPacketERR):
            self._end(t, f"client error {pkt.errorcode}")
            return
        if not isinstance(pkt, TftpPacketACK):
            self.count("tftp.bad_packet")
            return
        if pkt.blocknumber != ctx.next_block:
            t.dup_acks += 1  # duplicate or stale: tftpy sends nothing (Sorcerer's Apprentice)
        sent = ctx.last_pkt
        try:
            ctx.state = ctx.state.handle(pkt, t.client, ctx.tidport)
        except TftpTimeoutExpectACK:
            return  # a duplicate ACK after the timeout: our timer does the resend
        except OSError:
            self._end(t, "socket error")
            return
        except Exception as e:  # tftpy's TftpException (too many duplicates ...)
            log.info("TFTP: %s from %s: %s", t.name, t.client, e)
            self._end(t, "error")
            return
        if ctx.state is None:
            self._end(t, "ok")
        elif ctx.last_pkt is not sent:  # progress: a new block went out
            t.tries = 0
            t.deadline = time.monotonic() + t.timeout

    def _on_timeout(self, t: _Transfer, now: float) -> None:
        t.tries += 1
        if t.tries > self.retries:
            self._end(t, "timeout")
            return
        t.resends += 1
        t.deadline = now + t.timeout
        try:
            t.ctx.state.resendLast()
        except OSError:
            self._end(t, "socket error")

    def _acked_bytes(self, t: _Transfer, result: str) -> int:
        if result == "ok":
            return t.size
        ctx = t.ctx
        try:
            pos = ctx.fileobj.tell()
        except (OSError, ValueError):
            return 0
        last = ctx.last_pkt
        return max(0, pos - len(last.data)) if isinstance(last, TftpPacketDAT) else 0

    def _end(self, t: _Transfer, result: str) -> None:
        ctx = t.ctx
        if self._transfers.pop(ctx.sock, None) is None:
            return
        self._by_client.pop((t.client, ctx.tidport), None)
        nbytes = self._acked_bytes(t, result)
        try:
            ctx.end()  # closes the socket and the file
        except Exception:
            self.count("tftp.error")
        self.count("tftp.ok" if result == "ok" else "tftp.failed")
        if t.resends:
            self.count("tftp.resend", t.resends)
        if t.dup_acks:
            self.count("tftp.dup_ack", t.dup_acks)
        self._event(
            "end", t.name, t.client, bytes=nbytes, ms=int((time.monotonic() - t.started) * 1000),
            result=result, resends=t.resends, dup_acks=t.dup_acks,
        )

    def _event(self, stage: str, name: str, client: str, **fields: Any) -> None:
        if self.record is None:
            return
        payload = {"stage": stage, "file": name, "client": client, **fields}
        try:
            self.record("tftp", source="controller", payload=payload)
        except Exception:  # a full disk must not stop the transfers
            self.count("tftp.record_failed")
            log.exception("TFTP: cannot record an event")


def _text(b: bytes) -> str:
    try:
        return b.decode()
    except UnicodeError:
        return repr(b)
