"""`bastion cluster nodes` and `bastion cluster peers`: a site's k3s cluster as the controller sees
it, and the management side's WireGuard peer list; `bastion tunnel ...`: the tunnels to the
management cluster as wg-quick configs (bastion.cluster.tunnel). None prints a secret."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

from bastion.settings import secrets_option

if TYPE_CHECKING:
    from bastion.model import Site
    from bastion.state.secrets import SecretMissing, SecretStore

_SITE = click.option(
    "--site", "site_dir", envvar="BASTION_SITE", required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path), help="The site directory.",
)  # fmt: skip
_JSON = click.option("--json", "as_json", is_flag=True, help="One JSON document instead of text.")


def _load(site_dir: Path, secrets_dir: Path | None = None):
    """The site, its cluster checked against the secret store `secrets_dir` (--secrets-dir; None:
    the default one), which is only read."""
    from bastion.site.load import SiteError, load_site

    try:
        site = load_site(site_dir, secrets=secrets_dir)
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
@secrets_option
@_JSON
def nodes(site_dir: Path, secrets_dir: Path | None, as_json: bool) -> None:
    """Each node: role, architecture, how it joins, its disk and tunnel address.

    Which server starts the cluster, and the tunnel addresses that went out, are the records of
    the secret store (--secrets, as serve's; the service's: /var/lib/edge-bastion/secrets/<site>)."""
    site = _load(site_dir, secrets_dir)
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
@secrets_option
@_JSON
def peers(site_dir: Path, secrets_dir: Path | None, as_json: bool) -> None:
    """The management side's [Peer] sections, one per node with a tunnel.

    Reads the nodes' WireGuard keys from the controller's secret store (making those that do
    not exist yet, as the nodes' first boot would, and saying on stderr which and where) and
    prints their public keys only."""
    from bastion.cluster import plan as cluster
    from bastion.state.secrets import SecretStore, wireguard_public_keys
    from bastion.state.secrets import secrets_dir as store_dir

    site = _load(site_dir, secrets_dir)
    store = SecretStore(store_dir(site.name, secrets_dir))
    _make_keys(store, site, controller=False)
    keys = wireguard_public_keys(store, site, make=False)
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


def _service_store(site_name: str) -> Path:
    """Where `bastion install-service`'s unit keeps the site's secret store."""
    from bastion import service

    return Path(service.secrets_dir(site_name))


def _make_keys(store: SecretStore, site: Site, controller: bool = True) -> list[str]:
    """Make the site's tunnel keys missing from `store`; say on stderr which, and where. The
    names of those made."""
    from bastion.state.secrets import (
        record_tunnel_address,
        wireguard_key_names,
        wireguard_private_key,
    )

    for m in site.cluster_nodes:
        # the addresses go out with the keys (the management side's peers): later plans keep them
        record_tunnel_address(store, m)
    names = wireguard_key_names(site, controller=controller)
    made = [n for n in names if store.add_if_missing(n, wireguard_private_key)]
    for name in made:
        click.echo(f"made the WireGuard key {store.path(name)}", err=True)
    service = _service_store(site.name)
    if made and store.root.absolute() != service:
        click.echo(f"(in the secret store {store.root.absolute()}; the service's is {service}: "
                   "a key made elsewhere reaches no node the service serves)", err=True)  # fmt: skip
    return made


def _refuse_missing(e: SecretMissing, site_name: str, site_dir: Path) -> NoReturn:
    """The error of a command that only reads keys and found some missing: where it looked,
    where the service's store is, how to name it, and how to make keys on purpose."""
    from bastion.state.secrets import default_secrets_dir

    root, service = e.root.absolute(), _service_store(site_name)
    lines = [f"{e}; this command only reads keys, it makes none."]
    if root == default_secrets_dir(site_name).absolute():
        lines.append("That is the default store, $XDG_STATE_HOME/edge-bastion/secrets/<site> "
                     "(neither --secrets-dir nor BASTION_SECRETS_DIR was given).")  # fmt: skip
    if root != service:
        there = " (it exists on this host)" if service.is_dir() else ""
        lines.append(f"The service's store is {service}{there}: give --secrets-dir {service} "
                     "(or BASTION_SECRETS_DIR), as a user that may read it.")  # fmt: skip
    lines.append("To make the missing keys in this store on purpose: bastion tunnel make-keys "
                 f"--site {site_dir} --secrets-dir {root}")  # fmt: skip
    raise click.ClickException("\n".join(lines))


def _tunnelled(site_dir: Path, secrets_dir: Path | None):
    """(site, cluster.wireguard, secret store); exits when the site has no controller tunnel."""
    from bastion.state.secrets import SecretStore
    from bastion.state.secrets import secrets_dir as store_dir

    site = _load(site_dir, secrets_dir)
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


@tunnel_group.command("make-keys")
@_SITE
@secrets_option
def make_keys(site_dir: Path, secrets_dir: Path | None) -> None:
    """Make the tunnel keys missing from the secret store: the controller host's (with
    cluster.wireguard.controller) and each tunnelled node's.

    The one `bastion tunnel` command that makes keys (the others only read them), for setting
    up the management side before the nodes first boot. Says on stderr which keys it made and
    where; prints no secret."""
    from bastion.state.secrets import SecretStore
    from bastion.state.secrets import secrets_dir as store_dir

    site = _load(site_dir, secrets_dir)
    if site.settings.cluster.wireguard is None:
        click.echo(
            f"{site_dir}: site.yaml has no cluster.wireguard: nothing has a tunnel", err=True
        )
        sys.exit(1)
    store = SecretStore(store_dir(site.name, secrets_dir))
    if not _make_keys(store, site):
        click.echo(
            f"every tunnel key is in the secret store {store.root.absolute()}: made none", err=True
        )


@tunnel_group.command("show")
@_SITE
@secrets_option
@_JSON
def tunnel_show(site_dir: Path, secrets_dir: Path | None, as_json: bool) -> None:
    """The controller host's tunnel: interface, address, public key, and the management side.

    Reads the controller's key from the secret store, and refuses when it is not there
    (`bastion install-service` or `bastion tunnel make-keys` makes it); prints its public key
    only."""
    from bastion.cluster import tunnel
    from bastion.state.secrets import SecretMissing, controller_wireguard_public_key

    site, wg, store = _tunnelled(site_dir, secrets_dir)
    try:
        public_key = controller_wireguard_public_key(store, make=False)
    except SecretMissing as e:
        _refuse_missing(e, site.name, site_dir)
    out = {
        "interface": wg.controller.interface,
        "address": tunnel.controller_address(wg),
        "public_key": public_key,
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
@secrets_option
def controller_config(site_dir: Path, secrets_dir: Path | None) -> None:
    """The controller host's wg-quick config (/etc/wireguard/<interface>.conf).

    `bastion install-service` writes it; this prints it. Its PostUp reads the private key from
    the secret store, so the config holds no secret; refused when the key is not there."""
    from bastion.cluster import tunnel
    from bastion.state.secrets import (
        CONTROLLER_WIREGUARD_KEY,
        SecretMissing,
        controller_wireguard_public_key,
    )

    site, wg, store = _tunnelled(site_dir, secrets_dir)
    try:
        controller_wireguard_public_key(store, make=False)  # the key file the config names is one
    except SecretMissing as e:
        _refuse_missing(e, site.name, site_dir)
    click.echo(
        tunnel.controller_config(wg, site.name, str(store.path(CONTROLLER_WIREGUARD_KEY))), nl=False
    )


@tunnel_group.command("management-config")
@click.option("--site", "site_dirs", multiple=True, required=True, envvar="BASTION_SITE",
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The site directory; again for each further site that dials the same endpoint "
                   "(one interface for all of them).")  # fmt: skip
@click.option("--secrets-dir", "secrets_dirs", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="The controller's secret store, once per --site in the same order [default: "
                   "$BASTION_SECRETS_DIR (one site only), else $XDG_STATE_HOME/edge-bastion/secrets/"
                   "<site>; the service's: /var/lib/edge-bastion/secrets/<site>].")  # fmt: skip
@click.option("--private-key-file", default="/etc/wireguard/management.key", show_default=True,
              help="The management side's private key, where its host keeps it (PostUp reads it).")  # fmt: skip
def management_config(
    site_dirs: tuple[Path, ...], secrets_dirs: tuple[Path, ...], private_key_file: str
) -> None:
    """The management side's whole interface for the site, in wg-quick format: its address and
    port, one [Peer] for the controller host and one per node with a tunnel, each allowed its
    own tunnel address (/32) only.

    With several --site, one interface for all of them (they share the endpoint): each site's
    management address, every site's peers; refused when their address pools overlap or they
    name different ports or public keys for the management side.

    Reads the public keys from each controller's secret store, and refuses when a key or the
    store is not there (`bastion tunnel make-keys` makes them); prints no secret."""
    import os

    from bastion.cluster import tunnel
    from bastion.state.secrets import (
        SecretMissing,
        SecretStore,
        controller_wireguard_public_key,
        wireguard_public_keys,
    )
    from bastion.state.secrets import secrets_dir as store_dir

    if secrets_dirs and len(secrets_dirs) != len(site_dirs):
        raise click.UsageError(f"{len(site_dirs)} --site and {len(secrets_dirs)} --secrets-dir: give "
                               "one --secrets-dir per --site, in the same order, or none")  # fmt: skip
    if not secrets_dirs and len(site_dirs) > 1 and os.environ.get("BASTION_SECRETS_DIR"):
        raise click.UsageError("BASTION_SECRETS_DIR names one secret store, and each site has its "
                               "own: give one --secrets-dir per --site, in the same order")  # fmt: skip
    sites = []
    for i, site_dir in enumerate(site_dirs):
        site, wg, _ = _tunnelled(site_dir, secrets_dirs[i] if secrets_dirs else None)
        # one site: BASTION_SECRETS_DIR as for every command (several were refused it above)
        store = SecretStore(store_dir(site.name, secrets_dirs[i] if secrets_dirs else None))
        try:
            peers = [("controller", "the controller host", controller_wireguard_public_key(store, make=False),
                      tunnel.controller_address(wg))]  # fmt: skip
            keys = wireguard_public_keys(store, site, make=False)
        except SecretMissing as e:
            _refuse_missing(e, site.name, site_dir)
        peers += [(m.name, f"k3s {m.node['role']}", keys[m.name], m.node["wireguard"]["ip"])
                  for m in site.cluster_nodes if m.name in keys]  # fmt: skip
        sites.append((site.name, wg, peers))
    try:
        conf = tunnel.shared_management_config(sites, private_key_file)
    except tunnel.TunnelError as e:
        raise click.ClickException(
            f"these sites cannot share one management interface:\n{e}"
        ) from None
    click.echo(conf, nl=False)


COMMANDS = [cluster_group, tunnel_group]
