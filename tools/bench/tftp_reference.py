# Reference lock-step TFTP servers for tools/bench/tftp_bench.py, run on the MicroPython unix
# port (not CPython): how far the firmware's lock-step time is from what MicroPython itself
# costs, layer by layer. Each mode adds one layer of the firmware to the one before:
#
#   blocking  blocking sockets, no asyncio: the file read into the packet, the packet sent,
#             the ACK read; the floor of MicroPython plus the kernel.
#   asyncio   the same loop, each ACK awaited through asyncio's I/O queue as firmware/net.py
#             does on MicroPython (queue the socket, yield once to the loop).
#   engine    asyncio plus the firmware's engine, firmware.tftp (parse_request, check,
#             Transfer.start/on_packet/more), with no retransmission clock.
#   shell     the firmware's whole TFTP service, firmware.tftpd.TftpServer with a Log (its
#             one clock task, the listener, net.readable/take, the socket's write), and
#             nothing else of the firmware: no proxyDHCP, console, watchdog or power tasks.
#
# blocking and asyncio serve one transfer at a time, lock-step. Each transfer is begun by the
# firmware's engine (parse_request, check and Transfer.start: the same options, refusals and
# first packet as the firmware, windows held to 1), once per transfer and so outside what is
# measured; its blocks are their own loop. They never retransmit. They are measuring instruments for loopback, not servers: a
# client that goes away holds blocking for SOCKET_TIMEOUT_S and asyncio for good.
#
# Usage: micropython -X heapsize=128k tftp_reference.py MODE ROOT PORT REPO
#   ROOT: the directory served; REPO: the checkout whose firmware/ engine and shell import.
import asyncio
import os
import socket
import sys

HOST = "127.0.0.1"
MAX_BLKSIZE = 1468
SOCKET_TIMEOUT_S = 5


def _bind(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(socket.getaddrinfo(HOST, port)[0][-1])
    return s


class Lockstep:
    """One transfer's blocks for blocking and asyncio, from the first packet on (the OACK:
    block 0; or DATA 1 of n bytes): on_ack() sends the next block."""

    def __init__(self, buf, sock, f, blksize, block, n):
        self.buf = buf
        self.sock = sock
        self.f = f
        self.payload = memoryview(buf)[4 : 4 + blksize]
        self.blksize = blksize
        self.block = block
        self.n = n  # bytes in the block last sent

    def on_ack(self, rx):
        # True while the transfer goes on; a stale ACK is ignored.
        if rx[1] != 4 or ((rx[2] << 8) | rx[3]) != self.block & 0xFFFF:
            return rx[1] == 4
        if self.block and self.n < self.blksize:
            return False  # the last block's ACK
        self.block += 1
        buf = self.buf
        self.n = self.f.readinto(self.payload) or 0
        buf[0] = 0
        buf[1] = 3
        buf[2] = (self.block >> 8) & 0xFF
        buf[3] = self.block & 0xFF
        self.sock.write(buf, 4 + self.n)
        return True

    def close(self):
        self.f.close()
        self.sock.close()


def _begin(engine, cfg, data, client, now=0):
    """One request begun by the firmware's engine (a firmware.tftp.Transfer), its first packet
    sent on a socket connected to the client: (req, sock, f, n), n the packet's length; None
    for a request the engine refuses."""
    from firmware import tftp

    try:
        req = tftp.parse_request(data)
        tftp.check(req, cfg)
        f = open(req.path, "rb")  # noqa: SIM115 -- closed as the transfer ends
    except (tftp.Malformed, tftp.Refused, OSError):
        return None
    sock = _bind(0)
    sock.connect(client)
    n = engine.start(req, f, os.stat(req.path)[6], now)
    sock.write(engine.buf, n)
    return req, sock, f, n


def _open_transfer(engine, cfg, data, client):
    """A Lockstep for one request, its first packet sent, or None. engine only begins it and
    is left as it is."""
    begun = _begin(engine, cfg, data, client)
    if begun is None:
        return None
    req, sock, f, n = begun
    if req.oack:
        return Lockstep(engine.buf, sock, f, req.blksize, 0, req.blksize)
    return Lockstep(engine.buf, sock, f, req.blksize, 1, n - 4)


def _engine():
    from firmware import tftp

    return tftp.Transfer(bytearray(4 + MAX_BLKSIZE))


def serve_blocking(root, port):
    lis = _bind(port)
    engine, cfg = _engine(), _Cfg(root, 1)
    rx = bytearray(4)
    while True:
        data, client = lis.recvfrom(512)
        t = _open_transfer(engine, cfg, data, client)
        if t is None:
            continue
        t.sock.settimeout(SOCKET_TIMEOUT_S)
        try:
            while t.sock.readinto(rx) == 4 and t.on_ack(rx):
                pass
        except OSError:  # the client went away
            pass
        t.close()


async def serve_asyncio(root, port):
    from asyncio.core import _io_queue  # what firmware/net.py uses on MicroPython

    once = (None,)
    lis = _bind(port)
    lis.setblocking(False)
    engine, cfg = _engine(), _Cfg(root, 1)
    rx = bytearray(4)
    while True:
        _io_queue.queue_read(lis)
        await once
        data, client = lis.recvfrom(512)
        t = _open_transfer(engine, cfg, data, client)
        if t is None:
            continue
        t.sock.setblocking(False)
        while True:
            _io_queue.queue_read(t.sock)
            await once
            if t.sock.readinto(rx) != 4 or not t.on_ack(rx):
                break
        t.close()


class _Cfg:
    # The firmware's defaults (firmware/config.py) for what tftp.check and tftpd read.
    tftp_max_blksize = MAX_BLKSIZE
    tftp_max_transfers = 4
    tftp_timeout_ms = 1000
    tftp_retries = 5

    def __init__(self, root, window=4):
        self.tftp_root = root
        self.tftp_max_window = window  # 1: blocking and asyncio are lock-step


async def serve_engine(root, port):
    from asyncio.core import _io_queue
    from time import ticks_ms

    cfg = _Cfg(root)
    once = (None,)
    lis = _bind(port)
    lis.setblocking(False)
    t = _engine()
    buf = t.buf
    rx = bytearray(4)
    while True:
        _io_queue.queue_read(lis)
        await once
        data, client = lis.recvfrom(512)
        begun = _begin(t, cfg, data, client, ticks_ms())
        if begun is None:
            continue
        sock = begun[1]
        sock.setblocking(False)
        while not t.done:
            _io_queue.queue_read(sock)
            await once
            n = t.on_packet(rx, sock.readinto(rx), ticks_ms())
            while n:
                sock.write(buf, n)
                n = t.more()
        t.close()  # and its file
        sock.close()


async def serve_shell(root, port):
    from firmware.log import Log
    from firmware.tftpd import TftpServer

    log = Log(capacity=64)
    server = TftpServer(_Cfg(root), log, HOST, port)

    async def drain():  # what the console does with events: take them
        while True:
            while log.take() is not None:
                pass
            await asyncio.sleep_ms(100)

    asyncio.create_task(drain())
    await server.run()


def main():
    if len(sys.argv) != 5:
        print("usage: tftp_reference.py blocking|asyncio|engine|shell ROOT PORT REPO")
        sys.exit(2)
    mode, root, port, repo = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    sys.path.insert(0, repo)
    if mode == "blocking":
        serve_blocking(root, port)
        return
    run = {"asyncio": serve_asyncio, "engine": serve_engine, "shell": serve_shell}.get(mode)
    if run is None:
        print("unknown mode: " + mode)
        sys.exit(2)
    asyncio.run(run(root, port))


main()
