"""`bastion lab ...`: the PXE lab in network namespaces (docs/lab.md)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from bastion.lab.lab import Lab, Wiring, all_nodes, arm64_node, default_nodes, render_timeline
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
    dnsmasq as the home router, and QEMU nodes powered through the device's relays.

    Everything it sends stays inside its own namespaces, on 10.x addresses that exist only
    there. Needs root (namespaces, taps)."""


def _arch_option(f):
    return click.option("--arch", "arch", type=click.Choice(["amd64", "arm64", "all"]),
                        default=None, help="Which nodes the lab has: the x86 ones (amd64, the "
                        "default), also the arm64 node arm-1 (arm64, all).")(f)


def _nodes_for(arch):
    return all_nodes() if arch in ("arm64", "all") else default_nodes()


@lab_group.command("up")
@_arch_option
@_lab_options
@click.option("--management-prefix", metavar="PREFIX",
              help="Also a management network, PREFIX.0/24 (e.g. 10.79.0): the controller's "
                   "management listener on its own bridge, the boot endpoints alone on the "
                   "site LAN (docs/network.md).")  # fmt: skip
def up(arch, name, prefix, workdir, accel, management_prefix):
    """Build the lab (removing a stale one first) and leave it running."""
    try:
        Lab(name, prefix, workdir, accel, management_prefix).up(_nodes_for(arch))
    except LabError as e:
        raise click.ClickException(str(e)) from None


@lab_group.command("down")
@_lab_options
def down(name, prefix, workdir, accel):
    """Stop every lab process and delete the lab's namespaces."""
    removed = _lab(name, prefix, workdir, accel).down()
    click.echo("removed: " + ", ".join(removed) if removed else "nothing to remove")


@lab_group.command("boot")
@click.argument("node")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait for the callback.")
@_lab_options
def boot(node, timeout, name, prefix, workdir, accel):
    """Power NODE on through the device's relay and follow it to its callback; print the
    boot timeline. Exits 1 if the node's report does not match its Ignition config."""
    lab = _lab(name, prefix, workdir, accel)
    try:
        result = lab.boot(node, timeout)
    except LabError as e:
        raise click.ClickException(str(e)) from None
    render_timeline(result)
    raise SystemExit(0 if result.ok else 1)


@lab_group.command("power")
@click.argument("state", type=click.Choice(["on", "off", "cycle"]))
@click.argument("node")
@_lab_options
def power(state, node, name, prefix, workdir, accel):
    """Switch NODE's relay (through the controller and the device), without waiting."""
    try:
        r = _lab(name, prefix, workdir, accel).power(node, state)
    except LabError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(r))


@lab_group.command("status")
@_lab_options
def status(name, prefix, workdir, accel):
    """What runs, each node's relay and VM, and the device's view."""
    st = _lab(name, prefix, workdir, accel).status()
    click.echo(f"lab {st['lab']}: namespaces {'present' if st['namespaces_exist'] else 'absent'}")
    click.echo("processes: " + ", ".join(f"{k} {'up' if v else 'down'}"
                                         for k, v in st["processes"].items()))
    relays = {}
    dev = st.get("device") or {}
    for c in (dev.get("status") or {}).get("power", []):
        relays[c["ch"]] = c["output"]
    for n, d in st["nodes"].items():
        click.echo(f"  {n:<8} {d['firmware']:<5} {d['mac']}  relay {d['relay']} "
                   f"{relays.get(d['relay'], '?'):<3}  vm {d['vm']}")
    if dev:
        info = dev.get("info") or {}
        click.echo(f"device: {'connected' if dev.get('connected') else 'not connected'}, "
                   f"firmware {info.get('fw')}, boot {info.get('boot')}")


@lab_group.command("demo")
@click.option("--node", "nodes", multiple=True,
              help="Node(s) to boot, in turn [default: uefi-1]; see the lab's nodes below.")
@click.option("--keep", is_flag=True, help="Leave the lab running afterwards.")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds per boot.")
@_arch_option
@_lab_options
def demo(nodes, keep, timeout, arch, name, prefix, workdir, accel):
    """Build the lab, boot the UEFI node through the device (edk2 PXE -> TFTP ipxe.efi ->
    iPXE -> controller -> kernel, initrd -> Ignition -> callback), print its timeline, and
    take the lab down again. Nodes: uefi-1 (OVMF, edk2's own PXE), bios-1 (SeaBIOS + iPXE),
    arm-1 (arm64: AAVMF's edk2 PXE, arch 11 -> TFTP grubnetaa64.efi -> GRUB -> /grub).
    --arch arm64 boots arm-1, --arch all every node."""
    lab = _lab(name, prefix, workdir, accel)
    known = [n.name for n in all_nodes()]
    for n in nodes:
        if n not in known:
            raise click.BadParameter(f"{n!r}: the lab's nodes are {', '.join(known)}",
                                     param_hint="--node")
    arm = arm64_node().name
    if arch is None and arm in nodes:
        arch = "arm64"
    if not nodes:
        nodes = {"arm64": (arm,), "all": tuple(known)}.get(arch or "", ("uefi-1",))
    ok = True
    try:
        lab.up(_nodes_for(arch))
        for node in nodes:
            result = lab.boot(node, timeout)
            render_timeline(result)
            ok = ok and result.ok
    except LabError as e:
        raise click.ClickException(str(e)) from None
    finally:
        if not keep:
            removed = lab.down()
            click.echo(f"lab down: removed {len(removed)} namespaces and processes")
    raise SystemExit(0 if ok else 1)


@lab_group.command("wire", hidden=True)
@_lab_options
def wire(name, prefix, workdir, accel):
    """(internal) Run the relay wiring that powers node VMs; started by `lab up`."""
    Wiring(_lab(name, prefix, workdir, accel)).run()
