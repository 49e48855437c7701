"""The operator in a controller holding the real firmware's serial line (the sim board): the
site files' declaration powers machines on and off through the device, a boot that makes no
progress is cycled and ends Failed, a person's power command holds the machine, and `plan`
lists exactly what `apply` does. Every decision is an `operator` event with its reason."""

from __future__ import annotations

import pytest
from bastion_testkit import TOKEN, auth
from simkit import SimProcess, wait_for

# Short interlocks so that cycles take a moment; the device's stagger between power-ons.
POWER = {"stagger_ms": 300,
         "channels": [{"name": n, "min_off_ms": 200, "max_cycles": 20}
                      for n in ("node1", "node2", "pi1")]}  # fmt: skip
MACS = {"node1": "52:54:00:12:34:01", "node2": "52:54:00:12:34:02", "pi1": "dc:a6:32:01:02:03"}


def declare(site_dir, site_yaml: str, **per_machine: str) -> None:
    p = site_dir / "site.yaml"
    p.write_text(p.read_text() + site_yaml)
    m = site_dir / "machines.yaml"
    text = m.read_text()
    for name, extra in per_machine.items():
        text = text.replace(f"  - name: {name}\n", f"  - name: {name}\n{extra}", 1)
    m.write_text(text)


@pytest.fixture
def controller(tmp_path, site_dir):
    from bastion.api.main import create_app
    from bastion.settings import Settings
    from fastapi.testclient import TestClient

    def start(site_yaml: str, power: dict = POWER, **per_machine: str):
        declare(site_dir, site_yaml, **per_machine)
        board = SimProcess(tmp_path / "flash", tmp_path / "ttyACM0", {"power": power})
        board.__enter__()
        app = create_app(Settings(site_dir=site_dir, db_path=tmp_path / "events.db",
                                  api_token=TOKEN, poll_seconds=0, device_port=str(board.link)))
        c = TestClient(app)
        c.__enter__()
        started.append((c, board))
        wait_for(lambda: c.get("/api/v1/device").json().get("connected"), what="link")
        c.board, c.site = board, site_dir
        return c

    started: list = []
    yield start
    for c, board in started:
        c.__exit__(None, None, None)
        board.__exit__(None, None, None)


def events(c, kind=None, machine=None):
    params = {"limit": 1000, **({"kind": kind} if kind else {}),
              **({"machine": machine} if machine else {})}  # fmt: skip
    return list(reversed(c.get("/api/v1/events", params=params).json()))


def decisions(c, machine=None):
    return [(e["machine"], e["payload"]["action"]) for e in events(c, "operator", machine)]


def relay(c, ch):
    return c.get("/api/v1/device").json()["status"]["power"][ch]["output"]


def statuses(c):
    return {m["name"]: m["status"]["text"] for m in c.get("/api/v1/operator").json()["machines"]}


def test_declared_on_powers_every_machine_on_through_the_device(controller):
    c = controller("defaults:\n  power: on\noperator:\n  interval_s: 1\n")
    wait_for(lambda: all(relay(c, ch) == "on" for ch in (0, 1, 2)), what="three relays on")
    got = decisions(c)
    assert sorted(got) == [("node1", "power-on"), ("node2", "power-on"), ("pi1", "power-on")]
    for e in events(c, "operator"):
        assert e["source"] == "operator" and e["payload"]["reason"] == "declared on; its relay is off"
    # through the device, asked by the operator (not a person), and the device staggered them
    requests = events(c, "power_request")
    assert {e["source"] for e in requests} == {"operator"}
    ons = [e for e in events(c, "power") if e["payload"].get("state") == "on"]
    assert sorted(e["machine"] for e in ons) == ["node1", "node2", "pi1"]
    assert wait_for(lambda: set(statuses(c).values()) == {"Powering"}, what="Powering")
    # a boot, through the real endpoints: steps, then the callback makes it Provisioned
    mac = MACS["node1"]
    assert c.get(f"/ipxe?mac={mac}").status_code == 200
    assert c.get("/assets/flatcar/amd64/flatcar_production_pxe.vmlinuz").status_code == 200
    wait_for(lambda: statuses(c)["node1"] == "Booting (kernel)", what="node1 booting")
    c.post("/callback", json={"mac": mac, "stage": "booted", "status": "ok"})
    wait_for(lambda: statuses(c)["node1"] == "Provisioned", what="node1 Provisioned")
    c.post(f"/heartbeat?mac={mac}")
    wait_for(lambda: statuses(c)["node1"] == "Ready", what="node1 Ready")
    view = {m["name"]: m for m in c.get("/api/v1/machines").json()}
    assert (view["node1"]["phase"], view["node1"]["power"]) == ("Ready", "on")
    # nothing more was decided: a powered, booting or booted machine is left alone
    assert sorted(decisions(c)) == sorted(got)


