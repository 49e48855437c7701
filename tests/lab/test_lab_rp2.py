"""A node network-boots from MicroPython's official W5500-EVB-Pico image on an emulated RP2040
(markers `lab` and `rp2`): the lab's LAN, home router (dnsmasq) and controller, the board on
the LAN through its W5500 (the emulator's register model, its wire a tap device on the LAN's
bridge: tests/rp2kit.py), flashed by `bastion flash`. The controller drives the board
over its USB serial line; a relay pin going to "node on" starts the node's VM, as the lab's
relay wiring does for the sim board. The node is the lab's BIOS node (SeaBIOS with the NIC's
iPXE ROM), so the board answers its DHCP as proxyDHCP with the controller's script; TFTP from
the board is test_rp2_emulated's (a whole file to tftp-hpa), as an EFI node's 850 KB iPXE
would take minutes through the emulated USB line to flash."""

from __future__ import annotations

import os
import secrets
import shutil
import time

import pytest
from bastion.lab.lab import IPXE_DIR, Lab, Node, router_command
from bastion.lab.netns import Namespace, namespaces

pytestmark = [pytest.mark.lab, pytest.mark.rp2, pytest.mark.timeout(900)]

NAME, PREFIX = "ebrp", "10.79.0"
NODE = Node("bios-1", "52:54:00:79:00:02", "bios", 1)
RELAY_PINS = range(6, 14)  # boards/w5500-evb-pico.json: GP6..GP13, active low, NC contacts


def test_a_bios_node_boots_through_the_emulated_w5500_evb_pico_to_its_callback(tmp_path):
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
    lab.write_site([NODE], kernel, initrd, site_extra={"device": {
        "ip": net.device_ip, "answer": "site", "boot_files": {0: "undionly.kpxe"},
        "net": {"ip": f"{net.device_ip}/24", "gateway": net.router_ip},
    }})  # fmt: skip
    lab.token_file.write_text(secrets.token_urlsafe(24) + "\n")
    tftp = tmp_path / "tftp"
    tftp.mkdir()
    shutil.copy(IPXE_DIR / "undionly.kpxe", tftp)
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
        net.add_tap(NODE.tap)
        wire = TapWire(lan, "ebrp2w", bridge="br0")
        lab.procs.start("router", router_command(net, lab.workdir / "leases"), netns=net.router,
                        log=lab.logs / "router.log")  # fmt: skip
        with Rp2Board(link, w5500=True, on_frame=wire.write) as board:
            wire.attach(board)
            board.wait(lambda e: e.get("ev") == "usb", what="the USB serial line")
            r = bastion("flash", "--port", str(link), "--site", str(lab.site), "--board", "w5500-evb-pico",
                        "--tftp-dir", str(tftp), timeout=600)  # fmt: skip
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
            lab.api("POST", f"/api/v1/machines/{NODE.name}/power", {"state": "on"})  # through the board
            pin = RELAY_PINS[NODE.channel]
            board.wait(lambda e: e.get("ev") == "gpio" and e["pin"] == pin and e["value"] == "high",
                       timeout=60, what="the node's relay pin high (coil off, node on)")  # fmt: skip
            lab.procs.start("node", lab.qemu_command(NODE), netns=net.lan, log=lab.logs / "node.log")
            deadline = time.monotonic() + 600
            callback = None
            while callback is None:
                console = lab.logs / f"{NODE.name}.console"
                assert time.monotonic() < deadline, console.read_text(errors="replace")[-3000:]
                assert lab.procs.alive("controller"), (lab.logs / "controller.log").read_text()[-3000:]
                callback = next((e for e in lab.events(after, kind="callback")
                                 if e.get("machine") == NODE.name), None)  # fmt: skip
                time.sleep(2)
            events = lab.events(after)
    finally:
        if wire is not None:
            wire.close()
        lab.down()
    mine = [e for e in events if e.get("machine") == NODE.name]
    # the board switched the relay, reported over its serial line
    power = [e for e in mine if e["kind"] == "power" and e["source"] == "device"]
    assert [(e["payload"]["ch"], e["payload"]["state"]) for e in power] == [(NODE.channel, "on")], mine
    # the board's proxyDHCP named the controller's script to the node's iPXE (arch 0: BIOS)
    offers = [e for e in mine if e["kind"] == "dhcp" and e["source"] == "device"
              and e["payload"]["kind"] == "offer"]  # fmt: skip
    assert offers, mine
    assert {(o["payload"]["file"], o["payload"]["ipxe"], o["payload"]["arch"]) for o in offers} == {
        (f"{lab.controller_url}/boot.ipxe", True, 0)}, offers  # fmt: skip
    # then the node fetched it, its profile's script, kernel, initrd and Ignition config from
    # the controller, and called back from the booted kernel's initrd
    served = [(e["endpoint"], e["status"]) for e in mine if e["source"] == "controller"]
    assert served == [("/boot.ipxe", 200), ("/ipxe", 200), ("/assets/lab/vmlinuz", 200),
                      ("/assets/lab/initrd.img", 200), ("/ignition", 200)], mine  # fmt: skip
    assert min(o["id"] for o in offers) < min(e["id"] for e in mine if e["source"] == "controller")
    assert callback["payload"]["status"] == "ok", callback
    assert NAME + "-lan" not in namespaces()
