"""The site's WireGuard tunnels to the management cluster, as wg-quick configs.

site.yaml `cluster.wireguard` describes one star: the management side at the pool's first host
address listens on `endpoint`; every node (bastion.cluster.plan gives each its address and its
wg0.conf) and, with `cluster.wireguard.controller`, the controller host are its peers. The
management side reaches the controller's API through the controller's tunnel address.

    controller_address(wg)                       the controller host's tunnel address, or None
    controller_config(wg, site, key_file)        the controller host's wg-quick config
    shared_management_config(sites, key_file)    the management side's: one interface for the
                                                 sites that dial one endpoint (often one), every
                                                 peer of theirs, each allowed its own IP alone

Sites that share an endpoint share the management side's interface: one [Interface] can
listen on a port, so a second site's whole config on the same host failed (`Address already in
use`). Their pools must not overlap (a peer's AllowedIPs is the one thing that tells the
peers apart), and they must name the same management public key and endpoint port.

Pure: text from the site's settings and public keys. No private key is ever in a config: each
says `PostUp = wg set %i private-key FILE`, FILE being the controller's secret store
(bastion.state.secrets) on the controller host and the management side's own key file there.
"""

from __future__ import annotations

import ipaddress
import shlex
from typing import Any

# the controller host's interface when site.yaml names none (schema.ControllerWireguard)
DEFAULT_INTERFACE = "wg-bastion"

# (name, what it is, public key, tunnel IP): one [Peer] of the management side
Peer = tuple[str, str, str, str]


class TunnelError(ValueError):
    """Sites whose tunnels cannot meet on one management interface; the message says why."""


def _bits(ip: str) -> int:
    return 128 if ipaddress.ip_address(ip).version == 6 else 32


def management_address(wg: Any) -> str:
    """The management side's tunnel address: the pool's first host address."""
    return str(next(ipaddress.ip_network(wg.address_pool).hosts()))


def controller_address(wg: Any) -> str | None:
    """The controller host's tunnel address: cluster.wireguard.controller.address, else the
    pool's last host address (so that the nodes' addresses, counted from the start of the pool,
    never move when the controller gets a tunnel). None: the controller has no tunnel."""
    if wg is None or wg.controller is None:
        return None
    if wg.controller.address is not None:
        return wg.controller.address
    pool = ipaddress.ip_network(wg.address_pool)
    return str(pool[-1] if pool.version == 6 else pool[-2])  # IPv4: below the broadcast address


def endpoint_port(endpoint: str) -> int:
    """The port of `host:port` (`[v6]:port`): the port the management side listens on."""
    return int(endpoint.rsplit(":", 1)[1])


def _key_line(key_file: str) -> list[str]:
    # wg-quick runs PostUp after the interface exists and before it is used; `wg set` reads
    # the key from the file, so the config holds no secret
    # wg-quick runs the hook through bash: the path quoted (a space split it, a `$` or `;` ran)
    return [f"PostUp = wg set %i private-key {shlex.quote(key_file)}"]


def controller_config(wg: Any, site_name: str, key_file: str) -> str:
    """/etc/wireguard/<interface>.conf on the controller host: its tunnel address in the pool,
    the management side as its one peer."""
    ctl = wg.controller
    prefix = ipaddress.ip_network(wg.address_pool).prefixlen
    allowed = ctl.allowed_ips or wg.allowed_ips or [wg.address_pool]
    out = [
        f"# Written by Edge Bastion from site.yaml cluster.wireguard (site {site_name}): the",
        "# controller host's tunnel to the management cluster. `wg-quick up` reads it (the",
        "# wg-quick@ unit); the private key stays in the controller's secret store.",
        "[Interface]",
        f"Address = {controller_address(wg)}/{prefix}",
    ]
    if ctl.listen_port is not None:
        out.append(f"ListenPort = {ctl.listen_port}")
    out += _key_line(key_file)
    out += [
        "",
        "[Peer]",
        "# the management side",
        f"PublicKey = {wg.public_key}",
        f"Endpoint = {wg.endpoint}",
        f"AllowedIPs = {', '.join(allowed)}",
    ]
    if wg.persistent_keepalive:
        out.append(f"PersistentKeepalive = {wg.persistent_keepalive}")
    return "\n".join(out) + "\n"


