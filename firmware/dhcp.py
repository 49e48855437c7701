# DHCP/BOOTP packet codec (RFC 2131 header, RFC 2132 options, RFC 3396 long options,
# RFC 4578 PXE options 93/94/97, iPXE's encapsulated option 175). Pure: bytes in, Packet out;
# reply fields in, bytes written into the caller's preallocated buffer.
#
# The invariant, as for every codec here: parse(mv) returns a Packet or raises Malformed, never
# anything else, whatever the bytes. A Packet keeps a reference to the bytes it was parsed from
# (header fields are read from them on demand), so do not reuse that buffer while the Packet is
# in use. Malformed carries constant messages: a flood of garbage builds no strings.
from firmware.compat import const


class Malformed(ValueError):
    pass


BOOTREQUEST = const(1)
BOOTREPLY = const(2)

# Option 53 message types (RFC 2132 9.6).
DISCOVER = const(1)
OFFER = const(2)
REQUEST = const(3)
DECLINE = const(4)
ACK = const(5)
NAK = const(6)
RELEASE = const(7)
INFORM = const(8)

MAX_LEN = const(1472)  # one Ethernet frame without IP fragmentation: 1500 - 20 IP - 8 UDP
MIN_REPLY = const(300)  # RFC 1542 2.1: BOOTP relays and old clients expect at least 300 bytes

_OPTIONS = const(240)  # options start after the 236-byte header and the magic cookie
_SNAME = const(44)
_FILE = const(108)
_FILE_END = const(236)
_COOKIE = b"\x63\x82\x53\x63"  # RFC 2131 3: 99.130.83.99

_OPT_PAD = const(0)
_OPT_END = const(255)
_OPT_OVERLOAD = const(52)
_OPT_MSG_TYPE = const(53)
_OPT_GUID = const(97)

# Options a Packet keeps (their raw values, concatenated when repeated, RFC 3396); all other
# options are checked for framing and skipped.
_KEEP = {
    43: "vendor_opts",
    50: "requested_ip",
    52: "overload",
    53: "msg_type",
    54: "server_id",
    55: "params",
    57: "max_size",
    60: "vendor_class",
    61: "client_id",
    66: "tftp_server",
    67: "bootfile",
    77: "user_class",
    93: "arch",
    97: "guid",
    175: "ipxe_opts",
}


class Packet:
    """One parsed DHCP/BOOTP message.

    Header: op, htype, hlen, flags, ciaddr, giaddr, mac (chaddr[:hlen]) as attributes; the rest
    (xid, chaddr, ...) is read from `raw` by whoever needs it. What only tests read from a reply
    (yiaddr, siaddr, the boot file, sub-options) is in tests/firmware/mpy/dhcpread.py, off the
    device's heap.
    Options (None when absent): msg_type int (0 for plain BOOTP), server_id 4 bytes,
    requested_ip 4 bytes, params bytes (55), max_size int (57), vendor_class bytes (60),
    client_id bytes (61), tftp_server bytes (66), bootfile bytes (67), user_class bytes (77),
    arch int (93: the first architecture listed), guid 17 bytes (97, type 0 + UUID; a value of
    another length or type is ignored, as a client quirk rather than a broken packet),
    vendor_opts bytes (43), ipxe_opts bytes (175), overload int (52).
    """

    # Absent options read as these class attributes: an instance holds only what was sent.
    vendor_opts = requested_ip = overload = msg_type = server_id = params = max_size = None
    vendor_class = client_id = tftp_server = bootfile = user_class = arch = guid = None
    ipxe_opts = None

    def __init__(self, raw):
        self.raw = raw


def _scan(mv, i, end, pkt, main):
    """Read options from mv[i:end] into pkt; they must be framed and closed by END."""
    while i < end:
        code = mv[i]
        if code == _OPT_PAD:
            i += 1
            continue
        if code == _OPT_END:
            return
        if i + 1 >= end:
            raise Malformed("option without length")
        n = mv[i + 1]
        j = i + 2 + n
        if j > end:
            raise Malformed("option overruns its field")
        name = _KEEP.get(code)
        if name is not None and (main or code != _OPT_OVERLOAD):
            v = bytes(mv[i + 2 : j])
            old = getattr(pkt, name)
            setattr(pkt, name, v if old is None else old + v)
        i = j
    raise Malformed("no end option")


def _uint(v, n, what):
    if v is None:
        return None
    if len(v) != n:
        raise Malformed(what)
    return int.from_bytes(v, "big")


