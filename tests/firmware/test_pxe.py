"""firmware.pxe: the proxyDHCP policy, rule by rule, plus hypothesis over any parsed packet."""

import pytest
from dhcpread import file_name, find_suboption, siaddr, yiaddr
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware import dhcp, pxe
from firmware.config import Config

SERVER = bytes([10, 77, 0, 1])
URL = "http://10.77.0.1:8080/boot.ipxe"
GUID = b"\0" + bytes(range(1, 17))
RPI_GUID = b"\0RPi4" + bytes.fromhex("00c03111") + bytes.fromhex("321a2b3c") + bytes(4)
X86_FILES = {"undionly.kpxe", "ipxe.efi", "ipxe32.efi"}
BOOT_FILES = {
    "0": "undionly.kpxe",
    "6": "ipxe32.efi",
    "7": "ipxe.efi",
    "9": "ipxe.efi",
    "11": "snp-arm64.efi",
}
KNOWN_WHY = {
    "dhcp.not_ethernet",
    "dhcp.not_pxe",
    "dhcp.other_type",
    "dhcp.not_for_us",
    "dhcp.mac_not_allowed",
    "dhcp.no_boot_file",
    "dhcp.rpi_disabled",
}


def config(**kw):
    d = {"server_ip": "10.77.0.1", "script_url": URL, "boot_files": BOOT_FILES}
    d.update(kw)
    return Config(d)


def opt(code, value):
    return bytes((code, len(value))) + value


def request(
    mac=b"\x52\x54\x00\x00\x00\x01",
    arch=7,
    vendor=None,
    msg=dhcp.DISCOVER,
    flags=0x8000,
    ciaddr=bytes(4),
    giaddr=bytes(4),
    extra=b"",
    htype=1,
):
    hdr = bytearray(240)
    hdr[0], hdr[1], hdr[2] = 1, htype, 6
    hdr[4:8] = b"\xca\xfe\xf0\x0d"
    hdr[10:12] = flags.to_bytes(2, "big")
    hdr[12:16] = ciaddr
    hdr[24:28] = giaddr
    hdr[28:34] = mac
    hdr[236:240] = b"\x63\x82\x53\x63"
    if vendor is None:
        vendor = b"PXEClient:Arch:%05d:UNDI:003000" % (arch or 0)
    o = opt(53, bytes((msg,)))
    if arch is not None:
        o += opt(93, arch.to_bytes(2, "big"))
    if vendor:
        o += opt(60, vendor)
    return dhcp.parse(bytes(hdr) + o + extra + b"\xff")


def answer(cfg, pkt, port=pxe.DHCP_PORT):
    policy = pxe.Policy(cfg)
    return policy.answer(pkt, port), policy


def built(policy, pkt, r):
    buf = bytearray(policy.max_reply)
    b = r.boot
    n = dhcp.build_into(buf, pkt, r.msg_type, b.siaddr, b.file, b.opts, pkt.guid)
    return dhcp.parse(bytes(buf[:n]))


@pytest.mark.parametrize(
    "arch,file",
    [
        (0, "undionly.kpxe"),
        (6, "ipxe32.efi"),
        (7, "ipxe.efi"),
        (9, "ipxe.efi"),
        (11, "snp-arm64.efi"),
    ],
)
def test_boot_file_by_arch(arch, file):
    r, policy = answer(config(), request(arch=arch, extra=opt(97, GUID)))
    assert r.boot.file == file.encode() and r.boot.siaddr == SERVER and r.kind == "offer"
    q = built(policy, request(arch=arch, extra=opt(97, GUID)), r)
    assert yiaddr(q) == bytes(4) and siaddr(q) == SERVER and file_name(q) == file.encode()
    assert q.server_id == SERVER and q.vendor_class == b"PXEClient" and q.guid == GUID
    assert find_suboption(q.vendor_opts, 6) == b"\x08"


