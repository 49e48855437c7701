# Bounded event history and counters.
#
# Services record an event as a kind, a constant tuple of field names and a tuple of values,
# which costs one small tuple and no string building on the packet path; events become JSON
# text only when read (drained to the console, or listed). When the ring is full the oldest
# event is overwritten and `log.dropped` counts it.
import json

from firmware.compat import ticks_ms


class Log:
    def __init__(self, capacity=32):
        self.capacity = capacity  # events kept; older ones are overwritten and counted as dropped
        self._ring = [None] * capacity
        self._head = 0  # next slot to write
        self._seq = 0  # events ever recorded; the seq of the next one
        self._read = 0  # seq of the next event drain() hands out
        self.dropped = 0
        self.counters = {}
        self.sink = None  # optional callable(text_line) that takes each event as JSON
        self.boot = None  # optional boot id added to each event handed to the sink
        self.sink_errors = 0  # flushes that failed (out of memory): the events wait

    def count(self, name, n=1):
        self.counters[name] = self.counters.get(name, 0) + n

    def event(self, kind, keys, values, t=None):
        """Record an event; t is when it happened (ticks_ms), now unless given."""
        self._ring[self._head] = (self._seq, ticks_ms() if t is None else t, kind, keys, values)
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
            out.append(_as_dict(self._ring[(self._head - i) % self.capacity]))
        return out


def _as_dict(entry):
    seq, t, kind, keys, values = entry
    d = {"ev": kind, "seq": seq, "t": t}
    for i in range(len(keys)):
        d[keys[i]] = values[i]
    return d
