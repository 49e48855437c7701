"""A power cut played on NUT's real upsd (dummy-ups, in a namespace) against a controller that
holds the real firmware's serial line (the sim board). The nodes are played by the test through
the real POST /heartbeat: each beats until its answer carries `shutdown`, then falls silent, as
the k3s Butane's heartbeat does when it powers the node off.

What must happen: on battery past `on_battery_s`, power-ons are refused; the agents are asked
first, the server only once they are down; the relays open agents first; mains back with a low
battery changes nothing; above `resume_charge` the server is powered on first, then the agents,
through the device's stagger. A upsd that stops answering is an event and shuts nothing down."""

from __future__ import annotations

import time

import pytest
from bastion_testkit import TOKEN, auth
from nutkit import PASSWORD, USER, NutServer, connect_in
from simkit import SimProcess, wait_for

POWER = {"stagger_ms": 300,
         "channels": [{"name": n, "min_off_ms": 200, "max_cycles": 20} for n in ("node1", "node2", "pi1")]}  # fmt: skip
MACS = {"node1": "52:54:00:12:34:01", "node2": "52:54:00:12:34:02", "pi1": "dc:a6:32:01:02:03"}
CH = {"node1": 0, "node2": 1, "pi1": 2}
UPS = (f"ups:\n  name: eaton\n  host: 127.0.0.1\n  username: {USER}\n  poll_s: 1\n  on_battery_s: 2\n"
       "  shutdown_wait_s: 30\n  quiet_s: 3\n  low_charge: 20\n  resume_charge: 50\n")  # fmt: skip


def controller(tmp_path, site_dir, board, nut):
    """A controller on the board's line and upsd, its history in tmp_path (the same one each
    time: a restart)."""
    from bastion.api.main import create_app
    from bastion.settings import Settings
    from fastapi.testclient import TestClient

    app = create_app(Settings(site_dir=site_dir, db_path=tmp_path / "events.db", api_token=TOKEN,
                              poll_seconds=0, device_port=str(board.link),
                              secrets_dir=tmp_path / "secrets"))  # fmt: skip
    app.state.runtime.ups.connect = connect_in(nut.ns.name)  # upsd lives in its namespace
    c = TestClient(app)
    c.nut = nut
    c.restart = lambda: controller(tmp_path, site_dir, board, nut)
    return c


@pytest.fixture
def rig(request, tmp_path, site_dir):
    from bastion.state.secrets import SecretStore

    (site_dir / "site.yaml").write_text((site_dir / "site.yaml").read_text() + UPS)
    # node1 is watched by the device's node watchdog: silent for 5 s, it would be power-cycled
    m = site_dir / "machines.yaml"
    m.write_text(m.read_text().replace("    relay: 0\n", "    relay: 0\n    heartbeat: {timeout_s: 5, boot_s: 60}\n", 1))
    SecretStore(tmp_path / "secrets").put("ups/eaton/password", PASSWORD)
    power = getattr(request, "param", POWER)
    with NutServer(tmp_path / "nut") as nut, \
            SimProcess(tmp_path / "flash", tmp_path / "ttyACM0", {"power": power}) as board:  # fmt: skip
        with controller(tmp_path, site_dir, board, nut) as c:
            wait_for(lambda: c.get("/api/v1/device").json().get("connected"), what="link")
            yield c


def events(c, kind):
    return list(reversed(c.get("/api/v1/events", params={"kind": kind, "limit": 1000}).json()))


def ups_steps(c, action=None):
    return [(e["payload"]["action"], e["machine"]) for e in events(c, "ups")
            if action is None or e["payload"]["action"] == action]  # fmt: skip


def relays(c):
    return {name: c.get("/api/v1/device").json()["status"]["power"][ch]["output"] for name, ch in CH.items()}


class Nodes:
    """The three nodes' heartbeat services: each beats until told to shut down."""

    def __init__(self, c):
        self.c, self.running, self.told = c, set(MACS), []

    def beat(self):
        for name in sorted(self.running):
            r = self.c.post("/heartbeat", data={"mac": MACS[name], "node": name,
                                                "boot_id": "0e0c6a4e-3b8e-4a47-9d53-0b8f5d7c3a11"})  # fmt: skip
            assert r.status_code in (200, 202), r.text
            if "shutdown" in r.json():
                self.told.append(name)
                self.running.discard(name)  # it powers off: its beats stop

    def until(self, pred, what, timeout=60.0):
        def step():
            self.beat()
            time.sleep(0.3)
            return pred()
        return wait_for(step, timeout=timeout, what=what)