def test_arch_without_boot_file_gets_nothing():
    r, policy = answer(config(), request(arch=10))
    assert r is None and policy.why == "dhcp.no_boot_file"


def test_missing_arch_option_reads_the_vendor_class_then_defaults_to_bios():
    r, _ = answer(config(), request(arch=None, vendor=b"PXEClient:Arch:00009:UNDI:003000"))
    assert r.boot.file == b"ipxe.efi"
    r, _ = answer(config(), request(arch=None, vendor=b"PXEClient"))
    assert r.boot.file == b"undionly.kpxe"
    r, _ = answer(config(), request(arch=None, vendor=b"PXEClient:Arch:0000x:UNDI:003000"))
    assert r.boot.file == b"undionly.kpxe"


def test_next_server_is_configurable():
    r, _ = answer(config(next_server="10.77.0.9"), request(arch=7))
    assert r.boot.siaddr == bytes([10, 77, 0, 9])


@pytest.mark.parametrize(
    "extra",
    [opt(77, b"iPXE"), opt(77, b"\x04iPXE"), opt(175, b"\xb1\x05\x01\x10\xec\x81\x39")],
    ids=["user-class", "user-class-rfc3004", "option-175"],
)
def test_ipxe_gets_the_script_url(extra):
    r, policy = answer(config(), request(arch=7, extra=extra))
    assert r.ipxe and r.boot.file == URL.encode()
    q = built(policy, request(arch=7, extra=extra), r)
    assert file_name(q) == URL.encode()


def test_ipxe_on_any_arch_never_gets_a_binary():
    for arch in (0, 7, 10, 11):
        r, _ = answer(config(), request(arch=arch, extra=opt(77, b"iPXE")))
        assert r.boot.file == URL.encode(), arch


def test_long_script_url_goes_in_option_67():
    url = "http://controller.example.internal:8080/boot.ipxe?" + "x" * 120
    r, policy = answer(config(script_url=url), request(extra=opt(77, b"iPXE")))
    q = built(policy, request(extra=opt(77, b"iPXE")), r)
    assert q.bootfile == url.encode() and file_name(q) == url.encode()
    assert bytes(q.raw[108:236]) == bytes(128)


def test_script_url_over_255_bytes_is_refused_at_load():
    with pytest.raises(ValueError):
        pxe.Policy(config(script_url="http://x/" + "y" * 300))


def test_non_pxe_dhcp_is_ignored():
    for vendor in (b"", b"udhcp 1.36.1", b"HTTPClient:Arch:00016:UNDI:003000", b"PXECLIENT"):
        r, policy = answer(config(), request(vendor=vendor))
        assert r is None and policy.why == "dhcp.not_pxe", vendor


def test_non_ethernet_and_replies_are_ignored():
    r, policy = answer(config(), request(htype=6))
    assert r is None and policy.why == "dhcp.not_ethernet"


def test_allowed_macs():
    cfg = config(allowed_macs=["52:54:00:00:00:01"])
    r, _ = answer(cfg, request(mac=b"\x52\x54\x00\x00\x00\x01"))
    assert r is not None
    r, policy = answer(cfg, request(mac=b"\x52\x54\x00\x00\x00\x02"))
    assert r is None and policy.why == "dhcp.mac_not_allowed"
    r, policy = answer(cfg, request(mac=b"\x52\x54\x00\x00\x00\x02"), pxe.PXE_PORT)
    assert r is None


def test_message_types():
    cfg = config()
    for t in (dhcp.DECLINE, dhcp.RELEASE, dhcp.INFORM, dhcp.OFFER, dhcp.ACK):
        r, policy = answer(cfg, request(msg=t))
        assert r is None and policy.why == "dhcp.other_type"
    r, policy = answer(cfg, request(msg=dhcp.DISCOVER), pxe.PXE_PORT)
    assert r is None and policy.why == "dhcp.other_type"