def test_a_boot_without_progress_is_cycled_then_failed_and_nothing_else_is_touched(controller):
    c = controller("operator:\n  interval_s: 1\n  cycles: 2\n  backoff_s: 1\n"
                   "  step_timeouts: {power-on: 2}\n", node1="    power: on\n")
    # node1 has no machine behind its relay: no step ever follows the power-on
    wait_for(lambda: statuses(c)["node1"].startswith("Failed"), timeout=60, what="node1 Failed")
    assert decisions(c) == [("node1", a) for a in ("power-on", "stuck", "power-cycle", "stuck",
                                                   "power-cycle", "failed")]  # fmt: skip
    ops = events(c, "operator")
    assert [e["payload"].get("attempt") for e in ops] == [None, 1, 1, 2, 2, 2]
    assert ops[-1]["payload"]["step"] == "power-on"
    assert ops[-1]["payload"]["reason"].startswith("stuck after power-on (relay 0 on (")
    assert "2 power-cycle(s) did not help" in ops[-1]["payload"]["reason"]
    # the device did the cycles; no other machine's relay moved
    assert {e["machine"] for e in events(c, "power")} == {"node1"}
    assert relay(c, 1) == relay(c, 2) == "off"
    st = {m["name"]: m for m in c.get("/api/v1/operator").json()["machines"]}
    assert st["node1"]["status"]["phase"] == "Failed" and st["node1"]["status"]["step"] == "power-on"
    assert st["node2"]["status"]["text"] == "Off"
    # Failed: left alone, until someone acts (a release starts it over)
    before = len(events(c, "operator"))
    wait_for(lambda: c.get("/api/v1/operator").json()["passes"] >= 3, what="passes")
    assert len(events(c, "operator")) == before
    r = c.post("/api/v1/machines/node1/release", headers=auth())
    assert r.status_code == 200 and r.json()["failed"] is None
    wait_for(lambda: decisions(c)[-1] == ("node1", "stuck"), timeout=30, what="judged again")
    assert ("node1", "release") in decisions(c)


def test_off_in_the_file_powers_off_and_a_person_is_held_until_released(controller):
    c = controller("defaults:\n  power: on\noperator:\n  interval_s: 1\n")
    wait_for(lambda: relay(c, 1) == "on", what="node2 on")
    # the API's edit writes machines.yaml; the next pass powers the machine off
    r = c.patch("/api/v1/machines/node2", json={"power": "off"}, headers=auth())
    assert r.status_code == 200 and r.json()["power"] == "off"
    assert "\n  power: 'off'\n" in (c.site / "machines.yaml").read_text()
    wait_for(lambda: relay(c, 1) == "off", what="node2 off")
    off = [e for e in events(c, "operator", "node2") if e["payload"]["action"] == "power-off"]
    assert off and off[0]["payload"]["reason"] == "declared off; its relay is on"
    # a person switches node1 off: held, and the operator does not switch it back on
    r = c.post("/api/v1/machines/node1/power", json={"state": "off"}, headers=auth())
    assert r.status_code == 200 and r.json()["held"] is True
    wait_for(lambda: statuses(c)["node1"] == "Held (power off by api)", what="held")
    passes = c.get("/api/v1/operator").json()["passes"]
    wait_for(lambda: c.get("/api/v1/operator").json()["passes"] >= passes + 2, what="passes")
    assert relay(c, 0) == "off"
    assert [e["source"] for e in events(c, "power_request", "node1")][-1] == "api"
    # released: declared on, so on it goes
    assert c.post("/api/v1/machines/node1/release", headers=auth()).status_code == 200
    wait_for(lambda: relay(c, 0) == "on", what="node1 on again")
    assert decisions(c, "node1")[-3:] == [("node1", "hold"), ("node1", "release"),
                                          ("node1", "power-on")]  # fmt: skip


