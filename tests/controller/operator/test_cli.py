"""`bastion machines`, `bastion plan`, `bastion apply`, `bastion machine hold|release` against
a real `bastion serve` holding the sim board's serial line, as a person runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from bastion_testkit import TOKEN, Server
from simkit import SimProcess, wait_for

BIN = Path(sys.executable).parent
POWER = {"stagger_ms": 200,
         "channels": [{"name": n, "min_off_ms": 200} for n in ("node1", "node2", "pi1")]}


def bastion(*args: str, url: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "BASTION_API_TOKEN": TOKEN}
    r = subprocess.run([str(BIN / "bastion"), *args, "--url", url], capture_output=True,
                       text=True, env=env, timeout=60, check=False)  # fmt: skip
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture
def served(tmp_path, site_dir):
    (site_dir / "site.yaml").write_text((site_dir / "site.yaml").read_text()
                                        + "defaults:\n  power: on\noperator:\n  sync: manual\n"
                                          "  interval_s: 1\n")  # fmt: skip
    with SimProcess(tmp_path / "flash", tmp_path / "ttyACM0", {"power": POWER}) as board:
        srv = Server(site_dir, tmp_path / "events.db", TOKEN, device=str(board.link))
        try:
            wait_for(lambda: srv.get("/api/v1/device").json().get("connected"), what="link")
            yield srv, site_dir
        finally:
            srv.stop()


def relays(srv) -> list[str]:
    return [c["output"] for c in srv.get("/api/v1/device").json()["status"]["power"][:3]]


def test_machines_plan_apply_hold_release(served):
    srv, site = served
    wait_for(lambda: relays(srv) == ["on", "on", "on"], what="declared on: three relays on")
    out = bastion("machines", url=srv.url).stdout.splitlines()
    assert out[0].split() == ["NAME", "DESIRED", "RELAY", "STATUS", "RETRIES", "AGE"]
    rows = {line.split()[0]: line.split() for line in out[1:]}
    assert set(rows) == {"node1", "node2", "pi1"}
    assert all(r[1:4] == ["on", "on", "Powering"] for r in rows.values()), out
    wide = bastion("machines", "-o", "wide", url=srv.url).stdout.splitlines()
    assert wide[0].split()[-3:] == ["MAC", "STEP", "REASON"]

    # an edit by hand; sync: manual, so it waits for apply
    m = site / "machines.yaml"
    m.write_text(m.read_text().replace("  - name: node2\n", "  - name: node2\n    power: off\n"))
    plan = bastion("plan", url=srv.url).stdout
    assert "  node2: power on -> off\n" in plan
    planned = [line for line in plan.splitlines() if line.startswith("  node2: power-off")]
    assert planned == ["  node2: power-off (declared off; its relay is on)"]
    plan_id = plan.strip().splitlines()[-1].split()[1].rstrip(":")
    applied = bastion("apply", "--plan", plan_id, url=srv.url).stdout
    assert f"applied plan {plan_id}" in applied and "1 action(s) done" in applied
    assert applied.strip().splitlines()[1:] == ["  node2: power-off"]
    wait_for(lambda: relays(srv)[1] == "off", what="node2 off")
    again = bastion("apply", "--plan", plan_id, url=srv.url, check=False)
    assert again.returncode != 0 and "nothing was done" in again.stderr

    # a person: held until released
    r = bastion("power", "off", "node1", url=srv.url).stdout
    assert "node1: held: the operator leaves it alone until `bastion machine release node1`" in r
    wait_for(lambda: "Held (power off by api)" in bastion("machines", url=srv.url).stdout,
             what="node1 held")
    assert "node1: released" in bastion("machine", "release", "node1", url=srv.url).stdout
    wait_for(lambda: relays(srv)[0] == "on", what="node1 on again")


def test_watch_prints_a_line_when_a_status_changes(served):
    srv, _ = served
    wait_for(lambda: relays(srv) == ["on", "on", "on"], what="relays on")
    env = {**os.environ, "BASTION_API_TOKEN": TOKEN}
    proc = subprocess.Popen([str(BIN / "bastion"), "machines", "-w", "--interval", "0.3",
                             "--url", srv.url], stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        lines = [proc.stdout.readline() for _ in range(4)]  # the header and three machines
        bastion("machine", "hold", "pi1", url=srv.url)
        extra = proc.stdout.readline()
    finally:
        proc.kill()
        proc.wait()
    assert lines[0].split()[0] == "NAME"
    assert extra.split()[0] == "pi1" and "Held (hold by api)" in extra
    # the new line sits under the table's columns
    assert extra.index("Held") == lines[0].index("STATUS")
