# firmware.frame: the serial line's frames, under CPython and MicroPython.
from mpytest import raises

from firmware import frame
from firmware.frame import TO_DEVICE, TO_HOST, Deframer, Malformed

REPLY = b'#EB< 86354243 {"id":1,"ok":true}'
HELLO = b'#EB> ca453ab9 {"id":7,"op":"hello"}'
BANNER = b"MicroPython v1.28.0 on 2026-01-01; linux [GCC 14.2.1] version\r\nUse Ctrl-D to exit\r\n"


def _all(d, data, step=None):
    out = []
    if step is None:
        out.extend(d.feed(data))
    else:
        for i in range(0, len(data), step):
            out.extend(d.feed(data[i : i + step]))
    return out


def test_golden_lines_decode():
    assert frame.decode(REPLY) == {"id": 1, "ok": True}
    assert frame.decode(HELLO, TO_DEVICE) == {"id": 7, "op": "hello"}


def test_single_key_encoding_is_exact():
    assert frame.encode({"ev": "boot"}) == b'#EB< 7b5ae0f7 {"ev":"boot"}\n'


def test_encode_decode_round_trip():
    for obj in (
        {"id": 1, "op": "power", "channel": 2, "state": "on"},
        {"ev": "log", "text": 'line\nbreak "quoted" \\ back', "n": -3, "f": 1.5, "z": None},
        {"id": 2, "ok": False, "error": "caf\u00e9 \u2603", "list": [1, [2, {"a": []}]]},
        {},
    ):
        for mark in (TO_HOST, TO_DEVICE):
            line = frame.encode(obj, mark)
            assert line.endswith(b"\n") and line.count(b"\n") == 1
            assert frame.decode(line[:-1], mark) == obj


def test_crc_fallback_matches_binascii():
    assert frame.crc32_slow(b"123456789") == 0xCBF43926
    for data in (b"", b"a", b'{"id":1,"ok":true}', bytes(range(256))):
        assert frame.crc32_slow(data) == frame.crc32(data) & 0xFFFFFFFF


def test_rejects_every_damaged_line_with_malformed():
    cases = (
        b"",
        b"hello",
        REPLY.replace(b"#EB<", b"#EB>"),  # the other direction
        REPLY.replace(b"86354243", b"86354244"),  # checksum mismatch
        REPLY.replace(b"86354243", b"8635424G"),
        REPLY.replace(b"86354243", b"8635424+"),
        REPLY.replace(b"86354243", b"86354 43"),
        REPLY.replace(b"true", b"tru3"),  # payload changed: checksum mismatch
        REPLY.replace(b"< 8", b"<_8"),
        frame.frame("[1,2]")[:-1],  # valid checksum, not an object
        frame.frame("{bad json")[:-1],  # valid checksum, not JSON
        frame.frame('"text"')[:-1],
    )
    for line in cases:
        with raises(Malformed):
            frame.decode(line)


def test_every_truncation_is_malformed():
    for n in range(len(REPLY)):
        with raises(Malformed):
            frame.decode(REPLY[:n])


def test_deframer_whole_and_byte_by_byte_and_crlf():
    lines = frame.encode({"id": 1, "ok": True}) + frame.encode({"ev": "dhcp", "seq": 4})
    crlf = lines.replace(b"\n", b"\r\n")
    for data in (lines, crlf):
        for step in (None, 1, 3, 7):
            d = Deframer()
            got = _all(d, data, step)
            assert got == [{"id": 1, "ok": True}, {"ev": "dhcp", "seq": 4}]
            assert d.frames == 2 and d.noise == 0 and d.bad == 0


def test_repl_noise_is_skipped_and_counted():
    d = Deframer()
    data = BANNER + b">>> " + REPLY + b"\r\n" + b"Traceback (most recent call last):\r\n\r\n"
    assert _all(d, data, 5) == [{"id": 1, "ok": True}]
    # banner (2 lines) + the prompt glued in front of the frame + the traceback line
    assert d.noise == 4 and d.bad == 0 and d.frames == 1


def test_cut_frame_then_a_whole_one():
    d = Deframer()
    data = REPLY[:20] + b"\n" + REPLY[:15] + REPLY + b"\n"
    assert _all(d, data) == [{"id": 1, "ok": True}]
    assert d.bad == 1 and d.noise == 1  # the first cut line; the cut text glued to the frame


def test_echo_of_the_other_direction_is_counted_not_taken():
    d = Deframer(TO_HOST)
    assert _all(d, HELLO + b"\n" + REPLY + b"\n") == [{"id": 1, "ok": True}]
    assert d.echo == 1
    dev = Deframer(TO_DEVICE)
    assert _all(dev, HELLO + b"\n" + REPLY + b"\n") == [{"id": 7, "op": "hello"}]
    assert dev.echo == 1


def test_overlong_lines_are_dropped_and_the_buffer_stays_bounded():
    d = Deframer(max_line=64)
    data = b"x" * 200 + b"\n" + b"y" * 65 + REPLY + b"\n" + REPLY + b"\n"
    assert _all(d, data, 9) == [{"id": 1, "ok": True}]
    assert d.overlong == 2 and len(d._buf) == 64
    big = frame.encode({"id": 3, "text": "z" * 100})
    assert _all(d, big) == [] and d.overlong == 3


def test_partial_line_at_reset_is_counted():
    d = Deframer()
    assert _all(d, REPLY[:10]) == []
    d.reset()
    assert d.bad == 1
    assert _all(d, b"noise") == []
    d.reset()
    assert d.noise == 1
    assert _all(d, REPLY + b"\n") == [{"id": 1, "ok": True}]


def test_garbage_bytes_never_raise():
    d = Deframer(max_line=32)
    junk = bytes(range(256)) * 3 + b"#EB< \xff\xfe\n#EB< 00000000 \n#EB<\n\n\r\r\n"
    assert _all(d, junk, 11) == []
    assert d.frames == 0