def power_all_on(c) -> Nodes:
    """Every machine powered on through the API, the relays seen on, the nodes beating."""
    for name in CH:
        assert c.post(f"/api/v1/machines/{name}/power", json={"state": "on"}, headers=auth()).status_code == 200
    nodes = Nodes(c)
    nodes.until(lambda: set(relays(c).values()) == {"on"}, "relays on")
    return nodes


def test_a_power_cut_shuts_nodes_down_in_order_opens_relays_and_mains_brings_them_back(rig):
    c, nut = rig, rig.nut
    nodes = power_all_on(c)
    nodes.until(lambda: ("status", None) in ups_steps(c), "the UPS read")
    metrics = c.get("/metrics").text
    assert "bastion_ups_up 1.0" in metrics and "bastion_ups_battery_charge_percent 100.0" in metrics

    nut.write("OB DISCHRG", 80)
    nodes.until(lambda: set(relays(c).values()) == {"off"}, "every relay opened")
    # agents first (machines.yaml order), the server once they were down
    assert nodes.told == ["node1", "pi1", "node2"]
    steps = ups_steps(c)
    assert [m for a, m in steps if a == "shutdown"] == ["node1", "pi1", "node2"]
    assert steps.index(("shutdown", "node2")) > max(steps.index(("down", "node1")), steps.index(("down", "pi1")))
    assert [m for a, m in steps if a == "open"] == ["node1", "pi1", "node2"]
    # node1 fell silent long before its relay opened: the device's watchdog left it alone
    assert not [e for e in events(c, "watchdog") if e["payload"].get("action")]
    offs = [e for e in events(c, "power_request") if e["source"] == "ups"]
    assert [(e["machine"], e["payload"]["state"]) for e in offs] == [("node1", "off"), ("pi1", "off"), ("node2", "off")]
    assert "bastion_ups_on_battery 1.0" in c.get("/metrics").text
    view = c.get("/api/v1/ups").json()
    assert (view["phase"], view["status"], view["opened"]) == ("off", "OB DISCHRG", ["node1", "pi1", "node2"])
    assert "UPS" in view["holding"]
    # held: a person's power-on is refused, and says why
    r = c.post("/api/v1/machines/node1/power", json={"state": "on"}, headers=auth())
    assert r.status_code == 409 and "UPS" in r.json()["detail"]
    assert relays(c)["node1"] == "off"

    nut.write("OL CHRG", 30)  # mains back, battery too low
    wait_for(lambda: ("waiting", None) in ups_steps(c), what="waiting for charge")
    assert set(relays(c).values()) == {"off"}
    nut.write("OL CHRG", 60)
    wait_for(lambda: set(relays(c).values()) == {"on"}, what="relays back on")
    assert [m for a, m in ups_steps(c) if a == "power-on"] == ["node2", "node1", "pi1"]
    ons = [e for e in events(c, "power") if e["source"] == "device" and e["payload"].get("state") == "on"]
    assert [e["machine"] for e in ons][-3:] == ["node2", "node1", "pi1"]  # the device's stagger, in order
    assert "bastion_ups_power_held 0.0" in c.get("/metrics").text


def test_a_upsd_that_stops_answering_is_an_event_and_shuts_nothing_down(rig):
    c, nut = rig, rig.nut
    for name in CH:
        assert c.post(f"/api/v1/machines/{name}/power", json={"state": "on"}, headers=auth()).status_code == 200
    nodes = Nodes(c)
    nodes.until(lambda: ("status", None) in ups_steps(c), "the UPS read")
    nut.stop_upsd()
    nodes.until(lambda: ("lost", None) in ups_steps(c), "the UPS lost")
    assert "bastion_ups_up 0.0" in c.get("/metrics").text
    # eight more polls without an answer: well past on_battery_s and quiet_s
    watch = c.app.state.runtime.ups
    polls = watch.polls
    nodes.until(lambda: watch.polls >= polls + 8, "eight polls without upsd")
    assert nodes.told == [] and set(relays(c).values()) == {"on"}
    assert not [s for s in ups_steps(c) if s[0] in ("hold", "shutdown", "open")]
    nut.start_upsd()
    nodes.until(lambda: ("back", None) in ups_steps(c), "the UPS back")


