"""Which machine a LAN address belongs to, so that every boot step lands on its machine.

TFTP transfers, `/boot.ipxe`, `/grub/grub.cfg` and assets are asked for by address alone: no
MAC. A few requests carry both an address and the MAC, and teach the book:

- the device's `dhcp` events with a `client`: the address a declared PXE client asks the router
  for (its DHCPREQUEST's option 50, kind `request`, before any TFTP), the source of a port-4011
  request, a ciaddr;
- the boot script requests, `/ipxe` and `/grub`, with their `mac=` and source address.

Callbacks and Ignition fetches carry a MAC too, but do not teach: anyone may fetch a machine's
config with its MAC (a person with curl, a test), which says nothing of whose address that is.
The device cannot tell more: MicroPython exposes no ARP table on the unix port or the boards,
and a W5500 keeps its ARP inside the chip.

`attribute(kind, fields)` fills in the MAC and machine of an event that has only a `client`;
`learn(kind, fields)` returns a new or changed binding, for which the runner attributes the
recent events of that address retroactively (bastion.state.events.EventStore.attribute): on a
node's very first boot the router's address can come after its first TFTP step.

A machine that declares its `address:` in machines.yaml is bound at that address only: anyone on
the LAN may ask `/ipxe?mac=<a node's MAC>`, and that request must not make the asker's address
the node's (its steps would land in the node's history, and a journal it uploads would be the
node's: bastion.api.journal). Such a request is still answered as before (the script holds
nothing that is the node's alone; a one-time Ignition URL is issued only to the declared address,
bastion.boot); it teaches nothing, and is counted in `mismatches` and logged once per address
and machine. `declared(name)`, set by the runtime, says what a machine declares.

Bounds: `capacity` bindings (the least recently used is dropped), each good for `ttl_s` since
it was last confirmed (a lease given to another host later is not believed forever).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("bastion")

TEACHING_ENDPOINTS = ("/ipxe", "/grub")
ATTRIBUTED_KINDS = ("tftp", "asset", "boot")


def plain_address(host: str) -> str:
    """A peer's address as machines.yaml and the device write it: an IPv4-mapped IPv6 address
    (`::ffff:10.77.0.21`, an IPv4 client of an IPv6 socket such as `--listen [::]:8080`, RFC
    4291 2.5.5.2) is its IPv4 address; anything else is left as it is. The HTTP server applies it
    to every connection's peer (bastion.api.httpserver), before anything compares or records it:
    a machine's `address:`, a one-time URL's client, this book."""
    if not host.startswith("::") or "." not in host:  # the common case, without parsing
        return host
    try:
        mapped = ipaddress.IPv6Address(host).ipv4_mapped
    except ValueError:
        return host
    return str(mapped) if mapped is not None else host


@dataclass(frozen=True)
class Binding:
    address: str
    mac: str
    machine: str
    since: float  # when this address was first seen as this MAC's
    seen: float  # when it was last confirmed
    how: str  # what taught it: "dhcp request", "dhcp 4011", "GET /ipxe", ...


class AddressBook:
    capacity = 4096
    ttl_s = 24 * 3600.0

    def __init__(self, capacity: int | None = None, ttl_s: float | None = None,
                 declared: Callable[[str], str | None] | None = None):  # fmt: skip
        self.capacity = capacity or self.capacity
        self.ttl_s = ttl_s or self.ttl_s
        # the `address:` a machine (by name) declares, None for none; None: nothing is declared
        self.declared = declared
        self.mismatches = 0  # teachings refused: a machine's MAC asked for from another address
        self._lock = threading.Lock()
        self._by_address: OrderedDict[str, Binding] = OrderedDict()
        # the last address logged for each machine, so that a host that keeps asking is one line
        self._logged: dict[str, str] = {}

    def lookup(self, address: str | None, now: float) -> Binding | None:
        if not address:
            return None
        with self._lock:
            b = self._by_address.get(address)
        if b is None or now - b.seen > self.ttl_s:
            return None
        return b

    def bindings(self) -> list[Binding]:
        with self._lock:
            return list(self._by_address.values())

    @staticmethod
    def teaching(kind: str, fields: dict[str, Any]) -> tuple[str, str] | None:
        """(address, how) when an event with these fields ties an address to its machine."""
        payload = fields.get("payload") or {}
        client = payload.get("client")
        if not client or not fields.get("mac") or not fields.get("machine"):
            return None
        if kind == "dhcp" and fields.get("source") == "device":
            return client, f"dhcp {payload.get('kind')} (port {payload.get('port')})"
        status = fields.get("status")
        if kind == "boot" and fields.get("endpoint") in TEACHING_ENDPOINTS and status == 200:
            return client, f"GET {fields['endpoint']}"
        return None

    def learn(self, kind: str, fields: dict[str, Any], now: float,
              past: bool = False) -> tuple[Binding, Binding | None] | None:  # fmt: skip
        """Record what the event teaches; (binding, the one it replaced or None) when that is
        news (a new address, or one that was another MAC's), else None. `past`: an event of the
        history (seed), whose mismatch was counted and logged when it happened."""
        taught = self.teaching(kind, fields)
        if taught is None:
            return None
        address, how = taught
        mac, machine = fields["mac"], fields["machine"]
        declared = self.declared(machine) if self.declared is not None else None
        if declared is not None and declared != address:
            if not past:
                self.mismatch(machine, declared, address, how)
            return None
        with self._lock:
            old = self._by_address.pop(address, None)
            fresh = old is None or old.mac != mac or now - old.seen > self.ttl_s
            since = now if fresh else old.since
            b = Binding(address, mac, machine, since, now, how if fresh else old.how)
            self._by_address[address] = b
            while len(self._by_address) > self.capacity:
                self._by_address.popitem(last=False)
        return (b, old if old is not None and old.mac != mac else None) if fresh else None

    def mismatch(self, machine: str, declared: str, address: str, how: str) -> None:
        """Count a request that names `machine` from another address than its declared one, and
        log it once per (machine, address): the boot script's (learn) and the reports'
        (bastion.api.boot) alike."""
        with self._lock:
            self.mismatches += 1
            if self._logged.get(machine) == address:
                return
            self._logged[machine] = address
        log.warning("%s from %s names %s, whose address is %s (machines.yaml): not taken as %s's "
                    "address", how, address, machine, declared, machine)  # fmt: skip

    def seed(self, events: list[dict[str, Any]]) -> None:
        """Learn from past events (Event.as_dict(), oldest first): a restarted controller knows
        the addresses its nodes had."""
        for e in events:
            self.learn(e.get("kind") or "", e, float(e.get("ts") or 0), past=True)

    def attribute(self, kind: str, fields: dict[str, Any], now: float) -> dict[str, Any]:
        """`fields` with the machine of its client address, for a step recorded without one."""
        if kind not in ATTRIBUTED_KINDS or fields.get("mac") or fields.get("machine"):
            return fields
        payload = fields.get("payload") or {}
        b = self.lookup(payload.get("client"), now)
        if b is None:
            return fields
        return {**fields, "mac": b.mac, "machine": b.machine,
                "payload": {**payload, "attributed": "address"}}  # fmt: skip
