# The board layer: relay outputs, the network interface, the status LED and the hardware
# watchdog, from board.json.
#
# The only firmware code that touches `machine` or `network`, through two modules that only this
# one imports: board_hw (relays on GPIO, the LED, machine.WDT) and board_net (the Ethernet chip).
# Neither is loaded on the sim board (MicroPython unix port): there relay outputs are a state
# file that a lab or a test watches (one '0'/'1' per channel), the watchdog is emulated by the
# `bastion sim` supervisor, fed through a pipe, and the network is the host's, as it is.
# The real boards' paths have NOT RUN ON HARDWARE yet: tests/firmware/mpy/test_board_vectors.py
# runs them under the unix port against stand-in machine/network modules that record calls.
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
        if self.relay_kind == "gpio":
            chans = relays.get("channels")
            if not isinstance(chans, list) or len(chans) != self.channels:
                raise BoardError("board.json: relays.channels must list %r channels"
                                 % (self.channels,))  # fmt: skip
            for i, c in enumerate(chans):
                if not isinstance(c, dict) or "pin" not in c:
                    raise BoardError("board.json: relays.channels[%d] needs a pin" % i)
        wd = d.get("watchdog", {})
        self.wdt_kind = wd.get("kind", "none")
        self.wdt_timeout_ms = wd.get("timeout_ms", 8000)

    def reset(self):
        """Reset the board now (the console's "reboot" op), relays untouched. On a board this
        is machine.reset(), a hard reset: the only thing that stops a running WDT."""
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
            from firmware import board_hw

            return board_hw.PinRelays(self.defn["relays"])
        return FileRelays(self.channels)

    def led(self):
        """The status LED (set(on)), or None when the board has none."""
        if self.defn.get("led"):
            from firmware import board_hw

            return board_hw.Led(self.defn["led"])
        return None

    def network(self, d, log):
        """The board's Ethernet chip, brought up from device.json (d) by board_net.up, or None
        on the sim board, whose network is the host's, as it is."""
        eth = self.defn.get("ethernet")
        if eth and eth.get("kind") != "host":
            from firmware import board_net

            return board_net.up(eth, d, log)
        return None

    def watchdog(self, log=None):
        if self.wdt_kind == "hardware":
            from firmware import board_hw

            return board_hw.watchdog(self.defn["watchdog"], log)
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
