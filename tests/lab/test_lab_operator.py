"""The operator in the lab (marker `lab`): the site files' declaration alone powers the UEFI,
BIOS and arm64 nodes on through the device and each boots to its callback; a node whose
profile's kernel is missing is cycled with backoff and ends Failed with the step it reached,
nothing else touched; a machine declared off is powered off, a person's power command is held
until released; `bastion plan` lists exactly what `bastion apply` then does.

The tests are one scenario on one lab, in file order: each starts from what the one before left
(the three nodes booted and declared on, site.yaml's `operator:` section). A test whose
predecessor did not pass is skipped, saying which (run alone, with -k, it would start from a
lab it was not written for).

Real QEMU nodes under TCG, so minutes, not seconds: the waits are generous guards, and nothing
here checks how long anything took."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bastion.lab.lab import Lab, all_nodes, arm64_missing

pytestmark = [pytest.mark.lab, pytest.mark.timeout(1800)]

NAME, PREFIX = "ebop", "10.86.0"
BASTION = str(Path(sys.executable).parent / "bastion")
NODES = ("arm-1", "bios-1", "uefi-1")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (network namespaces, taps)")
    why = arm64_missing()
    if why:
        pytest.skip(f"{why}; run tools/setup or tools/build-grub-arm64")
    lab = Lab(NAME, PREFIX, tmp_path_factory.mktemp("labop"))
    try:
        lab.up(all_nodes(), progress=lambda msg: None)
        yield lab
    finally:
        lab.down()


_passed: list[str] = []  # the scenario's steps that passed, in order


@pytest.fixture
def step(request):
    """This test's place in the scenario: skip it unless every test before it in the file
    passed, and record it as passed when it does."""
    names = [name for name in vars(request.module) if name.startswith("test_")]  # file order
    before = names[: names.index(request.node.name)]
    missing = [n for n in before if n not in _passed]
    if missing:
        pytest.skip(f"this module is one scenario in file order; {missing[-1]} did not pass "
                    "before this test")  # fmt: skip
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed == failed:  # (its call's failure is counted before teardown)
        _passed.append(request.node.name)


def bastion(lab: Lab, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """A `bastion` command as a person on the site LAN runs it, against the lab's controller."""
    env = {**os.environ, "BASTION_API_TOKEN": lab.token_file.read_text().strip()}
    r = subprocess.run(["ip", "netns", "exec", lab.net.lan, BASTION, *args, "--url",
                        lab.controller_url], capture_output=True, text=True, env=env, timeout=60, check=False)  # fmt: skip
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(2)
    raise AssertionError(f"timed out waiting for {what}")


def status(lab: Lab) -> dict[str, dict]:
    return {m["name"]: m for m in lab.api("GET", "/api/v1/operator")["machines"]}


def ops(lab: Lab, after: int) -> list[tuple[str, str]]:
    return [(e["machine"], e["payload"]["action"]) for e in lab.events(after, kind="operator")]


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (old, text)
    path.write_text(text.replace(old, new, 1))


