"""firmware.watchdog: task check-ins and the node heartbeat watchdog, with a fake clock."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.log import Log
from firmware.power import Power
from firmware.watchdog import NodeWatch, TaskWatch

DEADLINES = {"dhcp": 2000, "tftp": 2000, "console": 1000, "power": 1000}


class Outputs:
    def __init__(self):
        self.level = {}

    def set(self, ch, on):
        self.level[ch] = on


def watch_events(log):
    return [e for e in log.recent() if e["ev"] == "watchdog"]


# --- TaskWatch ------------------------------------------------------------------------------
def test_feeds_while_every_task_checks_in():
    w = TaskWatch(DEADLINES, 0)
    for t in range(0, 10000, 500):
        for name in DEADLINES:
            w.checkin(name, t)
        assert w.may_feed(t + 400)
    assert w.tripped is None


def test_a_hung_task_stops_the_feeding_for_good():
    log = Log(8)
    w = TaskWatch(DEADLINES, 0, log)
    for t in range(0, 3000, 500):
        for name in ("dhcp", "tftp", "power"):
            w.checkin(name, t)
        if t < 1000:
            w.checkin("console", t)
    assert w.may_feed(1000)
    assert w.late(2600) == "console"
    assert not w.may_feed(2600)
    for name in DEADLINES:  # the task comes back: too late, the reset goes ahead
        w.checkin(name, 2700)
    assert not w.may_feed(2700)
    assert w.tripped == "console"
    ev = watch_events(log)
    assert len(ev) == 1 and ev[0]["task"] == "console" and ev[0]["late_ms"] == 2100
    assert log.counters["watchdog.starved"] == 1


def test_a_task_that_never_starts_is_caught():
    w = TaskWatch({"dhcp": 1000, "tftp": 1000}, 0)
    w.checkin("dhcp", 900)
    assert w.may_feed(1000)
    w.checkin("dhcp", 1500)
    assert not w.may_feed(1500) and w.tripped == "tftp"
    st_ = w.status(1500)
    assert st_["tftp"] == 1500 and st_["dhcp"] == 0 and st_["tripped"] == "tftp"


@settings(max_examples=200)
@given(st.lists(st.tuples(st.integers(0, 1500), st.sampled_from(sorted(DEADLINES))), max_size=40))
def test_may_feed_is_exactly_every_task_within_its_deadline(steps):
    w = TaskWatch(DEADLINES, 0)
    last = dict.fromkeys(DEADLINES, 0)
    now = 0
    ever_late = False
    for dt, name in steps:
        now += dt
        late = any(now - last[n] > DEADLINES[n] for n in DEADLINES)
        ever_late = ever_late or late
        assert w.may_feed(now) == (not ever_late)
        w.checkin(name, now)
        last[name] = now


# --- NodeWatch ------------------------------------------------------------------------------
def make(n=2, min_off=2000, **kw):
    log = Log(64)
    chans = [{"min_off_ms": min_off, "max_cycles": 50, "window_ms": 60000} for _ in range(n)]
    out = Outputs()
    p = Power(out, chans, None, log, stagger_ms=0)
    p.restore(0)
    for ch in range(n):
        p.on(ch, 0)
    nodes = NodeWatch(p, 0, log, **kw)
    return p, nodes, out, log


def run(p, nodes, start, end, step=100, contact=True, beat=None):
    for t in range(start, end, step):
        if contact:
            nodes.contact(t)
        if beat is not None:
            for ch in beat(t):
                nodes.beat(ch, t)
        nodes.tick(t)
        p.tick(t)


def test_a_healthy_node_is_left_alone():
    p, nodes, out, log = make()
    nodes.watch(0, 5000, 30000, 0)
    run(p, nodes, 0, 60000, beat=lambda t: [0] if t % 2000 == 0 else [])
    assert watch_events(log) == []
    assert out.level[0] is True


def test_a_node_that_never_booted_is_not_judged():
    p, nodes, out, log = make()
    nodes.watch(0, 5000, 30000, 0)
    run(p, nodes, 0, 120000)
    assert watch_events(log) == []


def test_a_silent_node_is_cycled_with_backoff_then_given_up_on():
    p, nodes, out, log = make(max_cycles=3, backoff_cap_ms=100000)
    nodes.watch(0, 5000, 10000, 0)
    nodes.beat(0, 1000)
    run(p, nodes, 1000, 200000)
    ev = [(e["action"], e["attempt"], e["wait_ms"]) for e in watch_events(log)]
    assert ev == [("cycle", 1, 10000), ("cycle", 2, 20000), ("cycle", 3, 40000), ("gave_up", 3, 0)]
    cycles = [e["t"] for e in log.recent() if e["ev"] == "power" and e.get("why") == "watchdog"]
    assert len(cycles) == 3
    assert out.level[0] is True  # back on after each cycle, and left on after giving up
    assert nodes.status()["0"]["gave_up"] is True


def test_the_backoff_is_capped():
    p, nodes, out, log = make(max_cycles=10, backoff_cap_ms=25000)
    nodes.watch(0, 5000, 10000, 0)
    nodes.beat(0, 0)
    run(p, nodes, 0, 200000, step=500)
    waits = [e["wait_ms"] for e in watch_events(log) if e["action"] == "cycle"]
    assert waits[:4] == [10000, 20000, 25000, 25000]


def test_a_beat_after_a_cycle_resets_the_backoff():
    p, nodes, out, log = make(max_cycles=5)
    nodes.watch(0, 5000, 10000, 0)
    nodes.beat(0, 0)
    run(p, nodes, 0, 8000)  # cycled at ~5100
    run(p, nodes, 8000, 25000, beat=lambda t: [0] if t < 12000 and t % 1000 == 0 else [])
    ev = [(e["action"], e["attempt"]) for e in watch_events(log)]
    assert ev == [("cycle", 1), ("cycle", 1)]  # the second silence starts over at attempt 1


def test_nodes_are_not_judged_while_the_controller_is_silent():
    p, nodes, out, log = make(contact_ms=10000)
    nodes.watch(0, 5000, 10000, 0)
    nodes.beat(0, 0)
    run(p, nodes, 0, 4000)
    run(p, nodes, 4000, 100000, contact=False)  # the controller is gone: heartbeats cannot come
    assert watch_events(log) == []
    run(p, nodes, 100000, 104000)  # back: the node gets a full timeout before it is judged
    assert watch_events(log) == []
    run(p, nodes, 104000, 106000)
    assert [e["action"] for e in watch_events(log)] == ["cycle"]


def test_a_controller_back_after_a_short_absence_gets_no_healthy_node_cycled():
    # Away 29 s (a restart), less than the 60 s that used to mark an absence: its first
    # request after it came after the node's deadline (6 s), and the node was cycled while it
    # beat all along, its beats waiting for the controller's resync.
    p, nodes, out, log = make()
    nodes.watch(0, 6000, 30000, 0)
    run(p, nodes, 0, 21000, beat=lambda t: [0] if t % 2000 == 0 else [])
    run(p, nodes, 21000, 50000, contact=False)
    run(p, nodes, 50000, 56000, step=2000)  # requests every 2 s again, its beats not yet
    assert watch_events(log) == [] and out.level[0] is True
    run(p, nodes, 56000, 70000, step=2000, beat=lambda t: [0])  # after the resync: its beats
    assert watch_events(log) == []


def test_a_hello_restarts_every_nodes_clock():
    # A controller that restarts quickly (its requests never 5 s apart) says hello first; the
    # beats come only after its resync
    p, nodes, _, log = make()
    nodes.watch(0, 6000, 30000, 0)
    nodes.beat(0, 0)
    run(p, nodes, 0, 5000)
    nodes.contact(5500, hello=True)
    run(p, nodes, 5500, 11000)  # 11 s after the beat, 5.5 s after the hello
    assert watch_events(log) == []
    run(p, nodes, 11000, 12000)  # and judged again once its own timeout has passed
    assert [e["action"] for e in watch_events(log)] == ["cycle"]


def test_a_node_switched_off_on_purpose_is_not_cycled():
    p, nodes, out, log = make()
    nodes.watch(1, 5000, 10000, 0)
    nodes.beat(1, 0)
    p.off(1, 1000)
    run(p, nodes, 1000, 60000)
    assert watch_events(log) == [] and out.level[1] is False


def test_a_refused_cycle_is_logged_and_retried_later():
    log = Log(64)
    p = Power(Outputs(), [{"min_off_ms": 1000, "max_cycles": 1, "window_ms": 600000}], None, log)
    p.restore(0)
    p.on(0, 0)  # the one power-on edge the window allows
    nodes = NodeWatch(p, 0, log)
    nodes.watch(0, 5000, 10000, 0)
    nodes.beat(0, 0)
    run(p, nodes, 0, 20000)
    ev = watch_events(log)
    assert [e["action"] for e in ev] == ["refused"] * 3  # about every timeout (5 s)
    assert "cycle storm" in ev[0]["error"]
    assert log.counters["watchdog.cycle_refused"] == 3


def test_watch_arguments_are_checked():
    p, nodes, out, log = make()
    for args in ((0, 500, 10000), (0, 5000, "x"), (9, 5000, 10000)):
        try:
            nodes.watch(*args, 0)
        except ValueError:
            continue
        raise AssertionError(f"accepted {args}")
    assert nodes.watch("ch1", 5000, 10000, 0) == 1
    assert nodes.unwatch(1) == 1 and nodes.status() == {}
    assert nodes.beat(0, 0) is False  # not watched
