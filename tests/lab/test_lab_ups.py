"""A power cut in the lab (marker `lab`): NUT's real upsd and dummy-ups in the lab's LAN, the
controller's UPS watch reading it, and two QEMU nodes that boot through the device and beat
until their heartbeat's answer asks them to shut down (the lab initrd then syncs and powers off:
QEMU exits). The test rewrites dummy-ups' state file: on battery, the agent is asked first and
the server once the agent is down, their relays open in that order; mains back, the server is
powered on first and both boot again. A UPS that stops answering shuts nothing down.

The policy's times are the lab's own (ups: below), short so that a cut plays in a minute."""

from __future__ import annotations

import json
import os
import time

import pytest
from bastion.lab.lab import Lab, steady_nodes
from bastion.lab.netns import LabError, Namespace
from nutkit import NutServer, need_nut

pytestmark = [pytest.mark.lab, pytest.mark.timeout(1500)]

NAME, PREFIX = "ebups", "10.94.0"
SERVER, AGENT = "srv-1", "agt-1"
UPS = {
    "name": "labups", "host": "127.0.0.1", "port": 3493, "poll_s": 1, "timeout_s": 2,
    "on_battery_s": 3, "low_charge": 20, "shutdown_wait_s": 180,
    # a node beats every 2 s, but a wget under TCG on a busy host can take several
    "quiet_s": 12, "resume_charge": 50,
}  # fmt: skip
BOOT_S = 600  # a guard against a hang, not a measure


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (network namespaces, taps)")
    need_nut()
    lab = Lab(NAME, PREFIX, tmp_path_factory.mktemp("lab"))
    nut = None
    try:
        lab.up(steady_nodes(), progress=lambda msg: None, site_extra={"ups": UPS})
        # upsd on the LAN namespace's loopback, where the controller (in the same namespace)
        # finds it as site.yaml says: 127.0.0.1:3493.
        nut = NutServer(lab.workdir / "nut", ups=UPS["name"], ns=Namespace(lab.net.lan)).start()
        lab.nut = nut
        _wait(
            lambda: lab.api("GET", "/api/v1/ups")["status"] == "OL", 30, "the controller reads upsd"
        )
        yield lab
    finally:
        if nut is not None:
            nut.stop()
        lab.down()


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _ups(lab: Lab, after: int) -> list[dict]:
    return lab.events(after, kind="ups")


def _steps(evs: list[dict]) -> list[tuple[str, str | None]]:
    return [(e["payload"]["action"], e.get("machine")) for e in evs]


def _first_beat(lab: Lab, node: str, after: int) -> dict | None:
    return next((e for e in lab.events(after, kind="heartbeat") if e.get("machine") == node), None)


def _vm_log(lab: Lab) -> list[dict]:
    """The lab wiring's record of the VMs: started, halted (QEMU exited: the node powered
    itself off), power-cut (killed by its relay opening)."""
    out = []
    for line in (lab.logs / "wiring.log").read_text().splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and ev.get("ev") == "vm":
            out.append(ev)
    return out


def _beats(lab: Lab, node: str) -> int:
    """The heartbeats a node's console says it sent (the controller records only news)."""
    console = (lab.logs / f"{node}.console").read_text(errors="replace")
    return console.count("lab-init: heartbeat ")


def _running(lab: Lab) -> dict[str, dict]:
    """Both nodes booted and beating (powered on together, the device staggers them); the
    first heartbeat of the boots this started."""
    after = {n: lab.power_on(n) for n in (SERVER, AGENT) if lab.vm_state(n) != "running"}
    beats = {}
    for node, since in after.items():
        lab.wait_callback(node, since, BOOT_S)
        beats[node] = _wait(lambda n=node, a=since: _first_beat(lab, n, a), 60, f"{node} beats")
    for node in (SERVER, AGENT):
        assert lab.vm_state(node) == "running", node
    return beats


def test_nodes_boot_and_beat_and_the_controller_reads_the_ups(lab):
    beats = _running(lab)
    assert set(beats) == {SERVER, AGENT}
    assert all(b["payload"].get("boot_id") for b in beats.values())
    view = lab.api("GET", "/api/v1/ups")
    assert view["ups"] == "labups" and view["answering"] is True
    assert view["status"] == "OL" and view["charge"] == 100 and view["phase"] == "mains"