def test_declared_on_the_three_nodes_boot_with_no_command_from_a_person(lab, step):
    after = lab.last_event_id()
    (lab.site / "site.yaml").write_text((lab.site / "site.yaml").read_text()
                                        + "defaults:\n  power: on\noperator:\n  interval_s: 2\n")
    # the controller reloads the file; the operator powers every node on through the device
    callbacks = wait(lambda: {e["machine"]: e for e in lab.events(after, kind="callback")}
                     if {e["machine"] for e in lab.events(after, kind="callback")} >= set(NODES)
                     else None, 900, "the three callbacks")  # fmt: skip
    for name in NODES:
        assert callbacks[name]["payload"]["status"] == "ok", callbacks[name]
    decided = ops(lab, after)
    assert sorted(d for d in decided if d[1] == "power-on") == [(n, "power-on") for n in NODES]
    # On a loaded host a boot can stall (the sim board's own watchdog may reset it under
    # contention): the operator may then cycle it, but only a boot it found stuck first, and
    # never into Failed. Each node still reached its callback above.
    events = lab.events(after, kind="operator")
    for i, e in enumerate(events):
        if e["payload"]["action"] == "power-cycle":
            stuck = [x for x in events[:i] if x["machine"] == e["machine"]
                     and x["payload"]["action"] == "stuck"
                     and x["payload"]["attempt"] == e["payload"]["attempt"]]  # fmt: skip
            assert stuck, (e, decided)
    assert ("failed" not in {a for _, a in decided}), decided
    # no person asked: every power request came from the operator
    assert {e["source"] for e in lab.events(after, kind="power_request")} == {"operator"}
    # the device staggered the first on edges (its own clock, stagger_ms 1000 in the lab)
    first = {}
    for e in lab.events(after, kind="power", source="device"):
        if e["payload"].get("state") == "on" and e["payload"].get("why") == "on":
            first.setdefault(e["machine"], e["payload"]["t"])
    ons = sorted(first.values())
    assert len(ons) == 3 and all(b - a >= 1000 for a, b in itertools.pairwise(ons)), ons
    # bastion machines: each Provisioned (the lab initrd calls back and powers itself off)
    def provisioned() -> str | None:
        out = bastion(lab, "machines").stdout
        rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
        return out if all(rows.get(n, [""] * 4)[3] == "Provisioned" for n in NODES) else None

    out = wait(provisioned, 60, "bastion machines: Provisioned")
    assert out.splitlines()[0].split() == ["NAME", "DESIRED", "RELAY", "STATUS", "RETRIES", "AGE"]
    # every step is the machine's, the address-only ones too (TFTP and assets)
    for name in ("uefi-1", "arm-1"):
        mine = [json.loads(line) for line in bastion(
            lab, "events", "--machine", name, "-n", "500", "--json").stdout.splitlines()]
        kinds = {e["kind"] for e in mine if e["id"] > after}
        assert {"power", "dhcp", "tftp", "boot", "asset", "callback", "operator"} <= kinds, kinds
        assert all(e["payload"].get("attributed") == "address" for e in mine
                   if e["id"] > after and e["kind"] in ("tftp", "asset"))


def test_a_broken_profile_is_retried_with_backoff_and_ends_failed(lab, step):
    (lab.site / "site.yaml").write_text((lab.site / "site.yaml").read_text()
                                        + "  cycles: 2\n  backoff_s: 5\n"
                                          "  step_timeouts: {script: 15, power-on: 120}\n")  # fmt: skip
    broken = json.loads((lab.site / "profiles/lab-node.json").read_text())
    broken.update(id="lab-broken", name="Lab node whose kernel is missing")
    broken["boot"]["kernel"] = "/assets/lab/no-such-vmlinuz"
    (lab.site / "profiles/lab-broken.json").write_text(json.dumps(broken))
    time.sleep(3)  # the controller reloads site.yaml and the profile
    after = lab.last_event_id()
    # bios-1 gets it, and a new reprovision word asks for a fresh network boot of it
    lab.api("PATCH", "/api/v1/machines/bios-1", {"profile": "lab-broken", "reprovision": "broken"})
    wait(lambda: status(lab)["bios-1"]["status"]["phase"] == "Failed", 900, "bios-1 Failed")
    decided = ops(lab, after)
    assert decided == [("bios-1", a) for a in ("reprovision", "power-cycle", "stuck", "power-cycle",
                                               "stuck", "power-cycle", "failed")], decided
    events = lab.events(after, kind="operator")
    failed = events[-1]["payload"]
    assert failed["step"] == "script" and failed["attempt"] == 2
    assert "2 power-cycle(s) did not help" in failed["reason"]
    assert "GET /assets/lab/no-such-vmlinuz 404" in failed["reason"]
    stuck = [e["payload"] for e in events if e["payload"]["action"] == "stuck"]
    assert [s["reason"].rsplit(" in ", 1)[1] for s in stuck] == ["5s", "10s"]  # doubling
    st = status(lab)["bios-1"]["status"]
    assert (st["text"], st["step"]) == ("Failed (stuck after script)", "script")
    # nothing else was touched (a restart of the sim board under load restores every relay as
    # it was, `why: restore`: that is the device's, not a switch)
    others = [e for e in lab.events(after) if e.get("machine") in ("uefi-1", "arm-1")
              and e["kind"] in ("power", "power_request", "operator")
              and e["payload"].get("why") != "restore"]  # fmt: skip
    assert others == []
    # the bios-1 profile back, and its word changed again: it boots to its callback
    after = lab.last_event_id()
    lab.api("PATCH", "/api/v1/machines/bios-1", {"profile": "lab-node", "reprovision": "fixed"})
    wait(lambda: [e for e in lab.events(after, kind="callback") if e["machine"] == "bios-1"],
         600, "bios-1 boots again")
    assert ops(lab, after)[:2] == [("bios-1", "reset"), ("bios-1", "reprovision")]


