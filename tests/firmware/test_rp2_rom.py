"""The emulator's stand-in for the RP2040 bootrom (tests/firmware/rp2/rom.mjs), function by
function, against CPython's IEEE arithmetic: the ROM's header and tables as the Pico SDK reads
them, and each function called with the registers the ARM EABI passes, as the emulator calls
it. The rp2 tests run MicroPython's image on it (test_rp2_emulated.py)."""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

ROM = Path(__file__).parent / "rp2" / "rom.mjs"
pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="no node (Debian package nodejs)")

# Calls each case's function (by its name in the ROM: "SF:fadd", "memcpy", ...) on a copy of
# its registers, against a memory of 64 KiB at 0x20000000 and the ROM's image at 0; prints
# the registers after each call, and the ROM's image.
DRIVER = """
import { makeRom } from %s;
const { image, hooks, names } = makeRom();
const rom = new Uint8Array(image.buffer);
const ram = new Uint8Array(65536);
const at = (a) => (a >= 0x20000000 ? [ram, a - 0x20000000] : [rom, a]);
const mcu = {
  readUint8: (a) => { const [m, i] = at(a); if (i >= m.length) throw new Error('read ' + a); return m[i]; },
  writeUint8: (a, v) => { const [m, i] = at(a); if (m !== ram) throw new Error('write ' + a); m[i] = v; },
  readUint16: (a) => mcu.readUint8(a) | (mcu.readUint8(a + 1) << 8),
};
const byName = new Map([...names].map(([address, name]) => [name, address]));
const cases = JSON.parse(await new Promise((done) => {
  let s = ''; process.stdin.on('data', (c) => { s += c; }); process.stdin.on('end', () => done(s));
}));
const out = [];
for (const { fn, regs, ram: fill } of cases) {
  if (fill) ram.set(fill);
  const address = byName.get(fn);
  const hook = hooks.get(address);
  if (!hook) { out.push({ missing: fn, address: address ?? null }); continue; }
  const r = new Uint32Array(16);
  r.set(regs.map((v) => v >>> 0));
  hook(r, mcu);
  out.push({ regs: [...r.slice(0, 4)], ram: fill ? [...ram.slice(0, fill.length)] : undefined });
}
process.stdout.write(JSON.stringify({ out, rom: [...rom] }));
"""


