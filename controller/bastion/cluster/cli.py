"""`bastion cluster nodes` and `bastion cluster peers`: a site's k3s cluster as the controller sees
it, and the management side's WireGuard peer list; `bastion tunnel ...`: the tunnels to the
management cluster as wg-quick configs (bastion.cluster.tunnel). None prints a secret."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

_SITE = click.option(
    "--site", "site_dir", envvar="BASTION_SITE", required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path), help="The site directory.",
)  # fmt: skip
_JSON = click.option("--json", "as_json", is_flag=True, help="One JSON document instead of text.")


def _load(site_dir: Path):
    from bastion.site.load import SiteError, load_site

    try:
        site = load_site(site_dir)
    except SiteError as e:
        click.echo("\n".join(e.report(site_dir)), err=True)
        sys.exit(1)
    if not site.cluster_nodes:
        click.echo(f"{site_dir}: site.yaml has no cluster: section", err=True)
        sys.exit(1)
    return site


@click.group("cluster")
def cluster_group() -> None:
    """The site's k3s cluster (site.yaml cluster:, machines with role server or agent)."""


@cluster_group.command("nodes")
@_SITE
@_JSON
def nodes(site_dir: Path, as_json: bool) -> None:
    """Each node: role, architecture, how it joins, its disk and tunnel address."""
    site = _load(site_dir)
    rows = []
    for m in site.cluster_nodes:
        n = m.node
        rows.append({
            "name": m.name, "role": n["role"], "arch": n["arch"], "init": n["init"],
            "joins": None if n["init"] else n["server_url"],
            "disk": n["disk"]["device"] if n["disk"] else None,
            "wireguard": n["wireguard"]["address"] if n["wireguard"] else None,
            "exec": n["exec"],
        })  # fmt: skip
    if as_json:
        click.echo(json.dumps({"cluster": site.cluster_nodes[0].node["name"], "nodes": rows}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"k3s cluster {site.cluster_nodes[0].node['name']} ({site.name})")
    for col in ("node", "role", "arch", "starts or joins", "disk", "tunnel"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["name"], r["role"], r["arch"], "--cluster-init" if r["init"] else r["joins"],
            r["disk"] or "-", r["wireguard"] or "-",
        )  # fmt: skip
    Console(width=200).print(table)


@cluster_group.command("peers")
@_SITE
@click.option("--secrets-dir", envvar="BASTION_SECRETS_DIR", type=click.Path(file_okay=False, path_type=Path),
              help="The controller's secret store [default: $XDG_STATE_HOME/edge-bastion/secrets/<site>].")  # fmt: skip
@_JSON
def peers(site_dir: Path, secrets_dir: Path | None, as_json: bool) -> None:
    """The management side's [Peer] sections, one per node with a tunnel.

    Reads the nodes' WireGuard keys from the controller's secret store (making those that do
    not exist yet, as the nodes' first boot would) and prints their public keys only."""
    from bastion.cluster import plan as cluster
    from bastion.state.secrets import SecretStore, wireguard_public_keys
    from bastion.state.secrets import secrets_dir as store_dir

    site = _load(site_dir)
    store = SecretStore(store_dir(site.name, secrets_dir))
    keys = wireguard_public_keys(store, site)
    nodes = [m for m in site.cluster_nodes if m.name in keys]
    if not nodes:
        click.echo("no node has a WireGuard tunnel (site.yaml cluster.wireguard)", err=True)
        sys.exit(1)
    name = nodes[0].node["name"]
    if as_json:
        click.echo(json.dumps({
            "cluster": name,
            "peers": [{"name": m.name, "role": m.node["role"], "public_key": keys[m.name],
                       "address": m.node["wireguard"]["ip"]} for m in nodes],
        }, indent=2))  # fmt: skip
        return
    click.echo(cluster.peers_config(site.name, name, [
        (m.name, m.node["role"], keys[m.name], m.node["wireguard"]["ip"]) for m in nodes
    ]), nl=False)  # fmt: skip


# --- bastion tunnel ------------------------------------------------------------------------------

_SECRETS = click.option(
    "--secrets-dir", envvar="BASTION_SECRETS_DIR", type=click.Path(file_okay=False, path_type=Path),
    help="The controller's secret store [default: $XDG_STATE_HOME/edge-bastion/secrets/<site>; "
         "the service's: /var/lib/edge-bastion/secrets/<site>].",
)  # fmt: skip


def _tunnelled(site_dir: Path, secrets_dir: Path | None):
    """(site, cluster.wireguard, secret store); exits when the site has no controller tunnel."""
    from bastion.state.secrets import SecretStore
    from bastion.state.secrets import secrets_dir as store_dir

    site = _load(site_dir)
    wg = site.settings.cluster.wireguard
    if wg is None or wg.controller is None:
        click.echo(f"{site_dir}: site.yaml has no cluster.wireguard.controller: the controller host "
                   "has no tunnel (`controller: {}` under cluster.wireguard gives it one)", err=True)  # fmt: skip
        sys.exit(1)
    return site, wg, SecretStore(store_dir(site.name, secrets_dir))


@click.group("tunnel")
def tunnel_group() -> None:
    """The WireGuard tunnels to the management cluster (site.yaml cluster.wireguard): the
    controller host's own and the management side's end of all of them (docs/tunnel.md)."""


@tunnel_group.command("show")
@_SITE
@_SECRETS
@_JSON
def tunnel_show(site_dir: Path, secrets_dir: Path | None, as_json: bool) -> None:
    """The controller host's tunnel: interface, address, public key, and the management side.

    Makes the controller's private key in the secret store the first time (as
    `bastion install-service` does); prints its public key only."""
    from bastion.cluster import tunnel
    from bastion.state.secrets import controller_wireguard_public_key

    _, wg, store = _tunnelled(site_dir, secrets_dir)
    out = {
        "interface": wg.controller.interface,
        "address": tunnel.controller_address(wg),
        "public_key": controller_wireguard_public_key(store),
        "listen_port": wg.controller.listen_port,
        "management": {"address": tunnel.management_address(wg), "endpoint": wg.endpoint,
                       "public_key": wg.public_key},
    }  # fmt: skip
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"interface   {out['interface']}\naddress     {out['address']}\n"
               f"public key  {out['public_key']}\nmanagement  {out['management']['address']} "
               f"at {wg.endpoint}, public key {wg.public_key}")  # fmt: skip


