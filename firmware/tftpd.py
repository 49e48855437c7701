# The read-only TFTP service: the asyncio shell around firmware/tftp.py.
#
# One listener takes requests on (listen_ip, port) with a bounded recvfrom. Each accepted read
# gets a slot from a pool allocated at start (TransferSlots) and a fresh socket bound to
# (listen_ip, 0) and connected to the client: the kernel then drops datagrams from any other
# address or port, so a stray sender cannot disturb a transfer (RFC 1350's "unknown transfer
# ID" case needs no code). Refusals (writes, bad names, missing files, bad options, no free
# slot) are answered from the listener socket, which every client accepts as the first reply.
#
# A transfer runs as one task, a receiver that awaits the client's datagrams and feeds them to
# the Transfer. One clock task for the whole service sleeps until the earliest deadline of the
# running transfers and calls their on_timeout; when a transfer gives up there, it cancels the
# receiver, which always cleans up. That costs net.readable's tuple iterator per datagram (its
# socket stays in asyncio's I/O queue between waits, net.py: 32 bytes allocated per block on
# the unix port, 128 when each wait made a new entry), where asyncio.wait_for_ms around each
# read costs about 1.2 KB (two tasks and a closure). A clock per transfer (a task and its
# generator) held about 190 B of heap per transfer more; the shared one holds nothing per
# transfer. A datagram that is already there when the receiver would wait (the client answered
# while the window went out and the next block was read ahead: on a board, a flash read) is read
# at once, without the loop's turn, up to _BURST in a row before the other tasks get theirs.
#
# Reads from a client take only the first 4 bytes of a datagram: on MicroPython a socket's
# readinto fills the whole buffer from as many queued datagrams as it takes, so a larger buffer
# would glue an ACK to the next one. ACK n and ERROR n are all a read server needs to know.
#
# Under a flood of requests (docs/device.md, "Hostile hosts"): a refusal is built in one
# preallocated buffer; its event keeps at most _NAME_MAX bytes of the name, as bytes (made
# safe text only when read), and refusal events pass a Budget (the rest are counted). A request
# that finds every slot busy ends the transfer whose client has been silent longest, if that
# is more than TransferSlots.evict_after_ms, and takes its slot.
#
# A request that still finds no slot (or no heap for a transfer, or the heap in pieces: a
# MemoryError while its transfer started) waits: up to as many as there
# are slots are kept as they came (the datagram's bytes, at most _SMALL_READ of them, and the
# client's address: `queued`) and started, oldest first, as transfers end, so that their
# clients are served then rather than after their own retransmission timeout (curl's and
# edk2's are seconds: with heap for two transfers, four clients got a sixth of tftp-hpa's
# throughput, docs/benchmarks.md). A client asking again replaces its own; one that waited
# longer than _QUEUED_MS is let go. Any other is dropped, counted, and not answered. Refusing
# it with an ERROR would end the boot: edk2 takes any TFTP ERROR as final (PXE-E23), and so do
# curl and tftp-hpa's client. A request without an answer is one lost on the wire, and RFC
# 1350's clients time out and send it again. Before either, the listener yields a few times: a
# slot is often held only by a transfer whose final ACK waits in its socket (the client asked
# again at once), and its receiver frees it.
import gc
import os

import asyncio

from firmware import net, tftp
from firmware.frame import crc32
from firmware.compat import const, sleep_ms, ticks_diff, ticks_ms
from firmware.log import Budget

_MAX_REQUEST = const(512)  # RFC 2347: a request, options included, fits in 512 bytes
_ERROR_BUF = const(96)  # 4 header bytes, the longest message, a NUL
_SMALL_READ = const(128)  # the read after a MemoryError (edk2, iPXE, the Pi ask in < 80)
_S_IFMT = const(0o170000)
_S_IFREG = const(0o100000)

_START = ("stage", "file", "client", "blksize", "tsize", "window")
_END = ("stage", "file", "client", "bytes", "ms", "result", "resends", "dup_acks")
# file: at most _NAME_MAX bytes of the name asked for (safe text); name_bytes: its length
_REFUSED = ("stage", "file", "client", "code", "reason", "name_bytes")

