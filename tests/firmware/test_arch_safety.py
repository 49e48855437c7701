"""Arch safety: an arm32/arm64 client (DHCP option 93 = 10, 11) is never offered an x86 binary,
and an x86 client (0 BIOS, 6 EFI IA32, 7 EFI BC, 9 EFI x86-64) never the arm64 image (GRUB's
grubnetaa64.efi, or iPXE's arm64 snp.efi when the site has one). Whatever else arrives: odd
architectures, a vendor class that disagrees with option 93, no option 93, iPXE, Raspberry Pi
bootloaders and Pis running UEFI.

1. The policy (firmware/pxe.py) under CPython for every option 93 value, 0..65535.
2. A differential against dnsmasq in proxy mode, configured equivalently (`dhcp-match` on
   client-arch, `dhcp-boot` per arch tag, the Pi and iPXE tags of test_proxydhcp_dnsmasq.py),
   with the firmware under MicroPython (.mpy, 128 KB heap), each in network namespaces made
   here, on the real ports with real broadcasts. Where dnsmasq has an equivalent answer, both
   must give the same boot file; everywhere, both must be safe.
"""

from __future__ import annotations

import pytest
from dhcpread import file_name, siaddr, yiaddr
from netkit import event_counts, proxydhcp_differential
from test_proxydhcp import SERVICE_SCRIPT
from test_proxydhcp_dnsmasq import (
    CLIENT_IP,
    GUID,
    IPXE_175,
    RPI_GUID,
    SERVER,
    SERVER_B,
    URL,
    dnsmasq_args,
    mac,
    opt,
    request,
    unique_xids,
)

from firmware import dhcp, pxe
from firmware.config import Config

X86_ARCHES = (0, 6, 7, 9)
ARM_ARCHES = (10, 11)
X86_FILES = {"undionly.kpxe", "ipxe32.efi", "ipxe.efi", "snponly.efi"}
ARM64_IMAGES = ("grubnetaa64.efi", "snp.efi")


def boot_files(arm64: str) -> dict[int, str]:
    return {0: "undionly.kpxe", 6: "ipxe32.efi", 7: "ipxe.efi", 9: "snponly.efi", 11: arm64}


def safe(arch: int, file: bytes | None, arm64: str) -> bool:
    """The property: nothing x86 to arch 10/11, not the arm64 image to an x86 arch."""
    name = (file or b"").decode()
    if arch in ARM_ARCHES:
        return name not in X86_FILES
    if arch in X86_ARCHES:
        return name != arm64
    return True


# --- 1. the policy, every architecture --------------------------------------------------------


@pytest.mark.parametrize("arm64", ARM64_IMAGES)
def test_policy_is_safe_for_every_option_93_value(arm64):
    cfg = Config({"server_ip": SERVER, "script_url": URL,
                  "boot_files": {str(k): v for k, v in boot_files(arm64).items()}})
    policy = pxe.Policy(cfg)
    pc_mac, pi_mac = mac("52:54:00:00:00:01"), mac("dc:a6:32:00:00:01")
    answered = {}
    for arch in range(0x10000):
        for m, guid in ((pc_mac, GUID), (pi_mac, RPI_GUID)):
            vendor = b"PXEClient:Arch:%05d:UNDI:003000" % min(arch, 99999)
            pkt = dhcp.parse(request(m, arch, vendor, guid))
            r = policy.answer(pkt, pxe.DHCP_PORT)
            file = r.boot.file if r is not None else None
            assert safe(arch, file, arm64), (arch, m.hex(), file)
            if m is pc_mac and r is not None:
                answered[arch] = file.decode()
            if m is pi_mac and arch == 0:
                assert r.rpi and file == b""  # the Pi bootloader: a menu, never a binary
            if m is pi_mac and arch == 11:
                assert not r.rpi and file == arm64.encode()  # a Pi running UEFI: arm64
    # Exactly the configured architectures get an answer, each its own file.
    assert answered == boot_files(arm64)


@pytest.mark.parametrize("arm64", ARM64_IMAGES)
def test_option_93_decides_over_the_vendor_class_and_the_vendor_class_only_when_93_is_absent(
        arm64):
    cfg = Config({"server_ip": SERVER, "script_url": URL,
                  "boot_files": {str(k): v for k, v in boot_files(arm64).items()}})
    policy = pxe.Policy(cfg)
    m = mac("52:54:00:00:00:02")
    for arch93, vendor_arch, want in ((11, 7, arm64), (7, 11, "ipxe.efi"), (0, 11, "undionly.kpxe"),
                                      (10, 7, None), (11, 0, arm64)):
        pkt = dhcp.parse(request(m, arch93, b"PXEClient:Arch:%05d:UNDI:003000" % vendor_arch))
        r = policy.answer(pkt, pxe.DHCP_PORT)
        assert (r.boot.file.decode() if r else None) == want, (arch93, vendor_arch)
    raw = bytearray(request(m, 11, b"PXEClient:Arch:00011:UNDI:003000"))
    i = raw.index(bytes((93, 2, 0, 11)))
    raw[i : i + 4] = bytes((0, 0, 0, 0))  # option 93 gone (pads): the vendor class says 11
    r = policy.answer(dhcp.parse(bytes(raw)), pxe.DHCP_PORT)
    assert r.boot.file == arm64.encode()


# --- 2. the differential with dnsmasq ----------------------------------------------------------

