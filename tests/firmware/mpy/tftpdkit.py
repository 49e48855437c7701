# What the tests of firmware.tftpd that run on both interpreters share: a directory with one
# file for the server to serve (MicroPython has no tempfile), and the server on loopback.
import os

from firmware.compat import ticks_ms
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
