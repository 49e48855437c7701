# firmware.tftp: codec vectors and the transfer state machine, under CPython and MicroPython.
# Transfers are driven without sockets: a simulated client (and, for the lossy tests, a
# deterministic link that drops, duplicates and reorders) talks to a Transfer directly.
import io

from mpytest import micropython_only, raises

from firmware import tftp
from firmware.tftp import Malformed, Refused


class Cfg:  # the fields tftp.check reads
    tftp_root = "tftp"
    tftp_max_blksize = 1468
    tftp_max_window = 4


def rrq(name, *opts, mode=b"octet", op=1):
    b = bytes((0, op)) + name + b"\0" + mode + b"\0"
    for o in opts:
        b += o + b"\0"
    return b


def ack(k):
    return bytes((0, 4, (k >> 8) & 0xFF, k & 0xFF))


def checked(*opts, name=b"f"):
    return tftp.check(tftp.parse_request(rrq(name, *opts)), Cfg)


def code_of(data):
    try:
        tftp.check(tftp.parse_request(data), Cfg)
    except Refused as e:
        return e.code
    return None


def pattern(n, seed=0):
    return bytes(((i * 7 + (i >> 8) + seed) & 0xFF) for i in range(n))


def new_transfer(timeout_ms=100, retries=5):
    return tftp.Transfer(bytearray(4 + Cfg.tftp_max_blksize), timeout_ms, retries)


def drain(t, n):
    """The packets a call asked to send: its result, then more() until 0."""
    out = []
    while n:
        out.append(bytes(t.buf[:n]))
        n = t.more()
    return out


# ---- parsing -----------------------------------------------------------------------------


def test_parse_plain_rrq():
    r = tftp.parse_request(rrq(b"ipxe.efi"))
    assert (r.op, r.name, r.mode, r.options) == (tftp.RRQ, b"ipxe.efi", b"octet", [])


def test_parse_options_in_order_names_and_mode_lowercased():
    r = tftp.parse_request(rrq(b"a", b"TSize", b"0", b"BLKSIZE", b"1468", mode=b"OcTeT"))
    assert r.mode == b"octet"
    assert r.options == [(b"tsize", b"0"), (b"blksize", b"1468")]


def test_parse_accepts_nul_padding_after_the_last_field():
    r = tftp.parse_request(rrq(b"a", b"tsize", b"0") + b"\0\0\0")
    assert r.options == [(b"tsize", b"0")]


def test_parse_wrq():
    assert tftp.parse_request(rrq(b"up", op=2)).op == tftp.WRQ


def test_every_truncation_parses_at_field_ends_or_is_malformed():
    whole = rrq(b"file", b"blksize", b"1468", b"tsize", b"0")
    ends = [i + 1 for i in range(2, len(whole)) if whole[i] == 0]
    fields_ok = ends[1::2]  # after the mode, and after each option's value
    for n in range(len(whole) + 1):
        if n in fields_ok:
            r = tftp.parse_request(whole[:n])
            assert len(r.options) == fields_ok.index(n)
        else:
            with raises(Malformed):
                tftp.parse_request(whole[:n])


def test_non_requests_are_malformed():
    for data in (b"", b"\x00", b"\x00\x01", ack(1), b"\x00\x03\x00\x01data",
                 b"\x00\x05\x00\x01oops\x00", b"\x00\x06blksize\x00512\x00",
                 b"\x00\x00a\x00octet\x00", b"\x00\x07a\x00octet\x00", b"\x01\x01a\x00octet\x00"):
        with raises(Malformed):
            tftp.parse_request(data)


def test_option_name_without_value_is_malformed():
    with raises(Malformed):
        tftp.parse_request(rrq(b"a", b"tsize"))
    with raises(Malformed):
        tftp.parse_request(rrq(b"a") + b"tsize\x000")


# ---- policy ------------------------------------------------------------------------------


def test_writes_are_refused_as_access_violation():
    assert code_of(rrq(b"x", op=2)) == tftp.E_ACCESS


def test_only_octet_mode():
    assert code_of(rrq(b"x", mode=b"netascii")) == tftp.E_UNDEFINED
    assert code_of(rrq(b"x", mode=b"mail")) == tftp.E_UNDEFINED
    assert code_of(rrq(b"x", mode=b"")) == tftp.E_UNDEFINED
    assert code_of(rrq(b"x", mode=b"OCTET")) is None


