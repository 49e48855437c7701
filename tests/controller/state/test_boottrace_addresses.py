"""bastion.state.boottrace.node_addresses: the addresses a node's timeline takes as the node's are
the ones the address book would bind to it (bastion.state.addresses), read from the real
history. Another LAN host that asks `/ipxe?mac=<the node's MAC>`, or fetches its config, does not
make its own TFTP and HTTP steps the node's: not for a machine that declares `address:` (the
boot script's event carries `declared_address`, bastion.boot), nor for one that does not."""

from __future__ import annotations

import time

from bastion.state import boottrace
from bastion_testkit import auth
from fastapi.testclient import TestClient

NODE1 = "52:54:00:12:34:01"  # examples/site's node1, declared at NODE below
NODE2 = "52:54:00:12:34:02"  # node2: no address declared
NODE = ("10.77.0.21", 40000)
NODE2_AT = ("10.77.0.22", 40000)
OTHER = ("10.77.0.66", 40000)  # another host on the LAN


def history(runtime) -> list[dict]:
    return [e.as_dict() for e in reversed(runtime.store.query(limit=1000))]  # oldest first


def book_addresses(runtime, machine: str) -> set[str]:
    now = time.time()
    return {b.address for b in runtime.addresses.bindings()
            if b.machine == machine and runtime.addresses.lookup(b.address, now) is not None}  # fmt: skip


def power_on(c, mac: str) -> None:
    r = c.post("/api/v1/events", json={"kind": "power", "source": "device", "mac": mac,
                                       "payload": {"ch": 0, "state": "on", "why": "on"}}, headers=auth())  # fmt: skip
    assert r.status_code == 201, r.text


def test_a_host_asking_with_a_declared_nodes_mac_is_not_in_its_timeline(site_dir, client_for):
    machines = site_dir / "machines.yaml"
    machines.write_text(machines.read_text().replace(f"    mac: {NODE1}\n", f"    mac: {NODE1}\n    address: {NODE[0]}\n"))
    node = client_for(site_dir, client=NODE)
    runtime = node.app.state.runtime
    other = TestClient(node.app, client=OTHER)
    power_on(node, NODE1)
    assert node.get("/boot.ipxe").status_code == 200
    assert node.get(f"/ipxe?mac={NODE1}").status_code == 200
    # another host asks for node1's script (answered), then takes its own steps
    assert other.get(f"/ipxe?mac={NODE1}").status_code == 200
    assert other.get("/boot.ipxe").status_code == 200
    assert other.get("/boot.ipxe.0").status_code == 200

    events = history(runtime)
    (foreign,) = [e for e in events if e["endpoint"] == "/ipxe" and e["payload"].get("client") == OTHER[0]]
    assert foreign["machine"] == "node1" and foreign["payload"]["declared_address"] == NODE[0]
    (own,) = [e for e in events if e["endpoint"] == "/ipxe" and e["payload"].get("client") == NODE[0]]
    assert "declared_address" not in own["payload"]

    assert boottrace.node_addresses(events, NODE1, "node1") == {NODE[0]} == book_addresses(runtime, "node1")
    steps = node.get("/api/v1/machines/node1/timeline").json()["steps"]
    assert [s["stage"] for s in steps] == ["power on", "GET /boot.ipxe", "GET /ipxe", "GET /ipxe"]
    assert steps[3]["detail"] == (f"HTTP 200, profile flatcar-worker, asked from {OTHER[0]}, "
                                  f"not the machine's address {NODE[0]}")  # fmt: skip
    # the other host's /boot.ipxe and /boot.ipxe.0 are its own, in the lab's reading too
    assert [s.stage for s in boottrace.timeline(events, NODE1, "node1")] == [s["stage"] for s in steps]