def test_request_on_67_is_acked_only_when_it_names_us():
    cfg = config()
    r, _ = answer(cfg, request(msg=dhcp.REQUEST, extra=opt(54, SERVER)))
    assert r.kind == "ack" and r.to_ip == b"\xff\xff\xff\xff"
    for extra in (b"", opt(54, bytes([10, 77, 0, 254])), opt(50, bytes([10, 77, 0, 50]))):
        r, policy = answer(cfg, request(msg=dhcp.REQUEST, extra=extra))
        assert r is None and policy.why == "dhcp.not_for_us"


def test_boot_server_port_acks_back_to_the_sender():
    ci = bytes([10, 77, 0, 50])
    r, policy = answer(config(), request(msg=dhcp.REQUEST, flags=0, ciaddr=ci), pxe.PXE_PORT)
    assert r.kind == "ack" and r.to_ip is None
    q = built(policy, request(msg=dhcp.REQUEST, flags=0, ciaddr=ci), r)
    assert q.msg_type == dhcp.ACK and q.ciaddr == ci and file_name(q) == b"ipxe.efi"


@pytest.mark.parametrize(
    "flags,ciaddr,giaddr,to,port",
    [
        (0x8000, bytes(4), bytes(4), b"\xff" * 4, 68),
        (0, bytes(4), bytes(4), b"\xff" * 4, 68),
        # RFC 2131 4.1: ciaddr set, unicast there whatever the flag (it was a broadcast)
        (0x8000, bytes([10, 77, 0, 50]), bytes(4), bytes([10, 77, 0, 50]), 68),
        (0, bytes([10, 77, 0, 50]), bytes(4), bytes([10, 77, 0, 50]), 68),
        (0, bytes(4), bytes([10, 1, 0, 1]), bytes([10, 1, 0, 1]), 67),
    ],
)
def test_where_replies_go(flags, ciaddr, giaddr, to, port):
    req = request(flags=flags, ciaddr=ciaddr, giaddr=giaddr)
    r, policy = answer(config(), req)
    assert (r.to_ip, r.to_port) == (to, port)
    # with the broadcast bit, whatever the client asked: a relay sends a reply without it to
    # yiaddr, which a proxy reply leaves 0.0.0.0 (a Pi's bootloader asks without the bit)
    assert built(policy, req, r).flags == 0x8000


def rpi_request(mac=b"\xdc\xa6\x32\x1a\x2b\x3c", guid=RPI_GUID, arch=0):
    extra = opt(97, guid) if guid else b""
    return request(mac=mac, arch=arch, vendor=b"PXEClient:Arch:00000:UNDI:002001", extra=extra)


def test_rpi_by_guid_gets_the_menu_never_an_x86_binary():
    cfg = config(rpi={"next_server": "10.77.0.2"})
    pkt = rpi_request(mac=b"\x52\x54\x00\x99\x99\x99")
    r, policy = answer(cfg, pkt)
    assert r.rpi and r.boot.file == b"" and r.boot.siaddr == bytes([10, 77, 0, 2])
    q = built(policy, pkt, r)
    assert b"Raspberry Pi Boot" in find_suboption(q.vendor_opts, 9)
    assert find_suboption(q.vendor_opts, 6) == b"\x03"
    assert q.tftp_server == b"10.77.0.2" and q.guid == RPI_GUID and file_name(q) == b""


@pytest.mark.parametrize("oui", ["b827eb", "dca632", "e45f01", "28cdc1", "d83add", "2ccf67"])
def test_rpi_by_mac_prefix(oui):
    r, _ = answer(config(), rpi_request(mac=bytes.fromhex(oui + "010203"), guid=GUID))
    assert r.rpi and r.boot.siaddr == SERVER


@pytest.mark.parametrize("prefix", ["27ebdc", "eb2ccf", "5254ff", "2ccf68"])
def test_no_rpi_by_a_prefix_that_is_not_a_pi_oui(prefix):
    # the firmware keeps the OUIs back to back in one bytes object: three bytes that straddle
    # two of them (b8:27:eb dc:a6:32 -> 27:eb:dc) are no Pi's
    r, policy = answer(config(), rpi_request(mac=bytes.fromhex(prefix + "010203"), guid=None))
    assert not (r and r.rpi)