def test_the_operator_cannot_power_on_while_power_is_held(rig):
    """The site declares every machine on; a low battery opens the relays at once and the
    operator's power-ons are refused with the UPS's reason until mains returns."""
    c, nut = rig, rig.nut
    site = c.app.state.runtime.holder
    (site.root / "site.yaml").write_text((site.root / "site.yaml").read_text()
                                         + "defaults:\n  power: on\noperator:\n  interval_s: 1\n")  # fmt: skip
    assert c.post("/api/v1/reload", headers=auth()).status_code == 200
    wait_for(lambda: set(relays(c).values()) == {"on"}, what="the operator powers all on")
    nut.write("OB LB", 10)
    wait_for(lambda: set(relays(c).values()) == {"off"}, what="relays opened on low battery")
    steps = ups_steps(c)
    assert ("low-battery", None) in steps and not [s for s in steps if s[0] == "shutdown"]

    def refused():
        return [e for e in events(c, "operator") if e["payload"]["action"] == "refused"
                and "UPS" in e["payload"]["reason"]]  # fmt: skip

    # the operator waits settle_s (30 s) after its own power-on before it tries again
    wait_for(lambda: {e["machine"] for e in refused()} == set(CH), what="the operator refused",
             timeout=90)
    assert set(relays(c).values()) == {"off"}
    nut.write("OL CHRG", 70)
    wait_for(lambda: set(relays(c).values()) == {"on"}, what="relays back on")
    assert [m for a, m in ups_steps(c) if a == "power-on"] == ["node2", "node1", "pi1"]


def test_a_controller_restarted_in_a_cut_asks_the_nodes_before_it_opens_their_relays(rig):
    # Heartbeats live in the controller's memory: a restarted one knew no node's, took every
    # node for down at its first pass and opened every relay, the k3s server's too, unasked.
    c, nut = rig, rig.nut
    nodes = power_all_on(c)
    nut.write("OB DISCHRG", 80)
    nodes.until(lambda: nodes.told == ["node1", "pi1"], "the agents asked")
    c.__exit__(None, None, None)  # the controller stops in the middle of the shutdown
    with c.restart() as c2:
        wait_for(lambda: c2.get("/api/v1/device").json().get("connected"), what="link")
        nodes.c = c2  # node2, the server, beats on; the agents went down
        nodes.until(lambda: set(relays(c2).values()) == {"off"}, "every relay opened")
        assert nodes.told == ["node1", "pi1", "node2"], ups_steps(c2)
        steps = ups_steps(c2)
        assert steps.index(("shutdown", "node2")) < steps.index(("open", "node2")), steps


@pytest.mark.parametrize("rig", [{**POWER, "channels": [{**POWER["channels"][0], "min_off_ms": 5000},
                                                        *POWER["channels"][1:]]}], indirect=True)  # fmt: skip
def test_a_power_on_after_the_cut_the_device_refuses_is_tried_again(rig):
    # node1's channel may not come back on within 5 s of going off: mains returning sooner made
    # its power-on a refusal, logged, and node1 stayed off for good.
    c, nut = rig, rig.nut
    power_all_on(c)
    nut.write("OB LB", 10)  # low battery: the relays open at once
    wait_for(lambda: set(relays(c).values()) == {"off"}, what="relays opened")
    nut.write("OL CHRG", 80)
    wait_for(lambda: set(relays(c).values()) == {"on"}, what="relays back on", timeout=30)
    errors = [e for e in events(c, "ups") if e["payload"]["action"] == "error"]
    assert [e["machine"] for e in errors] == ["node1"] and "minimum off time" in errors[0]["payload"]["reason"]
    assert [m for a, m in ups_steps(c, "power-on")] == ["node2", "node1", "pi1", "node1"]


def test_a_relay_mid_cycle_when_the_relays_open_stays_open(rig):
    # Its output was off for the cycle, so it was skipped as off, and the device switched it
    # back on in the middle of the cut.
    c, nut = rig, rig.nut
    power_all_on(c)
    r = c.post("/api/v1/machines/node2/power", json={"state": "cycle", "off_ms": 6000}, headers=auth())
    assert r.status_code == 200, r.text
    wait_for(lambda: relays(c)["node2"] == "off", what="node2 cycling")
    nut.write("OB LB", 10)
    wait_for(lambda: ("open", "node2") in ups_steps(c), what="node2 opened")
    time.sleep(7)  # past the cycle's 6 s
    assert set(relays(c).values()) == {"off"}


class HubStandIn:
    """Stands in for the device hub where the sim cannot be made to miss one answer: its
    `channels()` says what it is told (None: the device did not answer)."""

    power_hold = None

    def __init__(self):
        self.answer = None

    def channels(self):
        return self.answer

    def suspend_watch(self, channels):
        pass