def test_an_undeclared_node_takes_the_addresses_the_address_book_learns(site_dir, client_for):
    node = client_for(site_dir, client=NODE2_AT)
    runtime = node.app.state.runtime
    other = TestClient(node.app, client=OTHER)
    power_on(node, NODE2)
    assert node.get(f"/ipxe?mac={NODE2}").status_code == 200
    # fetching a config, or reporting, with node2's MAC teaches nothing: anyone may (a person
    # with curl); the other host's own next step is not node2's
    other.get(f"/ignition?mac={NODE2}")
    other.post("/callback", json={"mac": NODE2, "status": "ok"})
    assert other.get("/boot.ipxe").status_code == 200

    events = history(runtime)
    assert {e["payload"].get("client") for e in events if e["machine"] == "node2"} >= {NODE2_AT[0], OTHER[0]}
    assert boottrace.node_addresses(events, NODE2, "node2") == {NODE2_AT[0]} == book_addresses(runtime, "node2")
    stages = [s.stage for s in boottrace.timeline(events, NODE2, "node2")]
    assert stages[:2] == ["power on", "GET /ipxe"] and "GET /boot.ipxe" not in stages

    # a boot script asked from the other host does teach an undeclared node's address (the
    # address book's rule: nothing says where node2 is), so the trace takes it as well
    assert other.get(f"/ipxe?mac={NODE2}").status_code == 200
    events = history(runtime)
    assert boottrace.node_addresses(events, NODE2, "node2") == {NODE2_AT[0], OTHER[0]}
    assert book_addresses(runtime, "node2") == {NODE2_AT[0], OTHER[0]}


def test_a_declared_address_given_by_the_caller_keeps_the_spoofers_address_and_steps_out():
    # a DHCP event naming node1 from another host (a spoofed DISCOVER with its MAC) carries no
    # mark, so the history alone cannot tell the two addresses apart; the machine's own
    # `address:`, as the API's timeline passes it, keeps the spoofer's address out of the
    # node's, and with it the spoofer's TFTP step. The DHCP event itself stays in the timeline,
    # saying where it came from.
    spoofed = {"ts": 1.0, "kind": "dhcp", "source": "device", "mac": NODE1, "machine": "node1",
               "payload": {"client": OTHER[0], "kind": "discover", "port": 68}}  # fmt: skip
    own = {"ts": 2.0, "kind": "boot", "source": "controller", "mac": NODE1, "machine": "node1",
           "endpoint": "/ipxe", "status": 200, "payload": {"client": NODE[0]}}  # fmt: skip
    tftp = {"ts": 3.0, "kind": "tftp", "source": "device", "payload": {"client": OTHER[0],
            "file": "ipxe.efi", "stage": "start"}}  # fmt: skip
    events = [spoofed, own, tftp]
    assert boottrace.node_addresses(events, NODE1, "node1") == {NODE[0], OTHER[0]}  # no way to tell
    assert boottrace.node_addresses(events, NODE1, "node1", declared=NODE[0]) == {NODE[0]}
    steps = boottrace.timeline(events, NODE1, "node1", from_power=False, declared=NODE[0])
    assert [s.stage for s in steps] == ["proxy offer", "GET /ipxe"], steps
    assert steps[0].detail.endswith(f", from {OTHER[0]}, not the machine's address {NODE[0]}")


def test_the_machines_timeline_route_passes_the_declared_address(site_dir, client_for):
    machines = site_dir / "machines.yaml"
    machines.write_text(machines.read_text().replace(f"    mac: {NODE1}\n", f"    mac: {NODE1}\n    address: {NODE[0]}\n"))
    node = client_for(site_dir, client=NODE)
    power_on(node, NODE1)
    r = node.post("/api/v1/events", json={"kind": "dhcp", "source": "device", "mac": NODE1,
                                          "payload": {"client": OTHER[0], "kind": "discover",
                                                      "port": 68}}, headers=auth())  # fmt: skip
    assert r.status_code == 201, r.text
    r = node.post("/api/v1/events", json={"kind": "tftp", "source": "device",
                                          "payload": {"client": OTHER[0], "file": "ipxe.efi",
                                                      "stage": "start"}}, headers=auth())  # fmt: skip
    assert r.status_code == 201, r.text
    stages = [s["stage"] for s in node.get("/api/v1/machines/node1/timeline").json()["steps"]]
    assert "proxy offer" in stages and "tftp start" not in stages, stages
