# firmware.dhcp and firmware.pxe on captured and crafted DHCP vectors, under CPython and
# MicroPython: every vector whole, truncated byte by byte, and with trailing bytes; the policy's
# answer to each real client; replies built and parsed back.
from dhcpread import chaddr, file_name, find_suboption, siaddr, xid, yiaddr
from mpytest import raises

from firmware import dhcp, pxe
from firmware.config import Config

_DATA = __file__.rsplit("/", 2)[0] + "/data/dhcp/"
_SERVER = b"\x0a\x4d\x00\x01"  # 10.77.0.1, the server of the dnsmasq vectors
_URL = "http://10.77.0.1:8080/boot.ipxe"


def _vector(name):
    with open(_DATA + name, "rb") as f:
        return f.read()


def _cfg(**kw):
    d = {
        "server_ip": "10.77.0.1",
        "script_url": _URL,
        "boot_files": {"0": "undionly.kpxe", "7": "ipxe.efi", "9": "ipxe.efi", "11": "snp.efi"},
    }
    for k in kw:
        d[k] = kw[k]
    return Config(d)


def _request(mac, opts, msg=1, flags=0x8000, ciaddr=b"\0\0\0\0", op=1, htype=1, hlen=6, tail=b""):
    """A DHCP request: header, cookie, option 53 (unless msg is None), raw option bytes, END."""
    p = bytearray(240)
    p[0] = op
    p[1] = htype
    p[2] = hlen
    p[4:8] = b"\x12\x34\x56\x78"
    p[10] = flags >> 8
    p[12:16] = ciaddr
    p[28 : 28 + len(mac)] = mac
    p[236:240] = b"\x63\x82\x53\x63"
    if msg is not None:
        p += bytes((53, 1, msg))
    p += opts + b"\xff" + tail
    return bytes(p)


def _opt(code, value):
    return bytes((code, len(value))) + value


def _end_of_options(raw):
    """Index just past the END option of the main options field."""
    i = 240
    while raw[i] != 255:
        i += 1 if raw[i] == 0 else 2 + raw[i + 1]
    return i + 1


_REQUESTS = (
    "edk2-x64-discover.bin",
    "edk2-httpboot-discover.bin",
    "ipxe-bios-discover.bin",
    "rpi4-eeprom-discover.bin",
)
_REPLIES = ("dnsmasq-rpi4-offer.bin", "dnsmasq-ipxe-offer.bin", "dnsmasq-edk2-x64-offer.bin")


def test_edk2_discover_parses():
    p = dhcp.parse(_vector("edk2-x64-discover.bin"))
    assert (p.op, p.htype, p.hlen, p.msg_type) == (1, 1, 6, dhcp.DISCOVER)
    assert p.mac == b"\x52\x54\x00\x12\x34\x07"
    assert p.vendor_class == b"PXEClient:Arch:00007:UNDI:003000"
    assert p.arch == 7 and p.flags == 0x8000
    assert p.guid == bytes(17)
    assert p.max_size == 1472
    assert p.user_class is None and p.ipxe_opts is None
    assert 43 in p.params and 97 in p.params


def test_ipxe_discover_parses():
    p = dhcp.parse(_vector("ipxe-bios-discover.bin"))
    assert p.arch == 0 and p.flags == 0
    assert p.user_class == b"iPXE" and dhcp.has_user_class(p.user_class, b"iPXE")
    assert len(p.ipxe_opts) == 48
    assert p.client_id == b"\x01" + p.mac
    assert pxe.is_ipxe(p)


def test_rpi4_discover_parses():
    p = dhcp.parse(_vector("rpi4-eeprom-discover.bin"))
    assert p.guid[1:5] == b"RPi4"
    assert pxe.is_rpi_bootloader(p, pxe.client_arch(p))


def test_rpi4_by_mac_prefix_alone():
    # the Pi's DISCOVER without its GUID: the MAC prefix decides, the whole OUI and only it
    p = dhcp.parse(_vector("rpi4-eeprom-discover.bin"))
    p.guid = None
    for prefix, pi in ((b"\xdc\xa6\x32", True), (b"\x2c\xcf\x67", True), (b"\xb8\x27\xeb", True),
                       (b"\x27\xeb\xdc", False), (b"\x52\x54\x00", False)):  # fmt: skip
        p.mac = prefix + b"\x1a\x2b\x3c"
        assert pxe.is_rpi_bootloader(p, 0) == pi
        assert not pxe.is_rpi_bootloader(p, 11)