def test_names_escaping_the_root_are_access_violations():
    for name in (b"../x", b"..", b"a/../../x", b"a/..", b"/etc/passwd", b"/x", b"a\\..\\b",
                 b"a\\b", b"", b"a\x01b", b"a\x7fb", b"caf\xc3\xa9", b"a\tb"):
        assert code_of(rrq(name)) == tftp.E_ACCESS, name


def test_dots_that_are_not_a_parent_component_are_names():
    for name in (b"a..b", b"..a", b"a/..b", b"b../c", b"...", b"a/.../b"):
        assert code_of(rrq(name)) is None, name
    for name in (b"a/../b", b"x/..", b"../..", b"a//../b"):
        assert code_of(rrq(name)) == tftp.E_ACCESS, name


def test_a_nul_ends_the_name():
    # "ok\0../../x" is the name "ok" and the mode "../../x": refused for its mode, or
    # malformed when what follows is not an option pair. Never a path outside the root.
    assert code_of(b"\x00\x01ok\x00../../x\x00") == tftp.E_UNDEFINED
    with raises(Malformed):
        tftp.parse_request(b"\x00\x01ok\x00../../x\x00octet\x00")


def test_nested_and_dotted_names_resolve_under_the_root():
    assert checked(name=b"ab/cd/ipxe.efi").path == "tftp/ab/cd/ipxe.efi"
    assert checked(name=b"..hidden").path == "tftp/..hidden"
    assert checked(name=b"./a").path == "tftp/./a"
    assert checked(name=b"a b").path == "tftp/a b"


def test_blksize_is_clamped_to_the_device_bound():
    r = checked(b"blksize", b"65464")
    assert r.blksize == 1468 and r.oack
    assert checked(b"blksize", b"8").blksize == 8
    assert checked(b"blksize", b"1024").blksize == 1024
    assert checked().blksize == 512 and not checked().oack


def test_option_values_outside_their_rfc_ranges_are_refused_with_error_8():
    for key, value in ((b"blksize", b"7"), (b"blksize", b"65465"), (b"blksize", b"abc"),
                       (b"blksize", b""), (b"blksize", b"+512"), (b"blksize", b"1_000"),
                       (b"timeout", b"0"), (b"timeout", b"256"), (b"windowsize", b"0"),
                       (b"windowsize", b"65536"), (b"tsize", b"x"),
                       (b"blksize", b"99999999999")):
        assert code_of(rrq(b"f", key, value)) == tftp.E_OPTION, (key, value)


def test_windowsize_clamped_timeout_echoed_unknown_options_ignored():
    r = checked(b"windowsize", b"64", b"timeout", b"3")
    assert (r.window, r.timeout) == (4, 3)
    r = checked(b"multicast", b"", b"x-foo", b"bar")
    assert not r.oack and r.window == 1


def test_error_packet_vector():
    buf = bytearray(32)
    n = tftp.build_error(buf, tftp.E_NOT_FOUND, tftp.MSG_NOT_FOUND)
    assert bytes(buf[:n]) == b"\x00\x05\x00\x01file not found\x00"
    n = tftp.build_error(bytearray(10), 0, b"a long message")
    assert n == 10


# ---- transfers ---------------------------------------------------------------------------


def test_without_options_data_1_goes_first():
    t = new_transfer()
    pkts = drain(t, t.start(checked(), io.BytesIO(b"hello"), 5, 0))
    assert pkts == [b"\x00\x03\x00\x01hello"]
    assert drain(t, t.on_packet(ack(1), 4, 1)) == []
    assert t.done and t.result == "ok" and t.bytes_acked() == 5


def test_oack_vector_then_data_on_ack_0():
    t = new_transfer()
    req = checked(b"tsize", b"0", b"blksize", b"1468", b"timeout", b"2", b"windowsize", b"8")
    pkts = drain(t, t.start(req, io.BytesIO(b"x" * 3000), 3000, 0))
    assert pkts == [
        b"\x00\x06blksize\x001468\x00tsize\x003000\x00timeout\x002\x00windowsize\x004\x00"
    ]
    pkts = drain(t, t.on_packet(ack(0), 4, 1))
    assert [p[:4] for p in pkts] == [b"\x00\x03\x00\x01", b"\x00\x03\x00\x02", b"\x00\x03\x00\x03"]
    assert [len(p) for p in pkts] == [1472, 1472, 4 + 3000 - 2 * 1468]