def shared_interface_problems(sites: list[tuple[str, Any, list[Peer]]]) -> list[str]:
    """Why the sites' tunnels cannot be one management interface (none: they can). Each site is
    (name, its cluster.wireguard, its peers)."""
    problems = []
    names = [name for name, _, _ in sites]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"site {name} is given twice, or two sites have that name (site.yaml "
                        "site:): each needs its own")  # fmt: skip
    ports = ", ".join(f"{name}: {endpoint_port(wg.endpoint)}" for name, wg, _ in sites)
    if len({endpoint_port(wg.endpoint) for _, wg, _ in sites}) > 1:
        problems.append(f"the sites' endpoints have different ports ({ports}): one interface "
                        "listens on one port; make it one endpoint in each site.yaml, or give "
                        "each port its own interface (management-config once per port)")  # fmt: skip
    keys = ", ".join(f"{name}: {wg.public_key}" for name, wg, _ in sites)
    if len({wg.public_key for _, wg, _ in sites}) > 1:
        problems.append(f"the sites name different management public keys ({keys}): one "
                        "interface has one private key, so the peers of all but one site would "
                        "get no handshake; give every site.yaml the public key of "
                        "--private-key-file")  # fmt: skip
    for i, (a, wa, _) in enumerate(sites):
        for b, wb, _ in sites[i + 1 :]:
            pa, pb = ipaddress.ip_network(wa.address_pool), ipaddress.ip_network(wb.address_pool)
            if a != b and pa.version == pb.version and pa.overlaps(pb):
                problems.append(f"sites {a} and {b}: their address pools {pa} and {pb} overlap: "
                                "on one interface their peers' addresses would collide; give "
                                "each site a pool of its own (site.yaml "
                                "cluster.wireguard.address_pool)")  # fmt: skip
    # Pools apart are not all: a pinned controller address may lie outside its site's pool, and
    # one secret store given for two sites gives their peers one key (WireGuard: one peer).
    by_ip: dict[str, tuple[str, str]] = {}
    by_key: dict[str, tuple[str, str]] = {}
    for site_name, _, peers in sites:
        for name, _, key, ip in peers:
            for seen, value, clash in ((by_ip, ip, "the address"), (by_key, key, "the public key")):
                other = seen.setdefault(value, (site_name, name))
                if other[0] != site_name:
                    problems.append(f"{other[0]}'s {other[1]} and {site_name}'s {name} have "
                                    f"{clash} {value}: one interface takes them for one peer")  # fmt: skip
    return problems


def shared_management_config(sites: list[tuple[str, Any, list[Peer]]], key_file: str) -> str:
    """The management side's one interface for every site of `sites` (name, cluster.wireguard,
    peers), which dial the same endpoint: each pool's first address (wg-quick takes a list),
    the endpoint's port, every site's peers, each with its tunnel IP alone as its AllowedIPs
    (a peer can only speak as itself). TunnelError when shared_interface_problems() finds a
    reason they cannot share it."""
    problems = shared_interface_problems(sites)
    if problems:
        raise TunnelError("\n".join(problems))
    _, first, _ = sites[0]
    addresses = [f"{management_address(wg)}/{ipaddress.ip_network(wg.address_pool).prefixlen}"
                 for _, wg, _ in sites]  # fmt: skip
    count = sum(len(peers) for _, _, peers in sites)
    names = ", ".join(name for name, _, _ in sites)
    whose = f"site {names}: the management side's end of its" if len(sites) == 1 else (
        f"sites {names}: the management side's end of their")  # fmt: skip
    out = [
        f"# Edge Bastion {whose} tunnels ({count} peers).",
        "# wg-quick format: save as /etc/wireguard/<interface>.conf and `wg-quick up <interface>`.",
        "[Interface]",
        f"Address = {', '.join(addresses)}",
        f"ListenPort = {endpoint_port(first.endpoint)}",
        *_key_line(key_file),
    ]  # fmt: skip
    for site_name, wg, peers in sites:
        if len(sites) > 1:
            out += ["", f"# --- site {site_name}: address pool {wg.address_pool}"]
        for name, what, key, ip in peers:
            out += ["", "[Peer]", f"# {name} ({what})", f"PublicKey = {key}",
                    f"AllowedIPs = {ip}/{_bits(ip)}"]  # fmt: skip
    return "\n".join(out) + "\n"
