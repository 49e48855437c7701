"""`bastion cluster nodes` and `bastion cluster peers`: a site's k3s cluster as the controller sees
it, and the management side's WireGuard peer list. Neither prints a secret."""

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


COMMANDS = [cluster_group]
