# The read-only TFTP service: the asyncio shell around firmware/tftp.py.
#
# One listener takes requests on (listen_ip, port) with a bounded recvfrom. Each accepted read
# gets a slot from a pool allocated at start (TransferSlots) and a fresh socket bound to
# (listen_ip, 0) and connected to the client: the kernel then drops datagrams from any other
# address or port, so a stray sender cannot disturb a transfer (RFC 1350's "unknown transfer
# ID" case needs no code). Refusals (writes, bad names, missing files, bad options, no free
# slot) are answered from the listener socket, which every client accepts as the first reply.
#
# A transfer runs as two tasks: a receiver that awaits the client's datagrams and feeds them to
# the Transfer, and a clock that sleeps until the transfer's deadline and calls on_timeout.
# Whichever of them ends the transfer cancels the other; the receiver always cleans up. That
# costs one generator and an I/O-queue entry per datagram (about 290 bytes on the unix port),
# where asyncio.wait_for_ms around each read costs about 1.2 KB (two tasks and a closure).
#
# Reads from a client take only the first 4 bytes of a datagram: on MicroPython a socket's
# readinto fills the whole buffer from as many queued datagrams as it takes, so a larger buffer
# would glue an ACK to the next one. ACK n and ERROR n are all a read server needs to know.
import gc
import os

import asyncio

from firmware import net, tftp
from firmware.compat import const, sleep_ms, ticks_diff, ticks_ms

_MAX_REQUEST = const(512)  # RFC 2347: a request, options included, fits in 512 bytes
_ERROR_BUF = const(96)  # 4 header bytes, the longest message, a NUL
_S_IFMT = const(0o170000)
_S_IFREG = const(0o100000)

_START = ("stage", "file", "client", "blksize", "tsize", "window")
_END = ("stage", "file", "client", "bytes", "ms", "result", "resends", "dup_acks")
_REFUSED = ("stage", "file", "client", "code", "reason")

_MSG_NO_SOCKET = b"out of sockets; try again"
_NO_MEMORY_PAUSE_MS = const(20)
_TRANSFER_RESERVE = const(4096)  # free heap a new transfer needs (bytes; unix port measured)


class _Slot:
    def __init__(self, cfg):
        buf = bytearray(4 + cfg.tftp_max_blksize)
        self.transfer = tftp.Transfer(buf, cfg.tftp_timeout_ms, cfg.tftp_retries)
        self.rx = bytearray(4)  # the first 4 bytes of each client datagram
        self.file = None  # the name and client of the current transfer, for its end event
        self.client = None


class TransferSlots:
    """The transfers that may run at once, allocated when the service starts.

    capacity  cfg.tftp_max_transfers. A read request when all are busy is refused with
              ERROR 0 and the message in TftpServer.busy_msg, and counted as tftp.busy.
    buf_size  bytes of each slot's packet buffer: 4 + cfg.tftp_max_blksize.
    """

    def __init__(self, cfg):
        self.capacity = cfg.tftp_max_transfers
        self.buf_size = 4 + cfg.tftp_max_blksize
        self._free = [_Slot(cfg) for _ in range(self.capacity)]

    def acquire(self):
        return self._free.pop() if self._free else None

    def release(self, slot):
        self._free.append(slot)

    def active(self):
        return self.capacity - len(self._free)


