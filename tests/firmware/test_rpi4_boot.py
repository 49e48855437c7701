"""An emulated Raspberry Pi 4 EEPROM bootloader boots through the device: its captured DISCOVER
(Pi MAC dc:a6:32:1a:2b:3c, the "RPi4" GUID in option 97, arch 0) goes to the firmware's
proxyDHCP on the real MicroPython unix port (the sim board, .mpy in a 128 KB heap); it reads
the offer, then fetches `<serial>/start4.elf`, `<serial>/config.txt` and `<serial>/RPI_EFI.fd`
(2 MiB of test-made random bytes) with blksize 1024 and tsize, as the bootloader does, from
the TFTP server the offer names (next-server, which must agree with option 66). Every file
must come back byte-identical.

Two configurations:
- `device`: no rpi.next_server; the offer points at the device, which serves the Pi files.
- `controller`: rpi.next_server = the controller; the offer points at `bastion serve --tftp`
  (the firmware's TFTP engine in a CPython shell), which serves them from the site's tftp/,
  while a UEFI arm64 client (arch 11) and an x86 one (arch 7) in the same run still get their
  chainloaders from the device.

Everything runs in a network namespace this test makes with only `lo` in it, on the real ports
(67, 68, 69): the device at 127.0.0.2, the controller at 127.0.0.3. Every process is stopped
by its PID and the namespace deleted, whatever happens.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest
from bastion.flash import sim
from bastion.lab.netns import Namespace
from bastion.state.events import EventStore
from dhcpread import file_name, siaddr, yiaddr
from netkit import need_root
from simkit import SimBoard, wait_for
from test_proxydhcp_dnsmasq import GUID, mac, request

from firmware import dhcp

pytestmark = pytest.mark.netns

DATA = Path(__file__).resolve().parent / "data" / "dhcp"
RPI_DISCOVER = (DATA / "rpi4-eeprom-discover.bin").read_bytes()
SERIAL = "9ffefdef"  # the last 4 bytes of the capture's option 97, as TFTP_PREFIX=0 names it
DEVICE, CONTROLLER = "127.0.0.2", "127.0.0.3"
PI_FILES = ("start4.elf", "config.txt", "RPI_EFI.fd")

# The bootloader's side, run inside the namespace: for each client, send its DISCOVER to the
# device, take the offer whose xid matches, then fetch the files over TFTP from the offer's
# next-server (siaddr), port 69, lock-step: RRQ with blksize and tsize, ACK 0 to the OACK, ...
# argv: a JSON file of {"clients": [{"name", "hex", "files", "blksize"}], "device", "out"}.
# Prints {name: {"offer": hex, "files": {file: {"tsize": n, "path": ...}}}}.
CLIENT_SCRIPT = r"""
import json, os, socket, sys

spec = json.load(open(sys.argv[1]))
out = {}
b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
b.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
b.bind(("0.0.0.0", 68))
b.settimeout(10)


def offer_for(raw):
    b.sendto(raw, (spec["device"], 67))
    while True:
        d, _ = b.recvfrom(2048)
        if d[0] == 2 and d[4:8] == raw[4:8]:
            return d


def tftp_get(server, name, blksize, dest):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    req = b"\0\1" + name.encode() + b"\0octet\0blksize\0%d\0tsize\0000\0" % blksize
    s.sendto(req, (server, 69))
    pkt, peer = s.recvfrom(65536)
    if pkt[:2] == b"\0\5":
        raise SystemExit("%s: TFTP error %r" % (name, pkt))
    assert pkt[:2] == b"\0\6", pkt
    parts = pkt[2:].split(b"\0")[:-1]
    opts = dict(zip(parts[::2], parts[1::2]))
    assert int(opts[b"blksize"]) == blksize, opts
    tsize = int(opts[b"tsize"])
    got = bytearray()
    expect, last_ack, tries = 1, b"\0\4\0\0", 0
    s.sendto(last_ack, peer)
    while True:
        try:
            pkt, src = s.recvfrom(65536)
        except socket.timeout:
            tries += 1
            assert tries < 10, name
            s.sendto(last_ack, peer)
            continue
        if src != peer or pkt[:2] != b"\0\3":
            raise SystemExit("%s: unexpected %r from %r" % (name, pkt[:4], src))
        n = (pkt[2] << 8) | pkt[3]
        if n != expect & 0xFFFF:
            continue  # a resend of a block we have
        got += pkt[4:]
        last_ack = b"\0\4" + pkt[2:4]
        s.sendto(last_ack, peer)
        expect += 1
        if len(pkt) - 4 < blksize:
            break
    s.close()
    with open(dest, "wb") as f:
        f.write(got)
    return tsize


