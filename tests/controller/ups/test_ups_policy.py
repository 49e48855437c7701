"""bastion.ups.core: the power-cut policy as pure functions, no threads, no time passing but
the `now` each call is given."""

from __future__ import annotations

from bastion.ups.core import Memory, Node, Policy, Ups, decide

P = Policy(on_battery_s=60, low_charge=20, shutdown_wait_s=120, quiet_s=15, resume_charge=50)
OL, OB = ("OL",), ("OB", "DISCHRG")


def nodes(now, beating=("a1", "a2", "s1"), relays="on"):
    """Two agents and a server (listed between them, as machines.yaml may), all beating."""
    spec = [("a1", 0, False), ("s1", 1, True), ("a2", 2, False)]
    return [Node(n, ch, srv, now - 1 if n in beating else None, relays) for n, ch, srv in spec]


def run(ups, now, mem, beating=("a1", "a2", "s1"), relays="on", error=None):
    acts, mem = decide(ups, error, nodes(now, beating, relays), mem, now, P)
    return [(a.action, a.machine) for a in acts], mem


def test_a_short_cut_is_only_recorded():
    acts, mem = run(Ups(OL, 100), 0, None)
    assert acts == [("status", None)] and mem.phase == "mains"
    acts, mem = run(Ups(OB, 95), 10, mem)
    assert acts == [("status", None), ("on-battery", None)] and not mem.holding
    acts, mem = run(Ups(OB, 93), 69, mem)  # 59 s: not yet
    assert acts == [] and mem.phase == "on-battery"
    acts, mem = run(Ups(OL, 93), 70, mem)
    assert ("mains", None) in acts and mem.phase == "mains"


def test_a_long_cut_asks_agents_then_servers_then_opens_relays_in_order_and_comes_back():
    _, mem = run(Ups(OL, 100), 0, None)
    _, mem = run(Ups(OB, 90), 0, mem)
    acts, mem = run(Ups(OB, 88), 60, mem)
    assert acts == [("hold", None), ("shutdown", "a1"), ("shutdown", "a2")]
    assert mem.holding and mem.phase == "shutdown"
    # the agents still beat: the servers are not asked yet
    acts, mem = run(Ups(OB, 88), 70, mem)
    assert acts == []
    # a1 and a2 stopped beating; s1 still beats: it is asked now
    acts, mem = run(Ups(OB, 87), 90, mem, beating=("s1",))
    assert acts == [("down", "a1"), ("down", "a2"), ("shutdown", "s1")]
    acts, mem = run(Ups(OB, 85), 110, mem, beating=())
    assert acts == [("status", None), ("down", "s1"), ("open", "a1"), ("open", "a2"), ("open", "s1")]
    assert mem.phase == "off" and mem.opened == ("a1", "a2", "s1")
    # mains back, battery still low: wait, once
    acts, mem = run(Ups(OL, 30), 200, mem, beating=(), relays="off")
    assert acts == [("status", None), ("waiting", None)] and mem.holding
    acts, mem = run(Ups(OL, 31), 210, mem, beating=(), relays="off")
    assert acts == [] and mem.holding
    acts, mem = run(Ups(OL, 55), 300, mem, beating=(), relays="off")
    assert acts == [("status", None), ("release", None),
                    ("power-on", "s1"), ("power-on", "a1"), ("power-on", "a2")]
    assert mem.phase == "mains" and not mem.holding and mem.opened == ()


def test_nodes_that_do_not_go_down_are_given_the_bounded_wait_only():
    _, mem = run(Ups(OB, 90), 0, None)
    _, mem = run(Ups(OB, 90), 60, mem)
    acts, mem = run(Ups(OB, 90), 179, mem)
    assert acts == []
    acts, mem = run(Ups(OB, 90), 180, mem)
    assert acts == [("timeout", None), ("shutdown", "s1")]
    acts, mem = run(Ups(OB, 90), 300, mem)
    assert acts == [("timeout", None), ("open", "a1"), ("open", "a2"), ("open", "s1")]


def test_low_battery_skips_the_waiting():
    _, mem = run(Ups(OB, 90), 0, None)
    _, mem = run(Ups(OB, 90), 60, mem)  # agents asked
    acts, mem = run(Ups(("OB", "LB"), 50), 65, mem)
    assert ("low-battery", None) in acts
    assert [a for a in acts if a[0] == "open"] == [("open", "a1"), ("open", "a2"), ("open", "s1")]
    # straight from a fresh cut, by charge alone
    _, mem = run(Ups(OL, 100), 0, None)
    acts, mem = run(Ups(OB, 19), 1, mem)
    assert [a[0] for a in acts] == ["status", "on-battery", "hold", "low-battery", "open", "open", "open"]


def test_a_silent_ups_is_an_event_and_never_a_shutdown():
    _, mem = run(Ups(OL, 100), 0, None)
    acts, mem = run(None, 10, mem, error="cannot reach upsd")
    assert acts == [("lost", None)] and mem.phase == "mains" and not mem.holding
    for t in range(20, 1000, 50):
        acts, mem = run(None, t, mem, beating=())
        assert acts == [] and not mem.holding
    acts, mem = run(Ups(OL, 100), 1000, mem)
    assert acts == [("back", None)]
    # on battery, then silent: the cut's timer does not run out into a shutdown
    _, mem = run(Ups(OB, 90), 1010, mem)
    acts, mem = run(None, 1500, mem, error="gone")
    assert acts == [("lost", None)] and mem.phase == "on-battery" and not mem.holding


def test_machines_already_off_or_without_relay_are_not_switched_and_stay_off():
    _, mem = run(Ups(OB, 90), 0, None, beating=())
    acts, mem = decide(Ups(OB, 90), None, [Node("x", 0, False, None, "off"), Node("y", None, False, None),
                       Node("z", 2, True, None, "on")], mem, 60, P)
    assert [(a.action, a.machine) for a in acts] == [("hold", None), ("open", "z")]
    acts, mem = decide(Ups(OL, 90), None, [Node("x", 0, False, None, "off"), Node("z", 2, True, None, "off")],
                       mem, 100, P)
    assert [(a.action, a.machine) for a in acts][-1] == ("power-on", "z")
    assert not any(a.machine == "x" for a in acts)


def test_a_relay_seen_on_while_held_is_opened_again():
    mem = Memory(phase="off", opened=("a1",), status="OB DISCHRG", charge=80)
    acts, mem = decide(Ups(OB, 80), None, [Node("a1", 0, False, None, "on")], mem, 0, P)
    assert [(a.action, a.machine) for a in acts] == [("open", "a1")]
