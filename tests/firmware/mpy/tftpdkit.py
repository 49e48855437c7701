# What the tests of firmware.tftpd that run on both interpreters share: a directory with one
# file for the server to serve (MicroPython has no tempfile), and the server on loopback.
import os
import socket

from firmware.compat import sleep_ms, ticks_add, ticks_diff, ticks_ms
from firmware.config import Config
from firmware.log import Log
from firmware.tftpd import TftpServer


class served_file:
    """with served_file(tag, size) as root: a directory under /tmp holding the file f of size
    zero bytes, removed afterwards."""

    def __init__(self, tag, size):
        self.root = "/tmp/eb-tftpd-%s-%d" % (tag, ticks_ms())
        self.size = size

    def __enter__(self):
        os.mkdir(self.root)
        with open(self.root + "/f", "wb") as f:
            f.write(bytes(self.size))
        return self.root

    def __exit__(self, *exc):
        os.remove(self.root + "/f")
        os.rmdir(self.root)


def loopback_server(root, events):
    """A TftpServer serving root on 127.0.0.1 at a port of its own, with a Log of `events`
    events and resends a minute apart: (server, log, port)."""
    port = 20000 + ticks_ms() % 20000
    cfg = Config(
        {"server_ip": "127.0.0.1", "script_url": "http://127.0.0.1/x",
         "tftp": {"root": root, "timeout_ms": 60000}}
    )  # fmt: skip
    log = Log(capacity=events)
    return TftpServer(cfg, log, "127.0.0.1", port), log, port


def addr(port):
    """127.0.0.1:port as this interpreter's sockets take it."""
    return socket.getaddrinfo("127.0.0.1", port)[0][-1]


async def recv(s, ms=2000):
    """A client's non-blocking read, polled: (data, address)."""
    end = ticks_add(ticks_ms(), ms)
    while True:
        try:
            return s.recvfrom(600)
        except OSError:
            assert ticks_diff(end, ticks_ms()) > 0, "no reply from the server"
            await sleep_ms(1)


async def stop_when_idle(srv, task):
    """Once every transfer of srv has ended (and left asyncio's I/O queue), stop its run()
    task; asserts they all end within a hundred turns."""
    for _ in range(100):
        if not srv.slots.active():
            break
        await sleep_ms(1)
    assert not srv.slots.active()
    task.cancel()
    await sleep_ms(20)
