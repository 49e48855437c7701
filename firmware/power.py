# Relay channels: the policy that switches node power, with no pins in it.
#
# The board layer supplies the outputs: an object with set(index, on) that drives channel
# `index` (0-based, in the order of the channel list given to Power) to logical on/off; pins
# and polarity are its business (the board definition's `relays`). Everything here is pure
# over a clock passed in as `now` (ticks_ms), so tests use a fake clock.
#
# Theory of operation, per channel:
#   desired   what the operator asked for (on/off). Persisted, only when it changes (flash wear),
#             atomically (temp file + rename), and restored by restore() at boot before any
#             other service starts, so an MCU reset, a watchdog reset or a reflash never
#             glitches a running node.
#   output    what the relay is doing now. It differs from desired while a power-on waits its
#             turn in the stagger queue, and during the off phase of a cycle.
# Interlocks (each refusal is a PowerError whose text says why and when to try again):
#   min_off_ms   a channel that went off stays off at least this long: on() or a cycle with a
#                shorter off time is refused.
#   max_cycles   at most this many power-on edges per window_ms per channel (no cycle storms).
# Staggering: power-ons go through one queue; tick(now) switches at most one channel per
# stagger_ms so many nodes never draw inrush current at once. restore() is not staggered: the
# nodes it turns on were (as far as the device knows) already running.
import os

from firmware.compat import ticks_add, ticks_diff

_ON_KEYS = ("ch", "name", "state", "why")
# The longest off time of a cycle: an hour, as min_off_ms's own bound (config.py). Longer is an
# off and, later, an on. It also keeps back_on_at within what ticks_diff can tell apart (2**29 ms
# on a board, about six days): beyond it, a cycle would never come back on.
MAX_OFF_MS = 3600000


class PowerError(ValueError):
    """A refused power request; the text is for the operator."""


class Channel:
    """One relay channel's definition (from the board definition) and its runtime state."""

    def __init__(self, index, checked):
        self.index = index
        # firmware.config.channels checked these; pin and polarity are the board layer's business
        self.name, self.min_off_ms, self.max_cycles, self.window_ms, self.default_on = checked
        self.desired = self.default_on
        self.output = False
        self.off_at = None  # ticks when the output last went off, while min_off_ms matters
        self.back_on_at = None  # ticks when a cycle's off phase ends
        self.queued = False
        self.edges = []  # ticks of power-on edges inside the window (at most max_cycles)

    def status(self):
        return {
            "ch": self.index,
            "name": self.name,
            "desired": "on" if self.desired else "off",
            "output": "on" if self.output else "off",
            "queued": self.queued,
            "cycling": self.back_on_at is not None,
        }


