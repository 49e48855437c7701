"""STAND-IN for MicroPython's `machine` module, for tests only: never flash it to a board.

It lets the firmware's board layer (firmware/board_hw.py, firmware/board_net.py) run under the
MicroPython unix port and CPython, and records every call so tests can check what the firmware
asked of the hardware. It models only what the firmware relies on, as MicroPython's rp2 and
esp32 ports behave (their sources, read for these facts, are named where it matters):

- Pin(id, mode, pull, *, value=None, hold=None): with mode OUT and a value, the output latch
  is written before the driver is enabled (ports/rp2/machine_pin.c, ports/esp32/machine_pin.c),
  so the first level the pin drives is that value; without one it drives whatever its latch
  holds, 0 after a reset. `levels[id]` is every level a pin has driven, in order: what an
  oscilloscope on the pin would show.
- WDT(timeout=...): refuses a timeout above `wdt_max_ms` with ValueError, as the rp2 port does
  above 8388 ms (ports/rp2/machine_wdt.c); counts feeds.
- reset(): records the call and raises Reset (a real board would not come back from it).
- `bad_pins`: pin ids Pin() refuses with ValueError("invalid pin"), as the rp2 port does for
  a pin the chip lacks (ports/rp2/machine_pin.c); empty after standin_reset().
"""

calls = []  # every call, in order, as tuples
levels = {}  # pin id -> levels driven, in order
latches = {}  # pin id -> output latch (0 after reset)
wdt_max_ms = None  # e.g. 8388 to behave like an RP2040
bad_pins = set()


def standin_reset(max_wdt_ms=None):
    """Forget everything recorded, as a power-on would (tests call it first)."""
    global wdt_max_ms
    del calls[:]
    levels.clear()
    latches.clear()
    wdt_max_ms = max_wdt_ms
    WDT.feeds = 0
    bad_pins.clear()


class Reset(Exception):
    """machine.reset() was called."""


def reset():
    calls.append(("reset",))
    raise Reset()


class Pin:
    IN = 0
    OUT = 1
    OPEN_DRAIN = 2
    PULL_UP = 1
    PULL_DOWN = 2

    def __init__(self, id, mode=None, pull=None, *, value=None, hold=None):
        if id in bad_pins:
            raise ValueError("invalid pin")
        self.id = id
        self.mode = None
        self.hold = False
        calls.append(("Pin", id, mode, value) + (() if hold is None else (("hold", hold),)))
        if mode is not None or value is not None or hold is not None:
            self.init(mode, pull, value=value, hold=hold, _record=False)

    def init(self, mode=None, pull=None, *, value=None, hold=None, _record=True):
        if _record:
            calls.append(("Pin.init", self.id, mode, value, hold))
        if value is not None:
            latches[self.id] = 1 if value else 0  # the latch first, as the ports do
        if mode is not None:
            self.mode = mode
        if self.mode == Pin.OUT:
            self._drive()
        if hold is not None:
            self.hold = bool(hold)

    def _drive(self):
        v = latches.get(self.id, 0)
        seen = levels.setdefault(self.id, [])
        if not seen or seen[-1] != v:
            seen.append(v)

    def value(self, v=None):
        if v is None:
            return latches.get(self.id, 0)
        calls.append(("Pin.value", self.id, 1 if v else 0))
        latches[self.id] = 1 if v else 0
        if self.mode == Pin.OUT:
            self._drive()
        return None


class SPI:
    def __init__(self, id, baudrate=1000000, *, sck=None, mosi=None, miso=None, **kw):
        calls.append(("SPI", id, baudrate, sck.id, mosi.id, miso.id))
        self.id = id


class WDT:
    feeds = 0

    def __init__(self, id=0, timeout=5000):
        if wdt_max_ms is not None and timeout > wdt_max_ms:
            raise ValueError("timeout exceeds %d" % wdt_max_ms)
        calls.append(("WDT", timeout))
        self.timeout = timeout

    def feed(self):
        WDT.feeds += 1


class UART:
    """A UART with a node on the other end: `arrive(data)` is what the node sends (kept up
    to rxbuf bytes, the rest lost, as a UART's ring buffer does: `overrun` counts it), `sent`
    what the firmware wrote. Constructor arguments as the rp2 and esp32 ports take them."""

    instances = []

    def __init__(self, id, baudrate=115200, *, tx=None, rx=None, timeout=None, rxbuf=256, **kw):
        calls.append(("UART", id, baudrate, tx.id if tx else None, rx.id if rx else None,
                      timeout, rxbuf))
        self.id = id
        self.rxbuf = rxbuf
        self._rx = bytearray()
        self.sent = bytearray()
        self.overrun = 0
        UART.instances.append(self)

    def arrive(self, data):
        room = self.rxbuf - len(self._rx)
        self._rx += data[:room]
        self.overrun += max(0, len(data) - room)

    def any(self):
        return len(self._rx)

    def readinto(self, buf):
        n = min(len(buf), len(self._rx))
        if not n:
            return None
        buf[:n] = self._rx[:n]
        self._rx = self._rx[n:]
        return n

    def write(self, data):
        calls.append(("UART.write", self.id, bytes(data)))
        self.sent += data
        return len(data)