def test_relays_seen_before_stand_for_a_device_that_does_not_answer(site_dir):
    # A device silent at the moment the relays open made every channel unknown, counted as on:
    # a machine that was off was recorded as opened and powered on after the cut.
    from bastion.site.holder import SiteHolder
    from bastion.state.heartbeats import Heartbeats
    from bastion.ups.runner import UpsWatch

    hub = HubStandIn()
    watch = UpsWatch(SiteHolder(site_dir), lambda *a, **k: 0, Heartbeats(), hub=hub)
    hub.answer = [{"ch": 0, "output": "on", "desired": "on"}, {"ch": 1, "output": "off", "desired": "off"},
                  {"ch": 2, "output": "off", "desired": "on"}]  # fmt: skip
    first = {n.name: n.relay_state for n in watch._nodes(quiet_s=15)}
    assert first == {"node1": "on", "node2": "off", "pi1": "on"}  # pi1 waits to come on: on
    hub.answer = None
    assert {n.name: n.relay_state for n in watch._nodes(quiet_s=15)} == first


def test_a_machine_left_off_stays_off_after_a_restart_to_a_silent_device(tmp_path, site_dir):
    # The relays as last seen lived in the watch's memory only: a controller restarted in the
    # middle of the shutdown, its device silent when the relays opened, counted every machine
    # as on, and pi1, left off by a person before the cut, was powered on at the release.
    from bastion.device.link import DeviceTimeout
    from bastion.site.holder import SiteHolder
    from bastion.state.heartbeats import Heartbeats
    from bastion.state.ups import UpsState
    from bastion.ups import core
    from bastion.ups.runner import UpsWatch

    class SilentableHub(HubStandIn):
        def resume_watch(self):
            pass

        def power(self, name, state, source="api"):
            if self.answer is None:
                raise DeviceTimeout("the device did not answer")

    (site_dir / "site.yaml").write_text((site_dir / "site.yaml").read_text()
                                        + "ups:\n  name: eaton\n  on_battery_s: 0\n")  # fmt: skip
    state = UpsState(tmp_path / "events.db")

    def watch_with(hub, reading):
        watch = UpsWatch(SiteHolder(site_dir), lambda *a, **k: 0, Heartbeats(), hub=hub,
                         state=state)  # fmt: skip
        watch._read = lambda section: (reading(), None)
        return watch

    hub = SilentableHub()
    hub.answer = [{"ch": 0, "output": "on"}, {"ch": 1, "output": "on"}, {"ch": 2, "output": "off"}]
    before = watch_with(hub, lambda: core.Ups(("OB", "DISCHRG"), 80.0))
    before.pass_once()
    assert before.mem.phase == "shutdown"  # the controller stops here
    hub = SilentableHub()  # and comes back to a device that does not answer
    reading = [core.Ups(("OB", "LB"), 10.0)]
    after = watch_with(hub, lambda: reading[0])
    acts = after.pass_once()
    assert after.mem.phase == "off"
    assert [a.machine for a in acts if a.action == "open"] == ["node1", "node2"]
    reading[0] = core.Ups(("OL",), 90.0)
    acts = after.pass_once()
    assert [a.machine for a in acts if a.action == "power-on"] == ["node2", "node1"]
    state.close()


def test_a_machine_declared_off_during_the_cut_is_not_powered_on_after_it(rig):
    c, nut = rig, rig.nut
    power_all_on(c)
    nut.write("OB LB", 10)
    wait_for(lambda: set(relays(c).values()) == {"off"}, what="relays opened")
    m = c.app.state.runtime.holder.root / "machines.yaml"
    m.write_text(m.read_text().replace("  - name: pi1\n", "  - name: pi1\n    power: off\n", 1))
    assert c.post("/api/v1/reload", headers=auth()).status_code == 200
    nut.write("OL CHRG", 80)
    wait_for(lambda: relays(c)["node1"] == relays(c)["node2"] == "on", what="the others back on")
    time.sleep(2)
    assert relays(c)["pi1"] == "off"
    assert ("skipped", "pi1") in ups_steps(c) and ("power-on", "pi1") in ups_steps(c)
    offs = [e for e in events(c, "power") if e["machine"] == "pi1" and e["payload"].get("state") == "on"]
    assert len(offs) == 1  # its power-on before the cut, none after