class FileStore:
    """The persisted desired states: one line of '0'/'1' per channel, replaced atomically."""

    def __init__(self, path):
        self.path = path
        self.writes = 0  # how many times the file was written (flash wear)

    def load(self):
        """The stored text, or None when there is none. Damage is text that restore() reports:
        a file that is not UTF-8 comes back as its bytes' repr (read as text, it raised
        UnicodeError out of the boot, before any relay was restored)."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read(64)  # 32 channels at most (board.json): more is damage, not state
        except OSError:
            return None
        try:
            return raw.decode()
        except ValueError:
            return repr(raw)

    def save(self, text):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            if hasattr(f, "fileno") and hasattr(os, "fsync"):  # CPython; boards sync on close
                os.fsync(f.fileno())
        os.rename(tmp, self.path)  # replaces the old file on POSIX, littlefs and MicroPython FAT
        self.writes += 1


class Power:
    """Relay channels behind outputs.set(index, on). Call restore(now) first, then tick(now)
    regularly (it returns the ms until it next has work, or None)."""

    def __init__(self, outputs, channels, store=None, log=None, stagger_ms=2000):
        """channels: a number of channels with every default, or a list of channel objects,
        checked by firmware.config.channels (boot-only code, unloaded by firmware.boot)."""
        from firmware.config import channels as check

        self.outputs = outputs
        self.channels = [Channel(i, c) for i, c in enumerate(check(channels))]
        self.store = store
        self.log = log
        self.stagger_ms = stagger_ms  # minimum time between two staggered power-on edges
        self._queue = []  # channels waiting to be switched on, first come first served
        self._next_on = None  # ticks before which the queue may not switch another channel

    # --- lookups -------------------------------------------------------------------------
    def channel(self, ref):
        """The Channel for a 0-based index or a name; raises PowerError."""
        if isinstance(ref, int) and not isinstance(ref, bool):
            if 0 <= ref < len(self.channels):
                return self.channels[ref]
        elif isinstance(ref, str):
            for c in self.channels:
                if c.name == ref:
                    return c
        raise PowerError("no relay channel %r (channels: 0..%d)" % (ref, len(self.channels) - 1))

    def status(self):
        return [c.status() for c in self.channels]

    # --- boot ----------------------------------------------------------------------------
    def restore(self, now):
        """Drive every output to its persisted desired state, at once. Call before anything.

        Restored power-ons count neither as edges nor as off times: as far as the device
        knows, those nodes were running all along (or have been off for long)."""
        text = self.store.load() if self.store is not None else None
        bits = text.strip() if text is not None else ""
        if text is not None and (len(bits) < len(self.channels) or bits.strip("01")):
            # short or damaged: said by the boot-only checker (the channels' one, still loaded)
            from firmware.config import restore

            bits = restore(bits, len(self.channels), self.store, self.log)
        for c in self.channels:
            c.desired = bits[c.index] == "1" if c.index < len(bits) else c.default_on
            c.queued = False
            c.back_on_at = None
            self._drive(c, c.desired)
            c.output = c.desired
            if self.log is not None:
                self.log.event(
                    "power", _ON_KEYS, (c.index, c.name, "on" if c.output else "off", "restore")
                )
        self._queue = []

    # --- requests ------------------------------------------------------------------------
    def on(self, ref, now):
        c = self.channel(ref)
        if c.desired:
            return c.status()  # already on, or on its way: nothing changes
        self._check_off_time(c, now)
        self._check_storm(c, now)
        c.desired = True
        try:
            self._save()
        except OSError:  # a full or failing flash: nothing switched, memory and flash agree
            c.desired = False
            raise
        self._enqueue(c)
        self.tick(now)
        return c.status()

    def off(self, ref, now):
        c = self.channel(ref)
        self._dequeue(c)
        c.back_on_at = None
        if c.output:  # first: a node to be stopped is stopped, whatever the flash does next
            self._set(c, False, now, "off")
        if c.desired:
            c.desired = False
            self._save()
        return c.status()

    def cycle(self, ref, now, off_ms=None, why="cycle"):
        """Off, then back on after off_ms (default: the channel's minimum off time)."""
        c = self.channel(ref)
        if not c.desired:
            raise PowerError("%s is off; switch it on instead of cycling it" % c.name)
        if c.back_on_at is not None:
            raise PowerError(
                "%s is already cycling (back on in %d ms)"
                % (c.name, max(0, ticks_diff(c.back_on_at, now)))
            )
        if c.queued:
            raise PowerError("%s is still waiting for its staggered power-on" % c.name)
        if off_ms is None:
            off_ms = c.min_off_ms
        if not isinstance(off_ms, int) or isinstance(off_ms, bool) or off_ms < c.min_off_ms:
            raise PowerError(
                "%s: off time %r ms is shorter than its minimum off time of %d ms"
                % (c.name, off_ms, c.min_off_ms)
            )
        if off_ms > MAX_OFF_MS:
            raise PowerError(
                "%s: off time %d ms is longer than a cycle may be (%d ms): switch it off, and on later"
                % (c.name, off_ms, MAX_OFF_MS)
            )
        self._check_storm(c, now)
        back_on_at = ticks_add(now, off_ms)  # before the relay moves: nothing can fail after it
        self._set(c, False, now, why)  # desired stays on: a reset mid-cycle restores power
        c.back_on_at = back_on_at
        return c.status()

    def tick(self, now):
        """Finish cycles, release the stagger queue, forget stale timestamps. Returns the ms
        until the next thing to do, or None when nothing is scheduled."""
        wait = None
        for c in self.channels:
            if c.back_on_at is not None:
                left = ticks_diff(c.back_on_at, now)
                if left <= 0:
                    c.back_on_at = None
                    self._enqueue(c)
                else:
                    wait = left if wait is None else min(wait, left)
            # Timestamps older than their rule are dropped, so ticks wrap-around cannot revive them.
            if c.off_at is not None and ticks_diff(now, c.off_at) >= c.min_off_ms:
                c.off_at = None
            while c.edges and ticks_diff(now, c.edges[0]) >= c.window_ms:
                c.edges.pop(0)
        # The stagger's slot too, once passed: kept, a board's ticks (period 2**30 ms) made it
        # lie 6 days ahead after 6 days without a power-on, and the next on waited for it.
        if self._next_on is not None and not 0 < ticks_diff(self._next_on, now) <= self.stagger_ms:
            self._next_on = None
        while self._queue:
            if self._next_on is not None:
                left = ticks_diff(self._next_on, now)
                if left > 0:
                    return left if wait is None else min(wait, left)
                self._next_on = None
            c = self._queue.pop(0)
            c.queued = False
            self._set(c, True, now, "on")
            self._next_on = ticks_add(now, self.stagger_ms)
        return wait

    # --- internals -----------------------------------------------------------------------
    def _check_off_time(self, c, now):
        if c.off_at is not None:
            left = c.min_off_ms - ticks_diff(now, c.off_at)
            if left > 0:
                raise PowerError(
                    "%s went off %d ms ago; its minimum off time is %d ms: try again in %d ms"
                    % (c.name, c.min_off_ms - left, c.min_off_ms, left)
                )

    def _check_storm(self, c, now):
        edges = c.edges
        while edges and ticks_diff(now, edges[0]) >= c.window_ms:
            edges.pop(0)
        if len(edges) >= c.max_cycles:
            raise PowerError(
                "%s was powered on %d times in %d ms (limit %d): refused to avoid a cycle "
                "storm, try again in %d ms"
                % (
                    c.name,
                    len(edges),
                    c.window_ms,
                    c.max_cycles,
                    c.window_ms - ticks_diff(now, edges[0]),
                )
            )

    def _enqueue(self, c):
        if not c.queued and not c.output:
            c.queued = True
            self._queue.append(c)

    def _dequeue(self, c):
        if c.queued:
            c.queued = False
            self._queue.remove(c)

    def _drive(self, c, on):
        try:
            self.outputs.set(c.index, on)
        except Exception as e:  # the relay may not have switched: say so, keep the policy going
            if self.log is not None:
                self.log.count("power.output_error")
                self.log.event("power", ("ch", "error"), (c.index, str(e)))

    def _set(self, c, on, now, why):
        self._drive(c, on)
        if on and not c.output:
            c.edges.append(now)
            if len(c.edges) > c.max_cycles:
                c.edges.pop(0)
        if not on:
            c.off_at = now
        c.output = on
        if self.log is not None:  # stamped with the time the policy decided on
            self.log.event("power", _ON_KEYS, (c.index, c.name, "on" if on else "off", why), now)

    def _save(self):
        if self.store is not None:
            self.store.save("".join("1" if c.desired else "0" for c in self.channels) + "\n")