_S_IFLNK = const(0o120000)
# Why a request was dropped unanswered (its event's reason; no ERROR goes out)
_NO_SLOT = b"busy: every transfer slot taken"
_NO_HEAP = b"busy: no heap for a transfer"
_NAME_MAX = const(48)  # bytes of a requested name its event keeps (the length is given too)
_QUEUED_MS = const(2000)  # how long a request that waits for a slot is kept
_DEQUEUE_MS = const(50)  # how often waiting requests are tried when no transfer runs

_NO_MEMORY_PAUSE_MS = const(1)  # a yield, not a stall: the next read is a small one
_SMALL_MS = const(2000)  # how long reads stay small after a MemoryError
# Free heap (bytes, unix port measured) below which no transfer starts: a running one holds
# about 1 KB (tests/firmware/mpy/test_tftpd_heap.py), more while it starts, and what is left
# keeps proxyDHCP and the console answering: answering PXE comes first.
_TRANSFER_RESERVE = const(6144)
_CLOCK_MS = const(1000)  # the clock's longest sleep, unless tftp.timeout_ms is shorter
# Datagrams a transfer's receiver reads in a row, when each is there before it would wait, before
# it lets the loop's other tasks run (proxyDHCP, the console, the watchdog, other transfers).
_BURST = const(8)


class _NoSocket(Exception):
    pass


class _Slot:
    def __init__(self, cfg):
        buf = bytearray(4 + cfg.tftp_max_blksize)
        self.transfer = tftp.Transfer(buf, cfg.tftp_timeout_ms, cfg.tftp_retries)
        self.rx = bytearray(4)  # the first 4 bytes of each client datagram
        self.file = None  # the name (at most _NAME_MAX bytes) and client address of the
        self.client = None  # current transfer, for its end event
        self.sock = None  # its socket and receiver task while it runs
        self.task = None
        # The request's CRC-32 (30 bits of it: a small int, no heap held) and the client's port
        # (its address is in `client`): the same request again is not a new transfer
        # (_asked_again). -1 while no transfer runs.
        self.asked = -1
        self.port = 0