def lockstep(data, *opts):
    """A loss-free client: acks each window; returns (bytes received, blocks seen)."""
    t = new_transfer()
    req = checked(*opts)
    pkts = drain(t, t.start(req, io.BytesIO(data), len(data), 0))
    got = bytearray()
    blocks = 0
    for _ in range(100000):
        last_num = None
        for p in pkts:
            if p[1] == tftp.OACK:
                last_num = 0
                continue
            assert p[1] == tftp.DATA
            got += p[4:]
            blocks += 1
            last_num = (p[2] << 8) | p[3]
        pkts = drain(t, t.on_packet(ack(last_num), 4, 1))
        if t.done:
            break
    assert t.result == "ok" and pkts == []
    return bytes(got), blocks


def test_awkward_sizes_arrive_whole():
    for bs in (512, 1468):
        opts = () if bs == 512 else (b"blksize", b"1468", b"tsize", b"0")
        for size in (0, 1, bs - 1, bs, bs + 1, 2 * bs, 3 * bs + 7):
            data = pattern(size)
            got, blocks = lockstep(data, *opts)
            assert got == data, (bs, size)
            assert blocks == size // bs + 1  # a multiple of blksize ends with an empty block


def test_windows_deliver_the_same_bytes():
    data = pattern(10 * 512 + 3)
    for w in (b"1", b"2", b"4", b"9"):
        assert lockstep(data, b"windowsize", w)[0] == data


def test_duplicate_ack_sends_nothing():
    t = new_transfer()
    t.start(checked(), io.BytesIO(pattern(2000)), 2000, 0)
    assert len(drain(t, t.on_packet(ack(1), 4, 1))) == 1  # DATA 2
    for _ in range(5):
        assert t.on_packet(ack(1), 4, 2) == 0  # the Sorcerer's Apprentice fix
        assert t.on_packet(ack(0), 4, 2) == 0
    assert t.dup_acks == 10 and t.resends == 0


def test_stale_and_future_acks_are_ignored():
    t = new_transfer()
    t.start(checked(b"windowsize", b"4"), io.BytesIO(pattern(20 * 512)), 20 * 512, 0)
    assert len(drain(t, t.on_packet(ack(0), 4, 1))) == 4  # blocks 1..4
    assert t.on_packet(ack(5), 4, 1) == 0  # never sent
    assert t.on_packet(ack(60000), 4, 1) == 0
    pkts = drain(t, t.on_packet(ack(2), 4, 1))  # a gap after 2: the window restarts at 3
    assert [p[3] for p in pkts] == [3, 4, 5, 6]
    assert t.on_packet(ack(1), 4, 1) == 0  # stale now
    assert t.on_packet(ack(2), 4, 1) == 0
    assert t.acked == 2 and t.dup_acks == 4


def test_timeout_resends_with_backoff_then_gives_up():
    t = new_transfer(timeout_ms=100, retries=3)
    first = drain(t, t.start(checked(), io.BytesIO(pattern(600)), 600, 0))
    assert t.on_timeout(99) == 0  # not yet
    now = 0
    waits = []
    for _ in range(3):
        waits.append(t.deadline - now)
        now = t.deadline
        assert drain(t, t.on_timeout(now)) == first  # the same DATA 1 again
    waits.append(t.deadline - now)
    assert waits == [100, 200, 400, 400]
    assert t.on_timeout(t.deadline) == 0
    assert t.done and t.result == "timeout" and t.resends == 3
    assert t.on_packet(ack(1), 4, now) == 0  # too late: nothing more happens


def test_progress_resets_the_retry_count():
    t = new_transfer(timeout_ms=100, retries=1)
    t.start(checked(), io.BytesIO(pattern(2000)), 2000, 0)
    assert t.on_timeout(100)  # resend 1 of 1
    t.on_packet(ack(1), 4, 150)
    assert t.deadline == 250
    assert t.on_timeout(250)  # DATA 2 resent: the count started over
    assert not t.done


