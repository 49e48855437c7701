"""The node watchdog end to end: machines.yaml's heartbeat: setting, the controller forwarding
nodes' heartbeats to the real firmware on the sim board, and the device power-cycling a node
whose heartbeats stop, recorded as events that name the machine."""

from __future__ import annotations


import pytest
from bastion_testkit import TOKEN, auth, make_app

from simkit import SimProcess, wait_for

POWER = {"channels": [{"name": "node1", "min_off_ms": 1000, "max_cycles": 10},
                      {"name": "node2", "min_off_ms": 1000}]}


@pytest.fixture
def watched_site(site_dir):
    p = site_dir / "machines.yaml"
    p.write_text(p.read_text().replace(
        "    relay: 0\n", "    relay: 0\n    heartbeat:\n      timeout_s: 1\n      boot_s: 30\n", 1))
    return site_dir


@pytest.fixture
def api(tmp_path, watched_site):
    from fastapi.testclient import TestClient

    from bastion.api.main import create_app
    from bastion.settings import Settings

    with SimProcess(tmp_path / "flash", tmp_path / "ttyACM0", {"power": POWER}) as board:
        app = create_app(Settings(site_dir=watched_site, db_path=tmp_path / "events.db",
                                  api_token=TOKEN, poll_seconds=0, device_port=str(board.link)))
        with TestClient(app) as c:
            wait_for(lambda: c.get("/api/v1/device").json().get("connected"), what="link")
            c.board = board
            yield c


def test_a_node_whose_heartbeats_stop_is_power_cycled(api):
    mac = "52:54:00:12:34:01"  # node1, relay 0
    assert api.post("/api/v1/machines/node1/power", json={"state": "on"},
                    headers=auth()).status_code == 200
    r = api.post(f"/heartbeat?mac={mac}")
    assert r.status_code == 202 and r.json()["machine"] == "node1"
    # The device has it watched (the controller sent the site's watches on connect), and
    # counts it booted once a forwarded beat arrives.
    wait_for(lambda: api.get("/api/v1/device").json()["status"]["nodes"].get("0", {})
             .get("booted"), what="node1 counted as booted")
    # Silence: the device cycles node1 through its relay, and says so.
    ev = wait_for(lambda: [e for e in api.get("/api/v1/events", params={"kind": "watchdog"})
                           .json() if e["payload"].get("action") == "cycle"],
                  what="a watchdog cycle", timeout=30)[0]
    assert ev["machine"] == "node1" and ev["payload"]["attempt"] == 1
    offs = [e for e in api.get("/api/v1/events", params={"kind": "power"}).json()
            if e["payload"].get("why") == "watchdog"]
    assert offs and offs[0]["payload"]["state"] == "off" and offs[0]["machine"] == "node1"
    # Its relay comes back on after the minimum off time; a beat makes it a healthy node.
    wait_for(lambda: (api.board.link.parent / "flash" / "relays.state").read_text()[0] == "1",
             what="relay 0 back on")
    api.post(f"/heartbeat?mac={mac}")
    wait_for(lambda: api.get("/api/v1/device").json()["status"]["nodes"]["0"]["attempt"] == 0,
             what="the beat resets the backoff")


def test_heartbeats_of_unwatched_or_unknown_machines_are_not_forwarded(api):
    r = api.post("/heartbeat?mac=52:54:00:12:34:02")  # node2: a relay, no heartbeat setting
    assert r.status_code == 200 and r.json()["forwarded"] is False
    r = api.post("/heartbeat?mac=not-a-mac")
    assert r.status_code == 400 and "not a MAC address" in r.json()["detail"]


def test_heartbeat_needs_a_relay(watched_site):
    from bastion.site.load import SiteError, load_site

    p = watched_site / "machines.yaml"
    p.write_text(p.read_text().replace("    relay: 0\n", "", 1))
    with pytest.raises(SiteError) as e:
        load_site(watched_site)
    assert any("machines[0].heartbeat" in x and "needs relay" in x for x in e.value.problems)


def test_a_reload_brings_the_device_watches_in_line_with_the_site(api, watched_site):
    def watched():
        return api.get("/api/v1/device").json()["status"]["nodes"]

    wait_for(lambda: "0" in watched(), what="node1 watched on connect")
    p = watched_site / "machines.yaml"
    text = p.read_text()
    p.write_text(text.replace("    heartbeat:\n      timeout_s: 1\n      boot_s: 30\n", "", 1)
                 .replace("    relay: 1\n", "    relay: 1\n    heartbeat:\n      timeout_s: 60\n", 1))
    assert api.post("/api/v1/reload", headers=auth()).json()["ok"] is True
    wait_for(lambda: set(watched()) == {"1"},
             what=lambda: f"node1 unwatched, node2 watched (now {watched()})")
    assert watched()["1"]["timeout_ms"] == 60000


