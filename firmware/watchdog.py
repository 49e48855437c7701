# Watchdog policy: when to feed the hardware watchdog, and when to power-cycle a hung node.
#
# TaskWatch: each critical task (dhcp, tftp, console, power) calls checkin(name, now) from its
# loop. may_feed(now) is True only while every task checked in within its own deadline; the
# board layer feeds the hardware WDT (machine.WDT, or the sim supervisor) only then, so a task
# that hangs means a reset. Once a task is late the verdict is latched: the board stops
# feeding for good and resets, even if the task wakes up again, because a task that hung
# once is not trusted to keep going. Tasks get their deadline counted from construction, so a
# task that never starts is caught too.
#
# NodeWatch: the controller forwards each node's heartbeat (console op "beat"). A node that was
# booted (sent at least one beat since it was watched or cycled) and then stays silent past its
# timeout is power-cycled through Power.cycle; if it does not beat again within its boot grace,
# it is cycled again with the grace doubled each time up to backoff_cap_ms, and after
# max_cycles cycles without a beat the watchdog gives up on it until it beats again. The verdict
# needs a live controller: heartbeats only reach the device through the controller, so a node
# counts as silent only when the controller's last contact (any request) came after the node's
# deadline; and when the controller was gone for more than contact_ms (5 s: it sends a request
# every 2 s while it watches nodes) or says hello (a restart, a reconnect), every node's clock
# restarts then: the beats of the time it was away could not reach us, and come only after
# its resync. With 60 s there, a controller back after 10 s had a node of a 6 s timeout cycled
# at its hello, beating all along. Pure over `now` (ticks_ms), so tests use a fake clock.
from firmware.compat import ticks_diff


class TaskWatch:
    def __init__(self, deadlines, now, log=None):
        """deadlines: {task name: ms allowed between two check-ins}."""
        self.deadlines = deadlines
        self.log = log
        self._last = {}
        for name in deadlines:
            self._last[name] = now
        self.tripped = None  # the first task found late; latched

    def checkin(self, name, now):
        self._last[name] = now

    def late(self, now):
        """The name of a task past its deadline, or None."""
        for name, deadline in self.deadlines.items():
            if ticks_diff(now, self._last[name]) > deadline:
                return name
        return None

    def may_feed(self, now):
        if self.tripped is not None:
            return False
        name = self.late(now)
        if name is None:
            return True
        self.tripped = name
        if self.log is not None:
            self.log.count("watchdog.starved")
            self.log.event(
                "watchdog", ("task", "late_ms"), (name, ticks_diff(now, self._last[name]))
            )
        return False

    def status(self, now):
        """{task: ms since its last check-in}, and the latched verdict under 'tripped'."""
        d = {}
        for name in self.deadlines:
            d[name] = ticks_diff(now, self._last[name])
        d["tripped"] = self.tripped
        return d


class _Node:
    def __init__(self, timeout_ms, boot_ms, now):
        self.timeout_ms = timeout_ms  # the longest silence allowed once booted
        self.boot_ms = boot_ms  # the first boot grace after a cycle; doubles on each retry
        self.since = now  # ticks of the last beat, cycle or restart of the clock
        self.booted = False
        self.attempt = 0  # cycles since the last beat
        self.gave_up = False

    def status(self):
        return {
            "timeout_ms": self.timeout_ms,
            "booted": self.booted,
            "attempt": self.attempt,
            "gave_up": self.gave_up,
        }


class NodeWatch:
    def __init__(
        self, power, now, log=None, max_cycles=5, backoff_cap_ms=3600000, contact_ms=5000
    ):
        self.power = power  # a firmware.power.Power
        self.log = log
        self.max_cycles = max_cycles  # cycles without a beat before giving up on a node
        self.backoff_cap_ms = backoff_cap_ms  # the longest boot grace between two cycles
        self.contact_ms = contact_ms  # controller silence after which nodes are not judged
        self._nodes = {}  # channel index -> _Node
        self._contact = now
        self._absent = False

    def watch(self, ch, timeout_ms, boot_ms, now):
        """Start watching the node on channel ch (index or name): it counts as booted from
        its first beat on. Re-watching resets its state."""
        c = self.power.channel(ch)
        if not isinstance(timeout_ms, int) or not isinstance(boot_ms, int):
            raise ValueError("timeout_ms and boot_ms must be integers")
        if timeout_ms < 1000 or boot_ms < 1000:
            raise ValueError("timeout_ms and boot_ms must be at least 1000")
        self._nodes[c.index] = _Node(timeout_ms, boot_ms, now)
        return c.index

    def unwatch(self, ch):
        c = self.power.channel(ch)
        self._nodes.pop(c.index, None)
        return c.index

    def contact(self, now, hello=False):
        """Any sign of life from the controller (every console request); hello: a session's
        first request, after which its beats come only once it has resynced."""
        if hello or self._absent or ticks_diff(now, self._contact) > self.contact_ms:
            self._absent = False
            for n in self._nodes.values():  # it was gone: every node gets a fresh timeout
                n.since = now
        self._contact = now

    def beat(self, ch, now):
        c = self.power.channel(ch)
        n = self._nodes.get(c.index)
        if n is None:
            return False
        n.since = now
        n.booted = True
        n.attempt = 0
        n.gave_up = False
        return True

    def status(self):
        d = {}
        for ch, n in self._nodes.items():
            d[str(ch)] = n.status()
        return d

    def tick(self, now):
        if ticks_diff(now, self._contact) > self.contact_ms:
            self._absent = True
        # Judge by the controller's last contact, not by now: a node is silent only if the
        # controller was still talking to us after its deadline and brought no beat for it.
        heard = self._contact
        for ch, n in self._nodes.items():
            if n.gave_up:
                continue
            c = self.power.channels[ch]
            if not c.desired:  # switched off on purpose: nothing to watch until it is on again
                n.booted = False
                n.attempt = 0
                n.since = now
                continue
            if n.attempt == 0:
                if not n.booted or ticks_diff(heard, n.since) <= n.timeout_ms:
                    continue
            elif ticks_diff(heard, n.since) <= self._grace(n, n.attempt):
                continue
            self._cycle(c, n, now)

    def _grace(self, n, attempt):
        g = n.boot_ms
        for _ in range(attempt - 1):
            g *= 2
            if g >= self.backoff_cap_ms:
                return self.backoff_cap_ms
        return min(g, self.backoff_cap_ms)

    def _cycle(self, c, n, now):
        n.since = now
        if n.attempt >= self.max_cycles:
            n.gave_up = True
            self._event(c.index, "gave_up", n.attempt, 0)
            return
        try:
            self.power.cycle(c.index, now, None, "watchdog")
        except ValueError as e:  # PowerError: an interlock said no; try again after a grace
            if self.log is not None:
                self.log.count("watchdog.cycle_refused")
                self.log.event("watchdog", ("ch", "action", "error"), (c.index, "refused", str(e)))
            return
        n.attempt += 1
        n.booted = False
        self._event(c.index, "cycle", n.attempt, self._grace(n, n.attempt))

    def _event(self, ch, action, attempt, wait_ms):
        if self.log is not None:
            self.log.event(
                "watchdog", ("ch", "action", "attempt", "wait_ms"), (ch, action, attempt, wait_ms)
            )
