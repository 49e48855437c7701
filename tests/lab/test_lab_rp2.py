"""Nodes network-boot from MicroPython's official W5500-EVB-Pico image on an emulated RP2040
(markers `lab` and `rp2`): the lab's LAN, home router (dnsmasq) and controller, the board on
the LAN through its W5500 (the emulator's register model, its wire a tap device on the LAN's
bridge: tests/rp2kit.py), flashed by `bastion flash`. The controller drives the board over its
USB serial line; a relay pin going to "node on" starts that node's VM, as the lab's relay
wiring does for the sim board.

Two nodes: the lab's UEFI node (OVMF: edk2's own PXE client, arch 7), which the board's
proxyDHCP sends to its TFTP server for iPXE, and its BIOS node (SeaBIOS with the NIC's iPXE
ROM), which it hands the controller's script at once. The UEFI node gets snponly.efi (174 KB,
iPXE on the firmware's network driver) rather than the lab's ipxe.efi (850 KB): every byte of
the board's files goes through the emulated USB line at about 5 KB/s when it is flashed. For
that reason too the board gets no BIOS boot file (undionly.kpxe, 74 KB, about 15 s of the
line): the BIOS node's iPXE is answered with the script, never with a file."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time

import pytest
from bastion.lab.lab import IPXE_DIR, Lab, Node, router_command
from bastion.lab.netns import LabError, Namespace, namespaces

pytestmark = [pytest.mark.lab, pytest.mark.rp2, pytest.mark.timeout(900)]

NAME, PREFIX = "ebrp", "10.79.0"
UEFI = Node("uefi-1", "52:54:00:79:00:01", "uefi", 0)
BIOS = Node("bios-1", "52:54:00:79:00:02", "bios", 1)
NODES = (UEFI, BIOS)
# Boots a node gets: the first, then resets after its firmware gave up (see the loop)
ATTEMPTS = 3
RELAY_PINS = range(6, 14)  # boards/w5500-evb-pico.json: GP6..GP13, active low, NC contacts


def power_on(lab: Lab, node: Node, board) -> None:
    """Power the node on through the controller and the board, and wait for the relay pin to
    go to "node on" (high: coil off, the NC contact closed). The emulated chip runs at a
    fraction of a board's speed, and its replies on the serial line have come later than the
    controller's 5 s for a request (three 504s in a row in one CI run, the relay switched all
    the same): the pin, not the reply, says the node has power."""
    started = time.monotonic()
    try:
        lab.api("POST", f"/api/v1/machines/{node.name}/power", {"state": "on"})
        print(f"power on {node.name}: {time.monotonic() - started:.1f} s")
    except LabError as e:
        if "did not answer" not in str(e):
            raise
        print(f"power on {node.name}: {e} after {time.monotonic() - started:.1f} s")
    pin = RELAY_PINS[node.channel]
    board.wait(lambda e: e.get("ev") == "gpio" and e["pin"] == pin and e["value"] == "high",
               timeout=120, what=f"{node.name}'s relay pin high")  # fmt: skip


def console(lab: Lab, node: Node) -> str:
    """The node's serial console so far, without the terminal's cursor moves (sgabios draws the
    BIOS screen); empty before the node has written any."""
    path = lab.logs / f"{node.name}.console"
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", path.read_text(errors="replace")) if path.exists() else ""


def why(lab: Lab, node: Node, after: int, board) -> str:
    """What a node that did not call back got, for the failure's message: its firmware's PXE
    lines, what the board and the controller logged for it (and for no node: the board's
    console contact) since the first node's power request, the emulated chip's clock, and the
    console's end."""
    text = console(lab, node)
    pxe = [line for line in text.splitlines() if re.search(r"PXE|TFTP|NBP|Station|iPXE|DHCP|http", line)]
    mine = [f"{e['id']} {time.strftime('%H:%M:%S', time.localtime(e['ts']))}.{int(e['ts'] % 1 * 100):02d} "
            f"{e['source']} {e['kind']} {e.get('endpoint') or ''} {e.get('status') or ''} "
            f"{json.dumps(e.get('payload'))[:160]}"
            for e in lab.events(after) if e.get("machine") in (node.name, None)]  # fmt: skip
    clock = [e for e in board.events if e.get("ev") == "clock"]
    return ("\n--- its console's boot lines:\n" + "\n".join(pxe[-40:])
            + "\n--- events since the first power request:\n" + "\n".join(mine[-60:])
            + f"\n--- the chip's clock: {clock[-1] if clock else None}; console end:\n"
            + (text[-1500:] or f"{node.name}.console: none"))