def test_the_api_sets_and_shows_a_heartbeat(site_dir, client_for):
    c = client_for(site_dir)
    body = {"mac": "52:54:00:12:34:09", "profile": "flatcar-worker", "relay": 5,
            "heartbeat": {"timeout_s": 90, "boot_s": 300}}
    assert c.put("/api/v1/machines/node9", json=body, headers=auth()).status_code == 200
    assert c.get("/api/v1/machines/node9").json()["heartbeat"] == {"timeout_s": 90, "boot_s": 300}
    body["heartbeat"] = {"timeout_s": 0}
    r = c.put("/api/v1/machines/node9", json=body, headers=auth())
    assert r.status_code == 422 and "heartbeat" in r.text


def test_a_beat_is_recorded_when_it_says_something_new(site_dir, client_for):
    c = client_for(site_dir)
    mac = "52:54:00:12:34:01"  # node1
    boot_a, boot_b = "1b4e28ba-2fa1-11d2-883f-0016d3cca427", "6fa459ea-ee8a-3ca4-894e-db77e160355e"

    def beat(**fields):
        r = c.post("/heartbeat", data={"mac": mac, "node": "node1", **fields})
        assert r.status_code == 200, r.text
        return r.json()["recorded"]

    def events():
        return [(e["payload"]["news"], e["payload"].get("boot_id"), e["payload"].get("k3s"))
                for e in c.get("/api/v1/events", params={"kind": "heartbeat"}).json()[::-1]]

    assert beat(boot_id=boot_a, k3s="activating") is True  # the first beat of a boot
    assert [beat(boot_id=boot_a, k3s="activating") for _ in range(20)] == [False] * 20
    assert beat(boot_id=boot_a, k3s="active") is True  # k3s came up
    assert beat(boot_id=boot_b, k3s="activating") is True  # it rebooted
    assert events() == [("boot", boot_a, "activating"), ("k3s", boot_a, "active"),
                        ("boot", boot_b, "activating")]
    assert all(e["machine"] == "node1" and e["payload"]["node"] == "node1"
               for e in c.get("/api/v1/events", params={"kind": "heartbeat"}).json())
    # Beats of unknown machines are counted, never kept; bad fields are refused, named.
    r = c.post("/heartbeat", data={"mac": "52:54:00:99:99:99", "boot_id": boot_a})
    assert r.status_code == 200 and r.json()["recorded"] is False
    r = c.post("/heartbeat", data={"mac": mac, "boot_id": "$(reboot)"})
    assert r.status_code == 400 and "boot_id: '$(reboot)' is not a boot id" in r.json()["detail"]
    assert len(events()) == 3


def test_a_restarted_controller_records_only_what_is_new_since_the_last_beat_it_recorded(site_dir, tmp_path):
    """The first beat after a restart was recorded as the first beat of a boot, for every
    machine: a history that said each node had rebooted whenever the controller had."""
    from fastapi.testclient import TestClient

    db = tmp_path / "events.db"
    boot_a, boot_b = "1b4e28ba-2fa1-11d2-883f-0016d3cca427", "6fa459ea-ee8a-3ca4-894e-db77e160355e"
    node1, node2 = "52:54:00:12:34:01", "52:54:00:12:34:02"

    def beat(c, mac, **fields):
        r = c.post("/heartbeat", data={"mac": mac, **fields})
        assert r.status_code == 200, r.text
        return r.json()["recorded"]

    with TestClient(make_app(site_dir, db)) as c:
        assert beat(c, node1, boot_id=boot_a, k3s="activating") is True
        assert beat(c, node1, boot_id=boot_a, k3s="active") is True
        assert beat(c, node2, boot_id=boot_b, k3s="active") is True
        for _ in range(3):  # beats that said nothing new: not in the history, remembered all the same
            assert beat(c, node2, boot_id=boot_b, k3s="active") is False
    with TestClient(make_app(site_dir, db)) as c:
        assert beat(c, node1, boot_id=boot_a, k3s="active") is False  # the same boot, k3s as it was
        assert beat(c, node2, boot_id=boot_b, k3s="failed") is True  # k3s changed meanwhile
        assert beat(c, node1, boot_id=boot_b, k3s="active") is True  # node1 rebooted
        news = [(e["machine"], e["payload"]["news"], e["payload"]["k3s"])
                for e in c.get("/api/v1/events", params={"kind": "heartbeat"}).json()[::-1]]
    assert news == [("node1", "boot", "activating"), ("node1", "k3s", "active"), ("node2", "boot", "active"),
                    ("node2", "k3s", "failed"), ("node1", "boot", "active")]  # fmt: skip
