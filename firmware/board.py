# The board layer: pins, relay outputs and the hardware watchdog, from board.json.
#
# The only module that imports `machine`. On the sim board (MicroPython unix port) relay
# outputs are a state file that a lab or a test watches (one '0'/'1' per channel), and the
# watchdog is emulated by the `bastion sim` supervisor, fed through a pipe.
import json
import os
import time

RELAY_STATE_FILE = "relays.state"


class BoardError(ValueError):
    pass


class FileRelays:
    """Relay outputs as a state file: the sim board's stand-in for GPIO pins.

    Like a real output latch, the file keeps its last value while the firmware restarts."""

    def __init__(self, channels, path=RELAY_STATE_FILE):
        self.channels = channels
        self.path = path
        self._out = bytearray(b"0" * channels)
        try:
            with open(path, "rb") as f:
                old = f.read(channels)
            if len(old) == channels:
                self._out[:] = old
        except OSError:
            pass

    def get(self, channel):
        return self._out[channel] == 0x31

    def set(self, channel, on):
        v = 0x31 if on else 0x30
        if self._out[channel] == v:
            return
        self._out[channel] = v
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(self._out)
            f.write(b"\n")
        os.rename(tmp, self.path)  # atomic on POSIX: a watcher never reads half a state


class PinRelays:
    """Relay outputs on GPIO pins, each with its polarity (active_low)."""

    def __init__(self, defs):
        from machine import Pin

        self.channels = len(defs)
        self._pins = []
        self._low = []
        for d in defs:
            # Construct without a value: the pin keeps what reset left (relays are wired so that
            # an unpowered or resetting device leaves nodes on) until power restores the
            # desired state.
            self._pins.append(Pin(d["pin"], Pin.OUT))
            self._low.append(bool(d.get("active_low", False)))
        self._state = [None] * self.channels

    def get(self, channel):
        return bool(self._state[channel])

    def set(self, channel, on):
        self._state[channel] = on
        self._pins[channel].value((not on) if self._low[channel] else on)


class NoWatchdog:
    def feed(self):
        pass


class PipeWatchdog:
    """The sim board's watchdog: each feed is a byte down the supervisor's pipe."""

    def __init__(self, fd):
        self._f = open("/proc/self/fd/%d" % fd, "wb")

    def feed(self):
        self._put(b".")

    def reset(self):
        """Ask the supervisor for a reset, as machine.reset() does on a board."""
        self._put(b"R")

    def _put(self, b):
        try:
            self._f.write(b)
            self._f.flush()
        except OSError:
            pass


class Board:
    def __init__(self, d):
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise BoardError("board.json: needs an object with a name")
        self.name = d["name"]
        self.defn = d
        relays = d.get("relays", {})
        self.relay_kind = relays.get("kind", "file")
        self.channels = d.get("channels", len(relays.get("channels", ())))
        wd = d.get("watchdog", {})
        self.wdt_kind = wd.get("kind", "none")
        self.wdt_timeout_ms = wd.get("timeout_ms", 8000)

    def reset(self):
        """Reset the board now (the console's "reboot" op), relays untouched."""
        if self.wdt_kind == "supervisor":
            wdt = self.watchdog()
            if isinstance(wdt, PipeWatchdog):
                wdt.reset()
                while True:  # the supervisor ends this process
                    time.sleep_ms(100) if hasattr(time, "sleep_ms") else time.sleep(0.1)
        import machine

        machine.reset()

    def relays(self):
        if self.relay_kind == "gpio":
            return PinRelays(self.defn["relays"]["channels"])
        return FileRelays(self.channels)

    def watchdog(self):
        if self.wdt_kind == "hardware":
            from machine import WDT

            return WDT(timeout=self.wdt_timeout_ms)
        if self.wdt_kind == "supervisor":
            fd = os.getenv("EDGE_BASTION_WDT_FD") if hasattr(os, "getenv") else None
            if fd:
                return PipeWatchdog(int(fd))
        return NoWatchdog()


def load(path="board.json"):
    try:
        with open(path) as f:
            d = json.load(f)
    except OSError:
        raise BoardError("%s: missing (flash the board definition)" % path)
    except ValueError as e:
        raise BoardError("%s: not valid JSON (%s)" % (path, e))
    return Board(d)