for c in spec["clients"]:
    raw = bytes.fromhex(c["hex"])
    d = offer_for(raw)
    server = socket.inet_ntoa(d[20:24])  # next-server: where the offer points
    files = c["files"]
    if files is None:  # a PC client fetches the boot file the offer names
        files = [d[108:236].split(b"\0")[0].decode()]
    got = {}
    for name in files:
        dest = os.path.join(spec["out"], c["name"] + "." + name.replace("/", "_"))
        got[name] = {"tsize": tftp_get(server, name, c["blksize"], dest), "path": dest,
                     "server": server}
    out[c["name"]] = {"offer": d.hex(), "files": got}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def pi_files() -> dict[str, bytes]:
    rng = random.Random(4)
    return {
        "start4.elf": rng.randbytes(2_228_224 + 77),
        "config.txt": b"arm_64bit=1\nenable_uart=1\nuart_2ndstage=1\nenable_gic=1\n"
        b"armstub=RPI_EFI.fd\ndisable_commandline_tags=1\ndisable_overscan=1\n"
        b"device_tree_address=0x3e0000\ndevice_tree_end=0x400000\n",
        "RPI_EFI.fd": rng.randbytes(2 * 1024 * 1024),  # a multiple of 1024: an empty last block
    }


CHAINLOADERS = {"ipxe.efi": random.Random(7).randbytes(300_001),
                "grubnetaa64.efi": random.Random(11).randbytes(200_003)}


def clients(blksize: int = 1024) -> list[dict]:
    uefi_arm = request(mac("52:54:00:00:00:0b"), 11, guid=GUID)
    uefi_x86 = request(mac("52:54:00:00:00:07"), 7, guid=GUID)
    return [
        {"name": "rpi4", "hex": RPI_DISCOVER.hex(), "blksize": blksize,
         "files": [f"{SERIAL}/{n}" for n in PI_FILES]},
        {"name": "uefi-arm64", "hex": uefi_arm.hex(), "blksize": 1468, "files": None},
        {"name": "uefi-x86", "hex": uefi_x86.hex(), "blksize": 1468, "files": None},
    ]


