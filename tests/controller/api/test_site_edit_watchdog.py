"""API edits of machines.yaml reach the device's node watchdog as a reload does: the real
controller app and the real firmware on the sim board (test_node_watchdog.py's setting). An edit
swapped the site in without the reload hooks, so the device went on watching (and
power-cycling) a node whose heartbeat: had been removed, until a POST /reload."""

from __future__ import annotations

import pytest
from bastion_testkit import TOKEN, auth
from simkit import SimProcess, wait_for

POWER = {"channels": [{"name": "node1", "min_off_ms": 1000, "max_cycles": 10},
                      {"name": "node2", "min_off_ms": 1000}]}  # fmt: skip


@pytest.fixture
def api(tmp_path, site_dir):
    from bastion.api.main import create_app
    from bastion.settings import Settings
    from fastapi.testclient import TestClient

    p = site_dir / "machines.yaml"
    p.write_text(
        p.read_text().replace(  # node1 (relay 0) watched; boot_s: not booted for 30 s
            "    relay: 0\n",
            "    relay: 0\n    heartbeat:\n      timeout_s: 1\n      boot_s: 30\n",
            1,
        )
    )
    with SimProcess(tmp_path / "flash", tmp_path / "ttyACM0", {"power": POWER}) as board:
        app = create_app(Settings(site_dir=site_dir, db_path=tmp_path / "events.db",
                                  api_token=TOKEN, poll_seconds=0, device_port=str(board.link)))  # fmt: skip
        with TestClient(app) as c:
            wait_for(lambda: c.get("/api/v1/device").json().get("connected"), what="link")
            yield c


def test_api_edits_bring_the_device_watches_in_line_with_the_site(api):
    def watched():
        return {ch: n.get("timeout_ms") for ch, n in
                api.get("/api/v1/device").json()["status"]["nodes"].items()}  # fmt: skip

    def edited(method, path, **body):
        r = api.request(method, f"/api/v1/machines/{path}", headers=auth(), **body)
        assert r.status_code in (200, 204), r.text

    def becomes(want, what):
        wait_for(lambda: watched() == want, what=lambda: f"{what} (the device watches {watched()})")

    becomes({"0": 1000}, "node1 watched on connect")
    edited("PATCH", "node2", json={"heartbeat": {"timeout_s": 60}})  # a heartbeat added
    becomes({"0": 1000, "1": 60000}, "node2 watched too")
    edited("DELETE", "node1")  # a watched machine removed
    becomes({"1": 60000}, "node1's channel no longer watched")
    edited("PATCH", "node2", json={"relay": 0})  # a watched machine moved to another relay
    becomes({"0": 60000}, "node2 watched on its new channel")
    edited("PATCH", "node2", json={"heartbeat": None})  # its heartbeat removed
    becomes({}, "nothing watched")
