# Bounded event history and counters.
#
# Services record an event as a kind, a constant tuple of field names and a tuple of values,
# which costs one small tuple and no string building on the packet path; events become JSON
# text only when read (drained to the console, or listed). When the ring is full the oldest
# event is overwritten and `log.dropped` counts it.
#
# What a hostile host sends must not fill the ring: a value taken from a request is stored as
# a bounded bytes copy, never decoded, and becomes text only when read: as Python writes a
# bytes literal without its b'' (printable ASCII as it is, other bytes as \xNN, backslash and
# quote escaped), so the JSON is plain ASCII whatever the bytes were. Events a flood can
# trigger at its own rate pass a Budget, which lets a few a second through and counts the rest.
#
# Every new global, attribute, argument or short string in the firmware is a qstr, and the
# unix port's qstr pool grows by one ~7 KB step when it fills (docs/device.md, "Heap"): the
# event keys here are tuple constants and the names reuse existing ones where they can.
import json

from firmware.compat import ticks_diff, ticks_ms


class Budget:
    """A token bucket for one kind of event that a flood can trigger: `capacity` events at
    once, then one per `interval_ms`. take() says whether one may be recorded now; what it
    refuses is counted in log.counters[<kind>.events_suppressed] and reported as
    `suppressed: n` in the next event it lets through: record that one with Budget.event."""

    def __init__(self, log, kind, interval_ms=100, capacity=20):
        self.log = log
        self.interval_ms = interval_ms
        self.capacity = capacity
        self.name = kind + ".events_suppressed"  # the counter
        self._free = capacity * interval_ms  # credit, in ms of interval
        self._last = ticks_ms()  # ticks of the last take
        self.suppressed = 0  # refused since the last event that reported them

    def take(self, now=None):
        """May one event be recorded now (ticks_ms)? If not, it is counted as suppressed."""
        if now is None:
            now = ticks_ms()
        full = self.capacity * self.interval_ms
        self._free = min(full, self._free + min(max(ticks_diff(now, self._last), 0), full))
        self._last = now
        if self._free >= self.interval_ms:
            self._free -= self.interval_ms
            return True
        self.suppressed += 1
        self.log.count(self.name)
        return False

    def event(self, kind, keys, values):
        """Log.event, with what this budget suppressed since its last event."""
        if self.suppressed:
            keys = keys + ("suppressed",)
            values = values + (self.suppressed,)
            self.suppressed = 0
        self.log.event(kind, keys, values)


class Log:
    def __init__(self, capacity=32, counters=64):
        self.capacity = capacity  # events kept; older ones are overwritten and counted as dropped
        self._ring = [None] * capacity
        self._head = 0  # next slot to write
        self._seq = 0  # events ever recorded; the seq of the next one
        self._read = 0  # seq of the next event drain() hands out
        self.dropped = 0
        # A dict grows by a fresh, larger table: on a heap in pieces that fails, and counters
        # are bumped in MemoryError handlers. So the table is grown here, at boot, to hold
        # `counters` names (MicroPython keeps a table's size when keys are deleted).
        self.counters = {}
        for i in range(counters):
            self.counters[i] = 0
        for i in range(counters):
            del self.counters[i]
        self.sink = None  # optional callable(text_line) that takes each event as JSON
        self.boot = None  # optional boot id added to each event handed to the sink
        self.sink_errors = 0  # flushes that failed (out of memory): the events wait
        # The budget for "net" events: datagrams the network stack would not send (net.send)
        self.net = Budget(self, "net", 1000, 2)
        self.pressure = []  # what else shed() asks to give heap back (TftpServer.give_way)

    def count(self, name, n=1):
        self.counters[name] = self.counters.get(name, 0) + n

    def event(self, kind, keys, values, t=None):
        """Record an event; t is when it happened (ticks_ms), now unless given."""
        # One tuple per entry, the values after (seq, t, kind, keys): half the allocations.
        self._ring[self._head] = (self._seq, ticks_ms() if t is None else t, kind, keys) + values
        self._head = (self._head + 1) % self.capacity
        self._seq += 1
        if self._seq - self._read > self.capacity:
            self.dropped += self._seq - self._read - self.capacity
            self._read = self._seq - self.capacity
        if self.sink is not None:
            try:
                self.flush()
            except MemoryError:  # the event stays in the ring (fetched later); go on
                self.sink_errors += 1

    def pending(self):
        return self._seq - self._read

    def take(self):
        """The oldest event not yet handed out, as a dict, or None."""
        if self._read == self._seq:
            return None
        slot = (self._head - (self._seq - self._read)) % self.capacity
        self._read += 1
        return _as_dict(self._ring[slot])

    def flush(self):
        """Hand every pending event to the sink as one JSON line each. An event leaves the
        pending set only once the sink took it."""
        while self._read != self._seq:
            slot = (self._head - (self._seq - self._read)) % self.capacity
            d = _as_dict(self._ring[slot])
            if self.boot is not None:
                d["boot"] = self.boot
            self.sink(json.dumps(d))
            self._read += 1

    def recent(self, n=None):
        """Up to n of the newest events still in the ring (oldest first), as dicts."""
        have = min(self._seq, self.capacity)
        n = have if n is None else min(n, have)
        out = []
        for i in range(n, 0, -1):
            e = self._ring[(self._head - i) % self.capacity]
            if e is not None:  # None: shed
                out.append(_as_dict(e))
        return out

    def shed(self):
        """Under heap pressure (a listener's MemoryError): forget the events already handed
        to the sink but the newest. They are kept only for a controller that reconnects (it
        counts what it cannot fetch as events_lost); their heap is worth more to the services
        now. Counted as log.events_shed. Then each callable in `pressure` may give heap back
        too."""
        n = 0
        ring = self._ring
        for i in range(self.capacity):
            e = ring[i]
            if e is not None and e[0] < self._read and e[0] != self._seq - 1:
                ring[i] = None
                n += 1
        if n:
            self.count("log.events_shed", n)
        for f in self.pressure:
            try:
                f()
            except MemoryError:  # called from MemoryError handlers: never raise from here
                pass


def _as_dict(entry):
    keys = entry[3]
    d = {"ev": entry[2], "seq": entry[0], "t": entry[1]}
    for i in range(len(keys)):
        v = entry[4 + i]
        if isinstance(v, bytes):  # from a request: safe text, the same on both interpreters
            v = repr(v)[2:-1]
        d[keys[i]] = v
    return d
