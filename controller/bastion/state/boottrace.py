"""A node's boot, read back from the controller's event history: its timeline.

Every step of a network boot lands as an event: the device's relay switching on (power), its
proxy offers (dhcp), the TFTP transfer (tftp), the controller's scripts and configs (boot),
kernel and initrd downloads (asset), the node's own report (callback), its heartbeats' news
(heartbeat: a boot's first beat) and the device's node watchdog acting on it (watchdog). Device and
HTTP events that carry no MAC (TFTP, /boot.ipxe, assets) are named after their machine by the
controller (bastion.state.addresses), and are also tied to the node here by the addresses that
are the node's (node_addresses: the address book's rule, read from the same history).

Pure over event dicts (Event.as_dict()): the lab's checks (bastion.lab.trace) and the dashboard's
machine view (GET /api/v1/machines/{name}/timeline) read the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bastion.state.addresses import AddressBook


@dataclass
class Step:
    t: float  # seconds since the node's power-on
    stage: str
    detail: str
    event: dict[str, Any] = field(repr=False, default_factory=dict)


def payload(e: dict) -> dict:
    """An event's payload, {} for none."""
    return e.get("payload") or {}


def node_addresses(events: list[dict], mac: str, name: str,
                   declared: str | None = None) -> set[str]:  # fmt: skip
    """The IP addresses that are the node's, by the address book's rule
    (bastion.state.addresses): where its boot script requests (`/ipxe`, `/grub`) and the
    device's DHCP events say it is. Not every request naming its MAC: any LAN host may ask
    `/ipxe?mac=<the node's MAC>` or fetch its config, and that host's own TFTP and HTTP steps
    are not the node's. A node that declares `address:` is at that address only; a boot script
    asked for from elsewhere carries it (`declared_address`, bastion.boot), and then it is the
    one address; `declared`: the machine's `address:` as its caller knows it (then no event
    needs to carry it: a spoofed DHCP event naming the node is not taken either)."""
    declared = declared_address(events, mac, name, declared)
    if declared:
        return {declared}
    out = set()
    for e in events:
        if e.get("mac") != mac and e.get("machine") != name:
            continue
        taught = AddressBook.teaching(e.get("kind") or "", e)
        if taught is not None:
            out.add(taught[0])
    return out


def declared_address(events: list[dict], mac: str, name: str,
                     declared: str | None = None) -> str | None:  # fmt: skip
    """The node's declared `address:`: `declared` when its caller knows it, else the one a
    boot script asked for from elsewhere carries (`declared_address`, bastion.boot), else
    None (an undeclared node, or a declared one no other host has asked for)."""
    if declared:
        return declared
    for e in events:
        if e.get("mac") != mac and e.get("machine") != name:
            continue
        if found := payload(e).get("declared_address"):
            return found
    return None


def timeline(events: list[dict], mac: str, name: str, from_power: bool = True,
             declared: str | None = None) -> list[Step]:  # fmt: skip
    """The node's boot steps, in order, from the first power-on in `events` (oldest first); with
    from_power=False from its first step of any kind (a machine no relay of ours switches).
    `declared`: the machine's `address:` (node_addresses); a device DHCP event naming the node
    from another address is marked so in its step (_elsewhere)."""
    declared = declared_address(events, mac, name, declared)
    ips = node_addresses(events, mac, name, declared)
    start = None
    steps: list[Step] = []

    def add(e: dict, stage: str, detail: str) -> None:
        nonlocal start
        if start is None:
            start = e["ts"]
        steps.append(Step(round(e["ts"] - start, 2), stage, detail, e))

    for e in events:
        p, kind, src = payload(e), e.get("kind"), e.get("source")
        mine = e.get("mac") == mac or e.get("machine") == name or p.get("client") in ips
        if kind == "power" and src == "device" and e.get("machine") == name:
            add(e, f"power {p.get('state')}", f"relay channel {p.get('ch')} ({p.get('why')})")
        elif start is None and from_power:
            continue  # nothing before the power-on belongs to this boot
        elif kind == "dhcp" and src == "device" and mine and p.get("kind") == "request":
            add(e, "address request", f"asks the router for {p.get('client')} (arch "
                f"{p.get('arch')}); not the device's to answer"
                + (f", not the machine's address {declared}" if _elsewhere(p, declared) else ""))
        elif kind == "dhcp" and src == "device" and mine:
            what = "script URL (iPXE)" if p.get("ipxe") else f"boot file {p.get('file')}"
            add(e, "proxy offer", f"{p.get('kind')} on port {p.get('port')}: arch "
                f"{p.get('arch')}, {what}" + (f" {p.get('file')}" if p.get("ipxe") else "")
                + (f", from {p['client']}, not the machine's address {declared}"
                   if _elsewhere(p, declared) else ""))
        elif kind == "tftp" and src in ("device", "controller") and (mine or not ips):
            where = "" if src == "device" else " (controller)"
            if p.get("stage") == "start":
                add(e, "tftp start", f"{p.get('file')}{where}: {p.get('tsize')} bytes, blksize "
                    f"{p.get('blksize')}, window {p.get('window')}")
            elif p.get("stage") == "end":
                secs = (p.get("ms") or 0) / 1000
                add(e, "tftp end", f"{p.get('file')}{where}: {p.get('bytes')} bytes in "
                    f"{secs:.2f} s, {p.get('result')}"
                    + (f", {p['resends']} resends" if p.get("resends") else ""))
        elif kind == "boot" and mine:
            add(e, f"GET {e.get('endpoint')}", f"HTTP {e.get('status')}"
                + (f", profile {e['profile']}" if e.get("profile") else "")
                + (f", asked from {p.get('client')}, not the machine's address "
                   f"{p['declared_address']}" if p.get("declared_address") else ""))
        elif kind == "asset" and mine:
            add(e, "GET asset", f"{e.get('endpoint')}: {p.get('size')} bytes, "
                f"HTTP {e.get('status')}")
        elif kind == "callback" and mine:
            add(e, "callback", f"{p.get('status')}, {len(p.get('files') or {})} files, "
                f"{p.get('digest')}")
        elif kind == "heartbeat" and mine:
            add(e, "heartbeat", f"{p.get('news')}: boot {p.get('boot_id')}"
                + (f", k3s {p['k3s']}" if p.get("k3s") else ""))
        elif kind == "watchdog" and src == "device" and e.get("machine") == name:
            add(e, f"watchdog {p.get('action')}", f"attempt {p.get('attempt')}, next boot grace "
                f"{(p.get('wait_ms') or 0) / 1000:.0f} s")
    return steps


def _elsewhere(p: dict, declared: str | None) -> bool:
    """Whether a device DHCP event naming the node's MAC says it is at another address than
    the declared one: a host sending a DHCP packet with the node's MAC from its own address, or
    a router leasing the node another one. Either way the address book refuses the binding
    (bastion.state.addresses), and the step is marked, as a boot script asked for from
    elsewhere is. A broadcast DISCOVER tells no address (`client` None): it cannot be told
    from the node's own, nor can any DHCP event of an undeclared node."""
    client = p.get("client")
    return bool(declared and client and client != declared)


def first(steps: list[Step], stage: str, contains: str = "") -> Step | None:
    for s in steps:
        if s.stage == stage and contains in s.detail:
            return s
    return None

