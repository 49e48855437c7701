"""A site's k3s cluster: site.yaml `cluster:` and the machines whose role is `server` or `agent`,
turned into one plan per node (the `cluster` variable of its templates) and a built-in profile.

Functions of the site files and of what the site's secret store says went out (a Ledger,
bastion.state.ledger, read by the caller: which server started the cluster, the tunnel addresses
nodes got); no secrets here (bastion.state.secrets.machine_secrets has them, and records those
facts when a node's config is issued). The only I/O is reading what `bastion assets fetch k3s`
recorded under the site's assets/ (the release's SHA-256s, `recorded_sha256`) and hashing a k3s
binary there to check it.

    plan(section, site_name, entries, sha256, ledger=...) -> (nodes by machine name, problems)

One server starts the cluster with --cluster-init: the one marked `k3s: {init: true}`, else the
one the secret store recorded once a node's config went out, else the first server in
machines.yaml order. The other servers join it, agents join as agents, at `cluster.server_url`,
else https://<that server's address>:6443. Tunnel addresses come from
`cluster.wireguard.address_pool`, after the pool's first host address (the management side's),
the controller host's (bastion.cluster.tunnel: the pool's last host address unless site.yaml
says) and the addresses machines pin: the one the store recorded for a machine whose key went
out, else the next free one in machines.yaml order.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bastion.cluster import tunnel
from bastion.model import Boot, Profile
from bastion.regcache import plan as regcache
from bastion.state.ledger import Ledger
from bastion.state.secrets import init_server_name, tunnel_address_name

PROFILE_ID = "k3s"
TEMPLATE = "k3s.bu"
TEMPLATES_DIR = Path(__file__).parent
ROLES = ("server", "agent")
# machines.yaml arch (iPXE's names) -> the name k3s and Flatcar use
K3S_ARCH = {"x86_64": "amd64", "arm64": "arm64"}
# k3s publishes its binaries as k3s (amd64) and k3s-arm64
UPSTREAM_BINARY = {"amd64": "k3s", "arm64": "k3s-arm64"}
# the kernel's consoles: the screen, then the serial line (the last one is /dev/console).
# A Raspberry Pi 4 with UEFI firmware has its PL011 UART on the GPIO header as ttyAMA0.
CONSOLES = {
    "x86_64": ("console=tty0", "console=ttyS0,115200n8"),
    "arm64": ("console=tty0", "console=ttyAMA0,115200n8"),
}
K3S_PATH = "/opt/bin/k3s"
TOKEN_FILE = "/etc/rancher/k3s/token"
AGENT_TOKEN_FILE = "/etc/rancher/k3s/agent-token"
NODE_PASSWORD_FILE = "/etc/rancher/node/password"  # where k3s's agent keeps its node password
HEARTBEAT_SCRIPT = "/opt/bin/bastion-heartbeat"
# How often a node beats: a third of its machines.yaml heartbeat.timeout_s, so that one lost
# beat is not silence; every HEARTBEAT_DEFAULT_S when the device does not watch it.
HEARTBEAT_DEFAULT_S = 30
HEARTBEAT_MIN_S = 2
DATA_PATH = "/var/lib/rancher"
# Graceful node shutdown (site.yaml cluster.shutdown_grace_s). The kubelet takes its periods
# from a KubeletConfiguration file only: k3s hands it the file of --kubelet-arg=config=FILE.
# k3s v1.32 and later copy that file into the kubelet's drop-in directory as
# 10-cli-config.conf, after their own 00-k3s-defaults.conf (which says shutdownGracePeriod:
# 0s); earlier releases pass it to the kubelet as --config. k3s keeps one such file: a site's
# own --kubelet-arg=config=... is refused beside this one (kubelet_config_arg).
KUBELET_CONFIG_FILE = "/etc/rancher/k3s/kubelet-config.yaml"
# The kubelet delays a shutdown with a logind "delay" inhibitor lock, which logind honours for
# InhibitDelayMaxSec (default 5 s). The kubelet raises it itself at start when it is too short
# (a drop-in of its own and a reload of logind), but does not always see the new value in
# time (kubernetes/kubernetes#133133): the node gets its value from the start instead, a few
# seconds over the grace period so that the kubelet can finish and report its pods.
LOGIND_DROPIN = "/etc/systemd/logind.conf.d/60-edge-bastion-k3s.conf"
INHIBIT_MARGIN_S = 5
_NODE_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")
_SYSTEMD_PLAIN = re.compile(r"^[A-Za-z0-9_@+=:,./-]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def builtin_profile(section: Any) -> Profile:
    """The `k3s` profile a site gets when it has a cluster and no profiles/k3s.yaml of its own:
    Flatcar's PXE kernel and initrd per architecture, from `bastion assets fetch flatcar`'s
    layout, with the consoles of each architecture."""
    fc = section.flatcar
    by_arch = {}
    for arch, name in K3S_ARCH.items():
        base = f"/assets/flatcar/{fc.channel}/{name}/{fc.version}"
        by_arch[arch] = Boot(
            f"{base}/flatcar_production_pxe.vmlinuz",
            (f"{base}/flatcar_production_pxe_image.cpio.gz",),
            CONSOLES[arch] + tuple(fc.args),
        )
    return Profile(
        id=PROFILE_ID,
        name=f"k3s node (Flatcar {fc.channel} {fc.version})",
        source="site.yaml (cluster: built-in profile k3s)",
        format="bastion",
        boot=None,
        boot_by_arch=by_arch,
        os="flatcar",
        ignition=TEMPLATE,
    )


@dataclass(frozen=True)
class Problem:
    file: str  # "site.yaml" or "machines.yaml"
    index: int | None  # the machines.yaml entry
    field: str  # the field under that entry (or the site.yaml field path)
    message: str


@dataclass(frozen=True)
class Entry:
    """A machines.yaml entry that is a cluster node: its place and its validated fields."""

    index: int
    name: str
    role: str
    arch: str | None
    address: str | None
    fields: Any  # schema.MachineEntry


def systemd_quote(arg: str) -> str:
    """One ExecStart= argument: % and $ doubled (specifiers, variables), quoted if needed.
    ValueError for a control character: a line break would end ExecStart= and start a line of
    the argument's choosing in the unit (or make a unit systemd refuses), which no quoting
    prevents; the site's values are checked when it loads, this is the last guard."""
    if _CONTROL.search(arg):
        raise ValueError(f"{arg[:60]!r} has a control character, which no ExecStart= argument may hold")
    arg = arg.replace("%", "%%").replace("$", "$$")
    if _SYSTEMD_PLAIN.match(arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def registries_yaml(cache: Any) -> str:
    """/etc/rancher/k3s/registries.yaml: every mirrored registry pulls through the cache first
    (containerd falls back to the registry itself when the cache cannot answer)."""
    lines = ["# Written by Edge Bastion from site.yaml cluster.registry_cache", "mirrors:"]
    # served by the controller host: each registry through its own Distribution instance, on
    # the port `mirrors` gives it or its place there (bastion.regcache.plan.ports)
    ends = regcache.endpoints(cache)
    for name, url in ends.items():
        lines += [f'  "{name}":', "    endpoint:", f'      - "{url}"']
    if cache.insecure_skip_verify:
        lines.append("configs:")
        for host in dict.fromkeys(urlsplit(url).netloc for url in ends.values()):
            lines += [f'  "{host}":', "    tls:", "      insecure_skip_verify: true"]
    return "\n".join(lines) + "\n"


def _url_host(url: str) -> str:
    return urlsplit(url).hostname or ""


def _server_url(address: str) -> str:
    ip = ipaddress.ip_address(address)
    return f"https://[{ip}]:6443" if ip.version == 6 else f"https://{ip}:6443"


def binary_url(section: Any, arch: str) -> str | None:
    """Where nodes of `arch` (amd64/arm64) download k3s; None: from the controller's assets."""
    if section.k3s.url is None:
        return None
    return (
        section.k3s.url.replace("{version}", section.k3s.version)
        .replace("{arch}", arch)
        .replace("{binary}", UPSTREAM_BINARY[arch])
    )


def asset_path(section: Any, arch: str) -> str:
    """The k3s binary under the site's assets/ (served at /assets/...)."""
    return binary_path(section.k3s.version, arch)


def binary_path(version: str, arch: str) -> str:
    return f"k3s/{version}/{arch}/k3s"


#: What `bastion assets fetch k3s` writes beside a release's binaries (bastion.assets.k3s).
MANIFEST = "manifest.json"


def manifest_path(version: str) -> str:
    """The release's manifest under the site's assets/."""
    return f"k3s/{version}/{MANIFEST}"


def recorded_sha256(assets: Path, version: str) -> dict[str, str]:
    """The k3s binary's SHA-256 by architecture, as `bastion assets fetch k3s` recorded it from
    the release's own sha256sum-<arch>.txt; {} when nothing was fetched (or the file is not
    one that command wrote)."""
    try:
        manifest = json.loads((Path(assets) / manifest_path(version)).read_text())
        files = manifest["files"] if manifest.get("version") == version else []
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
    out = {}
    for f in files:
        if isinstance(f, dict) and f.get("role") == "binary" and f.get("arch") in UPSTREAM_BINARY:
            digest = str(f.get("sha256", ""))
            if re.fullmatch(r"[0-9a-f]{64}", digest):
                out[f["arch"]] = digest
    return out


def kubelet_config_arg(args: list[str]) -> str | None:
    """The kubelet config file that k3s arguments name (`--kubelet-arg=config=FILE`, or
    `--kubelet-arg config=FILE`), or None; read the way k3s reads its kubelet arguments (a
    leading `--` dropped, the value after `=` or in the next one)."""
    values = []
    for i, arg in enumerate(args):
        if arg.startswith("--kubelet-arg="):
            values.append(arg.removeprefix("--kubelet-arg="))
        elif arg == "--kubelet-arg" and i + 1 < len(args):
            values.append(args[i + 1])
    for i, value in enumerate(values):
        key, eq, file = value.removeprefix("--").partition("=")
        if key == "config":
            return file if eq else (values[i + 1] if i + 1 < len(values) else "")
    return None


def shutdown_plan(section: Any) -> dict | None:
    """Graceful node shutdown on every node (site.yaml cluster.shutdown_grace_s), or None when
    it is off: the kubelet's grace periods, its config file, and logind's inhibitor delay."""
    grace = section.shutdown_grace_s
    if not grace:
        return None
    critical = section.shutdown_critical()
    delay = grace + INHIBIT_MARGIN_S
    return {
        "grace_s": grace,
        "critical_s": critical,
        "inhibit_delay_s": delay,
        "kubelet_config_file": KUBELET_CONFIG_FILE,
        "kubelet_config": (
            "# Written by Edge Bastion: site.yaml cluster.shutdown_grace_s (graceful node shutdown)\n"
            "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n"
            f"shutdownGracePeriod: {grace}s\nshutdownGracePeriodCriticalPods: {critical}s\n"
        ),
        "logind_file": LOGIND_DROPIN,
        "logind_conf": (
            "# Written by Edge Bastion: the kubelet's shutdown inhibitor may hold a shutdown for\n"
            f"# cluster.shutdown_grace_s ({grace} s) and {INHIBIT_MARGIN_S} s more\n"
            f"[Login]\nInhibitDelayMaxSec={delay}\n"
        ),
    }


def plan(section: Any, site_name: str, entries: list[Entry],
         sha256: Mapping[str, str] | None = None,
         networks: Any = None, ups: Any = None,
         ledger: Ledger | None = None) -> tuple[dict[str, dict], list[Problem]]:  # fmt: skip
    """Each node's plan, by machine name, and the problems that prevent one. `sha256`: the k3s
    binary's by architecture (site.yaml's cluster.k3s.sha256 over what the fetch recorded);
    None: site.yaml's alone. `networks`: site.yaml's (a schema.NetworksSection), which puts
    k3s's traffic on the cluster network and ingress on the ingress network (node_networks).
    `ups`: site.yaml's (a schema.UpsSection), whose quiet_s sets how often the nodes beat.
    `ledger`: what the site's secret store says went out (bastion.state.ledger, read by the
    caller; this reads and writes no store); None: nothing did, machines.yaml alone decides."""
    sums = dict(section.k3s.sha256 if sha256 is None else sha256)
    problems: list[Problem] = []
    unfetched: set[str] = set()
    cluster = cluster_name(section, site_name)
    if ledger is None:
        ledger = Ledger(cluster)

    def problem(e: Entry | None, field: str, msg: str) -> None:
        if e is None:
            problems.append(Problem("site.yaml", None, field, msg))
        else:
            problems.append(Problem("machines.yaml", e.index, field, msg))

    shutdown = shutdown_plan(section)
    if shutdown is not None:
        for field in ("args", "server_args", "agent_args"):
            own = kubelet_config_arg(list(getattr(section.k3s, field)))
            if own is not None:
                problem(None, f"cluster.k3s.{field}", _own_kubelet_config(own))
    ok: list[Entry] = []
    for e in entries:
        bad = False
        if not _NODE_NAME.match(e.name):
            problem(e, "name", f"{e.name!r} cannot be a Kubernetes node name (lower-case letters, "
                               "digits, '-', '.')")  # fmt: skip
            bad = True
        if e.arch not in K3S_ARCH:
            problem(e, "arch", "a k3s node needs arch: amd64 or arm64" if e.arch is None
                    else f"{e.arch!r}: k3s nodes are amd64 or arm64")  # fmt: skip
            bad = True
        elif K3S_ARCH[e.arch] not in sums:
            arch = K3S_ARCH[e.arch]
            if arch not in unfetched:
                unfetched.add(arch)
                problem(None, "cluster.k3s", _unfetched(section, arch, e.name))
            bad = True
        k3s = e.fields.k3s
        own = kubelet_config_arg(list(k3s.args)) if k3s is not None and shutdown is not None else None
        if own is not None:
            problem(e, "k3s.args", _own_kubelet_config(own))
            bad = True
        if k3s is not None and k3s.init and e.role != "server":
            problem(e, "k3s.init", "only a server can start the cluster")
            bad = True
        if e.role == "server" and e.fields.disk is None:
            problem(e, "disk", "a server needs its disk (/dev/disk/by-id/...): the PXE-booted root "
                               "is in RAM, and its datastore would be lost at every boot")  # fmt: skip
            bad = True
        if e.fields.wireguard is not None and e.fields.wireguard.enabled and section.wireguard is None:
            problem(e, "wireguard", "site.yaml cluster: has no wireguard: section")
            bad = True
        if networks is not None and networks.cluster is not None and not (e.fields.networks or {}).get("cluster"):
            problem(e, "networks", f"a k3s node needs its address on networks.cluster "
                                   f"({networks.cluster.subnet}), where k3s's traffic goes: "
                                   "networks: {cluster: ADDRESS}")  # fmt: skip
            bad = True
        if networks is not None and e.fields.mac is None and not (networks.pxe and networks.pxe.interface):
            tagged = [n for n in ("cluster", "ingress") if getattr(networks, n) is not None
                      and getattr(networks, n).vlan is not None and (e.fields.networks or {}).get(n)]  # fmt: skip
            if tagged:
                problem(e, "mac", f"its VLANs ({', '.join(tagged)}) go on the interface it boots "
                                  "from: give its mac, or site.yaml networks.pxe.interface")  # fmt: skip
                bad = True
        if not bad:
            ok.append(e)

    servers = [e for e in entries if e.role == "server"]
    marked = [e for e in servers if e.fields.k3s is not None and e.fields.k3s.init]
    if not servers:
        problem(None, "cluster", "no machine in machines.yaml has role: server")
        return {}, problems
    if len(marked) > 1:
        for e in marked[1:]:
            problem(e, "k3s.init", f"machine {marked[0].name} starts the cluster already")
        return {}, problems
    renamed = _renamed(ledger, cluster, section.name is None, site_name)
    if renamed:
        problem(None, "cluster.name", renamed)
        return {}, problems
    first = _first_server(ledger, servers, marked, entries, problems)
    if first is None:
        return {}, problems
    server_url = section.server_url
    joined_at = first.address
    if networks is not None and networks.cluster is not None:
        joined_at = (first.fields.networks or {}).get("cluster")
        if joined_at is None:
            return {}, problems  # reported above
    if server_url is None:
        if joined_at is None:
            problem(first, "address", f"{first.name} starts the cluster: give it its fixed address "
                                      "(a DHCP reservation) so that the others can join it, or set "
                                      "site.yaml cluster.server_url")  # fmt: skip
            return {}, problems
        server_url = _server_url(joined_at)

    tunnels, replaces = _tunnel_addresses(section.wireguard, entries, problem, ledger) if section.wireguard else ({}, {})
    if problems:
        return {}, problems

    cache = registries_yaml(section.registry_cache) if section.registry_cache else None
    defaults = section.disk
    nodes: dict[str, dict] = {}
    for e in ok:
        arch = K3S_ARCH[e.arch]
        server = e.role == "server"
        init = e is first
        mk = e.fields.k3s
        args = [K3S_PATH, e.role]
        args += ["--cluster-init"] if init else ["--server", server_url]
        args += ["--node-name", e.name, "--token-file", TOKEN_FILE]
        if server:
            args += ["--agent-token-file", AGENT_TOKEN_FILE, "--tls-san", _url_host(server_url)]
        on_networks = node_networks(networks, e, server) if networks is not None else None
        if on_networks is not None:
            args += on_networks["args"]
        if shutdown is not None:
            args += [f"--kubelet-arg=config={KUBELET_CONFIG_FILE}"]
        args += list(section.k3s.args)
        args += list(section.k3s.server_args if server else section.k3s.agent_args)
        if mk is not None:
            args += list(mk.args)
            for key, value in mk.node_labels.items():
                args += ["--node-label", f"{key}={value}"]
            for taint in mk.node_taints:
                args += ["--node-taint", taint]
        try:
            exec_start = " ".join(systemd_quote(a) for a in args)
        except ValueError as err:
            problem(e, "k3s", f"its k3s command line cannot go into the k3s unit: {err}")
            continue
        disk = None
        if e.fields.disk is not None:
            d = e.fields.disk
            disk = {
                "device": d.device,
                "format": d.format or defaults.format,
                "label": d.label if d.label is not None else defaults.label,
                "wipe": d.wipe if d.wipe is not None else defaults.wipe,
                "mount_options": list(d.mount_options if d.mount_options is not None else defaults.mount_options),
                "path": DATA_PATH,
            }
        wireguard = None
        if e.name in tunnels:
            wg = section.wireguard
            wireguard = {
                "interface": wg.interface,
                "ip": tunnels[e.name],
                "address": f"{tunnels[e.name]}/{ipaddress.ip_network(wg.address_pool).prefixlen}",
                # the machine no longer declared whose recorded address this is (machine_secrets
                # clears its record when this node's config goes out), or None
                "replaces": replaces.get(e.name),
                "listen_port": wg.listen_port,
                "peer": {
                    "public_key": wg.public_key,
                    "endpoint": wg.endpoint,
                    "allowed_ips": list(wg.allowed_ips or [wg.address_pool]),
                    "persistent_keepalive": wg.persistent_keepalive,
                },
            }
        nodes[e.name] = {
            "name": cluster,
            "role": e.role,
            "server": server,
            "agent": not server,
            "init": init,
            "node_name": e.name,
            "server_url": server_url,
            "first_server": first.name,
            "arch": arch,
            "k3s": {
                "version": section.k3s.version,
                "sha256": sums[arch],
                "url": binary_url(section, arch),
                "asset": f"/assets/{asset_path(section, arch)}",
                "path": K3S_PATH,
            },
            "exec": args,
            "exec_start": exec_start,
            "token_file": TOKEN_FILE,
            "agent_token_file": AGENT_TOKEN_FILE if server else None,
            "node_password_file": NODE_PASSWORD_FILE,
            "heartbeat": {
                "script": HEARTBEAT_SCRIPT,
                "every_s": heartbeat_every(e.fields.heartbeat, ups.quiet_s if ups is not None else None),
                "watched": e.fields.heartbeat is not None and e.fields.relay is not None,
            },
            "registries_yaml": cache,
            "shutdown": copy.deepcopy(shutdown),
            "disk": disk,
            "wireguard": wireguard,
            # site.yaml networks: the node's addresses and the systemd-networkd files for them
            "networks": on_networks["addresses"] if on_networks else None,
            "network_files": on_networks["files"] if on_networks else [],
        }
    if problems:
        return {}, problems
    return nodes, problems


def vlan_interface(net: Any) -> str:
    """The nodes' interface on a network: its own name, or vlan<id>."""
    return net.interface or f"vlan{net.vlan}"


def node_networks(networks: Any, e: Entry, server: bool) -> dict:
    """Where a node's k3s traffic and ingress go (site.yaml networks:, docs/network.md):

    - cluster: --node-ip (and --advertise-address on a server) is the node's cluster address,
      --flannel-iface the interface it is on, so that the API, etcd, kubelet and the pod overlay
      (flannel's VXLAN) run there and not on the PXE LAN;
    - ingress: --node-external-ip is the node's ingress address: what k3s's ServiceLB reports
      as a LoadBalancer service's address, so clients reach the ingress there.

    And the systemd-networkd files that give the node those addresses: a VLAN on the interface
    it booted from (matched by its MAC, or networks.pxe.interface), which stays on DHCP as it
    booted, or a NIC of its own (`interface`). A dict: args, addresses, files."""
    own = e.fields.networks or {}
    args: list[str] = []
    addresses: dict[str, dict] = {}
    files: list[dict] = []
    vlans: list[str] = []
    for name in ("cluster", "ingress"):
        net = getattr(networks, name)
        ip = own.get(name)
        if net is None or ip is None:
            continue
        iface = vlan_interface(net)
        prefix = ipaddress.ip_network(net.subnet).prefixlen
        addresses[name] = {"ip": ip, "interface": iface, "subnet": net.subnet, "vlan": net.vlan}
        if name == "cluster":
            args += ["--node-ip", ip, "--flannel-iface", iface]
            if server:
                args += ["--advertise-address", ip]
        else:
            args += ["--node-external-ip", ip]
        if net.vlan is not None:
            vlans.append(iface)
            files.append({"path": f"/etc/systemd/network/20-{name}.netdev", "contents": (
                f"# Written by Edge Bastion: site.yaml networks.{name}\n"
                f"[NetDev]\nName={iface}\nKind=vlan\n\n[VLAN]\nId={net.vlan}\n")})  # fmt: skip
        files.append({"path": f"/etc/systemd/network/20-{name}.network", "contents": (
            f"# Written by Edge Bastion: {e.name} on site.yaml networks.{name} ({net.subnet})\n"
            f"[Match]\nName={iface}\n\n[Network]\nAddress={ip}/{prefix}\n"
            "LinkLocalAddressing=no\n")})  # fmt: skip
    if vlans:
        pxe = networks.pxe
        match = f"Name={pxe.interface}" if pxe is not None and pxe.interface else f"MACAddress={e.fields.mac}"
        lines = [("# Written by Edge Bastion: the interface this node boots from (site.yaml "
                  "networks.pxe), on DHCP as it booted, carrying its VLANs"),
                 "[Match]", match, "", "[Network]", "DHCP=ipv4", *(f"VLAN={v}" for v in vlans)]  # fmt: skip
        files.insert(0, {"path": "/etc/systemd/network/10-pxe.network", "contents": "\n".join(lines) + "\n"})
    return {"args": args, "addresses": addresses, "files": files}


def heartbeat_every(heartbeat: Any, quiet_s: int | None = None) -> int:
    """Seconds between a node's heartbeats: a third of the shortest silence that counts, so that
    one lost beat is not silence; HEARTBEAT_DEFAULT_S when none does. Two silences count: the
    device's node watchdog (the machine's machines.yaml heartbeat.timeout_s, or None) and, on a
    site with a UPS, the UPS policy's ups.quiet_s: a node asked to shut down whose beats have
    stopped that long is down and its relay opens, so a node still stopping its pods (graceful
    node shutdown, while its timer still runs) must beat well within it."""
    every = HEARTBEAT_DEFAULT_S
    for silence in (heartbeat.timeout_s if heartbeat is not None else None, quiet_s):
        if silence is not None:
            every = min(every, silence // 3)
    return max(HEARTBEAT_MIN_S, every)


def _own_kubelet_config(file: str) -> str:
    return (f"--kubelet-arg=config={file}: k3s takes one kubelet config file, and graceful node "
            f"shutdown (cluster.shutdown_grace_s) needs its own ({KUBELET_CONFIG_FILE}); set "
            "cluster.shutdown_grace_s: 0 to use yours, and put shutdownGracePeriod in it")  # fmt: skip


def _unfetched(section: Any, arch: str, machine: str) -> str:
    v = section.k3s.version
    if section.k3s.url is None:
        return (f"k3s {v} for {arch} (machine {machine} is {arch}) has not been fetched: run "
                f"`bastion assets fetch k3s --site <this site>`, which downloads the release's "
                f"binaries, checks them against its sha256sum-{arch}.txt and records the SHA-256 "
                f"in assets/{manifest_path(v)}")  # fmt: skip
    return (f"no SHA-256 for the {arch} k3s binary (machine {machine} is {arch}), which nodes "
            f"download from cluster.k3s.url: give cluster.k3s.sha256.{arch}, the release's own "
            f"(its sha256sum-{arch}.txt), or fetch it with `bastion assets fetch k3s`")  # fmt: skip


def cluster_name(section: Any, site_name: str) -> str:
    """The cluster's name (site.yaml cluster.name, else the site's), which names its secrets."""
    return section.name or site_name.lower()


def _first_server(ledger: Ledger, servers: list[Entry], marked: list[Entry], entries: list[Entry],
                  problems: list[Problem]) -> Entry | None:  # fmt: skip
    """The server that starts the cluster (--cluster-init): the one marked `k3s: {init: true}`
    (the operator's word, recorded from then on); else, once a node's config went out (the
    cluster's token exists), the one the secret store recorded, wherever it is in machines.yaml;
    else the first server in machines.yaml. None, with a problem, when the recorded one is no
    server now: any other would start a second cluster if its disk is empty, so the operator
    says which (a mark, or the machine back)."""
    if marked:
        return marked[0]
    if not ledger.started:
        return servers[0]
    recorded = ledger.init_server
    if recorded is None:
        # a store from before the start was recorded: of the servers that got their config,
        # the first (a server added since has none)
        issued = [e for e in servers if ledger.issued(e.name)]
        return issued[0] if issued else servers[0]
    for e in servers:
        if e.name == recorded:
            return e
    where = f"the secret store remembers it: {ledger.where(init_server_name(ledger.cluster))}"
    todo = ("or, if it is gone for good, mark the server that starts the cluster from now on with "
            "`k3s: {init: true}`: one that holds the cluster's data, since a server with an empty "
            "disk would start a second cluster (docs/site-files.md)")  # fmt: skip
    entry = next((e for e in entries if e.name == recorded), None)
    if entry is not None:
        problems.append(Problem("machines.yaml", entry.index, "role",
                                f"{recorded} started the k3s cluster {ledger.cluster} ({where}) and "
                                f"must stay a server; {todo}"))  # fmt: skip
    else:
        problems.append(Problem("machines.yaml", None, "machines",
                                f"machine {recorded} started the k3s cluster {ledger.cluster} "
                                f"({where}), and machines.yaml has no server {recorded} now: put "
                                f"it back; {todo}"))  # fmt: skip
    return None


def _renamed(ledger: Ledger, cluster: str, named_after_site: bool, site_name: str) -> str | None:
    """Why the cluster looks renamed: the store holds another cluster's secrets and none of this
    one. Its nodes would get a new token, which k3s on them refuses, and new node passwords."""
    others = ledger.other_clusters()
    if ledger.started or not others or ledger.root is None:
        return None
    root = ledger.root
    what = (f"the cluster is named after the site ({site_name!r}: {cluster!r}), as cluster.name "
            "is not set" if named_after_site else f"cluster.name is {cluster!r}")  # fmt: skip
    old = others[0]
    return (f"the secret store {root} holds the k3s secrets of cluster {', '.join(repr(o) for o in others)} "
            f"and none of {cluster!r}: {what}. Under a new name every node would get a new token, "
            "which k3s on them refuses, and new node passwords. Set `cluster: {name: "
            f"{old}}}` (the name is only the secrets' name); or move the secrets to the new name, "
            f"with the service stopped: mv {root}/k3s/{old} {root}/k3s/{cluster}; or, to start a "
            f"new cluster on wiped disks, move {root}/k3s/{old} out of the store")  # fmt: skip


def _in_pool(ip: Any, pool: Any) -> bool:
    """A host address of the pool (not its network address, nor an IPv4 broadcast)."""
    return ip in pool and ip != pool.network_address and not (pool.version == 4 and ip == pool.broadcast_address)


def _tunnel_addresses(wg: Any, entries: list[Entry], problem, ledger: Ledger) -> tuple[dict[str, str], dict[str, str]]:
    """Each tunnelled node's address, and for a node given the recorded address of a machine no
    longer declared (the pool had no other left), that machine's name.

    In this order: the pool's first host address is the management side's; the controller host's
    tunnel address; the addresses machines pin; the address the secret store recorded for a
    machine whose key exists (it went out: bastion.state.ledger); then the lowest free address
    for each other machine in machines.yaml order, avoiding those recorded for machines no longer
    declared while any other is free. An address that went out is never given to another machine
    while the first is declared: a pin or a controller address that is one is refused."""
    pool = ipaddress.ip_network(wg.address_pool)
    hosts = pool.hosts()
    management = next(hosts)  # the pool's first host address is the management side's
    wanted = [e for e in entries if e.fields.wireguard is None or e.fields.wireguard.enabled]
    declared = {e.name for e in entries}
    held: dict[Any, str] = {}  # address -> the declared machine it went out to
    gone: dict[Any, str] = {}  # address -> the machine no longer declared that had it
    for machine, text in sorted(ledger.addresses().items()):
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            continue
        if not _in_pool(ip, pool) or ip == management or not ledger.handed_out(machine):
            continue  # from another pool, or never went out: nothing holds it
        if machine in declared:
            held.setdefault(ip, machine)
        else:
            gone.setdefault(ip, machine)
    recorded = {machine: ip for ip, machine in held.items()}

    def went_out(ip: Any, machine: str) -> str | None:
        owner = held.get(ip)
        if owner is None or owner == machine:
            return None
        return (f"{ip} is machine {owner}'s tunnel address, which went out already (the secret "
                f"store remembers it: {ledger.where(tunnel_address_name(owner))}): the management side "
                f"and {owner} know it; give another")  # fmt: skip

    out: dict[str, str] = {}
    taken: dict[Any, str] = {management: "the management side (the pool's first address)"}
    controller = tunnel.controller_address(wg)
    if controller is not None:
        ip = ipaddress.ip_address(controller)
        if not _in_pool(ip, pool):
            problem(None, "cluster.wireguard.controller.address", f"{controller} is not a host address of {pool}")
        elif ip in taken:
            problem(None, "cluster.wireguard.controller.address", f"{controller} is taken by {taken[ip]}")
        elif went_out(ip, "") is not None:
            problem(None, "cluster.wireguard.controller.address", went_out(ip, ""))
        else:
            taken[ip] = "the controller host (cluster.wireguard.controller)"
    for e in wanted:
        pinned = e.fields.wireguard.address if e.fields.wireguard is not None else None
        if pinned is None:
            continue
        ip = ipaddress.ip_address(pinned)
        if not _in_pool(ip, pool):
            problem(e, "wireguard.address", f"{pinned} is not a host address of {pool}")
        elif ip in taken:
            problem(e, "wireguard.address", f"{pinned} is taken by {taken[ip]}")
        elif went_out(ip, e.name) is not None:
            problem(e, "wireguard.address", went_out(ip, e.name))
        else:
            taken[ip] = e.name
            out[e.name] = str(ip)
    pinned_names = {e.name for e in wanted if e.fields.wireguard is not None and e.fields.wireguard.address}
    for e in wanted:
        ip = recorded.get(e.name)
        if e.name in pinned_names or ip is None or ip in taken:
            continue
        taken[ip] = e.name
        out[e.name] = str(ip)
    replaces: dict[str, str] = {}
    spare: list[Any] = []  # addresses of machines gone, passed over while others were free

    def next_free() -> Any:
        for ip in hosts:  # lazily, in order: an IPv6 pool has more than can be listed
            if ip in taken or ip in held:
                continue
            if ip in gone:
                spare.append(ip)
                continue
            return ip
        while spare:  # the pool is full: an address of a machine no longer declared
            ip = spare.pop(0)
            if ip not in taken:
                return ip
        return None

    for e in wanted:
        if e.name in out or e.name in pinned_names:
            continue
        ip = next_free()
        if ip is None:
            problem(e, "wireguard", f"no address left in cluster.wireguard.address_pool {pool}")
            continue
        taken[ip] = e.name
        out[e.name] = str(ip)
        if ip in gone:
            replaces[e.name] = gone[ip]
    return out, replaces


def node_variables(node: dict, base_url: str) -> dict:
    """The `cluster` template variable: the node's plan, with the k3s URL made absolute for the
    controller URL this request uses."""
    out = copy.deepcopy(node)
    if out["k3s"]["url"] is None:
        out["k3s"]["url"] = base_url + out["k3s"]["asset"]
    return out


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, remembered while its size and modification time stay the same."""
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def peers_config(site_name: str, cluster: str, peers: list[tuple[str, str, str, str]]) -> str:
    """The management side's [Peer] sections: one per (machine, role, public key, tunnel IP)."""
    out = [f"# Edge Bastion site {site_name}, k3s cluster {cluster}: {len(peers)} nodes.",
           "# Add these to the management side's WireGuard interface (wg-quick format)."]  # fmt: skip
    for name, role, key, ip in peers:
        bits = 128 if ipaddress.ip_address(ip).version == 6 else 32
        out += ["", "[Peer]", f"# {name} ({role})", f"PublicKey = {key}", f"AllowedIPs = {ip}/{bits}"]
    return "\n".join(out) + "\n"
