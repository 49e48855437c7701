"""GET /api/v1/machines/{name}/timeline: a machine's latest boot read from the event history
(bastion.state.boottrace, the steps the lab checks), and the event filters the dashboard uses."""

from __future__ import annotations

from bastion_testkit import auth

MAC = "52:54:00:12:34:01"


def device_event(c, kind: str, payload: dict, mac: str = MAC) -> dict:
    # What the device link posts for the device's own events (source "device").
    r = c.post("/api/v1/events", json={"kind": kind, "source": "device", "mac": mac,
                                       "payload": payload}, headers=auth())  # fmt: skip
    assert r.status_code == 201, r.text
    return r.json()


def power_on(c, ch: int = 0) -> dict:
    return device_event(c, "power", {"ch": ch, "state": "on", "why": "on"})


def stages(c, name: str = "node1") -> list[str]:
    r = c.get(f"/api/v1/machines/{name}/timeline")
    assert r.status_code == 200, r.text
    return [s["stage"] for s in r.json()["steps"]]


def test_a_boot_from_power_on_to_callback_in_order(site_dir, client_for):
    c = client_for(site_dir, client=("10.92.0.21", 40000))
    assert c.get("/api/v1/machines/node1/timeline").json() == {
        "machine": "node1", "since": "events", "started_at": None, "steps": []}
    on = power_on(c)
    device_event(c, "dhcp", {"kind": "offer", "port": 67, "arch": 7, "file": "ipxe.efi",
                             "client": "0.0.0.0"})  # fmt: skip
    assert c.get("/ipxe", params={"mac": MAC}).status_code == 200
    assert c.post("/callback", json={"mac": MAC, "status": "ok"}).status_code == 200
    body = c.get("/api/v1/machines/node1/timeline").json()
    assert body["since"] == "power-on" and body["started_at"] == on["ts"]
    assert [s["stage"] for s in body["steps"]] == ["power on", "proxy offer", "GET /ipxe", "callback"]
    first, offer = body["steps"][0], body["steps"][1]
    assert first["t"] == 0 and first["event"] == on["id"]
    assert first["detail"] == "relay channel 0 (on)"
    assert offer["detail"] == "offer on port 67: arch 7, boot file ipxe.efi"
    assert [s["t"] for s in body["steps"]] == sorted(s["t"] for s in body["steps"])
    # Another machine's boot is not in it.
    assert stages(c, "node2") == []


def test_a_new_power_on_starts_a_new_timeline(site_dir, client_for):
    c = client_for(site_dir)
    power_on(c)
    assert c.get("/ipxe", params={"mac": MAC}).status_code == 200
    assert stages(c) == ["power on", "GET /ipxe"]
    device_event(c, "power", {"ch": 0, "state": "off", "why": "cycle"})
    assert stages(c) == ["power on", "GET /ipxe", "power off"]
    again = power_on(c)
    body = c.get("/api/v1/machines/node1/timeline").json()
    assert [s["stage"] for s in body["steps"]] == ["power on"]
    assert body["steps"][0]["event"] == again["id"]


def test_without_a_power_on_its_own_events_make_the_timeline(site_dir, client_for):
    # A machine switched by hand (or before the device was attached): its steps, from the first.
    c = client_for(site_dir)
    assert c.get("/ipxe", params={"mac": MAC}).status_code == 200
    assert c.post("/callback", json={"mac": MAC, "status": "ok"}).status_code == 200
    body = c.get("/api/v1/machines/node1/timeline").json()
    assert body["since"] == "events"
    assert [s["stage"] for s in body["steps"]] == ["GET /ipxe", "callback"]


def test_an_unknown_machine_is_404(site_dir, client_for):
    c = client_for(site_dir)
    r = c.get("/api/v1/machines/nope/timeline")
    assert r.status_code == 404 and r.json() == {"detail": "no machine 'nope' in machines.yaml"}


def test_events_filter_by_machine_and_kind_together(site_dir, client_for):
    c = client_for(site_dir)
    power_on(c)
    device_event(c, "power", {"ch": 1, "state": "on", "why": "on"}, mac="52:54:00:12:34:02")
    assert c.get("/ipxe", params={"mac": MAC}).status_code == 200
    got = c.get("/api/v1/events", params={"machine": "node1", "kind": "power"}).json()
    assert [(e["machine"], e["kind"]) for e in got] == [("node1", "power")]
    mine = c.get("/api/v1/events", params={"machine": "node1"}).json()
    assert {e["kind"] for e in mine} == {"power", "boot"} and {e["machine"] for e in mine} == {"node1"}
    assert len(c.get("/api/v1/events", params={"kind": "power"}).json()) == 2


def test_the_token_check_says_whether_a_token_is_right(site_dir, client_for):
    c = client_for(site_dir)
    assert c.get("/api/v1/auth", headers=auth()).json() == {"ok": True}
    r = c.get("/api/v1/auth", headers=auth("wrong-token-0123456789abcdef"))
    assert r.status_code == 401 and r.json() == {"detail": "wrong token"}