ODD_ARCHES = (1, 2, 3, 4, 5, 8, 12, 15, 16, 19, 255, 0xFFFF)


def cases() -> dict[str, tuple[bytes, int]]:
    """name -> (DISCOVER, the architecture the safety rule judges it by)."""
    out: dict[str, tuple[bytes, int]] = {}
    for arch in X86_ARCHES + ARM_ARCHES + ODD_ARCHES:
        vendor = b"PXEClient:Arch:%05d:UNDI:003000" % arch
        out[f"arch-{arch}"] = (request(mac(f"52:54:00:00:{arch >> 8:02x}:{arch & 255:02x}"), arch,
                                       vendor, GUID), arch)
    # A vendor class that disagrees with option 93: option 93 is what both servers go by.
    out["93-is-11-vendor-7"] = (request(mac("52:54:00:01:00:0b"), 11,
                                        b"PXEClient:Arch:00007:UNDI:003000", GUID), 11)
    out["93-is-7-vendor-11"] = (request(mac("52:54:00:01:00:07"), 7,
                                        b"PXEClient:Arch:00011:UNDI:003000", GUID), 7)
    # iPXE on either side: the controller's script, never a binary.
    for arch in (7, 11):
        out[f"ipxe-{arch}"] = (request(mac(f"52:54:00:02:00:{arch:02x}"), arch,
                                       b"PXEClient:Arch:%05d:UNDI:003010" % arch, GUID,
                                       opt(77, b"iPXE") + IPXE_175), arch)
    # Raspberry Pis: the EEPROM bootloader (arch 0 + GUID or MAC), and a Pi running UEFI.
    out["rpi-eeprom"] = (request(mac("dc:a6:32:1a:2b:3c"), 0, b"PXEClient:Arch:00000:UNDI:002001",
                                 RPI_GUID), 0)
    out["rpi-mac-only"] = (request(mac("e4:5f:01:00:02:01"), 0,
                                   b"PXEClient:Arch:00000:UNDI:002001", GUID), 0)
    out["rpi-uefi-11"] = (request(mac("d8:3a:dd:00:00:0b"), 11, guid=GUID), 11)
    return unique_xids(out, 0x5AFE0000)


# Where dnsmasq has no equivalent of our answer; the safety rule still holds for both.
NO_EQUIVALENT = {
    # dnsmasq offers no boot file to an arch without one; we stay silent (dhcp.no_boot_file).
    **{f"arch-{a}": "no file for the arch" for a in ODD_ARCHES + (10,)},
}
# (A Pi running UEFI, arch 11 with a Pi MAC, carries dnsmasq's rpi tag, but its pxe-service=0
# is for arch 0 only: dnsmasq gives it the arm64 dhcp-boot, as we do.)


@pytest.mark.parametrize("arm64", ARM64_IMAGES)
def test_against_dnsmasq_nothing_unsafe_and_the_same_files(tmp_path, arm64):
    files = boot_files(arm64)
    all_cases = cases()
    config = {"server_ip": SERVER, "script_url": URL,
              "boot_files": {str(k): v for k, v in files.items()}}
    # (dnsmasq: the same files, every MAC answered as the firmware does without allowed_macs)
    got_d, got_o, fw_lines = proxydhcp_differential(
        tmp_path, {name: (raw, "bcast") for name, (raw, _) in all_cases.items()},
        dnsmasq_args=lambda ifname, pidfile: dnsmasq_args(ifname, pidfile, files, allowed=[]),
        device_config=config, service=SERVICE_SCRIPT, server_ip=SERVER, client_ip=CLIENT_IP,
        tags=("dxa", "dxc") if arm64 == ARM64_IMAGES[0] else ("dxb", "dxe"))  # fmt: skip
    table = []
    for name, (raw, arch) in all_cases.items():
        d = [dhcp.parse(bytes.fromhex(h)) for h, _, _ in got_d[name]]
        o = [dhcp.parse(bytes.fromhex(h)) for h, _, _ in got_o[name]]
        fd = file_name(d[0]) if d else None
        fo = file_name(o[0]) if o else None
        table.append((name, arch, fd, fo))
        for p in d + o:  # both servers are safe, whatever they answer
            assert safe(arch, file_name(p), arm64), (name, "dnsmasq" if p in d else "ours")
        for p in o:
            assert yiaddr(p) == bytes(4) and p.server_id == SERVER_B and siaddr(p) == SERVER_B
        if name in NO_EQUIVALENT:
            assert not o and (not d or fd == b""), (name, fd, fo)
            continue
        assert d and o, (name, len(d), len(o))
        assert fo == fd, (name, table)
    # What each kind of client got from us (table: name, arch, dnsmasq's file, ours).
    mine = {name: fo for name, _, _, fo in table}
    assert mine["arch-11"] == mine["93-is-11-vendor-7"] == mine["rpi-uefi-11"] == arm64.encode()
    assert mine["ipxe-11"] == mine["ipxe-7"] == URL.encode()
    assert mine["rpi-eeprom"] == mine["rpi-mac-only"] == b""
    assert mine["93-is-7-vendor-11"] == b"ipxe.efi"
    assert {mine[f"arch-{a}"] for a in X86_ARCHES} <= {f.encode() for f in X86_FILES}
    counts = event_counts(fw_lines)
    assert counts.get("dhcp.no_boot_file") == len(NO_EQUIVALENT)
    assert "dhcp.error" not in counts and "dhcp.malformed" not in counts
