"""firmware.tftp under CPython with hypothesis: parse or raise Malformed, never anything else,
and the transfer state machine's invariants under any sequence of client packets and timeouts.
The fixed vectors live in mpy/test_tftp_vectors.py (run under MicroPython too)."""

from __future__ import annotations

import io

from hypothesis import given, settings
from hypothesis import strategies as st
from test_tftp_vectors import Cfg, ack, checked, pattern, run_lossy

from firmware import tftp

fields = st.binary(max_size=40).map(lambda b: b.replace(b"\0", b""))
option_names = st.sampled_from([b"blksize", b"tsize", b"timeout", b"windowsize", b"BlkSize"])
option_values = st.one_of(
    st.integers(min_value=0, max_value=70000).map(lambda v: str(v).encode()), fields
)


names = st.one_of(
    st.text(alphabet="ab.", min_size=1, max_size=8).map(str.encode),
    st.text(alphabet="ab./\\ -", max_size=12).map(str.encode),
    fields,
)
modes = st.one_of(st.sampled_from([b"octet", b"OCTET"]), st.just(b"octet"), fields)


@st.composite
def requests(draw):
    """Datagrams shaped like requests: right or wrong opcodes, names, modes and options,
    sometimes cut short or followed by stray bytes."""
    op = draw(st.sampled_from([1, 1, 1, 1, 2, 0, 3, 4, 5, 6, 7, 256]))
    parts = [draw(names), draw(modes)]
    for _ in range(draw(st.integers(0, 5))):
        parts += [draw(option_names | fields), draw(option_values)]
    data = op.to_bytes(2, "big") + b"".join(p + b"\0" for p in parts)
    cut = draw(st.one_of(st.just(0), st.just(0), st.integers(0, len(data))))
    return data[: len(data) - cut] + draw(st.just(b"") | st.binary(max_size=4))


@given(st.binary(max_size=600))
def test_any_bytes_parse_or_raise_malformed(data):
    try:
        req = tftp.parse_request(data)
    except tftp.Malformed:
        return
    assert req.op in (tftp.RRQ, tftp.WRQ)


@settings(max_examples=500)
@given(requests())
def test_request_shaped_bytes_parse_or_malformed_then_check_or_refused(data):
    try:
        req = tftp.parse_request(data)
    except tftp.Malformed:
        return
    try:
        tftp.check(req, Cfg)
    except tftp.Refused as e:
        assert e.code in (tftp.E_UNDEFINED, tftp.E_ACCESS, tftp.E_OPTION)
        assert isinstance(e.msg, bytes)
        return
    # Accepted: a read of a plain name under the root, with options inside the bounds.
    assert req.op == tftp.RRQ and req.mode == b"octet"
    rel = req.path[len("tftp/") :]
    assert req.path.startswith("tftp/") and not rel.startswith("/")
    assert ".." not in rel.split("/") and "\\" not in rel and rel.isprintable()
    assert 8 <= req.blksize <= Cfg.tftp_max_blksize and 1 <= req.window <= Cfg.tftp_max_window
    assert 0 <= req.timeout <= 255


@given(st.binary(max_size=8), st.integers(0, 8))
def test_client_packets_are_acks_errors_or_malformed(data, n):
    t = tftp.Transfer(bytearray(1472), 100, 3)
    t.start(checked(b"windowsize", b"4"), io.BytesIO(pattern(5000)), 5000, 0)
    try:
        out = t.on_packet(data, min(n, len(data)), 1)
    except tftp.Malformed:
        return
    assert out >= 0


actions = st.lists(
    st.one_of(
        st.tuples(st.just("ack"), st.integers(0, 0xFFFF)),
        st.tuples(st.just("near"), st.integers(-3, 5)),  # an ACK close to the window
        st.tuples(st.just("timeout"), st.just(0)),
        st.tuples(st.just("error"), st.integers(0, 8)),
    ),
    max_size=60,
)


@settings(max_examples=300)
@given(
    actions,
    st.integers(0, 9000),
    st.sampled_from([b"8", b"512", b"1468"]),
    st.sampled_from([b"1", b"3", b"4"]),
    st.booleans(),
)
def test_transfer_invariants(acts, size, blksize, window, oack):
    data = pattern(size)
    t = tftp.Transfer(bytearray(1472), 100, 4)
    opts = (b"blksize", blksize, b"windowsize", window) if oack else ()
    req = checked(*opts)
    now = 0
    sent = _sent(t, t.start(req, io.BytesIO(data), size, now))
    _check_packets(t, data, sent, -1 if oack else 0)
    for kind, v in acts:
        before = (t.acked, t.done)
        now += 1
        if kind == "timeout":
            now = t.deadline
            sent = _sent(t, t.on_timeout(now))
        elif kind == "error":
            sent = _sent(t, t.on_packet(b"\0\x05\0" + bytes([v]) + b"x\0", 4, now))
            assert t.done and not sent
        else:
            num = v if kind == "ack" else (t.acked + v) & 0xFFFF
            sent = _sent(t, t.on_packet(ack(num), 4, now))
            if t.acked == before[0]:
                assert sent == []  # an ACK that moves nothing sends nothing
        assert t.acked >= before[0]  # acknowledgement never goes backwards
        if before[1]:
            assert sent == []  # nothing after the end
        _check_packets(t, data, sent, before[0])
        assert 0 <= t.sent - max(t.acked, 0) <= t.window


def _sent(t, n):
    out = []
    while n:
        out.append(bytes(t.buf[:n]))
        n = t.more()
    return out


def _check_packets(t, data, sent, acked_before):
    bs = t.blksize
    for p in sent:
        op = p[1]
        if op == tftp.OACK:
            assert t.acked < 0
            continue
        assert op == tftp.DATA
        num = (p[2] << 8) | p[3]
        # The absolute block this wire number stands for, in the window after the last ACK.
        k = t.acked + 1 + ((num - t.acked - 1) & 0xFFFF)
        assert k <= t.acked + t.window
        assert p[4:] == data[(k - 1) * bs : k * bs]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 10**6),
    st.integers(0, 6000),
    st.sampled_from([1, 2, 4]),
    st.integers(0, 300),
    st.integers(0, 300),
    st.integers(0, 500),
)
def test_lossy_link_never_corrupts(seed, size, window, drop, dup, reorder):
    t, c, data = run_lossy(seed, size, window, drop, dup, reorder)
    assert bytes(c.got) == data[: len(c.got)]
    if t.result == "ok":
        assert c.done and bytes(c.got) == data
    else:
        assert t.result == "timeout"