@pytest.mark.parametrize("where", ["device", "controller"])
def test_emulated_pi4_bootloader_gets_every_file_byte_identical(tmp_path, pi_files, where):
    need_root("ss")
    flash = tmp_path / "flash"
    sim.install_firmware(flash)
    config = {
        "server_ip": DEVICE,
        "script_url": f"http://{CONTROLLER}:8080/boot.ipxe",
        "boot_files": {"7": "ipxe.efi", "11": "grubnetaa64.efi"},
        "allowed_macs": ["dc:a6:32:1a:2b:3c", "52:54:00:00:00:0b", "52:54:00:00:00:07"],
    }
    if where == "controller":
        config["rpi"] = {"next_server": CONTROLLER}
    (flash / "device.json").write_text(json.dumps(config))
    for name, data in CHAINLOADERS.items():
        (flash / "tftp").mkdir(exist_ok=True)
        (flash / "tftp" / name).write_bytes(data)
    site = tmp_path / "site"
    pi_root = (flash / "tftp" if where == "device" else site / "tftp") / SERIAL
    pi_root.mkdir(parents=True)
    for name, data in pi_files.items():
        (pi_root / name).write_bytes(data)
    (site / "tftp").mkdir(parents=True, exist_ok=True)
    (site / "site.yaml").write_text("site: pi\n")
    out = tmp_path / "out"
    out.mkdir()
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"clients": clients(), "device": DEVICE, "out": str(out)}))
    db = tmp_path / "events.db"

    with Namespace(f"ebpi{os.getpid() % 100000}{where[0]}") as ns:
        cmd = sim.firmware_command(flash, DEVICE, 67, 4011, 69, "128k")
        board = SimBoard(flash, ns.argv(*cmd))
        ns.adopt(board.proc, "device")
        try:
            board.wait_event(lambda e: e.get("ev") == "boot")
            if where == "controller":
                ctl = ns.start([str(Path(sys.executable).parent / "bastion"), "serve", "--site",
                                str(site), "--listen", f"{CONTROLLER}:8080", "--tftp",
                                f"{CONTROLLER}:69", "--db", str(db), "--poll", "0",
                                "--no-access-log"], name="controller",
                               log=tmp_path / "serve.log")  # fmt: skip
                wait_for(lambda: ns.udp_bound(69, CONTROLLER) or ctl.poll() is not None,
                           30, "the controller's TFTP")
                assert ctl.poll() is None, (tmp_path / "serve.log").read_text()
            wait_for(lambda: ns.udp_bound(69, DEVICE), 30, "the device's TFTP")
            r = ns.run(sys.executable, "-c", CLIENT_SCRIPT, str(spec), capture_output=True,
                       text=True, timeout=300)
            assert r.returncode == 0, r.stdout + r.stderr + "\n".join(board.lines[-20:])
            got = json.loads(r.stdout)

            def device_ends():
                return [e for e in board.events if e.get("ev") == "tftp"
                        and e.get("stage") == "end"]

            # The device's last end event can come after the client is done.
            n_device = 2 + (3 if where == "device" else 0)
            board.wait_event(lambda e: len(device_ends()) >= n_device, timeout=20)
        finally:
            board.stop()

    # The Pi: an offer with the Pi menu, no boot file, next-server and option 66 agreeing.
    pi = got["rpi4"]
    offer = dhcp.parse(bytes.fromhex(pi["offer"]))
    want = CONTROLLER if where == "controller" else DEVICE
    assert offer.msg_type == dhcp.OFFER and yiaddr(offer) == bytes(4)
    assert siaddr(offer) == bytes(int(x) for x in want.split("."))
    assert offer.tftp_server == want.encode()
    assert offer.server_id == bytes(int(x) for x in DEVICE.split("."))  # the proxy is the device
    assert file_name(offer) == b"" and b"Raspberry Pi Boot" in offer.vendor_opts
    assert offer.guid == dhcp.parse(RPI_DISCOVER).guid
    for name in PI_FILES:
        f = pi["files"][f"{SERIAL}/{name}"]
        assert f["server"] == want
        assert f["tsize"] == len(pi_files[name])
        assert Path(f["path"]).read_bytes() == pi_files[name], name

    # The UEFI clients boot from the device either way, each with its own architecture's file.
    for name, file in (("uefi-arm64", "grubnetaa64.efi"), ("uefi-x86", "ipxe.efi")):
        o = dhcp.parse(bytes.fromhex(got[name]["offer"]))
        assert siaddr(o) == bytes(int(x) for x in DEVICE.split(".")) and file_name(o) == file.encode()
        f = got[name]["files"][file]
        assert f["server"] == DEVICE
        assert Path(f["path"]).read_bytes() == CHAINLOADERS[file]

    # Who served what, from each server's own events.
    served = {e["file"]: e for e in device_ends()}
    assert {n for n, e in served.items() if e["result"] == "ok"} >= set(CHAINLOADERS)
    pi_names = {f"{SERIAL}/{n}" for n in PI_FILES}
    dhcp_rpi = [e for e in board.events if e.get("ev") == "dhcp" and e.get("rpi")]
    assert dhcp_rpi and dhcp_rpi[0]["kind"] == "offer" and dhcp_rpi[0]["mac"] == "dc:a6:32:1a:2b:3c"
    if where == "device":
        assert {n for n in served if n in pi_names} == pi_names
        assert all(served[n]["bytes"] == len(pi_files[n.split("/")[1]]) for n in pi_names)
    else:
        assert not pi_names & set(served), "the device served a Pi file"
        events = EventStore(db).query(limit=50, kind="tftp")
        ends = {e.payload["file"]: e for e in events if e.payload["stage"] == "end"}
        assert set(ends) == pi_names
        assert all(e.source == "controller" for e in events)
        assert all(e.payload["result"] == "ok" for e in ends.values())
        assert {n: e.payload["bytes"] for n, e in ends.items()} == {
            f"{SERIAL}/{n}": len(d) for n, d in pi_files.items()}
        starts = [e.payload for e in events if e.payload["stage"] == "start"]
        assert {(s["blksize"], s["tsize"]) for s in starts} == {
            (1024, len(d)) for d in pi_files.values()}


def test_site_yaml_rpi_next_server_reaches_the_pi_offer_and_only_the_pi_offer(tmp_path):
    """site.yaml `device.rpi.next_server` -> device.json (bastion flash) -> the policy: the Pi
    bootloader's offer points at the controller, a UEFI client's at the device."""
    from bastion.flash import image as flashing
    from bastion.site.load import load_site

    from firmware import pxe
    from firmware.config import Config

    (tmp_path / "site.yaml").write_text(
        "controller_url: http://10.77.0.3:8080\n"
        "device:\n  ip: 10.77.0.2\n  answer: any\n"
        "  boot_files: {7: ipxe.efi, 11: grubnetaa64.efi}\n"
        "  rpi: {next_server: 10.77.0.3}\n")
    dev = flashing.render_device_config(load_site(tmp_path), flashing.board_definition("sim"))
    assert dev.config["rpi"] == {"next_server": "10.77.0.3"}
    assert "next_server" not in dev.config
    policy = pxe.Policy(Config(dev.config))
    pi = policy.answer(dhcp.parse(RPI_DISCOVER), pxe.DHCP_PORT)
    assert pi.rpi and pi.boot.siaddr == bytes([10, 77, 0, 3])
    assert dhcp.option(66, b"10.77.0.3") in pi.boot.opts
    for arch, file in ((7, b"ipxe.efi"), (11, b"grubnetaa64.efi")):
        r = policy.answer(dhcp.parse(request(mac("52:54:00:00:00:01"), arch, guid=GUID)),
                          pxe.DHCP_PORT)
        assert not r.rpi and r.boot.file == file and r.boot.siaddr == bytes([10, 77, 0, 2])
