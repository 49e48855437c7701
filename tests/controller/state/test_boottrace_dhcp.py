"""bastion.state.boottrace and the device's DHCP events: a DHCP packet naming a node's MAC from
another address than the node's declared `address:` (a LAN host sending it with the node's MAC,
or a router leasing the node another address) is marked in the node's timeline, as a boot script
asked for from elsewhere is, not shown as the node's own proxy offer. What cannot be told is
left as it was: a broadcast DISCOVER carries no address, and an undeclared node has none to
compare with. Also: the module defines each of its names once."""

from __future__ import annotations

from bastion.state import boottrace
from bastion_testkit import auth

NODE1 = "52:54:00:12:34:01"  # examples/site's node1
NODE = "10.77.0.21"  # its declared address in these tests
OTHER = "10.77.0.66"  # another host on the LAN
MARK = f", from {OTHER}, not the machine's address {NODE}"


def dhcp(ts: float, **payload) -> dict:
    return {"ts": ts, "kind": "dhcp", "source": "device", "mac": NODE1, "machine": "node1",
            "payload": {"arch": 7, "file": "ipxe.efi", **payload}}  # fmt: skip


def details(events: list[dict], declared: str | None = NODE) -> list[tuple[str, str]]:
    steps = boottrace.timeline(events, NODE1, "node1", from_power=False, declared=declared)
    return [(s.stage, s.detail) for s in steps]


def test_a_dhcp_packet_from_another_address_is_marked_not_the_nodes_proxy_offer():
    # the device answered a port-4011 request from each (firmware/proxydhcp.py: kind "ack",
    # `client` the request's source address)
    spoofed = dhcp(1.0, kind="ack", port=4011, client=OTHER)
    own = dhcp(2.0, kind="ack", port=4011, client=NODE)
    (theirs, mine) = details([spoofed, own])
    assert theirs == ("proxy offer", f"ack on port 4011: arch 7, boot file ipxe.efi{MARK}")
    assert mine == ("proxy offer", "ack on port 4011: arch 7, boot file ipxe.efi")


def test_an_address_request_for_another_address_says_so():
    (step,) = details([dhcp(1.0, kind="request", port=67, client=OTHER)])
    detail = (f"asks the router for {OTHER} (arch 7); not the device's to answer, "
              f"not the machine's address {NODE}")  # fmt: skip
    assert step == ("address request", detail)


def test_the_declared_address_may_come_from_a_boot_scripts_mark():
    # the lab reads timelines without the machine's `address:`; a boot script asked for from
    # elsewhere carries it (bastion.boot), and that is enough
    spoofed = dhcp(1.0, kind="offer", port=67, client=OTHER)  # a DISCOVER with a ciaddr
    foreign_ipxe = {"ts": 2.0, "kind": "boot", "source": "controller", "mac": NODE1,
                    "machine": "node1", "endpoint": "/ipxe", "status": 200,
                    "payload": {"client": OTHER, "declared_address": NODE}}  # fmt: skip
    steps = details([spoofed, foreign_ipxe], declared=None)
    assert steps[0] == ("proxy offer", f"offer on port 67: arch 7, boot file ipxe.efi{MARK}")


def test_what_cannot_be_told_is_not_marked():
    broadcast = dhcp(1.0, kind="offer", port=67)  # no client address: anyone's, or the node's
    assert details([broadcast]) == [("proxy offer", "offer on port 67: arch 7, boot file ipxe.efi")]
    undeclared = dhcp(1.0, kind="ack", port=4011, client=OTHER)
    assert details([undeclared], declared=None) == [
        ("proxy offer", "ack on port 4011: arch 7, boot file ipxe.efi")]


def test_the_machines_timeline_route_marks_a_spoofed_dhcp_event(site_dir, client_for):
    machines = site_dir / "machines.yaml"
    text = machines.read_text()
    declared = f"    mac: {NODE1}\n    address: {NODE}\n"
    machines.write_text(text.replace(f"    mac: {NODE1}\n", declared))
    c = client_for(site_dir)
    for kind, payload in (("power", {"ch": 0, "state": "on", "why": "on"}),
                          ("dhcp", {"client": OTHER, "kind": "ack", "port": 4011, "arch": 7,
                                    "file": "ipxe.efi"})):  # fmt: skip
        r = c.post("/api/v1/events", json={"kind": kind, "source": "device", "mac": NODE1,
                                           "payload": payload}, headers=auth())  # fmt: skip
        assert r.status_code == 201, r.text
    steps = c.get("/api/v1/machines/node1/timeline").json()["steps"]
    assert [(s["stage"], s["detail"]) for s in steps][1:] == [
        ("proxy offer", f"ack on port 4011: arch 7, boot file ipxe.efi{MARK}")]