def test_every_vector_parses_whole_and_with_trailing_bytes():
    for name in _REQUESTS + _REPLIES:
        raw = _vector(name)
        p = dhcp.parse(raw)
        for tail in (b"\0", b"\0" * 64, b"\xff\x01\x02garbage after END"):
            q = dhcp.parse(raw + tail)
            assert (q.msg_type, q.mac, q.vendor_class, q.arch, q.guid, q.vendor_opts) == (
                p.msg_type,
                p.mac,
                p.vendor_class,
                p.arch,
                p.guid,
                p.vendor_opts,
            ), name
        assert dhcp.parse(bytearray(raw)).vendor_class == p.vendor_class
        assert dhcp.parse(memoryview(raw)).vendor_class == p.vendor_class


def test_every_vector_truncated_byte_by_byte_is_malformed():
    for name in _REQUESTS + _REPLIES:
        raw = _vector(name)
        end = _end_of_options(raw)
        for n in range(end):
            with raises(dhcp.Malformed):
                dhcp.parse(raw[:n])
        # Past END only padding follows: every longer prefix is the same message.
        for n in range(end, len(raw) + 1):
            assert dhcp.parse(raw[:n]).vendor_class == dhcp.parse(raw).vendor_class


def test_dnsmasq_replies_parse():
    rpi = dhcp.parse(_vector("dnsmasq-rpi4-offer.bin"))
    assert (rpi.op, rpi.msg_type, rpi.server_id) == (2, dhcp.OFFER, _SERVER)
    assert rpi.vendor_class == b"PXEClient"
    menu = find_suboption(rpi.vendor_opts, 9)
    assert menu == b"\0\0\x11Raspberry Pi Boot"
    assert find_suboption(rpi.vendor_opts, 6) == b"\x03"
    assert find_suboption(rpi.vendor_opts, 8) is None
    edk2 = dhcp.parse(_vector("dnsmasq-edk2-x64-offer.bin"))
    assert file_name(edk2) == b"ipxe.efi" and siaddr(edk2) == _SERVER
    assert yiaddr(edk2) == bytes(4)
    ipxe = dhcp.parse(_vector("dnsmasq-ipxe-offer.bin"))
    assert file_name(ipxe) == _URL.encode()


def test_malformed_headers():
    good = _request(b"\x52\x54\x00\x00\x00\x01", _opt(60, b"PXEClient"))
    assert dhcp.parse(good).vendor_class == b"PXEClient"
    no_cookie = good[:236] + b"\x63\x82\x53\x64" + good[240:]
    bad_op = b"\x03" + good[1:]
    bad_hlen = good[:2] + b"\x11" + good[3:]
    for raw in (b"", b"\x01", good[:240], no_cookie, bad_op, bad_hlen, good + bytes(1473)):
        with raises(dhcp.Malformed):
            dhcp.parse(raw)
    for junk in (None, 42, "a string of text"):
        with raises(dhcp.Malformed):
            dhcp.parse(junk)


def test_malformed_options():
    mac = b"\x52\x54\x00\x00\x00\x01"
    cases = (
        _opt(60, b"PXEClient")[:-1],  # runs into END: END becomes data, then no END
        b"\x3c",  # option code, then END read as its length, overrunning
        _opt(53, b"\x01\x01"),  # RFC 3396 concatenation makes 53 two bytes long
        _opt(54, b"\x0a\x00\x00"),
        _opt(50, b"\x0a"),
        _opt(57, b"\x05"),
        _opt(93, b"\x00"),
        _opt(93, b""),
        _opt(93, b"\x00\x07\x00"),
        _opt(52, b"\x04"),
        _opt(52, b"\x01\x01"),
    )
    for opts in cases:
        with raises(dhcp.Malformed):
            dhcp.parse(_request(mac, opts))
    with raises(dhcp.Malformed):  # options but no END at all
        dhcp.parse(_request(mac, _opt(60, b"PXEClient"))[:-1])


def test_overload_reads_options_from_file_and_sname():
    mac = b"\x52\x54\x00\x00\x00\x01"
    raw = bytearray(_request(mac, _opt(52, b"\x03") + _opt(60, b"PXE")))
    f = _opt(60, b"Client") + _opt(67, b"boot.efi") + b"\xff"
    raw[108 : 108 + len(f)] = f
    s = _opt(93, b"\x00\x09") + b"\xff"
    raw[44 : 44 + len(s)] = s
    p = dhcp.parse(raw)
    assert p.vendor_class == b"PXEClient"  # RFC 3396: concatenated in order options, file
    assert p.arch == 9 and p.overload == 3
    assert file_name(p) == b"boot.efi"
    # Overloaded fields must be framed and end with END too.
    raw[108 + len(f) - 1] = 0
    with raises(dhcp.Malformed):
        dhcp.parse(raw)


def test_an_overloaded_file_field_holding_only_end_parses():
    raw = bytearray(_request(b"\x52\x54\x00\x00\x00\x01", _opt(52, b"\x01")))
    raw[108] = 255
    p = dhcp.parse(raw)
    assert p.overload == 1 and p.bootfile is None and file_name(p) == b""