def test_negotiated_timeout_is_used_without_backoff():
    t = new_transfer(timeout_ms=100, retries=5)
    t.start(checked(b"timeout", b"2"), io.BytesIO(b"abc"), 3, 0)
    assert t.deadline == 2000
    assert drain(t, t.on_timeout(2000))[0][1] == tftp.OACK  # the OACK is resent
    assert t.deadline == 4000


def test_a_timeout_above_the_cap_is_not_acknowledged():
    # RFC 2349: a server echoes the timeout as asked or leaves it out of the OACK.
    assert checked(b"timeout", b"%d" % tftp.CLIENT_TIMEOUT_MAX_S).timeout == 5
    r = checked(b"timeout", b"255", b"tsize", b"0")
    assert r.timeout == 0
    t = new_transfer(timeout_ms=1000)
    (oack,) = drain(t, t.start(r, io.BytesIO(b"abc"), 3, 0))
    assert oack == b"\0\x06tsize\x003\x00"  # tsize answered, timeout left out
    t = new_transfer(timeout_ms=1000)
    (data,) = drain(t, t.start(checked(b"timeout", b"6"), io.BytesIO(b"abc"), 3, 0))
    assert data[:4] == b"\0\x03\0\x01"  # no option acknowledged: no OACK at all
    assert t.deadline == 1000  # the device's own timeout


def _silent_client_ends_at(t):
    """Drive timeouts at each deadline until the transfer gives up; when it did (ms)."""
    now = 0
    while not t.done:
        now = t.deadline
        t.on_timeout(now)
    return now


def test_a_silent_client_holds_a_transfer_at_most_max_silence_ms():
    bound = tftp.Transfer.max_silence_ms
    # The device's own schedule when configured long: 1 + 2 + 4 x 18 s, cut at the bound.
    t = new_transfer(timeout_ms=1000, retries=20)
    t.start(checked(), io.BytesIO(pattern(5000)), 5000, 0)
    assert _silent_client_ends_at(t) == bound and t.result == "timeout"
    # A negotiated timeout at the cap, resent without backoff: 5 s x 11 > the bound.
    t = new_transfer(timeout_ms=1000, retries=10)
    t.start(checked(b"timeout", b"5"), io.BytesIO(pattern(5000)), 5000, 0)
    assert _silent_client_ends_at(t) == bound
    # The default schedule ends sooner on its own: 1 + 2 + 4 + 4 + 4 + 4 s.
    t = new_transfer(timeout_ms=1000, retries=5)
    t.start(checked(), io.BytesIO(pattern(5000)), 5000, 0)
    assert _silent_client_ends_at(t) == 19000


def test_progress_restarts_the_silence_bound():
    bound = tftp.Transfer.max_silence_ms
    t = new_transfer(timeout_ms=1000, retries=100)
    t.start(checked(), io.BytesIO(pattern(600)), 600, 0)
    now = bound - 1
    t.on_packet(ack(1), 4, now)  # block 1 acknowledged just before the bound
    assert t.since == now and not t.done
    assert _silent_client_ends_at(t) == now + bound


def test_edk2_tsize_probe_then_user_abort():
    # edk2 asks for tsize only, reads the OACK and sends ERROR 8 "User aborted".
    t = new_transfer()
    pkts = drain(t, t.start(checked(b"tsize", b"0"), io.BytesIO(b"z" * 1234), 1234, 0))
    assert pkts == [b"\x00\x06tsize\x001234\x00"]
    assert t.on_packet(b"\x00\x05\x00\x08User aborted\x00", 4, 5) == 0
    assert t.done and t.result == "aborted" and t.client_error == 8
    assert t.on_timeout(10 ** 6) == 0
    # ... then the real read, in the same slot.
    got, _ = lockstep(pattern(5000), b"blksize", b"1468", b"tsize", b"0")
    assert got == pattern(5000)


def test_packets_a_client_should_not_send_are_malformed():
    t = new_transfer()
    t.start(checked(), io.BytesIO(b"abc"), 3, 0)
    for p in (b"", b"\x00", b"\x00\x04\x00", b"\x00\x03\x00\x01", b"\x00\x01a\x00",
              b"\x00\x06", b"\x00\x00\x00\x01", b"\xff\x04\x00\x01"):
        with raises(Malformed):
            t.on_packet(p, len(p), 1)
    assert not t.done
    assert t.on_packet(ack(1), 4, 1) == 0 and t.result == "ok"