def gave_up(lab: Lab, node: Node) -> bool:
    """Whether the node's firmware has tried every boot option and stopped: SeaBIOS says so,
    OVMF starts its shell."""
    text = console(lab, node)
    return "No bootable device" in text or "Shell>" in text


def test_nodes_boot_through_the_emulated_w5500_evb_pico_to_their_callbacks(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (network namespaces, taps)")
    from rp2kit import Rp2Board, TapWire, missing
    from simkit import bastion

    if missing() is not None:
        pytest.skip(missing())
    lab = Lab(NAME, PREFIX, tmp_path / "lab")
    lab.down()  # what a killed run of this test left
    net = lab.net
    lab.workdir.mkdir(parents=True)
    lab.logs.mkdir()
    kernel, initrd = lab.prepare_boot_files()
    lab.write_site(list(NODES), kernel, initrd, site_extra={"device": {
        "ip": net.device_ip, "answer": "site",
        # no arch 0: the BIOS node's iPXE gets the script (firmware/pxe.py answers iPXE
        # before it looks at boot_files), and no other BIOS client is declared
        "boot_files": {7: "snponly.efi", 9: "snponly.efi"},
        "net": {"ip": f"{net.device_ip}/24", "gateway": net.router_ip},
    }})  # fmt: skip
    lab.token_file.write_text(secrets.token_urlsafe(24) + "\n")
    tftp = tmp_path / "tftp"
    tftp.mkdir()
    shutil.copy(IPXE_DIR / "snponly.efi", tftp)
    link = tmp_path / "ttyACM0"
    lab.serial = link  # the controller's --device: the board's USB serial line
    wire = None
    try:
        net.create()
        lan = Namespace(net.lan)
        # the device's address is the board's own, on its wire; the controller's stays (the
        # bridge's first address goes, and a second is then promoted rather than removed)
        lan.run("sysctl", "-qw", "net.ipv4.conf.br0.promote_secondaries=1", check=True)
        lan.ip("addr", "del", f"{net.device_ip}/24", "dev", "br0")
        for node in NODES:
            net.add_tap(node.tap)
        wire = TapWire(lan, "ebrp2w", bridge="br0")
        lab.procs.start("router", router_command(net, lab.workdir / "leases"), netns=net.router,
                        log=lab.logs / "router.log")  # fmt: skip
        with Rp2Board(link, w5500=True, on_frame=wire.write) as board:
            wire.attach(board)
            board.wait(lambda e: e.get("ev") == "usb", what="the USB serial line")
            r = bastion("flash", "--port", str(link), "--site", str(lab.site), "--board", "w5500-evb-pico",
                        # a blank NC-wired board powers every node; the site's default is off
                        "--tftp-dir", str(tftp), "--switch-relays", timeout=900)  # fmt: skip
            assert r.returncode == 0, r.stdout + r.stderr
            assert [board.level(pin) for pin in RELAY_PINS] == ["low"] * 8  # all off
            lab.procs.start("controller", lab.controller_command(), netns=net.lan,
                            log=lab.logs / "controller.log")  # fmt: skip
            deadline = time.monotonic() + 180
            while not lab.device_ready():
                assert time.monotonic() < deadline, (lab.logs / "controller.log").read_text()[-3000:]
                assert lab.procs.alive("controller"), (lab.logs / "controller.log").read_text()[-3000:]
                time.sleep(1)
            after = lab.last_event_id()
            callbacks: dict[str, dict] = {}
            # One after the other: the emulated chip runs at a fraction of a board's speed, and
            # while it sends one node iPXE over TFTP its proxyDHCP answers the other too late
            # for iPXE, which then boots nothing (seen: docs/boards.md).
            for node in (BIOS, UEFI):
                # controller -> serial -> the board's relay; its pin going high (coil off, the NC
                # contact closed) powers the node
                power_on(lab, node, board)
                # the VM at a lower priority than the emulated chip (rp2kit raises the chip's)
                vm = ["nice", "-n", "10", *lab.qemu_command(node)]
                lab.procs.start(node.name, vm, netns=net.lan, log=lab.logs / f"{node.name}.log")
                attempts, deadline = 1, time.monotonic() + 400
                while node.name not in callbacks:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"no callback from {node.name} in 400 s" + why(lab, node, after, board))
                    assert lab.procs.alive("controller"), (lab.logs / "controller.log").read_text()[-3000:]
                    if gave_up(lab, node):
                        # The node's firmware tried every boot option and stopped: reset it, as a
                        # machine set to retry its network boot would. The emulated chip's answers
                        # can come later than a PXE client's timers allow (docs/boards.md); this
                        # says so rather than failing the run, up to ATTEMPTS boots.
                        assert attempts < ATTEMPTS, f"{node.name} booted nothing {attempts} times" + why(
                            lab, node, after, board)  # fmt: skip
                        print(f"{node.name}: attempt {attempts} booted nothing" + why(lab, node, after, board))
                        lab.procs.stop(node.name)
                        lab.procs.start(node.name, vm, netns=net.lan, log=lab.logs / f"{node.name}.log")
                        attempts, deadline = attempts + 1, time.monotonic() + 400
                    for e in lab.events(after, kind="callback"):
                        callbacks.setdefault(e.get("machine"), e)
                    time.sleep(2)
                print(f"{node.name}: called back after {attempts} attempt(s)")
            events = lab.events(after)
    finally:
        if wire is not None:
            wire.close()
        lab.down()
    assert NAME + "-lan" not in namespaces()
    for node in NODES:
        mine = [e for e in events if e.get("machine") == node.name]
        # the board switched the relay, reported over its serial line
        power = [e for e in mine if e["kind"] == "power" and e["source"] == "device"]
        assert [(e["payload"]["ch"], e["payload"]["state"]) for e in power] == [(node.channel, "on")], mine
        # the board's proxyDHCP: the BIOS node's iPXE gets the controller's script at once; the
        # UEFI node's edk2 first gets iPXE from the board's TFTP, then (as iPXE) the script
        offers = {(o["payload"]["file"], o["payload"]["ipxe"], o["payload"]["arch"])
                  for o in mine if o["kind"] == "dhcp" and o["source"] == "device"
                  and o["payload"]["kind"] == "offer"}  # fmt: skip
        script = (f"{lab.controller_url}/boot.ipxe", True)
        if node is BIOS:
            assert offers == {(*script, 0)}, mine
        else:
            assert ("snponly.efi", False, 7) in offers and (*script, 7) in offers, mine
            sent = [e for e in mine if e["kind"] == "tftp" and e["source"] == "device"]
            assert sent, mine
        # then the node fetched the script, its profile's script, kernel, initrd and Ignition
        # config from the controller, and called back from the booted kernel's initrd
        served = [(e["endpoint"], e["status"]) for e in mine if e["source"] == "controller"]
        assert served == [("/boot.ipxe", 200), ("/ipxe", 200), ("/assets/lab/vmlinuz", 200),
                          ("/assets/lab/initrd.img", 200), ("/ignition", 200)], mine  # fmt: skip
        assert callbacks[node.name]["payload"]["status"] == "ok", callbacks[node.name]