def parse(mv):
    """Parse one DHCP message (bytes, bytearray or memoryview) into a Packet; or raise Malformed."""
    try:
        n = len(mv)
    except TypeError:
        raise Malformed("not a buffer")
    if n < _OPTIONS + 1:
        raise Malformed("truncated")
    if n > MAX_LEN:
        raise Malformed("overlong")
    if not isinstance(mv, memoryview):
        try:
            mv = memoryview(mv)
        except TypeError:
            raise Malformed("not a buffer")
    if bytes(mv[_FILE_END:_OPTIONS]) != _COOKIE:
        raise Malformed("no DHCP magic cookie")
    op = mv[0]
    if op != BOOTREQUEST and op != BOOTREPLY:
        raise Malformed("bad op")
    hlen = mv[2]
    if hlen > 16:
        raise Malformed("bad hlen")
    p = Packet(mv)
    p.op = op
    p.htype = mv[1]
    p.hlen = hlen
    p.flags = (mv[10] << 8) | mv[11]
    p.ciaddr = bytes(mv[12:16])
    p.giaddr = bytes(mv[24:28])
    p.mac = bytes(mv[28 : 28 + hlen])

    _scan(mv, _OPTIONS, n, p, True)
    ov = _uint(p.overload, 1, "bad option 52 length")
    if ov is not None:
        if not 1 <= ov <= 3:
            raise Malformed("bad option 52 value")
        # RFC 2131 4.1: the file field is read before sname.
        if ov & 1:
            _scan(mv, _FILE, _FILE_END, p, False)
        if ov & 2:
            _scan(mv, _SNAME, _FILE, p, False)
    p.overload = ov

    t = _uint(p.msg_type, 1, "bad option 53 length")
    p.msg_type = 0 if t is None else t
    if p.server_id is not None and len(p.server_id) != 4:
        raise Malformed("bad option 54 length")
    if p.requested_ip is not None and len(p.requested_ip) != 4:
        raise Malformed("bad option 50 length")
    p.max_size = _uint(p.max_size, 2, "bad option 57 length")
    a = p.arch
    if a is not None:
        if not a or len(a) & 1:
            raise Malformed("bad option 93 length")
        p.arch = (a[0] << 8) | a[1]
    g = p.guid
    if g is not None and (len(g) != 17 or g[0] != 0):
        p.guid = None
    return p


def has_user_class(value, name):
    """True when user class option bytes `value` carry `name`: either the whole value (iPXE and
    most firmware send the plain string) or one RFC 3004 length-prefixed instance of it."""
    if value is None:
        return False
    if value == name:
        return True
    i = 0
    n = len(value)
    while i < n:
        k = value[i]
        if k == 0 or i + 1 + k > n:
            return False
        if value[i + 1 : i + 1 + k] == name:
            return True
        i += 1 + k
    return False


def option(code, value):
    """One option (or sub-option) encoded as code, length, value. For config-time use."""
    if isinstance(value, str):
        value = value.encode()
    if len(value) > 255:
        raise ValueError("option %d: %d bytes is over 255" % (code, len(value)))
    return bytes((code, len(value))) + value


def build_into(buf, req, msg_type, siaddr, file, opts, guid=None):
    """Write a BOOTREPLY to `req` into bytearray `buf`; returns its length.

    msg_type   OFFER, ACK, ...: option 53, written first
    siaddr     4 bytes: next server
    file       bytes for the header's file field (at most 127; b"" for none)
    opts       pre-encoded options (bytes), written after option 53
    guid       17 bytes to echo as option 97, or None
    yiaddr is always 0.0.0.0 (this codec serves a proxy); ciaddr is echoed in an ACK
    (RFC 2131 table 3). The reply is padded to MIN_REPLY bytes. Raises ValueError when buf is
    too small: the caller sizes its buffer for the longest reply its config can produce.
    """
    end = _OPTIONS + 3 + len(opts) + (19 if guid is not None else 0) + 1
    n = end if end > MIN_REPLY else MIN_REPLY
    if n > len(buf) or len(file) > 127:
        raise ValueError("reply does not fit")
    mv = memoryview(buf)
    r = req.raw
    # Zero the first MIN_REPLY bytes by doubling a zeroed run in place: a 300-byte constant of
    # zeros would be held on the heap for good, and this costs nine copies per reply.
    buf[0] = 0
    k = 1
    while k < MIN_REPLY:
        m = k if k + k <= MIN_REPLY else MIN_REPLY - k
        mv[k : k + m] = mv[0:m]
        k += m
    buf[0] = BOOTREPLY
    buf[1] = req.htype
    buf[2] = req.hlen
    mv[4:8] = r[4:8]  # xid
    # flags: broadcast, whatever the client asked. A proxy reply has no yiaddr, and a relay
    # sends a reply without the bit to yiaddr (ISC's dhcrelay; a Pi's bootloader asks without
    # it): 0.0.0.0. Sent here, broadcast or to ciaddr, a reply goes where it goes regardless.
    buf[10] = r[10] | 0x80
    buf[11] = r[11]
    if msg_type == ACK:
        mv[12:16] = r[12:16]
    mv[20:24] = siaddr
    mv[24:28] = r[24:28]  # giaddr
    mv[28:44] = r[28:44]  # chaddr
    mv[_FILE : _FILE + len(file)] = file
    mv[_FILE_END:_OPTIONS] = _COOKIE
    i = _OPTIONS
    buf[i] = _OPT_MSG_TYPE
    buf[i + 1] = 1
    buf[i + 2] = msg_type
    i += 3
    mv[i : i + len(opts)] = opts
    i += len(opts)
    if guid is not None:
        buf[i] = _OPT_GUID
        buf[i + 1] = 17
        mv[i + 2 : i + 19] = guid
        i += 19
    buf[i] = _OPT_END
    return n