def test_rpi5_fourcc():
    r, _ = answer(
        config(), rpi_request(mac=b"\x52\x54\x00\x01\x02\x03", guid=b"\0RPi5" + bytes(12))
    )
    assert r.rpi


def test_rpi_menu_text_is_configurable():
    r, _ = answer(config(rpi={"menu": "Raspberry Pi Boot   "}), rpi_request())
    assert b"\x14Raspberry Pi Boot   " in r.boot.opts


def test_rpi_with_uefi_firmware_is_an_arm64_client():
    r, _ = answer(config(), rpi_request(arch=11))
    assert not r.rpi and r.boot.file == b"snp-arm64.efi"


def test_rpi_boot_off_means_no_answer_not_a_bios_binary():
    r, policy = answer(config(rpi={"boot": False}), rpi_request())
    assert r is None and policy.why == "dhcp.rpi_disabled"


def test_max_reply_covers_every_answer():
    policy = pxe.Policy(config(script_url="http://x/" + "y" * 240))
    for b in policy.boots():
        assert 240 + 3 + len(b.opts) + 19 + 1 <= policy.max_reply


@st.composite
def any_request(draw):
    mac = draw(
        st.one_of(
            st.binary(min_size=6, max_size=6),
            st.sampled_from(["b827eb", "dca632", "d83add"]).map(
                lambda o: bytes.fromhex(o + "000001")
            ),
        )
    )
    arch = draw(st.one_of(st.none(), st.integers(0, 20), st.integers(0, 0xFFFF)))
    vendor = draw(
        st.one_of(
            st.just(b"PXEClient"),
            st.integers(0, 99999).map(lambda a: b"PXEClient:Arch:%05d:UNDI:003000" % a),
            st.binary(max_size=40),
        )
    )
    msg = draw(st.integers(1, 8))
    extra = b""
    if draw(st.booleans()):
        extra += opt(77, draw(st.sampled_from([b"iPXE", b"\x04iPXE", b"gPXE", b""])))
    if draw(st.booleans()):
        extra += opt(97, b"\0" + draw(st.sampled_from([b"RPi4", b"RPi5", b"ABCD"])) + bytes(12))
    if draw(st.booleans()):
        extra += opt(175, b"\x13\x01\x01")
    if draw(st.booleans()):
        extra += opt(54, draw(st.sampled_from([SERVER, bytes(4)])))
    flags = draw(st.sampled_from([0, 0x8000]))
    ciaddr = draw(st.sampled_from([bytes(4), bytes([10, 77, 0, 50])]))
    return request(
        mac=mac, arch=arch, vendor=vendor, msg=msg, extra=extra, flags=flags, ciaddr=ciaddr
    )


@settings(max_examples=400)
@given(any_request(), st.sampled_from([pxe.DHCP_PORT, pxe.PXE_PORT]), st.booleans())
def test_any_request_gets_a_safe_answer_or_a_counted_none(pkt, port, allow):
    cfg = config(allowed_macs=["52:54:00:00:00:01"] if allow else None)
    policy = pxe.Policy(cfg)
    r = policy.answer(pkt, port)
    if r is None:
        assert policy.why in KNOWN_WHY
        return
    assert pkt.vendor_class.startswith(b"PXEClient")
    assert not allow or pkt.mac == b"\x52\x54\x00\x00\x00\x01"
    q = built(policy, pkt, r)
    assert yiaddr(q) == bytes(4) and q.server_id == SERVER and q.vendor_class == b"PXEClient"
    assert q.guid == pkt.guid
    if pxe.is_rpi_bootloader(pkt, pxe.client_arch(pkt)) and not r.ipxe:
        assert file_name(q).decode() not in X86_FILES
    if r.ipxe:
        assert file_name(q) == URL.encode()