def test_odd_guid_is_ignored_not_malformed():
    mac = b"\x52\x54\x00\x00\x00\x01"
    assert dhcp.parse(_request(mac, _opt(97, b"\x01" + bytes(16)))).guid is None
    assert dhcp.parse(_request(mac, _opt(97, bytes(10)))).guid is None
    assert dhcp.parse(_request(mac, _opt(97, bytes(17)))).guid == bytes(17)


def test_user_class_forms():
    assert dhcp.has_user_class(b"iPXE", b"iPXE")
    assert dhcp.has_user_class(b"\x04iPXE", b"iPXE")  # RFC 3004 instance
    assert dhcp.has_user_class(b"\x03abc\x04iPXE", b"iPXE")
    assert not dhcp.has_user_class(b"\x05iPXE", b"iPXE")
    assert not dhcp.has_user_class(b"iPXE2", b"iPXE")
    assert not dhcp.has_user_class(None, b"iPXE")


def _reply(policy, raw, port=pxe.DHCP_PORT):
    p = dhcp.parse(raw)
    r = policy.answer(p, port)
    if r is None:
        return None, None
    buf = bytearray(policy.max_reply)
    b = r.boot
    n = dhcp.build_into(buf, p, r.msg_type, b.siaddr, b.file, b.opts, p.guid)
    return r, dhcp.parse(bytes(buf[:n]))


def test_policy_answers_each_real_client():
    policy = pxe.Policy(_cfg())
    r, q = _reply(policy, _vector("edk2-x64-discover.bin"))
    assert r.kind == "offer" and r.to_ip == b"\xff\xff\xff\xff" and r.to_port == 68
    assert (q.op, q.msg_type, file_name(q), siaddr(q), yiaddr(q)) == (
        2,
        dhcp.OFFER,
        b"ipxe.efi",
        _SERVER,
        bytes(4),
    )
    assert q.server_id == _SERVER and q.vendor_class == b"PXEClient" and q.guid == bytes(17)
    assert find_suboption(q.vendor_opts, 6) == b"\x08"
    r, q = _reply(policy, _vector("ipxe-bios-discover.bin"))
    assert r.ipxe and file_name(q) == _URL.encode()
    r, q = _reply(policy, _vector("edk2-httpboot-discover.bin"))
    assert r is None and policy.why == "dhcp.not_pxe"


def test_policy_answers_a_pi_like_dnsmasq():
    policy = pxe.Policy(_cfg())
    r, q = _reply(policy, _vector("rpi4-eeprom-discover.bin"))
    theirs = dhcp.parse(_vector("dnsmasq-rpi4-offer.bin"))
    assert r.rpi and file_name(q) == b""
    assert q.vendor_opts == theirs.vendor_opts  # byte for byte what the Pi bootloader knows
    assert (q.server_id, q.vendor_class, q.guid) == (
        theirs.server_id,
        theirs.vendor_class,
        theirs.guid,
    )
    assert siaddr(q) == _SERVER and q.tftp_server == b"10.77.0.1"


def test_built_reply_copies_the_request_header():
    policy = pxe.Policy(_cfg())
    raw = _vector("edk2-x64-discover.bin")
    r, q = _reply(policy, raw)
    p = dhcp.parse(raw)
    assert (xid(q), chaddr(q), q.flags, q.giaddr, q.ciaddr) == (
        xid(p),
        chaddr(p),
        p.flags,
        p.giaddr,
        bytes(4),
    )
    assert len(q.raw) == dhcp.MIN_REPLY


def test_ack_echoes_ciaddr_and_4011_goes_back_to_sender():
    policy = pxe.Policy(_cfg())
    ci = b"\x0a\x4d\x00\x32"
    opts = _opt(93, b"\x00\x07") + _opt(60, b"PXEClient:Arch:00007:UNDI:003000")
    raw = _request(b"\x52\x54\x00\x00\x00\x07", opts, msg=dhcp.REQUEST, flags=0, ciaddr=ci)
    r, q = _reply(policy, raw, pxe.PXE_PORT)
    assert r.kind == "ack" and r.to_ip is None
    assert q.msg_type == dhcp.ACK and q.ciaddr == ci and yiaddr(q) == bytes(4)
    assert file_name(q) == b"ipxe.efi"


def test_build_into_refuses_a_small_buffer():
    p = dhcp.parse(_vector("edk2-x64-discover.bin"))
    with raises(ValueError):
        dhcp.build_into(bytearray(299), p, dhcp.OFFER, _SERVER, b"x", b"")
    with raises(ValueError):
        dhcp.build_into(bytearray(576), p, dhcp.OFFER, _SERVER, b"x" * 128, b"")