class Pattern:
    """A file of `size` pattern bytes that is never held in memory (seek + readinto)."""

    def __init__(self, size):
        self.size = size
        self.pos = 0

    def seek(self, pos):
        self.pos = pos

    def readinto(self, mv):
        n = min(len(mv), self.size - self.pos)
        p = self.pos
        for i in range(n):
            mv[i] = ((p + i) * 7 + ((p + i) >> 8)) & 0xFF
        self.pos = p + n
        return n

    def close(self):
        pass


def test_block_numbers_roll_over_past_65535_to_0():
    size = 65536 * 8 + 20  # 65539 blocks of 8 bytes
    t = new_transfer()
    req = checked(b"blksize", b"8")
    assert drain(t, t.start(req, Pattern(size), size, 0))[0][1] == tftp.OACK
    expect = Pattern(size)
    want = bytearray(8)
    k = 0  # absolute block number
    wire = []
    while not t.done:
        n = t.on_packet(ack(k & 0xFFFF), 4, 1)
        if n == 0:
            break
        k += 1
        buf = t.buf
        num = (buf[2] << 8) | buf[3]
        assert num == k & 0xFFFF
        if k > 65533:
            wire.append(num)
        m = expect.readinto(memoryview(want)[: n - 4])
        assert buf[4:n] == want[:m]
        assert t.more() == 0
    assert t.result == "ok" and k == 65539
    assert wire == [65534, 65535, 0, 1, 2, 3]
    assert t.bytes_acked() == size


class Broken:
    def readinto(self, mv):
        raise OSError(5)

    def seek(self, pos):
        pass

    def close(self):
        pass


def test_read_error_sends_error_0_and_ends():
    t = new_transfer()
    pkts = drain(t, t.start(checked(), Broken(), 100, 0))
    assert pkts == [b"\x00\x05\x00\x00read error\x00"]
    assert t.done and t.result == "read error"


# ---- reading ahead -----------------------------------------------------------------------


class Counting:
    """A file that counts its reads and seeks; the reads numbered in `fail` raise EIO."""

    def __init__(self, data, fail=()):
        self.f = io.BytesIO(data)
        self.fail = fail
        self.reads = self.seeks = 0

    def readinto(self, mv):
        self.reads += 1
        if self.reads in self.fail:
            raise OSError(5)
        return self.f.readinto(mv)

    def seek(self, pos):
        self.seeks += 1
        self.f.seek(pos)

    def close(self):
        pass


def data_packet(k, data, bs=512):
    return bytes((0, tftp.DATA, k >> 8, k & 0xFF)) + data[(k - 1) * bs : k * bs]


def test_the_next_block_is_read_while_the_client_acknowledges():
    data = pattern(5 * 512 + 10)
    f = Counting(data)
    t = new_transfer()
    assert drain(t, t.start(checked(), f, len(data), 0)) == [data_packet(1, data)]
    assert f.reads == 2  # DATA 1, then block 2 once the window was sent
    n = t.on_packet(ack(1), 4, 1)
    assert bytes(t.buf[:n]) == data_packet(2, data) and f.reads == 2  # no read on the ACK
    assert t.more() == 0 and f.reads == 3  # block 3
    assert f.seeks == 0


def test_a_resend_after_reading_ahead_seeks_back():
    data = pattern(5 * 512 + 10)
    f = Counting(data)
    t = new_transfer()
    drain(t, t.start(checked(), f, len(data), 0))
    assert drain(t, t.on_packet(ack(1), 4, 1)) == [data_packet(2, data)]
    assert drain(t, t.on_timeout(t.deadline)) == [data_packet(2, data)]
    assert f.seeks == 1
    assert drain(t, t.on_packet(ack(2), 4, t.deadline)) == [data_packet(3, data)]
    assert f.seeks == 1  # block 3 was read ahead again after the resend