@tunnel_group.command("controller-config")
@_SITE
@_SECRETS
def controller_config(site_dir: Path, secrets_dir: Path | None) -> None:
    """The controller host's wg-quick config (/etc/wireguard/<interface>.conf).

    `bastion install-service` writes it; this prints it. Its PostUp reads the private key from
    the secret store (made there the first time), so the config holds no secret."""
    from bastion.cluster import tunnel
    from bastion.state.secrets import CONTROLLER_WIREGUARD_KEY, controller_wireguard_public_key

    site, wg, store = _tunnelled(site_dir, secrets_dir)
    controller_wireguard_public_key(store)  # the key file the config names exists
    click.echo(tunnel.controller_config(wg, site.name, str(store.path(CONTROLLER_WIREGUARD_KEY))), nl=False)


@tunnel_group.command("management-config")
@_SITE
@_SECRETS
@click.option("--private-key-file", default="/etc/wireguard/management.key", show_default=True,
              help="The management side's private key, where its host keeps it (PostUp reads it).")  # fmt: skip
def management_config(site_dir: Path, secrets_dir: Path | None, private_key_file: str) -> None:
    """The management side's whole interface for the site, in wg-quick format: its address and
    port, one [Peer] for the controller host and one per node with a tunnel, each allowed its
    own tunnel address (/32) only.

    Reads the public keys from the controller's secret store (making the private keys that do
    not exist yet); prints no secret."""
    from bastion.cluster import tunnel
    from bastion.state.secrets import controller_wireguard_public_key, wireguard_public_keys

    site, wg, store = _tunnelled(site_dir, secrets_dir)
    peers = [("controller", "the controller host", controller_wireguard_public_key(store),
              tunnel.controller_address(wg))]  # fmt: skip
    keys = wireguard_public_keys(store, site)
    peers += [(m.name, f"k3s {m.node['role']}", keys[m.name], m.node["wireguard"]["ip"])
              for m in site.cluster_nodes if m.name in keys]  # fmt: skip
    click.echo(tunnel.management_config(wg, site.name, peers, private_key_file), nl=False)


COMMANDS = [cluster_group, tunnel_group]