def test_off_in_the_file_powers_off_and_a_person_is_held_until_released(lab, step):
    edit(lab.site / "machines.yaml", "- name: uefi-1\n", "- name: uefi-1\n  power: 'off'\n")
    wait(lambda: lab.vm_state("uefi-1") == "off", 60, "uefi-1 powered off")
    off = [e for e in lab.events(kind="operator") if e["machine"] == "uefi-1"][-1]["payload"]
    assert (off["action"], off["reason"]) == ("power-off", "declared off; its relay is on")
    # a person powers it on: held, and left on although the file says off. QEMU is seen off as
    # the relay opens, so the device may still be inside the channel's minimum off time: the
    # refusal says so, and the person tries again, as its message tells them to.
    def power_on():
        r = bastion(lab, "power", "on", "uefi-1", check=False)
        return None if "minimum off time" in r.stderr else r

    r = wait(power_on, 10, "power on past the minimum off time")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "uefi-1: held" in out
    wait(lambda: lab.vm_state("uefi-1") == "running", 30, "uefi-1 running")
    passes = lab.api("GET", "/api/v1/operator")["passes"]
    wait(lambda: lab.api("GET", "/api/v1/operator")["passes"] >= passes + 3, 60, "three passes")
    assert lab.vm_state("uefi-1") in ("running", "halted")
    assert status(lab)["uefi-1"]["status"]["text"] == "Held (power on by api)"
    # released: the file wins again
    bastion(lab, "machine", "release", "uefi-1")
    wait(lambda: lab.vm_state("uefi-1") == "off", 60, "uefi-1 off after the release")


def test_plan_lists_exactly_what_apply_does(lab, step):
    edit(lab.site / "site.yaml", "operator:\n", "operator:\n  sync: manual\n")
    time.sleep(3)  # reloaded: from now on the declaration waits for apply
    edit(lab.site / "machines.yaml", "- name: arm-1\n", "- name: arm-1\n  power: 'off'\n")
    time.sleep(5)  # reloaded and passed over: nothing switched
    assert status(lab)["arm-1"]["relay_state"] == "on"
    plan = bastion(lab, "plan").stdout
    assert "  arm-1: power on -> off" in plan
    planned = [line for line in plan.splitlines() if line.startswith("  ") and "(" in line]
    assert planned == ["  arm-1: power-off (declared off; its relay is on)"], plan
    done = bastion(lab, "apply").stdout
    assert [line for line in done.splitlines() if line.startswith("  ") and "(" in line] == planned
    applied = done.split("action(s) done")[1].strip().splitlines()
    assert applied == [line.split(" (")[0].strip() for line in planned]
    wait(lambda: lab.vm_state("arm-1") == "off", 60, "arm-1 off")
