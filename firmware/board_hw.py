# The board layer's GPIO side: relay outputs, the status LED and the hardware watchdog, on
# MicroPython's `machine`. Only firmware/board.py imports this module, and never on the sim board.
#
# NOT RUN ON HARDWARE YET: tests/firmware/mpy/test_board_vectors.py runs it under the unix port
# (and CPython) against a stand-in `machine` that records calls (tests/firmware/standin/).
from machine import Pin

from firmware.compat import sleep_ms


class PinRelays:
    """Relay outputs on GPIO pins, from board.json's `relays` section.

    A channel's pin level follows from its logical state (on = the node is powered) and its
    wiring: `contact` "nc" (the node is powered through the normally-closed contact, so the
    coil is energised to switch it off) or "no", and `active_low` (the module's input energises
    the coil when low, as optocoupler relay modules do). Each may be set for the whole section
    and overridden per channel.

    Glitch-free: a pin is constructed by its first set(), with its level given to the
    constructor. Pin(id, Pin.OUT, value=v) writes the output latch before it enables the driver
    (ports/rp2/machine_pin.c and ports/esp32/machine_pin.c), so a pin never drives a level
    nobody asked for. Power.restore() at boot is that first set(); until it runs a pin keeps its
    reset state, which the wiring makes harmless (docs/boards.md). With `hold` (ESP32) each
    output is also latched by the pad (Pin(..., hold=True)), so a watchdog or software reset
    does not release it."""

    def __init__(self, section):
        chans = section["channels"]
        self.channels = len(chans)
        self._hold = bool(section.get("hold", False))
        self._ids = [d["pin"] for d in chans]
        self._pins = [None] * self.channels
        self._on_level = bytearray(self.channels)  # the pin level that powers the node
        self._state = [None] * self.channels
        for i, d in enumerate(chans):
            low = bool(d.get("active_low", section.get("active_low", False)))
            contact = d.get("contact", section.get("contact", "no"))
            if contact not in ("no", "nc"):
                raise ValueError("relays.channels[%d].contact: %r is not 'no' or 'nc'"
                                 % (i, contact))  # fmt: skip
            # the coil is energised for "on" through NO, for "off" through NC
            self._on_level[i] = 1 if (contact == "no") != low else 0

    def level(self, channel, on):
        """The pin level (0/1) for a channel's logical state."""
        v = self._on_level[channel]
        return v if on else 1 - v

    def get(self, channel):
        return bool(self._state[channel])

    def set(self, channel, on):
        v = self.level(channel, on)
        pin = self._pins[channel]
        if pin is None:
            if self._hold:
                self._pins[channel] = Pin(self._ids[channel], Pin.OUT, value=v, hold=True)
            else:
                self._pins[channel] = Pin(self._ids[channel], Pin.OUT, value=v)
        elif self._hold:
            pin.init(value=v, hold=True)  # esp32: the new level is applied as the hold is renewed
        else:
            pin.value(v)
        self._state[channel] = on


class Led:
    """The status LED: on while the device serves with its link up, blinking in maintenance."""

    def __init__(self, d):
        self._low = bool(d.get("active_low", False))
        self._pin = Pin(d["pin"], Pin.OUT, value=1 if self._low else 0)

    def set(self, on):
        self._pin.value(1 if on != self._low else 0)

    async def blink(self, period_ms=500):
        """Blink for ever: the maintenance boot's sign."""
        on = False
        while True:
            on = not on
            self.set(on)
            await sleep_ms(period_ms)


def watchdog(section, log=None):
    """machine.WDT started with the board's timeout, clamped to the chip's maximum
    (`max_timeout_ms`): an RP2040 refuses more than 8388 ms with a ValueError, and a board
    definition asking for more gets the maximum and a `watchdog` event that says so."""
    from machine import WDT

    timeout = section.get("timeout_ms", 8000)
    top = section.get("max_timeout_ms")
    if top and timeout > top:
        if log is not None:
            log.count("watchdog.clamped")
            text = "timeout_ms %d is over this chip's maximum: using %d" % (timeout, top)
            log.event("watchdog", ("error",), (text,))
        timeout = top
    return WDT(timeout=timeout)


class UartConsole:
    """A node's serial console on a UART, from one entry of board.json's `node_consoles`:
    a port for firmware.nodecons (readinto -> n or None, write -> bytes taken). Thin on
    purpose: machine.UART with timeout 0 never blocks, its rxbuf (`rxbuf`, default 512) holds
    what arrives between two passes of the console's loop (at 115200 baud, 20 ms is 230
    bytes). What overruns the UART's own buffer is lost before the firmware sees it, uncounted:
    size rxbuf for the baud rate and the loop's pass."""

    def __init__(self, d):
        from machine import UART

        self._uart = UART(
            d["uart"],
            baudrate=d.get("baudrate", 115200),
            tx=Pin(d["tx"]),
            rx=Pin(d["rx"]),
            timeout=0,
            rxbuf=d.get("rxbuf", 512),
        )

    def readinto(self, buf):
        if not self._uart.any():
            return None
        return self._uart.readinto(buf)

    def write(self, mv):
        return self._uart.write(mv) or 0
