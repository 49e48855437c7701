"""The site's WireGuard tunnels to the management cluster, as wg-quick configs.

site.yaml `cluster.wireguard` describes one star: the management side at the pool's first host
address listens on `endpoint`; every node (bastion.cluster.plan gives each its address and its
wg0.conf) and, with `cluster.wireguard.controller`, the controller host are its peers. The
management side reaches the controller's API through the controller's tunnel address.

    controller_address(wg)                       the controller host's tunnel address, or None
    controller_config(wg, site, key_file)        the controller host's wg-quick config
    management_config(wg, site, peers, key_file) the management side's, every peer of the site

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


def management_config(wg: Any, site_name: str, peers: list[tuple[str, str, str, str]],
                      key_file: str) -> str:  # fmt: skip
    """The management side's whole interface for the site (wg-quick format): the pool's first
    address, listening on the endpoint's port, one [Peer] per (name, what, public key, tunnel
    IP) with that IP alone as its AllowedIPs, so that a peer can only speak as itself."""
    prefix = ipaddress.ip_network(wg.address_pool).prefixlen
    out = [
        f"# Edge Bastion site {site_name}: the management side's end of its tunnels ({len(peers)} peers).",
        "# wg-quick format: save as /etc/wireguard/<interface>.conf and `wg-quick up <interface>`.",
        "[Interface]",
        f"Address = {management_address(wg)}/{prefix}",
        f"ListenPort = {endpoint_port(wg.endpoint)}",
        *_key_line(key_file),
    ]  # fmt: skip
    for name, what, key, ip in peers:
        out += ["", "[Peer]", f"# {name} ({what})", f"PublicKey = {key}", f"AllowedIPs = {ip}/{_bits(ip)}"]
    return "\n".join(out) + "\n"