def test_plan_lists_exactly_what_apply_does(controller):
    c = controller("defaults:\n  power: on\noperator:\n  interval_s: 1\n  sync: manual\n")
    wait_for(lambda: all(relay(c, ch) == "on" for ch in (0, 1, 2)), what="relays on")
    assert c.get("/api/v1/plan", headers=auth()).json()["actions"] == []
    # an edit by hand: with sync: manual the reload serves it, but nothing is switched
    m = c.site / "machines.yaml"
    m.write_text(m.read_text().replace("  - name: node2\n", "  - name: node2\n    power: off\n")
                 .replace("  - name: pi1\n", "  - name: pi1\n    maintenance: true\n    power: off\n"))
    assert c.post("/api/v1/reload", headers=auth()).status_code == 200
    passes = c.get("/api/v1/operator").json()["passes"]
    wait_for(lambda: c.get("/api/v1/operator").json()["passes"] >= passes + 2, what="passes")
    assert relay(c, 1) == "on"
    plan = c.get("/api/v1/plan", headers=auth()).json()
    assert plan["changes"] == [
        {"machine": "node2", "field": "power", "from": "on", "to": "off"},
        {"machine": "pi1", "field": "power", "from": "on", "to": "off"},
        {"machine": "pi1", "field": "maintenance", "from": False, "to": True}]  # fmt: skip
    assert [(a["machine"], a["action"]) for a in plan["actions"]] == [("node2", "power-off")]
    r = c.post("/api/v1/apply", json={"plan": plan["id"]}, headers=auth())
    assert r.status_code == 200, r.text
    assert r.json()["done"] == plan["actions"]
    wait_for(lambda: relay(c, 1) == "off", what="node2 off")
    assert relay(c, 2) == "on"  # maintenance: left as it is
    applied = [e for e in events(c, "operator") if e["payload"].get("plan") == plan["id"]]
    assert [(e["machine"], e["payload"]["action"], e["payload"]["reason"]) for e in applied] == [
        (a["machine"], a["action"], a["reason"]) for a in plan["actions"]]
    # a plan that is not what would be done now is refused, and nothing is done
    r = c.post("/api/v1/apply", json={"plan": plan["id"]}, headers=auth())
    assert r.status_code == 409 and r.json()["detail"]["plan"]["actions"] == []
    assert c.post("/api/v1/apply", json={}).status_code == 401


# node1 may not come back on within a minute of going off: the device refuses its power-on
SLOW_NODE1 = {**POWER, "channels": [{**POWER["channels"][0], "min_off_ms": 60000}, *POWER["channels"][1:]]}


def declare_power(c, name, state):
    m = c.site / "machines.yaml"
    text = m.read_text()
    for old in ("    power: on\n", "    power: off\n"):
        text = text.replace(f"  - name: {name}\n{old}", f"  - name: {name}\n", 1)
    m.write_text(text.replace(f"  - name: {name}\n", f"  - name: {name}\n    power: {state}\n", 1))
    assert c.post("/api/v1/reload", headers=auth()).status_code == 200


