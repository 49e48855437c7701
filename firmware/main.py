# The firmware's entry point: load the board's config, start every service on one asyncio loop.
#
# On a board, the flash's /main.py calls run(). On the sim board (MicroPython unix port) the
# supervisor starts `micropython main.py --listen IP --dhcp-port N ...` in the flash directory,
# and those flags override the config for the lab and for tests.
import gc
import sys

import asyncio

from firmware import config as config_mod
from firmware.compat import heap_used, sleep_ms
from firmware.log import Log

VERSION = "0.1.0"
CONFIG_FILE = "device.json"
_HEAP_KEYS = ("used", "peak", "code")


def _options(argv):
    """--name value pairs from argv (the sim board's overrides); boards have no argv."""
    opts = {}
    i = 1
    while i < len(argv) - 1:
        if argv[i].startswith("--"):
            opts[argv[i][2:]] = argv[i + 1]
            i += 2
        else:
            i += 1
    return opts


def _write_line(text):
    sys.stdout.write(text)
    sys.stdout.write("\n")


class Heap:
    """Tracks the heap: `code` is what is held after imports, `peak` the live high-water mark
    sampled after a collection each period (so it counts data, not garbage)."""

    period_ms = 1000

    def __init__(self, log):
        self.log = log
        gc.collect()
        self.code = heap_used()
        self.peak = self.code

    def sample(self):
        gc.collect()
        used = heap_used()
        if used > self.peak:
            self.peak = used
            self.log.event("heap", _HEAP_KEYS, (used, self.peak, self.code))
        return used

    async def run(self):
        while True:
            await sleep_ms(self.period_ms)
            self.sample()


async def serve(cfg, log, opts, heap):
    from firmware.proxydhcp import ProxyDhcp
    from firmware.tftpd import TftpServer

    listen = opts.get("listen", "0.0.0.0")
    dhcp = ProxyDhcp(
        cfg,
        log,
        "0.0.0.0",  # broadcast DISCOVERs only reach a socket bound to the wildcard address
        int(opts.get("dhcp-port", 67)),
        int(opts.get("pxe-port", 4011)),
    )
    tftp = TftpServer(cfg, log, listen, int(opts.get("tftp-port", 69)))
    heap.code = heap.peak = heap_used()
    log.event("boot", ("version", "heap_code"), (VERSION, heap.code))
    await asyncio.gather(dhcp.run(), tftp.run(), heap.run())


def run(argv=None):
    opts = _options(argv if argv is not None else getattr(sys, "argv", []))
    log = Log(capacity=int(opts.get("log-capacity", 32)))
    log.sink = _write_line
    try:
        cfg = config_mod.load(opts.get("config", CONFIG_FILE), opts.get("listen"))
    except (OSError, ValueError) as e:
        log.event("boot", ("error",), ("config: %s" % e,))
        return 1
    heap = Heap(log)
    asyncio.run(serve(cfg, log, opts, heap))
    return 0
