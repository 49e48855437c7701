"""Differential test: our proxyDHCP (the firmware under MicroPython, .mpy in a 128 KB heap)
against dnsmasq in proxy mode, on the real ports (67, 68, 4011) with real broadcasts.

Each server gets its own pair of network namespaces made here (server side 10.77.0.1/24 on one
end of a veth pair, the client side on the other, nothing else), the same site config, and the
same DISCOVERs and REQUESTs crafted or captured from real clients. The answers are compared on
what a PXE client acts on: answered or not, boot file, next-server (siaddr), yiaddr, ciaddr and
options 54, 60, 43 and 97. Where we differ on purpose, INTENDED below says why.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dhcpread import file_name, siaddr, yiaddr
from netkit import event_counts, proxydhcp_differential
from test_proxydhcp import SERVICE_SCRIPT

from firmware import dhcp

pytestmark = pytest.mark.netns

DATA = Path(__file__).resolve().parent / "data" / "dhcp"
SERVER = "10.77.0.1"
SERVER_B = bytes([10, 77, 0, 1])
CLIENT_IP = "10.77.0.50"
URL = f"http://{SERVER}:8080/boot.ipxe"
BOOT_FILES = {
    0: "undionly.kpxe",
    6: "ipxe32.efi",
    7: "ipxe.efi",
    9: "ipxe.efi",
    11: "snp-arm64.efi",
}
X86_FILES = {b"undionly.kpxe", b"ipxe32.efi", b"ipxe.efi"}
PI_OUIS = ["b8:27:eb", "dc:a6:32", "e4:5f:01", "28:cd:c1", "d8:3a:dd", "2c:cf:67"]
# What we send every PC client in option 43, and what dnsmasq sends to x86PC clients on
# port 67 and to every client on 4011: discovery control 8, prompt (timeout 0, "PXE").
PC_43 = b"\x06\x01\x08\x0a\x04\x00PXE\xff"

INTENDED = {
    "efi_43": "On port 67 dnsmasq sends no option 43 to non-x86PC clients (it expects them to "
    "ask again on 4011). We send PC_43 to every PC client, as the project's rule is: edk2 then "
    "takes the boot file from the offer with no 4011 round trip (PxeBcSelectBootPrompt returns "
    "at once when discovery control bit 3 is set and a boot file is present).",
    "arch_without_file": "dnsmasq answers a client whose arch has no boot file with an offer "
    "that has no boot file; we stay silent and count dhcp.no_boot_file.",
    "rpi_next_server": 'For pxe-service=0,"Raspberry Pi Boot" dnsmasq leaves siaddr 0.0.0.0; '
    "we set next-server (rpi.next_server or next_server) and option 66, so the Pi's TFTP server "
    "is the one the site configured rather than the bootloader's fallback.",
    "request_67": "dnsmasq in proxy mode ignores DHCPREQUEST on port 67; we ACK a REQUEST whose "
    "option 54 names us (one naming another server, or none, we ignore like dnsmasq).",
}


def opt(code: int, value: bytes) -> bytes:
    return bytes((code, len(value))) + value


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def request(
    macb, arch, vendor=None, guid=None, extra=b"", msg=dhcp.DISCOVER, flags=0x8000, ciaddr=b""
):
    hdr = bytearray(240)
    hdr[0:3] = b"\x01\x01\x06"
    hdr[10:12] = flags.to_bytes(2, "big")
    hdr[12:16] = ciaddr or bytes(4)
    hdr[28:34] = macb
    hdr[236:240] = b"\x63\x82\x53\x63"
    if vendor is None:
        vendor = b"PXEClient:Arch:%05d:UNDI:003000" % arch
    o = opt(53, bytes((msg,))) + opt(93, arch.to_bytes(2, "big")) + opt(60, vendor)
    if guid is not None:
        o += opt(97, b"\0" + guid)
    raw = bytes(hdr) + o + extra + b"\xff"
    return raw + bytes(max(0, 300 - len(raw)))


GUID = bytes.fromhex("8c4f1d3b9e2a4c61b0d2e3f4a5b6c7d8")
RPI_GUID = (
    b"RPi4" + bytes.fromhex("00c03111") + bytes.fromhex("321a2b3c") + bytes.fromhex("9ffefdef")
)
IPXE_175 = opt(175, bytes.fromhex("b105011af41000eb0301000017010122010113010111010127010119"))


def vector(name: str) -> bytes:
    return (DATA / name).read_bytes()


CASES = {
    # name: (raw, via) -- "bcast": 0.0.0.0:68 -> 255.255.255.255:67; "4011": unicast from
    # CLIENT_IP:4011 to SERVER:4011 (as edk2 and iPXE ask the boot server).
    "edk2-x64-captured": (vector("edk2-x64-discover.bin"), "bcast"),
    "edk2-7": (request(mac("52:54:00:00:00:07"), 7, guid=GUID), "bcast"),
    "bios-0": (
        request(mac("52:54:00:00:00:00"), 0, b"PXEClient:Arch:00000:UNDI:002001", GUID),
        "bcast",
    ),
    "efi32-6": (request(mac("52:54:00:00:00:06"), 6, guid=GUID), "bcast"),
    "efi64-9": (request(mac("52:54:00:00:00:09"), 9, guid=GUID), "bcast"),
    "arm32-10": (request(mac("52:54:00:00:00:0a"), 10, guid=GUID), "bcast"),
    "arm64-11": (request(mac("52:54:00:00:00:0b"), 11, guid=GUID), "bcast"),
    "ipxe-7": (
        request(
            mac("52:54:00:00:01:07"),
            7,
            b"PXEClient:Arch:00007:UNDI:003010",
            GUID,
            opt(77, b"iPXE") + IPXE_175,
        ),
        "bcast",
    ),
    "ipxe-bios-captured": (vector("ipxe-bios-discover.bin"), "bcast"),
    "rpi4-captured": (vector("rpi4-eeprom-discover.bin"), "bcast"),
    "rpi-guid-only": (
        request(mac("52:54:00:00:02:00"), 0, b"PXEClient:Arch:00000:UNDI:002001", RPI_GUID),
        "bcast",
    ),
    "rpi-mac-only": (
        request(mac("e4:5f:01:00:02:01"), 0, b"PXEClient:Arch:00000:UNDI:002001", GUID),
        "bcast",
    ),
    "non-pxe": (request(mac("52:54:00:00:03:00"), 0, b"udhcp 1.36.1"), "bcast"),
    "httpboot-captured": (vector("edk2-httpboot-discover.bin"), "bcast"),
    "unlisted-mac": (request(mac("52:54:00:00:04:00"), 7, guid=GUID), "bcast"),
    "request-67": (
        request(mac("52:54:00:00:00:07"), 7, guid=GUID, extra=opt(54, SERVER_B), msg=dhcp.REQUEST),
        "bcast",
    ),
    "edk2-7-4011": (
        request(
            mac("52:54:00:00:00:07"),
            7,
            guid=GUID,
            msg=dhcp.REQUEST,
            flags=0,
            ciaddr=bytes([10, 77, 0, 50]),
        ),
        "4011",
    ),
    "ipxe-7-4011": (
        request(
            mac("52:54:00:00:01:07"),
            7,
            b"PXEClient:Arch:00007:UNDI:003010",
            GUID,
            opt(77, b"iPXE") + IPXE_175 + opt(54, SERVER_B),
            msg=dhcp.REQUEST,
            flags=0,
            ciaddr=bytes([10, 77, 0, 50]),
        ),
        "4011",
    ),
    "rpi4-4011": (
        request(
            mac("dc:a6:32:1a:2b:3c"),
            0,
            b"PXEClient:Arch:00000:UNDI:002001",
            RPI_GUID,
            msg=dhcp.REQUEST,
            flags=0,
            ciaddr=bytes([10, 77, 0, 50]),
        ),
        "4011",
    ),
}


def unique_xids(cases: dict[str, tuple], base: int) -> dict[str, tuple]:
    """The cases (packet first), each packet with its own xid from base on: replies are told
    apart by xid."""
    out = {}
    for i, (name, (raw, *rest)) in enumerate(cases.items()):
        b = bytearray(raw)
        b[4:8] = (base + i).to_bytes(4, "big")
        out[name] = (bytes(b), *rest)
    return out


ALLOWED = sorted(
    {dhcp.parse(raw).mac.hex(":") for raw, _ in CASES.values()} - {"52:54:00:00:04:00"}
)

def dnsmasq_args(ifname: str, pidfile: Path, boot_files: dict[int, str] = BOOT_FILES,
                 allowed: list[str] = ALLOWED) -> list[str]:  # fmt: skip
    """The seed user's dnsmasq proxy config, as flags: the boot files per client-arch tag, and
    only the `allowed` MACs answered (every one when empty)."""
    a = [
        "dnsmasq",
        "--no-daemon",
        "--conf-file=/dev/null",
        "--user=nobody",  # its built-in user, dnsmasq, exists only where a package made it
        f"--pid-file={pidfile}",
        "--port=0",
        "--log-dhcp",
        "--log-facility=-",
        f"--interface={ifname}",
        "--bind-interfaces",
        f"--dhcp-range={SERVER.rsplit('.', 1)[0]}.0,proxy",
        "--dhcp-userclass=set:ipxe,iPXE",
        "--dhcp-match=set:ipxe,175",
        "--dhcp-match=set:rpi,97,00:52:50:69:34",  # option 97: type 0, then "RPi4"
        f"--dhcp-boot=tag:ipxe,{URL},,{SERVER}",
        "--pxe-service=tag:rpi,tag:!ipxe,0,Raspberry Pi Boot",
    ]
    if allowed:
        a.append("--dhcp-ignore=tag:!known")
    for arch, name in boot_files.items():
        a.append(f"--dhcp-match=set:arch{arch},option:client-arch,{arch}")
        not_rpi = "tag:!rpi," if arch == 0 else ""
        a.append(f"--dhcp-boot=tag:!ipxe,{not_rpi}tag:arch{arch},{name},,{SERVER}")
    for oui in PI_OUIS:
        a.append(f"--dhcp-mac=set:rpi,{oui}:*:*:*")
    for m in allowed:
        a.append(f"--dhcp-host={m},set:known")
    return a


def our_config() -> dict:
    return {
        "server_ip": SERVER,
        "script_url": URL,
        "boot_files": {str(k): v for k, v in BOOT_FILES.items()},
        "allowed_macs": ALLOWED,
    }


def summary(p: dhcp.Packet) -> dict:
    return {
        "msg": p.msg_type,
        "file": file_name(p),
        "siaddr": siaddr(p),
        "yiaddr": yiaddr(p),
        "ciaddr": p.ciaddr,
        "54": p.server_id,
        "60": p.vendor_class,
        "43": p.vendor_opts,
        "97": p.guid,
    }


def test_against_dnsmasq(tmp_path):
    cases = unique_xids(CASES, 0x5EB00000)
    results = proxydhcp_differential(
        tmp_path, cases, dnsmasq_args=dnsmasq_args, device_config=our_config(),
        service=SERVICE_SCRIPT, server_ip=SERVER, client_ip=CLIENT_IP)  # fmt: skip
    got_d, got_o, fw_lines = results
    report = []
    for name, (raw, via) in cases.items():
        d = [dhcp.parse(bytes.fromhex(h)) for h, _, _ in got_d[name]]
        o = [dhcp.parse(bytes.fromhex(h)) for h, _, _ in got_o[name]]
        report.append((name, len(d), len(o)))
        req = dhcp.parse(raw)
        for p in o:  # what we promise every client, whatever dnsmasq does
            assert (
                yiaddr(p) == bytes(4) and p.server_id == SERVER_B and p.vendor_class == b"PXEClient"
            )
            assert p.guid == req.guid, name
        if via == "4011":
            # unicast back to the asking address and port, by both
            assert {(ip, port) for _, ip, port in got_o[name]} <= {(SERVER, 4011)}
        if name in ("non-pxe", "httpboot-captured", "unlisted-mac"):
            assert not d and not o, name
            continue
        if name == "arm32-10":  # INTENDED["arch_without_file"]
            assert d and file_name(d[0]) == b"" and not o
            continue
        if name == "request-67":  # INTENDED["request_67"]
            assert not d and o and o[0].msg_type == dhcp.ACK and file_name(o[0]) == b"ipxe.efi"
            continue
        assert d and o, (name, len(d), len(o))
        sd, so = summary(d[0]), summary(o[0])
        if name.startswith("rpi"):
            # A Pi never gets an x86 binary, and gets dnsmasq's menu byte for byte.
            assert so["file"] == b"" and so["file"] not in X86_FILES
            assert b"Raspberry Pi Boot" in so["43"]
            # INTENDED["rpi_next_server"]
            assert sd["siaddr"] == bytes(4) and so["siaddr"] == SERVER_B
            assert o[0].tftp_server == SERVER.encode()
            sd["siaddr"] = so["siaddr"]
        if sd["43"] is None and so["43"] == PC_43:  # INTENDED["efi_43"]
            assert via == "bcast" and req.arch != 0
            sd["43"] = PC_43
        assert so == sd, name
    answered = {n for n, dn, on in report if on}
    assert answered == set(cases) - {"non-pxe", "httpboot-captured", "unlisted-mac", "arm32-10"}

    counts = event_counts(fw_lines)
    assert counts.get("dhcp.not_pxe") == 2 and counts.get("dhcp.mac_not_allowed") == 1
    assert counts.get("dhcp.no_boot_file") == 1
    assert "dhcp.malformed" not in counts and "dhcp.error" not in counts
    assert "dhcp.send_failed" not in counts