def test_a_refused_power_on_after_a_changed_declaration_waits_like_any_other(controller):
    # The refusal put back the memory of before, declaration included: every pass then saw the
    # declaration change again, dropped the wait and asked the device again, once a second.
    c = controller("operator:\n  interval_s: 1\n", power=SLOW_NODE1, node1="    power: on\n")
    wait_for(lambda: relay(c, 0) == "on", what="node1 on")
    declare_power(c, "node1", "off")
    wait_for(lambda: relay(c, 0) == "off", what="node1 off")
    declare_power(c, "node1", "on")
    wait_for(lambda: ("node1", "refused") in decisions(c, "node1"), what="the device refuses")
    passes = c.get("/api/v1/operator").json()["passes"]
    wait_for(lambda: c.get("/api/v1/operator").json()["passes"] >= passes + 5, what="five passes")
    tail = decisions(c, "node1")
    tail = tail[len(tail) - 1 - tail[::-1].index(("node1", "power-off")):]
    assert tail == [("node1", "power-off"), ("node1", "power-on"), ("node1", "refused")], tail


def test_apply_says_what_the_device_refused(controller):
    c = controller("operator:\n  interval_s: 1\n  sync: manual\n", power=SLOW_NODE1)
    for state in ("on", "off"):
        declare_power(c, "node1", state)
        r = c.post("/api/v1/apply", json={}, headers=auth())
        assert r.status_code == 200 and r.json()["refused"] == [], r.text
        wait_for(lambda: relay(c, 0) == state, what=f"node1 {state}")  # noqa: B023
    declare_power(c, "node1", "on")
    r = c.post("/api/v1/apply", json={}, headers=auth())
    assert r.status_code == 200 and r.json()["done"] == [], r.text
    (no,) = r.json()["refused"]
    assert (no["machine"], no["action"]) == ("node1", "refused")
    assert no["reason"].startswith("power-on: ") and "minimum off time is 60000 ms" in no["reason"]


def test_a_machine_added_under_manual_sync_is_not_reprovisioned_by_the_next_apply(controller):
    # Passes before `apply` saw the new machine first, under the declaration applied before it
    # was added (no reprovision word in it), and made its memory with no word: `apply` then read
    # its declared `reprovision:` as a change, and power-cycled and reinstalled a running node.
    node3 = {"name": "node3", "min_off_ms": 200, "max_cycles": 20}
    power = {**POWER, "channels": [*POWER["channels"], node3]}
    c = controller("operator:\n  interval_s: 1\n  sync: manual\n", power=power)
    r = c.post("/api/v1/device/power/3", json={"state": "on"}, headers=auth())  # already running
    assert r.status_code == 200, r.text
    wait_for(lambda: relay(c, 3) == "on", what="relay 3 on")
    m = c.site / "machines.yaml"
    m.write_text(m.read_text() + "\n  - name: node3\n    mac: 52:54:00:12:34:04\n    arch: x86_64\n"
                 "    role: worker\n    relay: 3\n    power: on\n    reprovision: v1\n")  # fmt: skip
    assert c.post("/api/v1/reload", headers=auth()).status_code == 200
    passes = c.get("/api/v1/operator").json()["passes"]
    wait_for(lambda: c.get("/api/v1/operator").json()["passes"] >= passes + 2, what="passes")
    plan = c.get("/api/v1/plan", headers=auth()).json()
    assert plan["actions"] == [], plan
    r = c.post("/api/v1/apply", json={"plan": plan["id"]}, headers=auth())
    assert r.status_code == 200 and r.json()["done"] == [], r.text
    assert relay(c, 3) == "on" and decisions(c, "node3") == []
    # its word is followed from here on: a change of it reprovisions
    m.write_text(m.read_text().replace("    reprovision: v1\n", "    reprovision: v2\n"))
    assert c.post("/api/v1/reload", headers=auth()).status_code == 200
    planned = [(a["machine"], a["action"]) for a in c.get("/api/v1/plan", headers=auth()).json()["actions"]]
    assert planned == [("node3", "reprovision"), ("node3", "power-cycle")]


