"""`bastion ups`: the UPS as a running controller sees it (GET /api/v1/ups, docs/ups.md)."""

from __future__ import annotations

import json

import click

from bastion.client import ApiClient
from bastion.machine_cli import _where


def _charge(charge: float | None) -> str:
    return f"{charge:g}%" if charge is not None else "not reported"


@click.command("ups")
@_where
@click.option("--json", "as_json", is_flag=True, help="The API's answer as JSON.")
def ups_command(url, token_file, as_json) -> None:
    """The site's UPS through a running controller: its last status and battery charge, whether
    upsd answers, and the power-cut policy's phase (mains, on-battery, shutdown, relays, off),
    with the machines asked to shut down and the relays it opened. Fails when the site declares
    no UPS (site.yaml ups:)."""
    v = ApiClient.connect(url, token_file).call("GET", "/api/v1/ups")
    if as_json:
        click.echo(json.dumps(v, indent=2))
        return
    click.echo(f"ups: {v.get('ups')}")
    answering = "yes" if v.get("answering") else f"no ({v.get('error') or 'no reading yet'})"
    click.echo(f"upsd answers: {answering}")
    click.echo(f"status: {v.get('status') or '-'}, charge {_charge(v.get('charge'))}")
    click.echo(f"phase: {v.get('phase')}")
    if v.get("holding"):
        click.echo(f"holding: {v['holding']}")
    if v.get("asked"):
        click.echo(f"asked to shut down: {', '.join(v['asked'])}")
    if v.get("opened"):
        click.echo(f"relays opened: {', '.join(v['opened'])}")


COMMANDS = (ups_command,)
