"""The controller with its device: `serve --device` against the real sim board. Power by
machine name through the API and the CLI, device events in the history, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bastion_testkit import TOKEN, Server, auth
from simkit import SimProcess, wait_for

BIN = Path(sys.executable).parent
POWER = {"stagger_ms": 200, "channels": [{"name": "node1", "min_off_ms": 3000},
                                         {"name": "node2", "min_off_ms": 3000},
                                         {"name": "pi1", "min_off_ms": 3000}]}


@pytest.fixture
def board(tmp_path):
    with SimProcess(tmp_path / "flash", tmp_path / "ttyACM0", {"power": POWER}) as s:
        yield s


def relays(board) -> str:
    return (board.link.parent / "flash" / "relays.state").read_text().strip()


@pytest.fixture
def api(board, site_dir, tmp_path):
    from bastion.api.main import create_app
    from bastion.settings import Settings
    from fastapi.testclient import TestClient

    app = create_app(Settings(site_dir=site_dir, db_path=tmp_path / "events.db", api_token=TOKEN,
                              poll_seconds=0, device_port=str(board.link)))
    with TestClient(app) as c:
        wait_for(lambda: c.get("/api/v1/device").json().get("connected"), what="device link")
        yield c


def test_power_a_machine_by_name_and_see_the_device_events(api, board):
    r = api.post("/api/v1/machines/node2/power", json={"state": "on"}, headers=auth())
    assert r.status_code == 200, r.text
    assert r.json()["machine"] == "node2" and r.json()["channel"]["ch"] == 1
    wait_for(lambda: relays(board)[1] == "1", what="relay 1 on")

    def power_events():
        return [e for e in api.get("/api/v1/events", params={"kind": "power"}).json()
                if e["source"] == "device" and e["payload"].get("why") == "on"]

    wait_for(lambda: power_events(), what="the device's power event")
    ev = power_events()[0]
    assert ev["machine"] == "node2" and ev["payload"]["state"] == "on"
    view = api.get("/api/v1/device").json()
    assert view["connected"] and view["info"]["board"] == "sim"
    assert view["status"]["power"][1] == {"ch": 1, "name": "node2", "desired": "on",
                                          "output": "on", "queued": False, "cycling": False}


def test_power_errors_say_what_was_wrong(api):
    r = api.post("/api/v1/machines/node1/power", json={"state": "on"})
    assert r.status_code == 401
    r = api.post("/api/v1/machines/nobody/power", json={"state": "on"}, headers=auth())
    assert r.status_code == 404 and "no machine 'nobody'" in r.json()["detail"]
    r = api.post("/api/v1/machines/node1/power", json={"state": "sideways"}, headers=auth())
    assert r.status_code == 422
    assert api.post("/api/v1/machines/node1/power", json={"state": "on"},
                    headers=auth()).status_code == 200
    r = api.post("/api/v1/machines/node1/power", json={"state": "cycle", "off_ms": 100},
                 headers=auth())
    assert r.status_code == 409
    assert "shorter than its minimum off time of 3000 ms" in r.json()["detail"]


def test_power_bodies_and_targets_out_of_bounds_are_refused_before_the_device(api, board):
    assert api.post("/api/v1/machines/node1/power", json={"state": "on"}, headers=auth()).status_code == 200
    for body, says in [
        ({"state": "cycle", "off_ms": 3600001}, "less than or equal to 3600000"),
        ({"state": "cycle", "off_ms": 2**63}, "less than or equal to 3600000"),
        ({"state": "cycle", "off_ms": "5000"}, "valid integer"),
        ({"state": "cycle", "off_ms": True}, "valid integer"),
        ({"state": "on", "off_ms": 5000}, "off_ms is the off time of a cycle: not for state 'on'"),
    ]:
        r = api.post("/api/v1/machines/node1/power", json=body, headers=auth())
        assert r.status_code == 422 and says in r.text, (body, r.text)
    r = api.post("/api/v1/device/power/-1", json={"state": "on"}, headers=auth())
    assert r.status_code == 422 and "greater than or equal to 0" in r.text
    # digits that are not ASCII are names, not channels: '１' (fullwidth) is not relay 1
    for name in ("%EF%BC%91", "%C2%B2", "%F0%9D%9F%8F"):
        r = api.post(f"/api/v1/machines/{name}/power", json={"state": "on"}, headers=auth())
        assert r.status_code == 404 and "no machine" in r.json()["detail"], r.text
    assert relays(board)[0] == "1" and relays(board)[1] == "0"
    view = api.get("/api/v1/device").json()["status"]["power"][0]
    assert view["desired"] == view["output"] == "on" and not view["cycling"]


def test_a_command_the_device_refuses_does_not_hold_the_machine(api):
    def hold():
        return next(m for m in api.get("/api/v1/operator").json()["machines"] if m["name"] == "node1")["hold"]

    r = api.post("/api/v1/machines/node1/power", json={"state": "on"}, headers=auth())
    assert r.status_code == 200 and r.json()["held"] and hold()["state"] == "on"
    assert api.post("/api/v1/machines/node1/release", headers=auth()).status_code == 200
    assert hold() is None
    r = api.post("/api/v1/machines/node1/power", json={"state": "cycle", "off_ms": 100}, headers=auth())
    assert r.status_code == 409 and "minimum off time" in r.json()["detail"]
    assert hold() is None  # nothing was switched: the operator keeps the machine
    undone = [e for e in api.get("/api/v1/events", params={"kind": "operator", "machine": "node1"}).json()
              if "hold undone" in e["payload"].get("reason", "")]  # fmt: skip
    assert undone and "power cycle refused" in undone[0]["payload"]["reason"]
    # a hold made before stays as it was when a later command is refused
    assert api.post("/api/v1/machines/node1/hold", headers=auth()).status_code == 200
    r = api.post("/api/v1/machines/node1/power", json={"state": "cycle", "off_ms": 100}, headers=auth())
    assert r.status_code == 409 and hold() is not None and hold()["state"] is None


def test_no_device_is_a_clear_503(site_dir, tmp_path):
    from bastion.api.main import create_app
    from bastion.settings import Settings
    from fastapi.testclient import TestClient

    app = create_app(Settings(site_dir=site_dir, db_path=tmp_path / "e.db", api_token=TOKEN))
    with TestClient(app) as c:
        r = c.post("/api/v1/machines/node1/power", json={"state": "on"}, headers=auth())
        assert r.status_code == 503 and "--device" in r.json()["detail"]


def test_a_command_never_sent_to_the_device_says_so_and_holds_nothing(site_dir, tmp_path):
    """A link that is not up (here its port does not exist; or a device that refuses our
    protocol): the command waited for it and never went out. That is not "the device did not
    answer, it may have been done" (504, the machine held): nothing was done."""
    from bastion.api.main import create_app
    from bastion.settings import Settings
    from fastapi.testclient import TestClient

    app = create_app(Settings(site_dir=site_dir, db_path=tmp_path / "e.db", api_token=TOKEN,
                              poll_seconds=0, device_port=str(tmp_path / "no-such-tty")))
    with TestClient(app) as c:
        r = c.post("/api/v1/machines/node1/power", json={"state": "on"}, headers=auth())
        assert r.status_code == 503, r.text
        assert "not sent" in r.json()["detail"] and "nothing was done" in r.json()["detail"]
        hold = next(m for m in c.get("/api/v1/operator").json()["machines"]
                    if m["name"] == "node1")["hold"]  # fmt: skip
        assert hold is None