class TftpServer:
    """Serves files under cfg.tftp_root (relative to the flash directory, the working
    directory) on (listen_ip, port), read-only.

    max_request  bytes read of a request datagram (RFC 2347's 512); longer ones are cut and
                 then fail to parse (counted as tftp.malformed, no reply).
    slots        the TransferSlots pool; max_transfers is its capacity.
    Counters: tftp.request, tftp.malformed, tftp.refused, tftp.busy, tftp.bad_packet (on a
    transfer socket), tftp.send_failed, tftp.ok, tftp.failed, tftp.dup_ack, tftp.resend.
    """

    max_request = _MAX_REQUEST

    def __init__(self, cfg, log, listen_ip="0.0.0.0", port=69):
        self.cfg = cfg
        self.log = log
        self.listen_ip = listen_ip
        self.port = port
        self.slots = TransferSlots(cfg)
        self.max_transfers = self.slots.capacity
        self.busy_msg = (
            "busy: %d transfers at once is the limit; try again" % self.max_transfers
        ).encode()
        self._ebuf = bytearray(_ERROR_BUF)
        self.sock = None
        self.stalled_since = None  # ticks of the first of a run of MemoryErrors, or None

    async def run(self):
        self.sock = sock = net.udp_socket(self.listen_ip, self.port)
        while True:
            try:
                data, client = await net.recvfrom(sock, _MAX_REQUEST)
                self.stalled_since = None
                self.request(data, client)
            except MemoryError:
                # The heap is full (transfers, a burst of requests): this request is lost,
                # the client retries it. If it stays full the watchdog sees the listener
                # stalled (stalled_since) and resets the board: a fresh heap, relays kept.
                data = client = None
                self.log.count("tftp.no_memory")
                if self.stalled_since is None:
                    self.stalled_since = ticks_ms()
                gc.collect()
                await sleep_ms(_NO_MEMORY_PAUSE_MS)

    def request(self, data, client):
        """Handle one datagram that reached the listener. Never raises on any input."""
        log = self.log
        log.count("tftp.request")
        try:
            req = tftp.parse_request(data)
        except tftp.Malformed:
            log.count("tftp.malformed")
            return
        try:
            self._start(req, client)
        except tftp.Refused as e:
            n = tftp.build_error(self._ebuf, e.code, e.msg)
            if not net.send(self.sock, self._ebuf, n, client):
                log.count("tftp.send_failed")
            log.count("tftp.refused")
            log.event(
                "tftp",
                _REFUSED,
                ("refused", _text(req.name), _client(client), e.code, _text(e.msg)),
            )

    def _start(self, req, client):
        tftp.check(req, self.cfg)
        if _low_memory():
            self.log.count("tftp.low_memory")
            raise tftp.Refused(tftp.E_UNDEFINED, self.busy_msg)
        f, size = _open(req.path)
        slot = self.slots.acquire()
        if slot is None:
            f.close()
            self.log.count("tftp.busy")
            raise tftp.Refused(tftp.E_UNDEFINED, self.busy_msg)
        try:
            sock = net.udp_socket(self.listen_ip, 0)
        except OSError:
            f.close()
            self.slots.release(slot)
            raise tftp.Refused(tftp.E_UNDEFINED, _MSG_NO_SOCKET)
        try:
            sock.connect(client)
        except OSError:
            sock.close()
            f.close()
            self.slots.release(slot)
            raise tftp.Refused(tftp.E_UNDEFINED, _MSG_NO_SOCKET)
        t = slot.transfer
        slot.file = _text(req.name)
        slot.client = _client(client)
        try:
            n = t.start(req, f, size, ticks_ms())  # the transfer owns f from here
            asyncio.create_task(self._serve(slot, sock))
        except MemoryError:  # give everything back before the listener counts it
            t.f = t.f or f
            t.close()
            sock.close()
            slot.file = slot.client = None
            self.slots.release(slot)
            raise
        self._send(sock, t, n)
        self.log.event(
            "tftp", _START, ("start", slot.file, slot.client, t.blksize, size, t.window)
        )

    def _send(self, sock, t, n):
        while n:
            if not net.send(sock, t.buf, n):
                self.log.count("tftp.send_failed")
            n = t.more()

    async def _serve(self, slot, sock):
        # The receiver: feeds the client's datagrams to the transfer, and cleans up.
        t = slot.transfer
        rx = slot.rx
        clock = asyncio.create_task(self._clock(t, sock, asyncio.current_task()))
        try:
            while not t.done:
                n = await net.readinto(sock, rx)
                try:
                    n = t.on_packet(rx, n, ticks_ms())
                except tftp.Malformed:
                    self.log.count("tftp.bad_packet")
                    continue
                self._send(sock, t, n)
        except asyncio.CancelledError:
            t.finish("cancelled")  # the clock gave up (the result is already set) or shutdown
        except OSError:
            t.finish("socket error")  # e.g. ECONNREFUSED: the client's port has closed
        finally:
            clock.cancel()
            self._end(slot, sock)

    async def _clock(self, t, sock, receiver):
        while not t.done:
            wait = ticks_diff(t.deadline, ticks_ms())
            if wait > 0:
                await sleep_ms(wait)
                continue
            n = t.on_timeout(ticks_ms())
            if t.done:
                receiver.cancel()
                return
            self._send(sock, t, n)

    def _end(self, slot, sock):
        # Whatever the logging does (a full heap), the slot and the file go back.
        try:
            self._report(slot)
        finally:
            sock.close()
            slot.transfer.close()
            slot.file = slot.client = None
            self.slots.release(slot)

    def _report(self, slot):
        t = slot.transfer
        log = self.log
        result = t.result
        if result == "aborted":
            result = "client error %d" % t.client_error
        log.event(
            "tftp",
            _END,
            (
                "end",
                slot.file,
                slot.client,
                t.bytes_acked(),
                ticks_diff(ticks_ms(), t.started),
                result,
                t.resends,
                t.dup_acks,
            ),
        )
        log.count("tftp.ok" if result == "ok" else "tftp.failed")
        if t.dup_acks:
            log.count("tftp.dup_ack", t.dup_acks)
        if t.resends:
            log.count("tftp.resend", t.resends)


def _low_memory():
    # A new transfer needs a socket, two tasks and room for each datagram's generator: refuse
    # it ("busy", the client retries) rather than start what the heap cannot carry.
    free = getattr(gc, "mem_free", None)
    if free is None or free() >= _TRANSFER_RESERVE:
        return False
    gc.collect()
    return free() < _TRANSFER_RESERVE


def _open(path):
    # Regular files only: open() on a directory succeeds on the unix port and fails later.
    try:
        st = os.stat(path)
        if st[0] & _S_IFMT != _S_IFREG:
            raise OSError(2)
        return open(path, "rb"), st[6]
    except OSError:
        raise tftp.Refused(tftp.E_NOT_FOUND, tftp.MSG_NOT_FOUND)


def _text(b):
    # Names passed tftp.check are printable ASCII; a refused one may be anything.
    try:
        return b.decode()
    except UnicodeError:
        return repr(b)


def _client(a):
    return net.ip_str(net.addr_ip4(a))
