"""A machine that declares `address:` in machines.yaml is at that address only: a LAN host that
asks for its boot script with its MAC is answered as before, but does not become that machine
in the address book (bastion.state.addresses), so its own steps stay its own, in the history
as in a restarted controller's book."""

from __future__ import annotations

import logging
import time

from bastion_testkit import make_app
from fastapi.testclient import TestClient

NODE1 = "52:54:00:12:34:01"  # examples/site's node1, declared at NODE below
NODE2 = "52:54:00:12:34:02"  # node2: no address declared
NODE = ("10.77.0.21", 40000)
OTHER = ("10.77.0.66", 40000)  # another host on the LAN


def machine_at(runtime, address: str) -> str | None:
    b = runtime.addresses.lookup(address, time.time())
    return b.machine if b is not None else None


def test_another_address_does_not_take_a_declared_machines_place(client_for, site_dir, caplog):
    machines = site_dir / "machines.yaml"
    declared = f"    mac: {NODE1}\n    address: {NODE[0]}\n"
    machines.write_text(machines.read_text().replace(f"    mac: {NODE1}\n", declared))
    node = client_for(site_dir, client=NODE)
    runtime = node.app.state.runtime
    other = TestClient(node.app, client=OTHER)
    with caplog.at_level(logging.WARNING, logger="bastion"):
        for _ in range(2):
            r = other.get(f"/ipxe?mac={NODE1}")
            assert r.status_code == 200 and r.text.startswith("#!ipxe\nkernel "), r.text  # answered
    assert machine_at(runtime, OTHER[0]) is None  # it was node1
    assert runtime.addresses.mismatches == 2
    warned = [r.getMessage() for r in caplog.records if "(machines.yaml)" in r.getMessage()]
    assert warned == [("GET /ipxe from 10.77.0.66 names node1, whose address is 10.77.0.21 "
                       "(machines.yaml): not taken as node1's address")]  # fmt: skip
    # the other host's own next step is not node1's
    assert other.get("/boot.ipxe").status_code == 200
    (bootstrap,) = other.get("/api/v1/events", params={"kind": "boot", "limit": 1}).json()
    assert bootstrap["endpoint"] == "/boot.ipxe" and bootstrap["machine"] is None, bootstrap

    # from its own address the machine is learned as before
    assert node.get(f"/ipxe?mac={NODE1}").status_code == 200
    assert machine_at(runtime, NODE[0]) == "node1" and runtime.addresses.mismatches == 2
    # a restarted controller learns from the history the same way, and counts nothing twice
    again = make_app(site_dir, runtime.store.path, poll=0)
    with TestClient(again):
        book = again.state.runtime.addresses
        assert {b.address: b.machine for b in book.bindings()} == {NODE[0]: "node1"}
        assert book.mismatches == 0

    # a machine that declares no address is still learned from wherever it asks
    assert other.get(f"/ipxe?mac={NODE2}").status_code == 200
    assert machine_at(runtime, OTHER[0]) == "node2"