def test_a_ups_that_stops_answering_shuts_nothing_down(lab):
    _running(lab)
    after = lab.last_event_id()
    lab.nut.stop_upsd()
    try:
        lost = _wait(lambda: [e for e in _ups(lab, after) if e["payload"]["action"] == "lost"],
                     30, "a lost event")  # fmt: skip
        # Many polls (poll_s 1) and longer than on_battery_s and quiet_s together: still
        # nothing is held, asked or opened, and both nodes still run and beat.
        seen = lost[0]["id"]
        beats = {n: _beats(lab, n) for n in (SERVER, AGENT)}
        time.sleep(UPS["on_battery_s"] + UPS["quiet_s"] + 5)
        view = lab.api("GET", "/api/v1/ups")
        assert view["answering"] is False and view["phase"] == "mains" and view["holding"] is None
        assert view["asked"] == [] and view["opened"] == []
        assert [a for a, _ in _steps(_ups(lab, after))] == ["lost"]
        assert lab.vm_state(SERVER) == lab.vm_state(AGENT) == "running"
        assert all(_beats(lab, n) > beats[n] for n in beats), beats  # still beating
        assert not lab.events(seen, kind="power_request")
    finally:
        lab.nut.start_upsd()
    _wait(lambda: [e for e in _ups(lab, after) if e["payload"]["action"] == "back"], 30,
          "a back event")  # fmt: skip
    assert lab.api("GET", "/api/v1/ups")["phase"] == "mains"


def test_a_power_cut_shuts_agents_then_servers_down_and_mains_back_powers_servers_first(lab):
    _running(lab)
    after = lab.last_event_id()
    cut_at = time.time()
    lab.nut.write("OB DISCHRG", 80)

    def opened():
        acts = _steps(_ups(lab, after))
        return {m for a, m in acts if a == "open"} == {SERVER, AGENT}

    _wait(opened, 300, "both relays opened")
    evs = _ups(lab, after)
    steps = _steps(evs)
    timeline = "\n".join(f"{e['id']} {e['payload']['action']} {e.get('machine') or ''}: "
                         f"{e['payload']['reason']}" for e in evs)  # fmt: skip

    def at(action: str, machine: str | None = None) -> int:
        assert (action, machine) in steps, f"no {action} {machine or ''} in:\n{timeline}"
        return steps.index((action, machine))

    # The order of the shutdown, from the history.
    assert (
        at("on-battery")
        < at("hold")
        < at("shutdown", AGENT)
        < at("told", AGENT)
        < at("down", AGENT)
        < at("shutdown", SERVER)
        < at("told", SERVER)
        < at("down", SERVER)
        < at("open", AGENT)
        < at("open", SERVER)
    ), timeline
    assert "timeout" not in [a for a, _ in steps], timeline  # both went down by themselves
    # Both VMs powered themselves off (QEMU exited) on the request: the agent before the server;
    # neither was killed by its relay while running.
    vms = [v for v in _vm_log(lab) if v["t"] >= cut_at]
    halted = {v["node"]: v["t"] for v in vms if v["state"] == "halted"}
    assert set(halted) == {SERVER, AGENT}, vms
    assert halted[AGENT] < halted[SERVER]
    assert not [v for v in vms if v["state"] == "power-cut"], vms
    for node in (SERVER, AGENT):
        console = (lab.logs / f"{node}.console").read_text(errors="replace")
        assert "lab-init: asked to shut down" in console, node
        # The history's "open" is the device's word; the lab's wiring sees the relay file on
        # its next poll (every 0.1 s), so its state follows a moment later.
        _wait(lambda n=node: lab.vm_state(n) == "off", 10, f"{node}'s wiring to see its relay open")
    # Held: a person's power-on is refused.
    with pytest.raises(LabError, match="holds power"):
        lab.power(AGENT, "on")
    assert lab.api("GET", "/api/v1/ups")["phase"] == "off"

    # Mains back, the battery too low: it waits.
    back = lab.last_event_id()
    lab.nut.write("OL CHRG", 30)
    _wait(lambda: ("waiting", None) in _steps(_ups(lab, back)), 30, "a waiting event")
    assert lab.vm_state(SERVER) == lab.vm_state(AGENT) == "off"
    # Charged enough: released, the server powered on first, then the agent; both boot again.
    charged = lab.last_event_id()
    on_at = time.time()
    lab.nut.write("OL CHRG", 60)
    _wait(lambda: ("power-on", AGENT) in _steps(_ups(lab, charged)), 60, "the power-ons")
    steps = _steps(_ups(lab, charged))
    assert (
        steps.index(("release", None))
        < steps.index(("power-on", SERVER))
        < steps.index(("power-on", AGENT))
    ), steps
    for node in (SERVER, AGENT):
        lab.wait_callback(node, charged, BOOT_S)
        beat = _wait(lambda n=node: _first_beat(lab, n, charged), 60, f"{node} beats again")
        assert beat["payload"].get("boot_id")
    started = {
        v["node"]: v["t"] for v in _vm_log(lab) if v["t"] >= on_at and v["state"] == "started"
    }
    assert started[SERVER] < started[AGENT]
    view = lab.api("GET", "/api/v1/ups")
    assert view["phase"] == "mains" and view["holding"] is None and view["opened"] == []
    lab.power(SERVER, "off")
    lab.power(AGENT, "off")
