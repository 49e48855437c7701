"""firmware.frame under CPython: fuzzed with hypothesis, cross-checked with MicroPython's own
encoder, and the doc's example frames checked."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.flash.sim import micropython_bin
from firmware import frame
from firmware.frame import TO_DEVICE, TO_HOST, Deframer, Malformed

REPO = Path(__file__).resolve().parent.parent.parent

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
objects = st.dictionaries(st.text(max_size=8), json_values, max_size=5)
# REPL-like noise: anything but an end of line (a line break would make it a line of its own)
noise = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b""))


def _feed_chunked(d: Deframer, data: bytes, cuts: list[int]) -> list[dict]:
    out = []
    pos = 0
    for c in sorted(set(min(c, len(data)) for c in cuts)) + [len(data)]:
        out.extend(d.feed(data[pos:c]))
        pos = c
    return out


@given(objects, st.sampled_from([TO_HOST, TO_DEVICE]))
def test_round_trip(obj, mark):
    line = frame.encode(obj, mark)
    assert line.count(b"\n") == 1
    assert frame.decode(line[:-1], mark) == obj


@given(st.binary(max_size=300))
def test_decode_parses_or_raises_malformed_only(data):
    try:
        obj = frame.decode(data)
    except Malformed:
        return
    assert isinstance(obj, dict)


@given(objects)
def test_every_truncation_is_malformed(obj):
    line = frame.encode(obj)[:-1]
    for n in range(len(line)):
        try:
            frame.decode(line[:n])
        except Malformed:
            continue
        raise AssertionError(f"accepted a truncation at {n}: {line[:n]!r}")


@given(objects, st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_any_corrupted_byte_is_detected(obj, where, xor):
    """CRC-32 catches every error burst up to 32 bits, so one bad byte anywhere is caught."""
    line = bytearray(frame.encode(obj)[:-1])
    line[where % len(line)] ^= xor or 1
    try:
        got = frame.decode(bytes(line))
    except Malformed:
        return
    raise AssertionError(f"accepted a corrupted line as {got!r}")


@settings(max_examples=200)
@given(
    st.lists(st.tuples(noise, st.booleans(), objects), max_size=6),
    st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
)
def test_frames_survive_noise_and_any_chunking(items, cuts):
    """Noise glued in front of a frame, or on a line of its own, never loses the frame."""
    data = b""
    want = []
    for junk, own_line, obj in items:
        data += junk + (b"\r\n" if own_line else b"") + frame.encode(obj)
        want.append(obj)
    d = Deframer(max_line=4096)
    assert _feed_chunked(d, data, cuts) == want
    assert d.frames == len(want) and d.overlong == 0


@given(st.binary(max_size=2000), st.lists(st.integers(min_value=0, max_value=2000), max_size=8))
def test_deframer_never_raises_and_counts_are_chunking_independent(data, cuts):
    a = Deframer(max_line=128)
    b = Deframer(max_line=128)
    got_a = list(a.feed(data))
    got_b = _feed_chunked(b, data, cuts)
    assert got_a == got_b
    assert a.counters() == b.counters()
    assert len(a._buf) == 128  # bounded, whatever came in


def test_micropython_frames_decode_under_cpython():
    """MicroPython's json writes non-ASCII as raw UTF-8 where CPython escapes it: the checksum
    is over the bytes on the line, so both decode on both sides."""
    obj = {"id": 5, "ok": False, "error": 'caf\u00e9 \u2603 "q" \\ \n', "n": [1, 2.5, None]}
    script = (
        "import sys, json\nfrom firmware import frame\n"
        f"sys.stdout.buffer.write(frame.encode(json.loads({json.dumps(json.dumps(obj))})))\n"
    )
    r = subprocess.run(
        [micropython_bin(), "-c", script],
        env={"MICROPYPATH": f"{REPO}:.frozen"},
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert r.stdout.endswith(b"\n")
    assert frame.decode(r.stdout[:-1]) == obj


def test_the_protocol_docs_example_frames_are_valid():
    doc = (REPO / "docs" / "serial-protocol.md").read_text()
    lines = [ln.strip() for ln in doc.splitlines() if ln.strip().startswith(("#EB<", "#EB>"))]
    lines = [ln for ln in lines if "..." not in ln]  # the annotated format sketch
    assert len(lines) >= 6
    for ln in lines:
        mark = ln[:4].encode()
        assert isinstance(frame.decode(ln.encode(), mark), dict), ln