def bastion(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "bastion"), *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_cli_power_and_status_through_a_running_controller(board, site_dir, tmp_path):
    srv = Server(site_dir, tmp_path / "events.db", TOKEN, device=str(board.link))
    try:
        env = {**os.environ, "BASTION_API_TOKEN": TOKEN}
        wait_for(lambda: srv.get("/api/v1/device").json().get("connected"), what="device link")
        r = bastion("power", "on", "pi1", "--url", srv.url, env=env)
        assert r.returncode == 0, r.stderr
        assert "channel 2 (pi1) desired on" in r.stdout
        wait_for(lambda: relays(board)[2] == "1", what="relay 2 on")
        r = bastion("power", "cycle", "pi1", "--off-ms", "10", "--url", srv.url, env=env)
        assert r.returncode == 1 and "minimum off time of 3000 ms" in r.stderr
        r = bastion("status", "--url", srv.url, "--json", env=env)
        view = json.loads(r.stdout)
        assert view["status"]["power"][2]["output"] == "on"
        r = bastion("status", "--url", srv.url, env=env)
        assert "firmware" in r.stdout and "pi1" in r.stdout
        env.pop("BASTION_API_TOKEN")
        r = bastion("power", "off", "pi1", "--url", srv.url, env=env)
        assert r.returncode == 1 and "token" in r.stderr
    finally:
        srv.stop()


def test_cli_straight_over_the_serial_line(board):
    r = bastion("power", "on", "0", "--port", str(board.link))
    assert r.returncode == 0, r.stderr
    wait_for(lambda: relays(board)[0] == "1", what="relay 0 on")
    r = bastion("device", "info", "--port", str(board.link))
    assert r.returncode == 0 and "board: sim" in r.stdout
    r = bastion("power", "on", "node1", "--port", str(board.link))
    assert r.returncode == 2 and "relay channel number" in r.stderr
    r = bastion("status")
    assert r.returncode == 2 and "--url" in r.stderr



def _tree(pid: int) -> list[int]:
    """pid and every process under it (from /proc), to stop a sim board as a whole."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def test_a_silent_device_does_not_hold_up_a_nodes_requests(site_dir, tmp_path):
    """A device that keeps its line open and answers nothing (a stopped sim board): every
    exchange waits out its 5 s timeout in a worker thread, and worker threads are what a node's
    /ignition runs on. 60 concurrent GET /api/v1/device (no token needed) held /ignition behind
    them; device calls now take at most four threads and share one answer, and the node's
    request is answered before any of them."""
    import signal
    import threading
    import time

    import httpx

    with SimProcess(tmp_path / "flash", tmp_path / "ttyACM0", {"power": POWER}) as board:
        srv = Server(site_dir, tmp_path / "events.db", TOKEN, device=str(board.link))
        stopped: list[int] = []
        try:
            wait_for(lambda: srv.get("/api/v1/device").json().get("connected"), what="device link")
            stopped = _tree(board.proc.pid)
            for pid in stopped:
                os.kill(pid, signal.SIGSTOP)
            answered: list[float] = []

            def describe():
                httpx.get(srv.url + "/api/v1/device", timeout=120)
                answered.append(time.monotonic())

            threads = [threading.Thread(target=describe) for _ in range(60)]
            for t in threads:
                t.start()
            time.sleep(0.5)  # they are all asked
            r = srv.get("/ignition?mac=52:54:00:12:34:01")
            node_done = time.monotonic()
            for t in threads:
                t.join(120)
            assert r.status_code in (200, 404), r.text  # answered (the test site may lack assets)
            assert len(answered) == 60 and node_done < min(answered), "the node waited for the device"
        finally:
            for pid in stopped:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            srv.stop()
