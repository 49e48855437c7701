"""firmware.dhcp under hypothesis (CPython only): parse or raise Malformed, never anything else.

The vector tests that also run under MicroPython are in mpy/test_dhcp_vectors.py.
"""

from pathlib import Path

import pytest
from dhcpread import chaddr, file_name, siaddr, xid, yiaddr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware import dhcp

DATA = Path(__file__).resolve().parent / "data" / "dhcp"
VECTORS = sorted(p.name for p in DATA.glob("*.bin"))
COOKIE = b"\x63\x82\x53\x63"

# Options whose length the codec checks; everything else is free-form.
FIXED = {50: {4}, 52: {1}, 53: {1}, 54: {4}, 57: {2}}


def header(op=1, hlen=6, flags=0, body=bytes(236 - 12)):
    return (
        bytes((op, 1, hlen, 0))
        + b"\x12\x34\x56\x78"
        + b"\x00\x00"
        + flags.to_bytes(2, "big")
        + body
    )


@st.composite
def headers(draw):
    op = draw(st.sampled_from((1, 2)))
    hlen = draw(st.integers(0, 16))
    body = bytearray(draw(st.binary(min_size=224, max_size=224)))
    return (
        bytes((op, draw(st.integers(0, 255)), hlen, 0))
        + draw(st.binary(min_size=8, max_size=8))
        + bytes(body)
    )


def free_options():
    """Options that always parse: free-form codes, or fixed ones with their right length."""
    free = st.tuples(
        st.integers(1, 254).filter(lambda c: c not in FIXED and c not in (93, 97)),
        st.binary(max_size=40),
    )
    fixed = st.sampled_from(sorted(FIXED)).flatmap(
        lambda c: st.tuples(st.just(c), st.binary(min_size=min(FIXED[c]), max_size=min(FIXED[c])))
    )
    arch = st.tuples(st.just(93), st.binary(min_size=2, max_size=2))
    return st.lists(st.one_of(free, fixed, arch), max_size=12, unique_by=lambda o: o[0]).map(
        lambda opts: [(c, v) for c, v in opts if not (c == 52 and not 1 <= v[0] <= 3)]
    )


def encode(opts):
    return b"".join(bytes((c, len(v))) + v for c, v in opts)


@st.composite
def good_packets(draw):
    """(raw, index just past END): a well-formed message with trailing padding."""
    opts = [(c, v) for c, v in draw(free_options()) if c != 52]  # no overload: fields are junk
    body = draw(headers()) + COOKIE + encode(opts) + b"\xff"
    end = len(body)
    return body + bytes(draw(st.integers(0, 60))), end


@settings(max_examples=500)
@given(st.binary(max_size=1600))
def test_garbage_is_a_packet_or_malformed(raw):
    try:
        p = dhcp.parse(raw)
    except dhcp.Malformed:
        return
    assert isinstance(p, dhcp.Packet)


@settings(max_examples=300)
@given(headers(), st.binary(max_size=600))
def test_garbage_options_after_a_cookie_are_a_packet_or_malformed(hdr, opts):
    try:
        p = dhcp.parse(hdr + COOKIE + opts)
    except dhcp.Malformed:
        return
    assert p.arch is None or 0 <= p.arch <= 0xFFFF


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(good_packets())
def test_truncated_at_every_length_is_malformed(pkt):
    raw, end = pkt
    whole = dhcp.parse(raw)
    for n in range(end):
        with pytest.raises(dhcp.Malformed):
            dhcp.parse(raw[:n])
    for n in range(end, len(raw) + 1):
        assert dhcp.parse(raw[:n]).vendor_class == whole.vendor_class


@settings(max_examples=200)
@given(good_packets(), st.integers(dhcp.MAX_LEN + 1, 4000))
def test_oversized_is_malformed(pkt, size):
    raw, _ = pkt
    with pytest.raises(dhcp.Malformed):
        dhcp.parse(raw + bytes(size - len(raw)))