def test_a_resent_oack_never_carries_a_block_read_ahead():
    data = pattern(3000)
    t = new_transfer()
    oack = drain(t, t.start(checked(b"tsize", b"0"), Counting(data), 3000, 0))
    assert drain(t, t.on_timeout(t.deadline)) == oack
    assert drain(t, t.on_packet(ack(0), 4, t.deadline)) == [data_packet(1, data)]


def test_a_read_error_ahead_is_tried_again_when_its_block_is_due():
    data = pattern(2000)
    f = Counting(data, fail=(2,))  # reading block 2 ahead fails once
    t = new_transfer()
    assert len(drain(t, t.start(checked(), f, 2000, 0))) == 1 and not t.done
    assert drain(t, t.on_packet(ack(1), 4, 1)) == [data_packet(2, data)]
    assert f.seeks == 1 and not t.done
    f = Counting(data, fail=(2, 3))  # and again when it is due: the transfer ends there
    t = new_transfer()
    drain(t, t.start(checked(), f, 2000, 0))
    assert drain(t, t.on_packet(ack(1), 4, 1)) == [b"\x00\x05\x00\x00read error\x00"]
    assert t.done and t.result == "read error"


def test_a_short_read_ahead_is_read_again_when_due_and_ends_the_transfer():
    # A short block read ahead is not kept: its ACK reads it again, after a seek back, as the
    # last block. An empty one (the file a multiple of blksize) is read again where the file
    # stands, without a seek.
    for size, seeks in ((512 + 100, 1), (1024, 0)):
        data = pattern(size)
        f = Counting(data)
        t = new_transfer()
        got = drain(t, t.start(checked(), f, size, 0))
        k = 1
        while not t.done:
            got += drain(t, t.on_packet(ack(k), 4, k))
            k += 1
        assert got == [data_packet(i, data) for i in range(1, size // 512 + 2)]
        assert t.result == "ok" and t.size == size and f.seeks == seeks


# ---- a lossy link ------------------------------------------------------------------------


class Link:
    """Both directions of a link that drops, duplicates and reorders, driven by an LCG so the
    same seed gives the same run under CPython and MicroPython."""

    def __init__(self, seed, drop, dup, reorder):
        self.x = seed
        self.drop, self.dup, self.reorder = drop, dup, reorder
        self.q = []  # (time, seq, to_server, packet)
        self.seq = 0

    def rand(self):  # 0..999
        self.x = (self.x * 1103515245 + 12345) & 0x7FFFFFFF
        return (self.x >> 8) % 1000

    def send(self, now, to_server, pkt):
        if self.rand() < self.drop:
            return
        copies = 2 if self.rand() < self.dup else 1
        for _ in range(copies):
            delay = 1 + (self.rand() % 20 if self.rand() < self.reorder else 0)
            self.seq += 1
            self.q.append((now + delay, self.seq, to_server, pkt))

    def pop(self):
        i = min(range(len(self.q)), key=lambda j: (self.q[j][0], self.q[j][1]))
        return self.q.pop(i)


class Client:
    """A tolerant client: accepts a repeated OACK, acks the last in-order block at the end of
    each window, after a gap and on a repeated block (RFC 7440 section 4)."""

    def __init__(self, blksize, window):
        self.blksize = blksize
        self.window = window
        self.next = 1
        self.in_window = 0
        self.got = bytearray()
        self.done = False

    def on_packet(self, p):
        if p[1] == tftp.OACK:
            return ack(0) if self.next == 1 else None
        assert p[1] == tftp.DATA, p
        num = (p[2] << 8) | p[3]
        if self.done or num != self.next & 0xFFFF:
            self.in_window = 0
            return ack((self.next - 1) & 0xFFFF)
        self.got += p[4:]
        self.next += 1
        self.in_window += 1
        if len(p) - 4 < self.blksize:
            self.done = True
        if self.done or self.in_window == self.window:
            self.in_window = 0
            return ack((self.next - 1) & 0xFFFF)
        return None


def run_lossy(seed, size, window, drop=200, dup=100, reorder=200):
    data = pattern(size, seed)
    t = new_transfer(timeout_ms=50, retries=12)
    c = Client(512, window)
    link = Link(seed, drop, dup, reorder)
    req = checked(b"blksize", b"512", b"windowsize", str(window).encode())
    now = 0
    for p in drain(t, t.start(req, io.BytesIO(data), size, now)):
        link.send(now, False, p)
    while not t.done:
        soonest = min(e[0] for e in link.q) if link.q else None
        if soonest is None or soonest > t.deadline:
            now = t.deadline
            out = drain(t, t.on_timeout(now))
            for p in out:
                link.send(now, False, p)
            continue
        now, _, to_server, p = link.pop()
        if to_server:
            for q in drain(t, t.on_packet(p, 4, now)):
                link.send(now, False, q)
        else:
            reply = c.on_packet(p)
            if reply is not None:
                link.send(now, True, reply)
    return t, c, data


def test_lossy_link_never_corrupts():
    ok = 0
    for seed in range(1, 41):
        for window in (1, 4):
            size = (seed * 977) % 6000
            t, c, data = run_lossy(seed, size, window)
            if t.result == "ok":
                ok += 1
                assert c.done and bytes(c.got) == data, (seed, window)
            else:
                assert t.result == "timeout"
                assert bytes(c.got) == data[: len(c.got)], (seed, window)
    assert ok >= 76  # 12 resends per packet: a give-up is possible but rare


def test_duplicates_alone_never_cause_resends():
    # With no loss and no timeouts, every duplicate ACK is ignored: nothing is sent twice.
    for seed in range(1, 6):
        t, c, data = run_lossy(seed, 8000, 1, drop=0, dup=500, reorder=0)
        assert t.result == "ok" and bytes(c.got) == data
        assert t.resends == 0 and t.dup_acks > 0


def test_a_slots_transfer_keeps_23_attributes_and_start_adds_none():
    # A slot's Transfer lives from boot. At 23 attributes its table takes 416 B on the unix
    # port, at 24 to 29 512 B: with config's default timeout and retries it keeps 23, and
    # start() adds none (a table that grew later would be a fresh allocation on a busy heap).
    t = tftp.Transfer(bytearray(4 + Cfg.tftp_max_blksize))
    n = len(t.__dict__)
    req = checked(b"timeout", b"3", b"tsize", b"0", b"blksize", b"512")
    assert t.start(req, io.BytesIO(b"x" * 2000), 2000, 0) > 0  # the OACK
    assert bytes(t.buf[2:]).startswith(b"blksize\x00512\x00tsize\x002000\x00timeout\x003\x00")
    assert len(t.__dict__) == n <= 23
    assert (t.timeout_ms, t.retries) == (1000, 5)
    assert tftp.Transfer(bytearray(8), 300, 2).timeout_ms == 300  # its own, when not the default


# ---- the per-block path's frames -------------------------------------------------------


class _Noting:
    """A file whose readinto notes the heap in use when it is called."""

    def __init__(self, n):
        self.n = n
        self.seen = []

    def readinto(self, b):
        import gc

        self.seen.append(gc.mem_alloc())
        return self.n


def test_the_per_block_calls_keep_their_frames_off_the_heap():
    # MicroPython puts a call's frame on the heap once its locals, stack and try blocks
    # outgrow 11 words: an allocation and a free per call, each a search of a fragmented heap
    # for a run of free blocks (7.6% of the firmware's time, lock-step at 128k, before).
    # Nothing the transfer's ACK -> DATA path calls may allocate before it reads the file.
    import gc

    micropython_only("CPython has no heap of its own to measure")
    flash = _Noting(Cfg.tftp_max_blksize)
    t = new_transfer()
    t.start(checked(b"blksize", b"1468"), flash, 100 * Cfg.tftp_max_blksize, 0)
    a0, a1 = ack(0), ack(1)
    t.on_packet(a0, 4, 1)  # the OACK's ACK: DATA 1
    gc.collect()
    before = gc.mem_alloc()
    assert t.on_packet(a1, 4, 2) == 4 + Cfg.tftp_max_blksize  # on_packet -> more -> _read
    assert flash.seen[-1] == before
    gc.collect()
    before = gc.mem_alloc()
    assert t.more() == 0  # the window is sent: more reads ahead, block 3
    assert flash.seen[-1] == before and len(flash.seen) == 3
    assert t.on_packet(ack(2), 4, 3) == 4 + Cfg.tftp_max_blksize  # block 3 without a read
    assert len(flash.seen) == 3
