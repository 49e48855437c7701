"""/callback and /heartbeat about a machine that declares `address:` are taken only from that
address (bastion.api.boot.from_its_address): another LAN host sending the node's MAC can neither
mark it installed nor beat for it (which would keep the device's node watchdog from
power-cycling it when it hangs). A machine without `address:` is taken from anywhere, as
before. The app on a real SQLite file, its requests from the addresses set in TestClient."""

from __future__ import annotations

import logging

from fastapi.testclient import TestClient

NODE1 = "52:54:00:12:34:01"  # examples/site's node1, declared at NODE below
NODE2 = "52:54:00:12:34:02"  # node2: no address declared
NODE = ("10.77.0.21", 40000)
OTHER = ("10.77.0.66", 40000)  # another host on the LAN


def declared(site_dir) -> None:
    machines = site_dir / "machines.yaml"
    machines.write_text(
        machines.read_text().replace(
            f"    mac: {NODE1}\n", f"    mac: {NODE1}\n    address: {NODE[0]}\n"
        )
    )


def kinds(runtime, kind: str) -> list[dict]:
    return [e.as_dict() for e in runtime.store.query(limit=1000, kind=kind)]


def test_a_callback_from_another_address_is_refused(site_dir, client_for, caplog):
    declared(site_dir)
    node = client_for(site_dir, client=NODE)
    runtime = node.app.state.runtime
    other = TestClient(node.app, client=OTHER)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            r = other.post("/callback", data={"mac": NODE1, "stage": "installed", "status": "ok"})
            # it was 200, recorded as node1's callback
            assert r.status_code == 403, r.text
    assert "taken only from its address 10.77.0.21" in r.json()["detail"]
    assert "this request came from 10.77.0.66" in r.json()["detail"]
    assert kinds(runtime, "callback") == []
    assert runtime.addresses.mismatches == 3
    logged = [m for m in caplog.messages if "POST /callback from 10.77.0.66 names node1" in m]
    assert len(logged) == 1, caplog.messages  # once per address
    # the node itself, and a machine without `address:` from anywhere
    assert node.post("/callback", data={"mac": NODE1, "stage": "up"}).status_code == 200
    assert other.post("/callback", data={"mac": NODE2, "stage": "up"}).status_code == 200
    assert {e["machine"] for e in kinds(runtime, "callback")} == {"node1", "node2"}


def test_a_heartbeat_from_another_address_is_refused(site_dir, client_for):
    declared(site_dir)
    node = client_for(site_dir, client=NODE)
    runtime = node.app.state.runtime
    other = TestClient(node.app, client=OTHER)
    r = other.post("/heartbeat", data={"mac": NODE1, "boot_id": "b1"})
    # it was 200, recorded as node1's first beat of a boot
    assert r.status_code == 403, r.text
    assert "/heartbeat for node1 is taken only from its address 10.77.0.21" in r.json()["detail"]
    assert kinds(runtime, "heartbeat") == []
    r = node.post("/heartbeat", data={"mac": NODE1, "boot_id": "b1"})
    assert r.status_code == 200 and r.json()["recorded"] is True, r.text
    assert other.post("/heartbeat", data={"mac": NODE2, "boot_id": "b2"}).status_code == 200
    assert {e["machine"] for e in kinds(runtime, "heartbeat")} == {"node1", "node2"}