class TransferSlots:
    """The transfers that may run at once, allocated when the service starts.

    capacity  cfg.tftp_max_transfers. A read request when all are busy ends the transfer
              whose client has been silent longest, if that is over evict_after_ms (the
              client gets ERROR 0, the end event says "evicted", tftp.evicted counts it), and
              takes its slot; else, once the running transfers have had their turn, it is
              dropped without a reply (tftp.busy): its client sends it again (RFC 1350) and
              is served when a slot is free, where an ERROR would end an edk2 boot.
    evict_after_ms  how long a client must have sent nothing that moves its transfer forward
              before the transfer gives way to a new request: longer than a client on a LAN
              takes to answer, much shorter than tftp.Transfer.max_silence_ms, the bound on
              how long a silent client holds a slot when nobody else asks.
    buf_size  bytes of each slot's packet buffer: 4 + cfg.tftp_max_blksize.
    """

    evict_after_ms = 3000

    def __init__(self, cfg):
        self.capacity = cfg.tftp_max_transfers
        self.buf_size = 4 + cfg.tftp_max_blksize
        self.slots = tuple(_Slot(cfg) for _ in range(self.capacity))  # all of them
        self._free = list(self.slots)

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
    events       the Budget for refusal events (a flood of bad requests is answered and
                 counted; a few refusals a second are events).
    Counters: tftp.request, tftp.malformed, tftp.refused, tftp.dup_request (a running
    transfer's own request again, before its last block went out: not answered, the transfer
    answers it), tftp.no_socket (no socket for a transfer: the request waits or is dropped as
    busy), tftp.queued (requests that waited
    for a slot), tftp.busy and tftp.low_memory (requests dropped unanswered: no slot, no heap;
    busy also for a queued one let go after _QUEUED_MS), tftp.evicted, tftp.bad_packet (on a
    transfer socket), tftp.send_failed, tftp.ok, tftp.failed, tftp.dup_ack, tftp.resend,
    tftp.events_suppressed.
    """

    max_request = _MAX_REQUEST

    def __init__(self, cfg, log, listen_ip="0.0.0.0", port=69):
        self.cfg = cfg
        self.log = log
        self.listen_ip = listen_ip
        self.port = port
        self.slots = TransferSlots(cfg)
        self.max_transfers = self.slots.capacity
        self._ebuf = bytearray(_ERROR_BUF)
        self.events = Budget(log, "tftp")
        log.pressure.append(self.give_way)
        self.sock = None
        self.stalled_since = None  # ticks: stalled by the heap since then (net.waitless)
        self.queued = []  # requests that wait for a slot, oldest first: (datagram, client, ticks)
        self.task = None  # the _dequeue task, while one runs

    async def run(self):
        self.sock = sock = net.udp_socket(self.listen_ip, self.port)
        clock = asyncio.create_task(self._clock())
        unwaited = None  # the first wait that could not start since the last wake-up
        small = None  # ticks of the last MemoryError: reads stay small for _SMALL_MS after it
        try:
            while True:
                n = _MAX_REQUEST
                if small is not None:
                    if ticks_diff(ticks_ms(), small) < _SMALL_MS:
                        n = _SMALL_READ
                    else:
                        small = None
                try:
                    got = await net.recvfrom(sock, n)
                except MemoryError:  # before the wait: nothing is known to be waiting
                    got = None
                    unwaited = net.waitless(self, unwaited, ticks_ms())
                else:
                    unwaited = None
                    if got is None and self.stalled_since is None:  # woken; no heap to take it
                        self.stalled_since = ticks_ms()
                if got is not None:
                    self.stalled_since = None
                    data, client = got
                    got = None
                    try:
                        self.log.count("tftp.request")
                        if n != _MAX_REQUEST and len(data) >= n:  # maybe cut short: not trusted
                            self.log.count("tftp.truncated")
                            continue
                        if self.request(data, client):
                            # No slot yet: a transfer told to give way, or one whose last ACK
                            # waits in its socket, ends (and frees its slot) when its task runs;
                            # then the request once more, dropped if it still finds none.
                            for _ in range(4):
                                await sleep_ms(0)
                                if self.slots.active() < self.slots.capacity:
                                    break
                            self.request(data, client, True)  # started, queued or dropped
                        data = client = None
                        continue
                    except MemoryError:  # the request, read, is lost: the listener waits on
                        data = client = None
                # The heap is full or in pieces (transfers, a burst of requests): this request
                # is lost, the client retries it. For a while reads ask for less: a boot ROM's
                # request fits in _SMALL_READ bytes and needs no 512-byte run of heap. Already
                # reported events are shed. A datagram left waiting, or waits that keep failing,
                # make the listener stalled (net.waitless): the watchdog resets the board, a
                # fresh heap, relays kept.
                small = ticks_ms()
                self.log.count("tftp.no_memory")
                self.log.shed()
                gc.collect()
                await sleep_ms(_NO_MEMORY_PAUSE_MS)
        finally:
            clock.cancel()

    def request(self, data, client, last=False, since=None):
        """Handle one datagram that reached the listener. Never raises on any input but
        MemoryError. True when it found no slot (or no heap) and the transfers should run
        first (a silent one was told to give way, or one may be ending): then call again,
        with last=True, when they have; that call queues it (or drops it) if there is still
        none. since: when a queued request first came (ticks)."""
        log = self.log
        if self._asked_again(data, client):
            log.count("tftp.dup_request")
            return False
        try:
            req = tftp.parse_request(data)
        except tftp.Malformed:
            log.count("tftp.malformed")
            return False
        try:
            return self._start(req, client, last, data, since)
        except MemoryError:
            # No run of heap long enough for the transfer's task or socket: the free bytes
            # were enough (_low_memory) but in pieces. Nothing of it started (_start gave all
            # back); it waits like a request that found no slot, and is tried again as
            # transfers end and their heap comes back, where lost it would cost its client a
            # retransmission timeout (seconds). Lost, as before, when it cannot wait.
            if not self.hold(data, client, since):
                raise
        except _NoSocket:
            # Every socket the network stack has is taken (a board's lwIP has a few): the request
            # waits like one that found no slot, started as a transfer ends and gives its socket
            # back, or is dropped. Not refused: edk2 takes any ERROR as final (PXE-E23), and
            # "out of sockets" ended a boot on the emulated board.
            log.count("tftp.no_socket")
            if not self.hold(data, client, since):
                log.count("tftp.busy")
        except tftp.Refused as e:
            n = tftp.build_error(self._ebuf, e.code, e.msg)
            net.send(self.sock, self._ebuf, n, client, log, "tftp")
            log.count("tftp.refused")
            if self.events.take():
                name = req.name
                self.events.event(
                    "tftp",
                    _REFUSED,
                    ("refused", name[:_NAME_MAX], _client(client), e.code, e.msg, len(name)),
                )
        return False

    def _asked_again(self, data, client):
        # The very request of a running transfer, from its client's port, before the transfer
        # has sent the file's last block: the client asked again because an answer was slow or
        # lost (edk2 asks again after a second or two; on the emulated board its request crossed
        # our OACK, so even a transfer whose OACK has been acknowledged can get it). It is not a
        # new transfer: a second one needs a second socket and slot for the same client, which
        # takes packets only from the first TID it hears. The transfer's own resends cover lost
        # packets. Once the last block has gone out, the same request from the same port asks
        # for the file again (edk2 and the Pi's bootloader do, from one port, when a transfer's
        # last ACK was lost): a new transfer, and the old one times out.
        # "The very request" is told by 30 bits of its CRC-32, not its bytes (about 90 B per
        # transfer held on the unix port): another request from that port with the same bits
        # (one in a billion) is dropped like a lost one while the first transfer runs.
        h = -1
        for s in self.slots.slots:
            t = s.transfer
            if s.asked < 0 or t.done or t.last_sent():
                continue
            if h < 0:
                h = crc32(data) & 0x3FFFFFFF
            if s.asked == h and s.port == net.addr_port(client) and s.client == _client(client):
                return True
        return False

    def _start(self, req, client, last, data, since):
        tftp.check(req, self.cfg)
        low = _low_memory()
        if low:  # events the controller already has give way to a transfer
            self.log.shed()
            low = _low_memory()
        slot = None if low else self.slots.acquire()
        if slot is None:
            if not last:  # no slot, or no heap for another transfer: the transfers first
                self.give_way()
                return True
            if self.hold(data, client, since):
                return False
            # Dropped, not refused: the client asks again (see the header).
            self.log.count("tftp.low_memory" if low else "tftp.busy")
            if self.events.take():  # the refusals' budget: a flood is counted, not logged
                name = req.name
                why = _NO_HEAP if low else _NO_SLOT
                self.events.event(
                    "tftp",
                    _REFUSED,
                    ("dropped", name[:_NAME_MAX], _client(client), 0, why, len(name)),
                )
            return False
        t = slot.transfer
        f = sock = None
        try:
            f, size = _open(self.cfg.tftp_root, req.name, req.path)
            try:
                sock = net.udp_socket(self.listen_ip, 0)
                sock.connect(client)
            except OSError:
                raise _NoSocket()
            slot.file = req.name[:_NAME_MAX]
            slot.client = _client(client)  # one text for both events
            slot.sock = sock
            n = t.start(req, f, size, ticks_ms())  # the transfer owns f from here
            # Allocations before the task: once it exists its _end gives the slot back, and a
            # MemoryError after it (the crc as an int is boxed on a 32-bit board three times in
            # four) released the slot here too: twice, and the next request shared it.
            asked = crc32(data) & 0x3FFFFFFF
            port = net.addr_port(client)
            slot.task = asyncio.create_task(self._serve(slot, sock))
            slot.asked = asked
            slot.port = port
        except:  # Refused, MemoryError, anything: all goes back before the caller counts it
            if f is not None and t.f is not f:
                f.close()
            t.close()
            if sock is not None:
                sock.close()
            slot.file = slot.client = slot.sock = slot.task = None
            slot.asked = -1
            self.slots.release(slot)
            raise
        try:  # the transfer runs from here: a MemoryError must not make the caller hold it
            self._send(sock, t, n)  # (not sent: the clock sends it again)
            self.log.event(
                "tftp",
                _START,
                ("start", slot.file, slot.client, t.blksize, size, t.window),
            )
        except MemoryError:
            self.log.count("tftp.no_memory")
        return False

    def give_way(self):
        """End the transfer whose client has been silent longest, beyond evict_after_ms
        ("evicted"; the client gets ERROR 0); its receiver, cancelled, reports it and frees
        the slot and its heap. For a new request that finds no slot or no heap, and for
        proxyDHCP's reads when the heap is short (log.pressure). True if one gave way."""
        now = ticks_ms()
        old = None
        longest = self.slots.evict_after_ms
        for s in self.slots.slots:
            t = s.transfer
            if s.task is not None and not t.done and ticks_diff(now, t.since) > longest:
                old, longest = s, ticks_diff(now, t.since)
        if old is None:
            return False
        old.transfer.finish("evicted")
        self.log.count("tftp.evicted")
        n = tftp.build_error(self._ebuf, tftp.E_UNDEFINED, tftp.MSG_EVICTED)
        net.send(old.sock, self._ebuf, n)  # the client may be gone: nothing to say
        old.task.cancel()
        return True

    def _send(self, sock, t, n):
        while n:
            net.send(sock, t.buf, n, None, self.log, "tftp")
            n = t.more()

    async def _serve(self, slot, sock):
        # The receiver: feeds the client's datagrams to the transfer, and cleans up. Its loop
        # is the per-block hot path: names in locals, the window sent from here, and no call
        # per packet but on_packet/more and the socket's own readinto and write. Its frame is
        # a generator's, made once per transfer: the try around the write costs nothing per
        # packet here, where in a function it would (net.py).
        t = slot.transfer
        rx = slot.rx
        buf = t.buf
        log = self.log
        readable = net.readable
        # A datagram's first 4 bytes: its length, or None when none waits (a non-blocking
        # stream read returns None for EAGAIN and raises any other error: ECONNREFUSED, the
        # client's port has closed, ends the transfer below as a socket error).
        take = sock.readinto
        write = sock.write
        now = ticks_ms
        # The transfer's per-block methods as the class holds them, plain functions called
        # with t: no method looked up per block (tftp.py, before _read), no bound method held.
        on_packet = tftp.Transfer.on_packet
        more = tftp.Transfer.more
        burst = 0
        try:
            while not t.done:
                # A datagram already there is read without a turn of the loop, up to _BURST in
                # a row: then the loop's other tasks get theirs.
                n = take(rx) if burst < _BURST else None
                if n is None:
                    await readable(sock)
                    burst = 0
                    n = take(rx)
                    if n is None:
                        continue
                else:
                    burst += 1
                try:
                    n = on_packet(t, rx, n, now())
                except tftp.Malformed:
                    log.count("tftp.bad_packet")
                    continue
                while n:
                    try:
                        if write(buf, n) is None:
                            net.failed(None, None, log, "tftp")
                    except OSError as e:
                        net.failed(e, None, log, "tftp")
                    n = more(t)
        except asyncio.CancelledError:
            # the clock gave up or a request evicted it (the result is already set), or shutdown
            t.finish("cancelled")
        except OSError:
            t.finish("socket error")  # e.g. ECONNREFUSED: the client's port has closed
        except MemoryError:  # this transfer is lost (its client asks again), not the slot
            t.finish("out of memory")
            self.log.shed()
        finally:
            self._end(slot, sock)

    async def _clock(self):
        # Every running transfer's timer, one task for all of them, made with the service so
        # that starting a transfer allocates no clock. Its state is in _tick.
        while True:
            await sleep_ms(self._tick())

    def _tick(self):
        # Resends and give-ups that are due; returns how long to sleep: until the earliest
        # deadline, and never longer than the shortest a new transfer's first deadline can be
        # away (its resend timeout, at least 1 s when its client asked for one), so a transfer
        # started meanwhile is served in time too.
        wait = min(self.cfg.tftp_timeout_ms, _CLOCK_MS)
        now = ticks_ms()
        for slot in self.slots.slots:
            if slot.task is None:
                continue
            t = slot.transfer
            if not t.done:
                left = ticks_diff(t.deadline, now)
                if left > 0:
                    wait = min(wait, left)
                    continue
                try:
                    n = t.on_timeout(now)
                    if not t.done:
                        self._send(slot.sock, t, n)
                        wait = min(wait, max(1, ticks_diff(t.deadline, now)))
                        continue
                except MemoryError:  # a transfer without its clock would never time out
                    t.finish("out of memory")
            # Ended here (or a MemoryError kept it from its receiver): the receiver may wait
            # for a datagram that never comes. A second cancel of a task is harmless.
            try:
                slot.task.cancel()
            except MemoryError:
                wait = min(wait, 50)
        return wait

    def _end(self, slot, sock):
        # Whatever the logging does (a full heap), the slot and the file go back.
        try:
            self._report(slot)
        finally:
            net.forget(sock)  # out of asyncio's I/O queue, where net.readable keeps it
            sock.close()
            slot.transfer.close()
            slot.file = slot.client = slot.sock = slot.task = None
            slot.asked = -1
            self.slots.release(slot)
        if self.queued and self.task is None:
            self.task = asyncio.create_task(self._dequeue())

    def hold(self, data, client, since):
        # The request waits for a slot (see the header): False when it cannot.
        queued = self.queued
        now = ticks_ms()
        for i in range(len(queued) - 1, -1, -1):
            old = queued[i]
            if old[1] == client:  # its client asked again: it keeps its place
                queued[i] = (data, client, old[2])
                break
            if ticks_diff(now, old[2]) > _QUEUED_MS:  # waited long enough: its client asks again
                queued.pop(i)
                self.log.count("tftp.busy")
        else:
            if len(queued) >= self.slots.capacity or len(data) > _SMALL_READ:
                return False
            queued.append((data, client, now if since is None else since))
            self.log.count("tftp.queued")
        # No transfer runs whose end would start it (the heap was short, not the slots): a
        # _dequeue task tries until it starts or is let go.
        if self.task is None and not self.slots.active():
            self.task = asyncio.create_task(self._dequeue())
        return True

    async def _dequeue(self):
        # After the ended transfer's task is gone (its heap comes back): the oldest waiting
        # requests are started while there are slots (each through request(), which sheds
        # events already sent when the heap is short, and queues it again when that is not
        # enough). While requests wait and no transfer runs (whose end would try again), try
        # every _DEQUEUE_MS until they start or are let go.
        queued = self.queued
        try:
            await sleep_ms(0)
            while queued:
                for _ in range(len(queued)):
                    if not queued or self.slots.active() == self.slots.capacity:
                        return
                    data, client, since = queued.pop(0)
                    if ticks_diff(ticks_ms(), since) > _QUEUED_MS:
                        self.log.count("tftp.busy")  # its client has asked again, or given up
                        continue
                    self.request(data, client, True, since)
                if self.slots.active():
                    return
                await sleep_ms(_DEQUEUE_MS)
        except MemoryError:
            self.log.count("tftp.no_memory")
        finally:
            self.task = None

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
    # A new transfer needs a socket, two tasks and room for each datagram's wait: drop
    # its request (tftp.low_memory; the client asks again) rather than start what the heap
    # cannot carry, or what would leave proxyDHCP without room to answer.
    free = getattr(gc, "mem_free", None)
    if free is None or free() >= _TRANSFER_RESERVE:
        return False
    gc.collect()
    return free() < _TRANSFER_RESERVE