def test_two_power_commands_refused_at_once_leave_the_machine_as_it_was(controller):
    # Each refusal undid its own hold only while the memory was still exactly that hold: the
    # first refusal found the second command's hold and did nothing, the second put back the
    # memory of before it, the first command's hold, and the machine stayed held by a command
    # the device had refused, the operator leaving it alone until someone released it.
    import asyncio
    import threading

    import httpx

    c = controller("operator:\n  interval_s: 1\n", power=SLOW_NODE1)
    for state in ("on", "off"):  # off just now: a power-on is refused for a minute, a cycle too
        r = c.post("/api/v1/machines/node1/power", json={"state": state}, headers=auth())
        assert r.status_code == 200, r.text
        wait_for(lambda: relay(c, 0) == state, what=f"node1 {state}")  # noqa: B023
    assert c.post("/api/v1/machines/node1/release", headers=auth()).status_code == 200
    runtime = c.app.state.runtime
    op, hub = runtime.operator, runtime.device
    # Both holds are taken before either command reaches the device, and the first command's
    # refusal is undone before the second is sent: the order that left the machine held.
    held_order: list[str] = []
    both_held, first_undone = threading.Barrier(2, timeout=20), threading.Event()
    real_hold, real_unhold, real_power = op.hold, op.unhold, hub.power

    def hold(name, by, state=None):
        held_order.append(state)  # under the operator's lock: the order the holds are taken
        return real_hold(name, by, state)

    def power(target, state, off_ms=None, source="api"):
        both_held.wait()
        if state != held_order[0]:
            first_undone.wait(20)
        return real_power(target, state, off_ms, source=source)

    def unhold(name, held, why):
        real_unhold(name, held, why)
        if held.hold["state"] == held_order[0]:
            first_undone.set()

    op.hold, op.unhold, hub.power = hold, unhold, power

    async def at_once():
        transport = httpx.ASGITransport(app=c.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            url = "/api/v1/machines/node1/power"
            sent = (client.post(url, json={"state": s}, headers=auth()) for s in ("on", "cycle"))
            return await asyncio.gather(*sent)

    answers = c.portal.call(at_once)
    assert [r.status_code for r in answers] == [409, 409], [r.text for r in answers]
    assert sorted(held_order) == ["cycle", "on"] and first_undone.is_set()
    node1 = next(m for m in c.get("/api/v1/operator").json()["machines"] if m["name"] == "node1")
    assert node1["hold"] is None, node1["hold"]
    assert relay(c, 0) == "off"


def test_a_refused_power_command_is_undone_after_a_pass_changed_the_memory(tmp_path, site_dir):
    # The refusal undid the hold only while the memory was exactly the one the hold made: a
    # pass in between (the operator is woken by the hold, and the device call takes a while)
    # that first saw the machine wrote its declaration into the memory, and the machine stayed
    # held by a command the device had refused.
    from bastion.operator.runner import Operator
    from bastion.site.holder import SiteHolder
    from bastion.state.events import EventStore
    from bastion.state.operator import OperatorState

    store = EventStore(tmp_path / "events.db")
    op = Operator(SiteHolder(site_dir), store, OperatorState(tmp_path / "events.db"), store.record)
    hold = op.hold_for_power("node1", "api", "cycle")
    op.pass_once()
    assert op.view()["machines"][0]["hold"] is not None  # held while the command is out
    op.unhold("node1", hold, "power cycle refused: node1 is off")
    assert op.view()["machines"][0]["hold"] is None
    assert op.state.memories()["node1"]["spec"] is not None  # what the pass learnt is kept
    store.close()


def test_a_refused_power_command_keeps_the_hold_of_one_done_beside_it(tmp_path, site_dir):
    # Two commands alike in the same clock tick made equal holds: the first one's refusal took
    # the memory for its own, put back the one before, and the second command, which the device
    # did, left the machine un-held: the operator switched it back as declared.
    from bastion.operator.runner import Operator
    from bastion.site.holder import SiteHolder
    from bastion.state.events import EventStore
    from bastion.state.operator import OperatorState

    store = EventStore(tmp_path / "events.db")
    op = Operator(SiteHolder(site_dir), store, OperatorState(tmp_path / "events.db"), store.record,
                  clock=lambda: 1000.0)  # fmt: skip
    op.pass_once()
    refused = op.hold_for_power("node1", "api", "off")
    op.hold_for_power("node1", "api", "off")  # the device takes this one
    op.unhold("node1", refused, "power off refused: an interlock")
    assert op.view()["machines"][0]["hold"] == {"by": "api", "state": "off", "at": 1000.0}
    store.close()
