"""bastion.operator.core: the decisions, driven with events and a clock passed in (no thread,
no device, no file). A small simulated site at the end runs whole boots through `decide`."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
from bastion.operator import core
from bastion.operator.core import Config, Memory, Progress, Seen, Want, decide, fold, status
from bastion.site import schema

CFG = Config(cycles=2, backoff_s=10, backoff_max_s=15, ready_s=60,
             timeouts={**core.DEFAULT_TIMEOUTS, "script": 30, "power-on": 100})  # fmt: skip
ON = Want(power="on", relay=0, spec="a")


def ev(i, ts, event_kind, source="controller", endpoint=None, status=None, **payload):
    return {"id": i, "ts": ts, "kind": event_kind, "source": source, "endpoint": endpoint,
            "status": status, "payload": payload}  # fmt: skip


def boot_events(t0=100.0, broken=False):
    """A UEFI boot as the history has it; with broken, the kernel is missing and the node's
    firmware starts over (PXE again) instead of going on."""
    evs = [
        ev(1, t0, "power", "device", ch=0, state="on", why="on"),
        ev(2, t0 + 20, "dhcp", "device", kind="offer", file="ipxe.efi", arch=7, ipxe=False),
        ev(3, t0 + 21, "tftp", "device", stage="start", file="ipxe.efi"),
        ev(4, t0 + 21, "tftp", "device", stage="end", file="ipxe.efi", result="client error 8"),
        ev(5, t0 + 22, "tftp", "device", stage="end", file="ipxe.efi", result="ok"),
        ev(6, t0 + 25, "dhcp", "device", kind="offer", file="http://c/boot.ipxe", arch=7, ipxe=True),
        ev(7, t0 + 26, "boot", endpoint="/boot.ipxe", status=200),
        ev(8, t0 + 26, "boot", endpoint="/ipxe", status=200),
    ]
    if broken:
        return evs + [
            ev(9, t0 + 27, "asset", endpoint="/assets/broken/vmlinuz", status=404),
            ev(10, t0 + 40, "dhcp", "device", kind="offer", file="ipxe.efi", arch=7, ipxe=False),
            ev(11, t0 + 41, "tftp", "device", stage="start", file="ipxe.efi"),
            ev(12, t0 + 45, "boot", endpoint="/ipxe", status=200),
        ]
    return evs + [
        ev(9, t0 + 27, "asset", endpoint="/assets/lab/vmlinuz", status=200),
        ev(10, t0 + 30, "asset", endpoint="/assets/lab/initrd.img", status=200),
        ev(11, t0 + 40, "boot", endpoint="/ignition", status=200),
        {**ev(12, t0 + 45, "callback", "node", endpoint="/callback"), "payload": {"status": "ok"}},
    ]


def progress(events):
    p = Progress()
    for e in events:
        p = fold(p, e)
    return p


def test_the_step_names_agree_with_the_site_schema():
    assert tuple(core.STEPS[:-1]) == schema.BOOT_STEPS
    assert set(core.DEFAULT_TIMEOUTS) == set(schema.BOOT_STEPS)


# --- fold ---------------------------------------------------------------------------------------


def test_a_whole_boot_folds_to_its_callback():
    seen = []
    p = Progress()
    for e in boot_events():
        p = fold(p, e)
        seen.append(p.step)
    assert seen == ["power-on", "pxe", "tftp", "tftp", "tftp", "ipxe", "script", "script",
                    "kernel", "kernel", "ignition", "callback"]  # fmt: skip
    assert (p.boot_at, p.done_at, p.began, p.error, p.event) == (100.0, 145.0, "power-on", None, 12)
    assert p.step_at == 145.0


def test_a_loop_is_no_progress_and_the_error_is_kept():
    p = progress(boot_events(broken=True))
    # the node PXE-booted again after the kernel's 404: its furthest step stays the script
    assert (p.step, p.step_at, p.detail) == ("script", 126.0, "GET /boot.ipxe 200")
    assert p.error == "GET /assets/broken/vmlinuz 404"
    assert p.done_at is None


def test_a_restored_relay_is_not_a_new_boot():
    p = progress(boot_events())
    p2 = fold(p, ev(20, 500, "power", "device", ch=0, state="on", why="restore"))
    assert (p2.boot_at, p2.done_at) == (p.boot_at, p.done_at)


def test_a_reboot_after_a_finished_boot_is_a_new_boot():
    p = progress(boot_events())
    p = fold(p, ev(20, 900, "dhcp", "device", kind="offer", file="ipxe.efi", arch=7, ipxe=False))
    assert (p.boot_at, p.began, p.step, p.done_at) == (900, "reboot", "pxe", None)


def test_steps_before_any_beginning_are_not_a_boot():
    p = progress([ev(1, 10, "boot", endpoint="/ipxe", status=200)])
    assert p.boot_at is None and p.step is None


def test_a_pxe_request_without_an_on_edge_begins_a_boot():
    p = progress(boot_events()[1:])
    assert (p.began, p.boot_at, p.step) == ("pxe", 120.0, "callback")


def test_a_local_disk_script_ends_the_network_boot():
    p = progress([ev(1, 10, "power", "device", state="on", why="on"),
                  ev(2, 20, "boot", endpoint="/ipxe", status=200, boot="local-disk")])  # fmt: skip
    assert p.local_disk and p.step == "script"


def test_a_failed_callback_is_an_error_not_the_end():
    failed = {**ev(12, 150, "callback", "node", endpoint="/callback"),
              "payload": {"status": "error", "message": "ignition failed"}}
    p = progress(boot_events()[:-1] + [failed])
    assert p.done_at is None and p.step == "ignition"
    assert p.error == "callback: status error: ignition failed"


# --- decide -------------------------------------------------------------------------------------


def run(want, seen, mem, now, cfg=CFG):
    acts, mem = decide("n1", want, seen, mem, now, cfg)
    return [a.action for a in acts], mem, acts


def test_declared_on_and_off_power_it_once():
    names, mem, acts = run(ON, Seen(relay="off"), None, 0)
    assert names == ["power-on"] and acts[0].reason == "declared on; its relay is off"
    assert run(ON, Seen(relay="off"), mem, 5)[0] == []  # sent a moment ago: not again
    assert run(ON, Seen(relay="queued"), mem, 6)[0] == []  # behind the stagger
    assert run(ON, Seen(relay="off"), mem, 5 + CFG.settle_s)[0] == ["power-on"]  # lost: again
    off = replace(ON, power="off")
    names, mem, acts = run(off, Seen(relay="on"), mem, 50)
    assert names == ["power-off"] and acts[0].reason == "declared off; its relay is on"
    assert run(off, Seen(relay="on"), mem, 51)[0] == []
    assert run(off, Seen(relay="off"), mem, 200)[0] == []


def test_no_device_no_power_and_an_unmanaged_machine_is_left_alone():
    assert run(ON, Seen(relay=None), None, 0)[0] == []
    assert run(replace(ON, power=None), Seen(relay="off"), None, 0)[0] == []
    assert run(replace(ON, maintenance=True), Seen(relay="off"), None, 0)[0] == []


def test_a_boot_not_seen_begin_is_never_judged():
    # the controller started while the relay was on: a running node, not a stuck boot
    assert run(ON, Seen(relay="on"), None, 10_000)[0] == []


def test_a_stuck_boot_is_cycled_with_backoff_then_failed():
    evs = boot_events(broken=True)
    seen = Seen(relay="on", progress=progress(evs))
    mem = Memory(spec="a")
    assert run(ON, seen, mem, 150)[0] == []  # within the script step's 30 s
    names, mem, acts = run(ON, seen, mem, 157)
    assert names == ["stuck"] and (acts[0].attempt, acts[0].of, acts[0].step) == (1, 2, "script")
    assert "last error: GET /assets/broken/vmlinuz 404" in acts[0].reason
    assert "power-cycle 1 of 2 in 10s" in acts[0].reason
    assert status(ON, seen, mem, 160, CFG).text == "Stuck (1 of 2)"
    assert run(ON, seen, mem, 166)[0] == []  # backoff: 10 s
    names, mem, _ = run(ON, seen, mem, 167)
    assert names == ["power-cycle"] and mem.attempt == 1
    assert run(ON, Seen(relay="cycling", progress=seen.progress), mem, 168)[0] == []
    # the second boot, stuck at the same place
    seen2 = Seen(relay="on", progress=progress([{**e, "ts": e["ts"] + 100} for e in evs]))
    assert status(ON, seen2, mem, 230, CFG).text == "Booting (script), retry 1 of 2"
    names, mem, acts = run(ON, seen2, mem, 257)
    assert names == ["stuck"] and "power-cycle 2 of 2 in 15s" in acts[0].reason  # 20, capped
    names, mem, _ = run(ON, seen2, mem, 272)
    assert names == ["power-cycle"] and mem.attempt == 2
    seen3 = Seen(relay="on", progress=progress([{**e, "ts": e["ts"] + 200} for e in evs]))
    names, mem, acts = run(ON, seen3, mem, 357)
    assert names == ["failed"]
    assert acts[0].reason == ("stuck after script (GET /boot.ipxe 200) for 30s, 2 power-cycle(s) "
                              "did not help; last error: GET /assets/broken/vmlinuz 404")
    st = status(ON, seen3, mem, 400, CFG)
    assert (st.phase, st.text, st.step) == ("Failed", "Failed (stuck after script)", "script")
    # Failed: nothing more, however long, until someone acts
    assert run(ON, seen3, mem, 10_000)[0] == []
    assert run(ON, Seen(relay="off", progress=seen3.progress), mem, 10_000)[0] == []
    # an edit of its declaration is someone acting
    names, mem2, _ = run(replace(ON, spec="b"), seen3, mem, 10_001)
    assert names[0] == "reset" and mem2.failed is None and mem2.attempt == 0
    # so is a release: the same boot is judged again from the start
    names, _, _ = run(ON, seen3, core.released(mem), 10_001)
    assert names == ["stuck"]


def test_a_restarted_controller_waits_for_a_running_nodes_beats_before_judging_it():
    """A node whose profile sends no callback is Ready by its heartbeats alone. A restarted
    controller has heard none yet, so the boot's last step (long past its timeout) made it
    "stuck" at the first pass: a false alarm, and a power-cycle had the beats been slower than
    the backoff. Until ready_s after the controller began listening, a boot from before that is
    not judged for want of beats; a boot that stays silent is judged after it."""
    evs = boot_events()[:-1]  # power-on to /ignition at 140; no callback
    running = Seen(relay="on", progress=progress(evs), heartbeat_at=990, listening_since=50)
    assert run(ON, running, Memory(spec="a"), 1000)[0] == []  # Ready by its beats
    restarted = Seen(relay="on", progress=progress(evs), listening_since=5000)
    assert run(ON, restarted, Memory(spec="a"), 5001)[0] == []
    assert run(ON, restarted, Memory(spec="a"), 5000 + CFG.ready_s - 1)[0] == []
    assert run(ON, replace(restarted, heartbeat_at=5010), Memory(spec="a"), 5011)[0] == []
    assert run(ON, restarted, Memory(spec="a"), 5000 + CFG.ready_s + 1)[0] == ["stuck"]  # silent
    # and says so meanwhile: not "Booting (ignition)", a step it left an hour ago
    st = status(ON, restarted, Memory(spec="a"), 5001, CFG)
    assert (st.phase, st.text, st.since) == ("Unknown", "Unknown (waiting for a beat)", 5000), st
    assert "last at ignition" in st.reason and "ready_s" in st.reason, st
    assert status(ON, replace(restarted, heartbeat_at=5010), Memory(spec="a"), 5011, CFG).phase == "Ready"
    # a boot from before the restart (/ignition at 4990) within its step's timeout: booting
    fresh = Seen(relay="on", progress=progress(boot_events(t0=4950)[:-1]), listening_since=5000)
    assert status(ON, fresh, Memory(spec="a"), 5001, CFG).text == "Booting (ignition)"
    # a boot that began after the controller started is judged as always
    late = Seen(relay="on", progress=progress(boot_events(t0=6000)[:-1]), listening_since=5000)
    assert run(ON, late, Memory(spec="a"), 6040 + core.DEFAULT_TIMEOUTS["ignition"] + 1)[0] == ["stuck"]


def test_a_boot_that_reaches_its_callback_after_a_cycle_recovers():
    mem = Memory(spec="a", attempt=1, stuck_boot=1.0)
    seen = Seen(relay="on", progress=progress(boot_events()))
    names, mem, _ = run(ON, seen, mem, 500)
    assert names == ["recovered"] and mem.attempt == 0


def test_a_hold_stops_everything_until_released():
    mem = core.held(Memory(spec="a"), "api", "off", 5)
    for relay in ("off", "on"):
        assert run(ON, Seen(relay=relay, progress=progress(boot_events(broken=True))), mem, 9999)[0] == []
    st = status(ON, Seen(relay="off"), mem, 10, CFG)
    assert (st.phase, st.text) == ("Held", "Held (power off by api)")
    assert run(ON, Seen(relay="off"), core.released(mem), 10)[0] == ["power-on"]


def test_reprovision_acts_on_a_change_only():
    want = replace(ON, reprovision="1")
    names, mem, _ = run(want, Seen(relay="on"), None, 0)
    assert names == []  # first sight: adopted
    names, mem, acts = run(replace(want, reprovision="2"), Seen(relay="on"), mem, 1)
    assert names == ["reprovision", "power-cycle"]
    assert acts[0].reason == "reprovision changed from 1 to 2: network-boot and install again"
    assert run(replace(want, reprovision="2"), Seen(relay="on"), mem, 2)[0] == []
    # off and declared off: the mark is cleared, the power stays off
    names, _, _ = run(replace(want, power="off", reprovision="3"), Seen(relay="off"), mem, 3)
    assert names == ["reprovision"]
    # no relay: the mark only
    names, _, _ = run(Want(reprovision="3", spec="a"), Seen(), mem, 3)
    assert names == ["reprovision"]


def test_a_boot_that_moves_on_after_its_stuck_verdict_has_its_power_cycle_called_off():
    # Judged stuck, then a new step during the backoff: the pending cycle stayed, the status
    # said Stuck, and when the new step timed out the node was cycled at once (no verdict for
    # that step, no backoff)
    evs = boot_events()[:2]  # power-on at 100, the offer at 120: the pxe step
    t = 120 + core.DEFAULT_TIMEOUTS["pxe"] + 1
    names, mem, _ = run(ON, Seen(relay="on", progress=progress(evs)), Memory(spec="a"), t)
    assert names == ["stuck"]
    moved = progress([*evs, ev(3, t + 5, "tftp", "device", stage="start", file="ipxe.efi")])
    names, mem, acts = run(ON, Seen(relay="on", progress=moved), mem, t + 6)
    assert names == ["recovered"] and "called off" in acts[0].reason
    assert status(ON, Seen(relay="on", progress=moved), mem, t + 6, CFG).text == "Booting (tftp)"
    later = t + 5 + core.DEFAULT_TIMEOUTS["tftp"] + 1  # tftp times out: a verdict of its own, a backoff
    names, mem, acts = run(ON, Seen(relay="on", progress=moved), mem, later)
    assert names == ["stuck"] and "no step after tftp" in acts[0].reason
    assert run(ON, Seen(relay="on", progress=moved), mem, later + 1)[0] == []


def test_a_hold_or_release_before_the_first_pass_does_not_make_the_word_a_change():
    # A person's hold or release on a machine the operator has no memory of yet made a blank
    # memory (no spec, no word): the next pass read the declared word as a change, and a
    # running, provisioned node was reprovisioned and power-cycled.
    want = replace(ON, reprovision="v1")
    seen = Seen(relay="on", progress=progress(boot_events()))
    for mem in (core.released(None), core.released(core.held(None, "api", None, 5))):
        names, after, _ = run(want, seen, mem, 10)
        assert names == [] and after.reprovisioned == "v1", names
        assert run(replace(want, reprovision="v2"), seen, after, 11)[0] == ["reprovision", "power-cycle"]
    held = core.held(None, "api", "off", 5)  # held: nothing done, the word adopted for later
    names, after, _ = run(want, seen, held, 10)
    assert names == [] and after.reprovisioned == "v1" and after.hold is not None


def test_reprovision_of_a_machine_in_the_middle_of_a_cycle_sends_no_second_cycle():
    # it is heading into a fresh network boot already; a cycle sent then (refused by the device,
    # "already cycling") came back 30 s later and cut the install boot that had begun
    want = replace(ON, reprovision="1")
    _, mem, _ = run(want, Seen(relay="on"), None, 0)
    names, mem, _ = run(replace(want, reprovision="2"), Seen(relay="cycling"), mem, 1)
    assert names == ["reprovision"] and mem.reprovisioned == "2"
    assert run(replace(want, reprovision="2"), Seen(relay="on"), mem, 40)[0] == []


def test_memory_put_back_after_a_refusal_takes_the_new_declaration():
    mem = Memory(spec="a", attempt=2, failed="stuck")
    assert core.respecced(mem, "a") is mem
    assert core.respecced(mem, "b") == Memory(spec="b")


def test_a_refused_command_waits_before_it_is_tried_again():
    mem = Memory(spec="a", retry_at=50)
    assert run(ON, Seen(relay="off"), mem, 49)[0] == []
    assert run(ON, Seen(relay="off"), mem, 50)[0] == ["power-on"]


# --- status -------------------------------------------------------------------------------------


@pytest.mark.parametrize("want, seen, mem, now, text", [
    (ON, Seen(relay="off"), None, 0, "Off"),
    (ON, Seen(relay="off"), Memory(sent={"state": "on", "at": 0}), 1, "Powering"),
    (ON, Seen(relay="queued"), None, 0, "Powering (queued)"),
    (ON, Seen(relay="on", progress=progress(boot_events()[:1])), None, 101, "Powering"),
    (ON, Seen(relay="on", progress=progress(boot_events()[:3])), None, 125, "Booting (tftp)"),
    (ON, Seen(relay="on", progress=progress(boot_events())), None, 200, "Provisioned"),
    (ON, Seen(relay="on", progress=progress(boot_events()), heartbeat_at=190), None, 200, "Ready"),
    (ON, Seen(relay="on", progress=progress(boot_events()), heartbeat_at=100), None, 300, "Provisioned"),
    (ON, Seen(relay="on"), None, 0, "On"),
    (ON, Seen(relay="on", installed=True), None, 0, "Provisioned (installed)"),
    (Want(spec="a"), Seen(), None, 0, "Unknown"),
    (Want(spec="a"), Seen(progress=progress(boot_events()[1:4])), None, 130, "Booting (tftp)"),
    (replace(ON, maintenance=True), Seen(relay="on"), None, 0, "Maintenance"),
])  # fmt: skip
def test_status_says_where_a_machine_stands(want, seen, mem, now, text):
    st = status(want, seen, mem, now, CFG)
    assert st.text == text and st.phase in core.PHASES


# --- a simulated site: whole boots through decide, on a clock passed in --------------------------


class SimulatedSite:
    """A stand-in for the device and its nodes (records what it was told): a relay on starts a
    boot whose events arrive on schedule; a broken node loops without getting further."""

    def __init__(self, broken: set[str], stagger: float = 2):
        self.broken = broken
        self.stagger = stagger
        self.relay: dict[str, str] = {}
        self.events: dict[str, list[dict]] = {}
        self.commands: list[tuple[float, str, str]] = []
        self.next_on = 0.0

    def act(self, a: core.Action, now: float) -> None:
        self.commands.append((now, a.machine, a.action))
        if a.action in ("power-on", "power-cycle"):
            at = max(now + (5 if a.action == "power-cycle" else 0), self.next_on)
            self.next_on = at + self.stagger  # the device's stagger between on edges
            self.relay[a.machine] = "on"
            evs = boot_events(at, broken=a.machine in self.broken)
            self.events[a.machine] = evs
        elif a.action == "power-off":
            self.relay[a.machine] = "off"

    def seen(self, name: str, now: float) -> Seen:
        return Seen(relay=self.relay.get(name, "off"),
                    progress=progress([e for e in self.events.get(name, []) if e["ts"] <= now]))


def test_a_simulated_site_boots_the_good_nodes_and_fails_the_broken_one():
    names = ["bios-1", "broken-1", "uefi-1"]
    world = SimulatedSite(broken={"broken-1"})
    mems: dict[str, Memory | None] = {n: None for n in names}
    decisions: list[core.Action] = []
    for now in range(1200):
        for n in names:
            acts, mems[n] = decide(n, replace(ON, relay=names.index(n)), world.seen(n, now),
                                   mems[n], now, CFG)  # fmt: skip
            decisions += acts
            for a in acts:
                if a.effect:
                    world.act(a, now)
    texts = {n: status(ON, world.seen(n, 1200), mems[n], 1200, CFG).text for n in names}
    assert texts == {"bios-1": "Provisioned", "uefi-1": "Provisioned",
                     "broken-1": "Failed (stuck after script)"}  # fmt: skip
    # every node powered on once; the broken one cycled exactly `cycles` times, nothing else
    assert [(n, a) for _, n, a in world.commands] == [
        ("bios-1", "power-on"), ("broken-1", "power-on"), ("uefi-1", "power-on"),
        ("broken-1", "power-cycle"), ("broken-1", "power-cycle")]  # fmt: skip
    # the on edges were staggered by the device
    starts = sorted(evs[0]["ts"] for evs in world.events.values())
    assert all(b - a >= world.stagger for a, b in itertools.pairwise(starts))
    # the waits before the cycles doubled, and every decision has its reason
    stuck = [a for a in decisions if a.action == "stuck"]
    assert [a.attempt for a in stuck] == [1, 2] and all(a.reason for a in decisions)
    [failed] = [a for a in decisions if a.action == "failed"]
    assert failed.step == "script" and failed.machine == "broken-1"
