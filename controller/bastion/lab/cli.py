"""`bastion lab ...`: the PXE lab in network namespaces (docs/lab.md)."""

from __future__ import annotations

from pathlib import Path

import click

from bastion.lab.lab import Lab, Wiring
from bastion.lab.netns import LabError


def _lab_options(f):
    f = click.option("--name", default="eb", show_default=True,
                     help="Lab name: its namespaces are NAME-lan and NAME-rt.")(f)
    f = click.option("--prefix", default="10.77.0", show_default=True,
                     help="The site LAN's /24, existing only inside the lab's namespaces.")(f)
    f = click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
                     help="Where the lab keeps its files (default var/lab/NAME in the repo).")(f)
    f = click.option("--accel", default="tcg", show_default=True,
                     help="QEMU accelerator for the nodes (tcg works everywhere).")(f)
    return f


def _lab(name, prefix, workdir, accel) -> Lab:
    return Lab(name, prefix, workdir, accel)


@click.group("lab")
def lab_group() -> None:
    """The PXE lab: a site LAN in network namespaces with the sim board, the controller,
    dnsmasq as the home router, and QEMU nodes powered through the device's relays."""


@lab_group.command("up")
@_lab_options
def up(name, prefix, workdir, accel):
    """Build the lab (removing a stale one first) and leave it running."""
    try:
        _lab(name, prefix, workdir, accel).up()
    except LabError as e:
        raise click.ClickException(str(e)) from None


@lab_group.command("down")
@_lab_options
def down(name, prefix, workdir, accel):
    """Stop every lab process and delete the lab's namespaces."""
    removed = _lab(name, prefix, workdir, accel).down()
    click.echo("removed: " + ", ".join(removed) if removed else "nothing to remove")


@lab_group.command("wire", hidden=True)
@_lab_options
def wire(name, prefix, workdir, accel):
    """(internal) Run the relay wiring that powers node VMs; started by `lab up`."""
    Wiring(_lab(name, prefix, workdir, accel)).run()