def _open(root, name, path):
    # Regular files only: open() on a directory succeeds on the unix port and fails later.
    try:
        st = os.stat(path)
        if st[0] & _S_IFMT != _S_IFREG:
            raise OSError(2)
    except OSError:
        raise tftp.Refused(tftp.E_NOT_FOUND, tftp.MSG_NOT_FOUND)
    # No symbolic link in the name (refused like the controller refuses a link out of the
    # root). os.stat follows links, and MicroPython has no realpath, readlink or lstat, so a
    # link cannot be resolved and checked against the root: every link is refused, wherever
    # it points. Where lstat is missing, the type ilistdir gives the entry says it (the unix
    # port reports a link as S_IFLNK; a board's FAT or littlefs has no links).
    lstat = getattr(os, "lstat", None)
    d = root
    for part in name.split(b"/"):  # a name that passed check and exists: bounded
        if not part:
            continue
        part = part.decode()
        if lstat is not None:
            mode = lstat(d + "/" + part)[0]
        else:
            mode = 0
            for entry in os.ilistdir(d):
                if entry[0] == part:
                    mode = entry[1]
                    break
        if mode & _S_IFMT == _S_IFLNK:
            raise tftp.Refused(tftp.E_ACCESS, tftp.MSG_BAD_NAME)
        d = d + "/" + part
    try:
        return open(path, "rb"), st[6]
    except OSError:
        raise tftp.Refused(tftp.E_NOT_FOUND, tftp.MSG_NOT_FOUND)


def _client(a):
    return net.ip_str(net.addr_ip4(a))