@settings(max_examples=300)
@given(
    st.sampled_from(VECTORS),
    st.lists(st.tuples(st.integers(0, 1999), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(-40, 40),
)
def test_mutated_vectors_are_a_packet_or_malformed(name, flips, resize):
    raw = bytearray((DATA / name).read_bytes())
    for pos, val in flips:
        raw[pos % len(raw)] = val
    raw = raw[: len(raw) + resize] if resize < 0 else raw + bytes(resize)
    try:
        dhcp.parse(bytes(raw))
    except dhcp.Malformed:
        pass


@given(st.binary(min_size=1, max_size=600), st.lists(st.integers(1, 255), max_size=5))
def test_split_options_are_concatenated(value, cuts):
    """RFC 3396: an option sent in several pieces is one value."""
    points = sorted({c % len(value) for c in cuts} | {0, len(value)})
    pieces = [value[a:b] for a, b in zip(points, points[1:])]
    pieces = [p for p in pieces if p] or [b""]
    chunks = []
    for p in pieces:  # an over-255 piece is split again
        chunks += [p[i : i + 255] for i in range(0, max(len(p), 1), 255)]
    raw = header() + COOKIE + encode([(60, c) for c in chunks]) + b"\xff"
    if len(raw) > dhcp.MAX_LEN:
        with pytest.raises(dhcp.Malformed):
            dhcp.parse(raw)
    else:
        assert dhcp.parse(raw).vendor_class == value


@st.composite
def requests(draw):
    hdr = bytearray(draw(headers()))
    hdr[0] = 1
    opts = [(c, v) for c, v in draw(free_options()) if c not in (52, 53, 97)]
    guid = draw(st.one_of(st.none(), st.binary(min_size=16, max_size=16)))
    if guid is not None:
        opts.append((97, b"\0" + guid))
    return bytes(hdr) + COOKIE + encode([(53, b"\x01")] + opts) + b"\xff"


@settings(max_examples=300)
@given(
    requests(),
    st.sampled_from((dhcp.OFFER, dhcp.ACK)),
    st.binary(min_size=4, max_size=4),
    st.binary(max_size=127).map(lambda b: b.replace(b"\0", b"x")),
    st.lists(st.tuples(st.integers(1, 254), st.binary(max_size=60)), max_size=4),
)
def test_built_replies_parse_back(raw, msg, next_server, file, extra):
    req = dhcp.parse(raw)
    extra = [(c, v) for c, v in extra if c not in (52, 53, 54, 67, 93, 97) and c not in FIXED]
    opts = dhcp.option(54, b"\x0a\x00\x00\x01") + encode(extra)
    buf = bytearray(1024)
    n = dhcp.build_into(buf, req, msg, next_server, file, opts, req.guid)
    assert n >= dhcp.MIN_REPLY
    rep = dhcp.parse(bytes(buf[:n]))
    assert (rep.op, rep.msg_type, xid(rep), chaddr(rep), rep.flags) == (
        2,
        msg,
        xid(req),
        chaddr(req),
        req.flags | 0x8000,  # broadcast: a relay delivers a reply without yiaddr only so
    )
    assert yiaddr(rep) == bytes(4) and siaddr(rep) == next_server and rep.giaddr == req.giaddr
    assert rep.ciaddr == (req.ciaddr if msg == dhcp.ACK else bytes(4))
    assert file_name(rep) == file and rep.guid == req.guid
    assert rep.server_id == b"\x0a\x00\x00\x01"
    # The buffer is reused: a second, shorter reply leaves nothing of the first behind.
    n2 = dhcp.build_into(buf, req, msg, next_server, b"", b"", None)
    again = dhcp.parse(bytes(buf[:n2]))
    assert again.server_id is None and file_name(again) == b"" and again.guid is None


def test_option_refuses_over_255_bytes():
    assert dhcp.option(67, "a.efi") == b"\x43\x05a.efi"
    with pytest.raises(ValueError):
        dhcp.option(67, b"x" * 256)
