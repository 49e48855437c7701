"""`bastion machine list|status|reprovision`: the site's machines as a running controller sees
them, through its management API (`--url`, the token from --token-file or $BASTION_API_TOKEN[_FILE])."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import click

from bastion.client import ApiClient, segment

DEFAULT_URL = "http://127.0.0.1:8080"


def _where(f):
    f = click.option("--url", envvar="BASTION_URL", default=DEFAULT_URL, show_default=True, metavar="URL",
                     help="The running controller [$BASTION_URL].")(f)  # fmt: skip
    f = click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
                     help="The management API token (else $BASTION_API_TOKEN[_FILE]).")(f)  # fmt: skip
    return f


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _state(m: dict) -> str:
    if m.get("install") != "once":
        return "network boot (install: always)"
    if m.get("boots_from") == "local-disk":
        return f"installed {_when(m.get('installed_at'))}: boots its local disk"
    return "not installed yet: network boot (install: once)"


@click.group("machine")
def machine_group() -> None:
    """The site's machines: install-once state, reprovisioning, holds. `bastion machines`
    shows where each stands."""


@machine_group.command("list")
@_where
@click.option("--json", "as_json", is_flag=True, help="The API's answer as JSON.")
def machine_list(url, token_file, as_json) -> None:
    """Every machine of machines.yaml with its profile and what it boots next."""
    from rich.console import Console
    from rich.table import Table

    machines = ApiClient.connect(url, token_file).call("GET", "/api/v1/machines")
    if as_json:
        click.echo(json.dumps(machines, indent=2))
        return
    table = Table("name", "mac", "arch", "profile", "next boot")
    for m in machines:
        table.add_row(m["name"], m.get("mac") or "-", m.get("arch") or "-", m["profile"], _state(m))
    Console().print(table)


@machine_group.command("status")
@click.argument("name")
@_where
@click.option("--json", "as_json", is_flag=True, help="The API's answer as JSON.")
def machine_status(name, url, token_file, as_json) -> None:
    """One machine: its entry and what it boots next."""
    m = ApiClient.connect(url, token_file).call("GET", f"/api/v1/machines/{segment(name)}")
    if as_json:
        click.echo(json.dumps(m, indent=2))
        return
    for key in ("name", "mac", "uuid", "arch", "role", "profile", "hostname", "relay", "install"):
        if m.get(key) is not None:
            click.echo(f"{key}: {m[key]}")
    click.echo(f"next boot: {_state(m)}")


@machine_group.command("reprovision")
@click.argument("name")
@_where
def machine_reprovision(name, url, token_file) -> None:
    """Make an installed machine (profile `install: once`) network-boot and install again at its
    next boot. Needs the token. Power-cycle it to start now (`bastion power cycle NAME`)."""
    r = ApiClient.connect(url, token_file).call("POST", f"/api/v1/machines/{segment(name)}/reprovision")
    if r["changed"]:
        click.echo(f"{name}: was installed {_when(r['was_installed_at'])}; its next boot is a network "
                   f"boot (event {r['event']})")  # fmt: skip
    else:
        click.echo(f"{name}: was not marked installed; its next boot is a network boot")


@machine_group.command("hold")
@click.argument("name")
@_where
def machine_hold(name, url, token_file) -> None:
    """Hold NAME: the operator takes no action on it (power, cycles) until it is released. A
    power command (`bastion power`) holds its machine too. Needs the token."""
    ApiClient.connect(url, token_file).call("POST", f"/api/v1/machines/{segment(name)}/hold")
    click.echo(f"{name}: held; `bastion machine release {name}` gives it back to the operator")


@machine_group.command("release")
@click.argument("name")
@_where
def machine_release(name, url, token_file) -> None:
    """Give NAME back to the operator after a hold, a power command or Failed: it converges on
    its declaration again, with its count of power-cycles at zero. Needs the token."""
    r = ApiClient.connect(url, token_file).call("POST", f"/api/v1/machines/{segment(name)}/release")
    click.echo(f"{name}: released; the operator converges it on its declaration again"
               + (f" (it had failed: {r['failed']['reason']})" if r.get("failed") else ""))


COMMANDS = (machine_group,)
