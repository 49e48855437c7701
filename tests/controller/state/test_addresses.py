"""bastion.state.addresses and its use by the controller: steps that come by address alone
(TFTP, /boot.ipxe, assets) are named after their machine, through what carries both the MAC
and the address; and the steps a node took before that are named afterwards."""

from __future__ import annotations

import pytest
from bastion.state.addresses import AddressBook, plain_address
from bastion_testkit import auth

MAC = "52:54:00:12:34:01"  # node1 of examples/site


def dhcp_request(address, mac=MAC, machine="node1"):
    return {"source": "device", "mac": mac, "machine": machine,
            "payload": {"kind": "request", "port": 67, "client": address}}  # fmt: skip


@pytest.mark.parametrize("peer, plain", [
    ("::ffff:10.77.0.21", "10.77.0.21"),  # an IPv4 client of an IPv6 socket
    ("10.77.0.21", "10.77.0.21"),
    ("::1", "::1"),
    ("fd00::15", "fd00::15"),
    ("::10.77.0.21", "::10.77.0.21"),  # IPv4-compatible (deprecated), not mapped: not IPv4 traffic
    ("::ffff:not-an-address", "::ffff:not-an-address"),
])  # fmt: skip
def test_an_ipv4_mapped_peer_is_its_ipv4_address(peer, plain):
    assert plain_address(peer) == plain


def test_what_teaches_and_what_does_not():
    book = AddressBook()
    assert book.learn("dhcp", dhcp_request("10.0.0.5"), 1)[0].how == "dhcp request (port 67)"
    assert book.learn("dhcp", dhcp_request("10.0.0.5"), 2) is None  # nothing new
    # a config fetched with the MAC by someone else teaches nothing
    ign = {"source": "controller", "mac": MAC, "machine": "node1", "endpoint": "/ignition",
           "status": 200, "payload": {"client": "10.0.0.9"}}  # fmt: skip
    assert book.learn("boot", ign, 3) is None
    script = {**ign, "endpoint": "/ipxe"}
    b, replaced = book.learn("boot", script, 4)
    assert (b.address, b.machine, b.how, replaced) == ("10.0.0.9", "node1", "GET /ipxe", None)
    # an unknown MAC (no machine) teaches nothing either
    assert book.learn("dhcp", dhcp_request("10.0.0.7", machine=None), 5) is None


def test_an_address_given_to_another_machine_moves():
    book = AddressBook()
    book.learn("dhcp", dhcp_request("10.0.0.5"), 1)
    b, replaced = book.learn("dhcp", dhcp_request("10.0.0.5", "52:54:00:12:34:02", "node2"), 2)
    assert b.machine == "node2" and replaced.machine == "node1"
    tftp = {"source": "device", "payload": {"stage": "start", "client": "10.0.0.5"}}
    assert book.attribute("tftp", tftp, 3)["machine"] == "node2"


def test_bounds_forget_the_oldest_and_the_stale():
    book = AddressBook(capacity=2, ttl_s=100)
    for i in range(3):
        book.learn("dhcp", dhcp_request(f"10.0.0.{i}", f"52:54:00:00:00:0{i}", f"n{i}"), 10)
    assert [b.address for b in book.bindings()] == ["10.0.0.1", "10.0.0.2"]
    assert book.lookup("10.0.0.2", 110) is not None and book.lookup("10.0.0.2", 111) is None
    tftp = {"source": "device", "payload": {"client": "10.0.0.2"}}
    assert "machine" not in book.attribute("tftp", tftp, 200)


def test_the_controller_names_every_step_of_a_node(client_for, site_dir):
    c = client_for(site_dir, client=("10.77.0.130", 40000))
    # before anything tied 10.77.0.130 to node1: a TFTP transfer the device saw
    r = c.post("/api/v1/events", headers=auth(), json={
        "kind": "tftp", "payload": {"stage": "start", "file": "ipxe.efi", "client": "10.77.0.130"}})
    first = r.json()
    assert first["machine"] is None
    # iPXE's script request carries the MAC and comes from the address: both are node1's now
    assert c.get("/boot.ipxe").status_code == 200
    assert c.get(f"/ipxe?mac={MAC}").status_code == 200
    assert c.get("/assets/flatcar/amd64/flatcar_production_pxe.vmlinuz").status_code == 200
    evs = c.get("/api/v1/events", params={"machine": "node1"}).json()
    kinds = [(e["kind"], e["endpoint"]) for e in reversed(evs)]
    assert kinds == [("tftp", None), ("boot", "/boot.ipxe"), ("boot", "/ipxe"),
                     ("asset", "/assets/flatcar/amd64/flatcar_production_pxe.vmlinuz")]  # fmt: skip
    by_id = {e["id"]: e for e in evs}
    assert by_id[first["id"]]["payload"]["attributed"] == "address"  # named afterwards
    assert by_id[first["id"]]["mac"] == MAC
    # the device's REQUEST for the router's address teaches before any TFTP (another node)
    c.post("/api/v1/events", headers=auth(), json={
        "kind": "dhcp", "source": "device", "mac": "52:54:00:12:34:02",
        "payload": {"kind": "request", "port": 67, "client": "10.77.0.131"}})
    r = c.post("/api/v1/events", headers=auth(), json={
        "kind": "tftp", "payload": {"stage": "start", "file": "ipxe.efi", "client": "10.77.0.131"}})
    assert (r.json()["machine"], r.json()["mac"]) == ("node2", "52:54:00:12:34:02")


def test_a_missing_asset_is_a_failed_step_of_a_known_machine_only(client_for, site_dir):
    c = client_for(site_dir, client=("10.77.0.140", 40000))
    assert c.get("/assets/lab/no-such-vmlinuz").status_code == 404
    assert c.get("/api/v1/events", params={"kind": "asset"}).json() == []  # a stranger's probe
    assert c.get(f"/ipxe?mac={MAC}").status_code == 200  # now 10.77.0.140 is node1
    assert c.get("/assets/lab/no-such-vmlinuz").status_code == 404
    [e] = c.get("/api/v1/events", params={"kind": "asset"}).json()
    assert (e["machine"], e["status"], e["endpoint"]) == ("node1", 404, "/assets/lab/no-such-vmlinuz")


def test_naming_an_addresss_steps_reads_only_that_addresss_steps(tmp_path):
    from bastion.state.events import EventStore

    def steps_to_name(unnamed: int) -> int:
        store = EventStore(tmp_path / f"{unnamed}.db")
        others = [("boot", {"endpoint": "/boot.ipxe", "status": 200,
                            "payload": {"client": f"10.1.{n // 250}.{n % 250}"}})
                  for n in range(unnamed)]  # fmt: skip
        mine = ("tftp", {"source": "device", "payload": {"stage": "start", "client": "10.0.0.5"}})
        store.record_many([*others, mine, *others])
        steps = [0]

        def count() -> int:
            steps[0] += 1
            return 0

        store._db.set_progress_handler(count, 10)
        assert store.attribute("10.0.0.5", MAC, "node1", since=0, after_id=0) == 1
        store._db.set_progress_handler(None, 10)
        store.close()
        return steps[0]

    # other addresses' unnamed steps around it: four times as many cost no more to pass over
    # (each newly learned address read every unnamed step in the window: 4 ms for 10,000)
    few, many = steps_to_name(1000), steps_to_name(4000)
    assert 0 < few and many < 1.2 * few, (few, many)