def run(cases: list[dict]) -> tuple[list[dict], bytes]:
    script = DRIVER % json.dumps(ROM.resolve().as_uri())
    p = subprocess.run(["node", "--input-type=module", "-e", script], input=json.dumps(cases), check=False,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    return got["out"], bytes(got["rom"])


def fbits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def ffrom(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]


def dwords(x: float) -> list[int]:
    return list(struct.unpack("<II", struct.pack("<d", x)))


def dfrom(lo: int, hi: int) -> float:
    return struct.unpack("<d", struct.pack("<II", lo, hi))[0]


def f32(x: float) -> float:
    """x rounded once to single precision (CPython's struct rounds to nearest, ties to even)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def w64(v: int) -> list[int]:
    v &= (1 << 64) - 1
    return [v & 0xFFFFFFFF, v >> 32]


def one(fn: str, regs: list[int]) -> list[int]:
    (got,), _ = run([{"fn": fn, "regs": regs}])
    assert "regs" in got, got
    return got["regs"]


def test_the_header_and_tables_are_where_the_sdk_reads_them():
    _, rom = run([])
    assert len(rom) == 16384
    assert rom[0x10:0x13] == b"Mu\x01" and rom[0x13] == 3  # the magic; version 3 (RP2040-B2)
    u16 = lambda a: rom[a] | rom[a + 1] << 8
    table = {}
    at = u16(0x14)
    while u16(at):
        table[rom[at:at + 2].decode()] = u16(at + 2)
        at += 4
    data = {}
    at = u16(0x16)
    while u16(at):
        data[rom[at:at + 2].decode()] = u16(at + 2)
        at += 4
    # what the SDK's runtime and MicroPython look up (a trace of the image on the real bootrom)
    for code in ("MC", "MS", "C4", "S4", "P3", "R3", "L3", "T3", "IF", "EX", "RE", "RP", "FC", "CX"):
        assert code in table and table[code] & 1, code  # a Thumb function's address
    assert set(data) == {"SF", "SD"}
    for code in ("SF", "SD"):
        assert rom[data[code] - 2] * 4 >= 0x80  # the table's size in words, before it (the SDK's assert)
        entries = struct.unpack_from("<32I", rom, data[code])
        assert all(e & 1 and e < 16384 for e in entries), code
    # the table lookup (at 0x18) finds a function through the table at 0x14, as rom_func_lookup does
    out, _ = run([{"fn": "rom_table_lookup", "regs": [u16(0x14), ord("M") | ord("C") << 8]},
                  {"fn": "rom_table_lookup", "regs": [u16(0x16), ord("S") | ord("D") << 8]},
                  {"fn": "rom_table_lookup", "regs": [u16(0x14), ord("Z") | ord("Z") << 8]}])  # fmt: skip
    assert u16(0x18) & 1
    assert [o["regs"][0] for o in out] == [table["MC"], data["SD"], 0]


VALUES = [0.0, 1.0, -1.5, 3.0, 0.1, -7.25, 1e-3, 12345.678, -2.5e7, 3.4e38, 1.17549435e-38, 2.0**-20]


def test_single_precision_arithmetic_is_rounded_once_as_ieee_754():
    cases, want = [], []
    for a in VALUES:
        for b in VALUES:
            fa, fb = f32(a), f32(b)
            for fn, op in (("fadd", fa + fb), ("fsub", fa - fb), ("fmul", fa * fb)):
                cases.append({"fn": f"SF:{fn}", "regs": [fbits(fa), fbits(fb)]})
                want.append(fbits(f32(op)) if abs(op) < 3.5e38 else fbits(math.copysign(math.inf, op)))
            if fb != 0:
                cases.append({"fn": "SF:fdiv", "regs": [fbits(fa), fbits(fb)]})
                q = fa / fb
                want.append(fbits(f32(q)) if abs(q) < 3.5e38 else fbits(math.copysign(math.inf, q)))
        if a >= 0:
            cases.append({"fn": "SF:fsqrt", "regs": [fbits(f32(a))]})
            want.append(fbits(f32(math.sqrt(f32(a)))))
    out, _ = run(cases)
    got = [o["regs"][0] for o in out]
    wrong = [(c, hex(g), hex(w)) for c, g, w in zip(cases, got, want) if g != w]
    assert not wrong, wrong[:5]


def test_conversions_to_integers_round_towards_minus_infinity_and_clamp():
    # the datasheet's rule, which the SDK's C-style conversions (towards zero) are built on
    i32 = lambda v: v & 0xFFFFFFFF
    checks = [
        ("SF:float2int", [fbits(-2.5)], i32(-3)),
        ("SF:float2int", [fbits(2.5)], 2),
        ("SF:float2int", [fbits(3e9)], 0x7FFFFFFF),
        ("SF:float2int", [fbits(-3e9)], i32(-(2**31))),
        ("SF:float2int", [0x7FC00000], 0x7FFFFFFF),  # a NaN: the infinity of its sign
        ("SF:float2uint", [fbits(-1.0)], 0),
        ("SF:float2uint", [fbits(4e9)], 4000000000),
        ("SF:float2uint", [fbits(5e9)], 0xFFFFFFFF),
        ("SF:float2fix", [fbits(-0.75), 4], i32(-12)),
        ("SF:float2ufix", [fbits(0.5), 16], 0x8000),
        ("SD:double2int", dwords(-0.5), i32(-1)),
        ("SD:double2uint", dwords(4294967295.9), 0xFFFFFFFF),
        ("SD:double2fix", [*dwords(1.75), 8], 448),
        ("SD:double2ufix", [*dwords(-1.0), 8], 0),
    ]
    out, _ = run([{"fn": fn, "regs": regs} for fn, regs, _ in checks])
    assert [o["regs"][0] for o in out] == [w for *_, w in checks]
    checks64 = [
        ("SF:float2int64", [fbits(-1.5)], -2),
        ("SF:float2int64", [fbits(1e19)], 2**63 - 1),
        ("SF:float2uint64", [fbits(1e19)], int(f32(1e19))),
        ("SF:float2fix64", [fbits(-2.25), 33], -(9 << 31)),
        ("SF:float2ufix64", [fbits(3.0), 62], 3 << 62),
        ("SF:float2ufix64", [fbits(5.0), 62], 2**64 - 1),
        ("SD:double2int64", dwords(-(2.0**40) - 0.5), -(2**40) - 1),
        ("SD:double2uint64", dwords(-5.0), 0),
        ("SD:double2fix64", [*dwords(0.1), 40], math.floor(0.1 * 2**40)),
        ("SD:double2ufix64", [*dwords(1.0), 70], 2**64 - 1),
    ]
    out, _ = run([{"fn": fn, "regs": regs} for fn, regs, _ in checks64])
    assert [o["regs"][0] | o["regs"][1] << 32 for o in out] == [w & (2**64 - 1) for *_, w in checks64]


def test_conversions_from_integers_are_rounded_once():
    big = 2**60 + 2**36 + 1  # halfway between two floats but for its last bit: rounds up, once
    checks = [
        ("SF:int2float", [-7 & 0xFFFFFFFF], f32(-7)),
        ("SF:uint2float", [0xFFFFFFFF], f32(2.0**32)),
        ("SF:fix2float", [-3 & 0xFFFFFFFF, 2], -0.75),
        ("SF:ufix2float", [0x8000, 16], 0.5),
        ("SF:int642float", w64(big), float(2**60 + 2**37)),
        ("SF:int642float", w64(-big), -float(2**60 + 2**37)),
        ("SF:uint642float", w64(2**64 - 1), 2.0**64),
        ("SF:fix642float", [*w64(3 << 40), 42], 0.75),
        ("SF:ufix642float", [*w64(2**63 + 2**39), 63], f32(1.0 + 2**-24)),
    ]
    out, _ = run([{"fn": fn, "regs": regs} for fn, regs, _ in checks])
    assert [ffrom(o["regs"][0]) for o in out] == [w for *_, w in checks]
    dchecks = [
        ("SD:int2double", [-7 & 0xFFFFFFFF], -7.0),
        ("SD:uint2double", [0xFFFFFFFF], 4294967295.0),
        ("SD:fix2double", [-3 & 0xFFFFFFFF, 2], -0.75),
        ("SD:ufix2double", [1, 30], 2.0**-30),
        ("SD:int642double", w64(-(2**62) - 1), float(-(2**62) - 1)),
        ("SD:uint642double", w64(2**64 - 1), float(2**64 - 1)),
        ("SD:fix642double", [*w64(-(5 << 50)), 52], -1.25),
        ("SD:ufix642double", [*w64(3), 1], 1.5),
        ("SF:float2double", [fbits(0.1)], f32(0.1)),
    ]
    out, _ = run([{"fn": fn, "regs": regs} for fn, regs, _ in dchecks])
    assert [dfrom(*o["regs"][:2]) for o in out] == [w for *_, w in dchecks]
    assert ffrom(one("SD:double2float", dwords(0.1))[0]) == f32(0.1)


def test_double_precision_arithmetic_is_ieee_754():
    pairs = [(0.1, 0.2), (-1e300, 1e-300), (3.0, -7.5), (2.0**-1000, 2.0**1000)]
    cases, want = [], []
    for a, b in pairs:
        for fn, v in (("dadd", a + b), ("dsub", a - b), ("dmul", a * b), ("ddiv", a / b)):
            cases.append({"fn": f"SD:{fn}", "regs": [*dwords(a), *dwords(b)]})
            want.append(v)
        cases.append({"fn": "SD:dsqrt", "regs": dwords(abs(a))})
        want.append(math.sqrt(abs(a)))
    out, _ = run(cases)
    assert [dfrom(*o["regs"][:2]) for o in out] == want


def test_scientific_functions_agree_with_libm_to_a_few_units_in_the_last_place():
    xs = [0.5, -1.25, 2.0, 3.0, 100.0]
    cases, want = [], []
    for x in xs:
        fx = f32(x)
        for fn, f in (("fcos", math.cos), ("ftan", math.tan), ("fexp", math.exp)):
            cases.append({"fn": f"SF:{fn}", "regs": [fbits(fx)]})
            want.append(("f", f(fx) if fn != "fexp" or fx < 80 else math.inf))
        cases.append({"fn": "SF:fsin", "regs": [fbits(fx)]})
        want.append(("sincos", (math.sin(fx), math.cos(fx))))
        cases.append({"fn": "SF:fatan2", "regs": [fbits(fx), fbits(f32(-0.75))]})
        want.append(("f", math.atan2(fx, f32(-0.75))))  # (y, x)
        if fx > 0:
            cases.append({"fn": "SF:fln", "regs": [fbits(fx)]})
            want.append(("f", math.log(fx)))
        for fn, f in (("dcos", math.cos), ("dsin", math.sin), ("dtan", math.tan), ("dexp", math.exp)):
            cases.append({"fn": f"SD:{fn}", "regs": dwords(x)})
            want.append(("d", f(x)))
        cases.append({"fn": "SD:dsincos", "regs": dwords(x)})
        want.append(("dsincos", (math.sin(x), math.cos(x))))
        cases.append({"fn": "SD:datan2", "regs": [*dwords(x), *dwords(2.0)]})
        want.append(("d", math.atan2(x, 2.0)))
    out, _ = run(cases)
    for case, o, (kind, w) in zip(cases, out, want):
        r = o["regs"]
        if kind == "f":
            assert math.isclose(ffrom(r[0]), w, rel_tol=4e-7, abs_tol=1e-7), (case, ffrom(r[0]), w)
        elif kind == "sincos":  # the SDK's sincosf takes the cosine from r1
            assert math.isclose(ffrom(r[0]), w[0], rel_tol=4e-7, abs_tol=1e-7), case
            assert math.isclose(ffrom(r[1]), w[1], rel_tol=4e-7, abs_tol=1e-7), case
        elif kind == "d":
            assert math.isclose(dfrom(r[0], r[1]), w, rel_tol=1e-15, abs_tol=1e-16), case
        else:
            assert math.isclose(dfrom(r[0], r[1]), w[0], rel_tol=1e-15, abs_tol=1e-16), case
            assert math.isclose(dfrom(r[2], r[3]), w[1], rel_tol=1e-15, abs_tol=1e-16), case


def test_bit_and_memory_functions():
    checks = [("popcount32", 0xF0F0_0001, 9), ("reverse32", 0x0000_0001, 0x8000_0000),
              ("reverse32", 0x1234_5678, int(f"{0x12345678:032b}"[::-1], 2)), ("clz32", 0x0001_0000, 15),
              ("clz32", 0, 32), ("ctz32", 0x0001_0000, 16), ("ctz32", 0, 32)]  # fmt: skip
    out, _ = run([{"fn": fn, "regs": [x]} for fn, x, _ in checks])
    assert [o["regs"][0] for o in out] == [w for *_, w in checks]
    base = 0x20000000
    fill = list(range(32))
    out, _ = run([
        {"fn": "memcpy", "regs": [base + 16, base, 8], "ram": fill},
        {"fn": "memset", "regs": [base + 3, 0x1AB, 5], "ram": fill},
        {"fn": "memcpy44", "regs": [base, base + 8, 8], "ram": fill},
        {"fn": "memset4", "regs": [base + 4, 0, 8], "ram": fill},
    ])  # fmt: skip
    assert out[0]["ram"] == fill[:16] + fill[:8] + fill[24:] and out[0]["regs"][0] == base + 16
    assert out[1]["ram"] == fill[:3] + [0xAB] * 5 + fill[8:] and out[1]["regs"][0] == base + 3
    assert out[2]["ram"] == fill[8:16] + fill[8:]
    assert out[3]["ram"] == fill[:4] + [0] * 8 + fill[12:]


def test_what_the_stand_in_lacks_is_named_not_answered():
    # no hook: the emulator stops at the slot's bkpt and names it (test_rp2_emulated covers
    # that path on the chip)
    out, _ = run([{"fn": "reset_usb_boot", "regs": []}, {"fn": "SF:fcmp_fast", "regs": []}])
    assert [o.get("missing") for o in out] == ["reset_usb_boot", "SF:fcmp_fast"]
    assert all(o["address"] is not None for o in out)