def test_a_refused_power_on_declared_off_before_its_retry_is_not_retried():
    # The retries of a power-on the device refused after the cut looked at nothing: a machine
    # declared off in between was powered on all the same, for up to 15 minutes.
    from types import SimpleNamespace

    from bastion.device.link import DeviceError
    from bastion.state.heartbeats import Heartbeats
    from bastion.ups import core
    from bastion.ups.runner import UpsWatch

    class Hub(HubStandIn):
        refuse = True

        def __init__(self):
            super().__init__()
            self.calls = []

        def resume_watch(self):
            pass

        def power(self, name, state, source="api"):
            if self.refuse:
                raise DeviceError("pi1 went off 1000 ms ago; its minimum off time is 5000 ms", "refused")
            self.calls.append((name, state, source))

    pi1 = SimpleNamespace(name="pi1", relay=2, role="agent", node=None, power="on", mac="dc:a6:32:01:02:03")
    section = SimpleNamespace(name="eaton", on_battery_s=60, low_charge=20, shutdown_wait_s=120, quiet_s=15,
                              resume_charge=50, poll_s=5, timeout_s=5, host="127.0.0.1", port=3493,
                              username=None)  # fmt: skip
    site = SimpleNamespace(machines=[pi1], settings=SimpleNamespace(ups=section),
                           machine=lambda n: pi1 if n == "pi1" else None)  # fmt: skip
    hub, recorded = Hub(), []
    watch = UpsWatch(SimpleNamespace(site=site), lambda kind, **kw: recorded.append(kw["payload"]),
                     Heartbeats(), hub=hub)  # fmt: skip
    watch.mem = core.Memory(phase="off", opened=("pi1",), status="OL", charge=90)
    watch._read = lambda section: (core.Ups(("OL",), 90.0), None)
    watch.pass_once()  # mains back: pi1's power-on refused, to be tried again
    assert [p["action"] for p in recorded][-2:] == ["power-on", "error"]
    pi1.power = "off"  # declared off since (machines.yaml)
    hub.refuse = False
    watch.pass_once()
    assert hub.calls == [] and recorded[-1]["action"] == "skipped", recorded[-1]
    assert recorded[-1]["reason"] == "not powered on again: declared power: off"
    watch.pass_once()
    assert hub.calls == []  # and not tried again


def test_a_ups_password_that_cannot_be_read_does_not_stall_a_shutdown(tmp_path):
    # The secret store raised out of the pass (a file not UTF-8, one the controller's user may
    # not read): every pass ended before the policy, and a shutdown already begun never opened
    # the relays. Now it counts as a UPS that does not answer, and says why.
    from types import SimpleNamespace

    from bastion.state.heartbeats import Heartbeats
    from bastion.state.secrets import SecretStore
    from bastion.ups import core
    from bastion.ups.runner import UpsWatch

    (tmp_path / "ups" / "eaton").mkdir(parents=True)
    (tmp_path / "ups" / "eaton" / "password").write_bytes(b"\xff\xfepass\n")
    now = [1000.0]

    class Hub(HubStandIn):
        def __init__(self):
            super().__init__()
            self.calls = []
            self.answer = [{"ch": 0, "output": "on"}]

        def power(self, name, state, source="api"):
            self.calls.append((name, state))

    node1 = SimpleNamespace(name="node1", relay=0, role="agent", node=None, power="on", mac="52:54:00:12:34:01")
    section = SimpleNamespace(name="eaton", on_battery_s=60, low_charge=20, shutdown_wait_s=120, quiet_s=15,
                              resume_charge=50, poll_s=5, timeout_s=1, host="127.0.0.1", port=9,
                              username="monitor")  # fmt: skip
    site = SimpleNamespace(machines=[node1], settings=SimpleNamespace(ups=section), machine=lambda n: node1)
    hub, recorded = Hub(), []
    watch = UpsWatch(SimpleNamespace(site=site), lambda kind, **kw: recorded.append(kw["payload"]),
                     Heartbeats(lambda: now[0]), hub=hub, secrets=SecretStore(tmp_path),
                     clock=lambda: now[0])  # fmt: skip
    # in a shutdown: node1 asked 200 s ago, past shutdown_wait_s: its relay is due to open
    watch.mem = core.Memory(phase="shutdown", since=800, stage=0, stage_at=800, asked=("node1",))
    now[0] += 30
    watch.pass_once()
    assert hub.calls == [("node1", "off")] and watch.mem.phase == "off"
    assert "the UPS password (ups/eaton/password) cannot be read" in watch.last_error
