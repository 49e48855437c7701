// A stand-in for the RP2040's bootrom, made here, so that the emulated board needs no
// third-party ROM (the real one's floating-point part is licensed for RP2040 devices only).
//
// What it has is what MicroPython's rp2 image and the Pico SDK reach through the ROM's
// documented interface (RP2040 datasheet, section 2.8): the header (the magic at 0x10, the
// version byte at 0x13, the 16-bit pointers at 0x14, 0x16 and 0x18), the function table, the
// data table's soft-float and soft-double tables, and each function's behaviour. Each function
// is a slot of code holding `bkpt #n; bx lr`; the emulator (emulator.mjs) runs the function's
// JavaScript here when the core reaches the slot, puts its results in r0-r3 and returns to the
// caller, so the bkpt runs only for a function this stand-in does not have, and the emulator
// then stops, naming it.
//
// The arithmetic is IEEE 754 (JavaScript's doubles, Math.fround for single precision), where
// the real ROM's library is a smaller one that flushes denormals and is a few units in the
// last place off in its scientific functions: figures agree with a real board's to those
// units, not bit for bit. Not here: the USB boot mode (reset_usb_boot, 'UB'), the
// comparisons that return processor flags, the debug trampolines, core 1's wait for a vector,
// the bootrom's own boot path (the emulator starts at the flash, as rp2040js's demo does).
//
// Version 3 (the RP2040-B2's ROM): its tables hold sincos for both precisions, where version
// 2's double sincos is reached by the SDK through the ROM's internal addresses.

const VERSION = 3;
const ROM_SIZE = 16384;

const scratch = new DataView(new ArrayBuffer(8));
function f32(bits) { scratch.setUint32(0, bits >>> 0, true); return scratch.getFloat32(0, true); }
function bitsF32(x) { scratch.setFloat32(0, x, true); return scratch.getUint32(0, true); }
function f64(lo, hi) { scratch.setUint32(0, lo >>> 0, true); scratch.setUint32(4, hi >>> 0, true); return scratch.getFloat64(0, true); }
function bitsF64(x) { scratch.setFloat64(0, x, true); return [scratch.getUint32(0, true), scratch.getUint32(4, true)]; }
function i64(lo, hi) { return (BigInt(hi | 0) << 32n) | BigInt(lo >>> 0); }
function u64(lo, hi) { return (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0); }
function words64(v) { return [Number(BigInt.asUintN(32, v)), Number(BigInt.asUintN(32, v >> 32n))]; }
const pow2 = (n) => 2 ** n;

// To an integer, rounding towards -infinity and clamping to [lo, hi] (the datasheet's
// conversions); a NaN is taken as the infinity of its sign, as the ROM's library takes it.
function toInt(x, lo, hi, negative) {
  if (Number.isNaN(x)) return negative ? lo : hi;
  const v = Math.floor(x);
  return v < lo ? lo : v > hi ? hi : v;
}
function toBig(x, lo, hi, negative) {
  if (Number.isNaN(x)) return negative ? lo : hi;
  if (x === Infinity) return hi;
  if (x === -Infinity) return lo;
  const v = BigInt(Math.floor(x));
  return v < lo ? lo : v > hi ? hi : v;
}
const I64 = [-(2n ** 63n), 2n ** 63n - 1n];
const U64 = [0n, 2n ** 64n - 1n];

// A 64-bit integer times 2^-n, rounded once to single precision: first cut to 53 bits with a
// sticky bit for what was cut (so the cut cannot make a tie), exact as a double, then rounded.
function bigToFloat(v, n) {
  const negative = v < 0n;
  let m = negative ? -v : v;
  let shift = 0;
  const bits = m.toString(2).length;
  if (bits > 53) {
    shift = bits - 53;
    const cut = m & ((1n << BigInt(shift)) - 1n);
    m = (m >> BigInt(shift)) | (cut !== 0n ? 1n : 0n);
  }
  const x = Number(m) * pow2(shift - n);
  return Math.fround(negative ? -x : x);
}

// Registers: r[0..3] in, results written back into r (a 64-bit value as r0 low, r1 high).
const F = (r) => f32(r[0]);
const setF = (r, x) => { r[0] = bitsF32(Math.fround(x)); };
const D = (r, at = 0) => f64(r[at], r[at + 1]);
const setD = (r, x, at = 0) => { [r[at], r[at + 1]] = bitsF64(x); };
const setI = (r, v) => { r[0] = v >>> 0; };
const set64 = (r, v) => { [r[0], r[1]] = words64(v); };
const neg32 = (bits) => (bits >>> 31) === 1;
const neg64 = (hi) => (hi >>> 31) === 1;

// The soft-float table, by byte offset (the SDK's sf_table.h names); arguments and results as
// the ARM EABI passes them.
const softFloat = new Map([
  [0x00, ['fadd', (r) => setF(r, F(r) + f32(r[1]))]],
  [0x04, ['fsub', (r) => setF(r, F(r) - f32(r[1]))]],
  [0x08, ['fmul', (r) => setF(r, F(r) * f32(r[1]))]],
  [0x0c, ['fdiv', (r) => setF(r, F(r) / f32(r[1]))]],
  [0x10, ['fcmp_fast', null]],
  [0x14, ['fcmp_fast_flags', null]],
  [0x18, ['fsqrt', (r) => setF(r, Math.sqrt(F(r)))]],
  [0x1c, ['float2int', (r) => setI(r, toInt(F(r), -(2 ** 31), 2 ** 31 - 1, neg32(r[0])))]],
  [0x20, ['float2fix', (r) => setI(r, toInt(F(r) * pow2(r[1] | 0), -(2 ** 31), 2 ** 31 - 1, neg32(r[0])))]],
  [0x24, ['float2uint', (r) => setI(r, toInt(F(r), 0, 2 ** 32 - 1, neg32(r[0])))]],
  [0x28, ['float2ufix', (r) => setI(r, toInt(F(r) * pow2(r[1] | 0), 0, 2 ** 32 - 1, neg32(r[0])))]],
  [0x2c, ['int2float', (r) => setF(r, r[0] | 0)]],
  [0x30, ['fix2float', (r) => setF(r, (r[0] | 0) * pow2(-(r[1] | 0)))]],
  [0x34, ['uint2float', (r) => setF(r, r[0] >>> 0)]],
  [0x38, ['ufix2float', (r) => setF(r, (r[0] >>> 0) * pow2(-(r[1] | 0)))]],
  [0x3c, ['fcos', (r) => setF(r, Math.cos(F(r)))]],
  // the SDK's sincosf takes the cosine from r1 too
  [0x40, ['fsin', (r) => { const x = F(r); setF(r, Math.sin(x)); r[1] = bitsF32(Math.fround(Math.cos(x))); }]],
  [0x44, ['ftan', (r) => setF(r, Math.tan(F(r)))]],
  [0x48, ['fsincos', (r) => { const x = F(r); setF(r, Math.sin(x)); r[1] = bitsF32(Math.fround(Math.cos(x))); }]],
  [0x4c, ['fexp', (r) => setF(r, Math.exp(F(r)))]],
  [0x50, ['fln', (r) => setF(r, Math.log(F(r)))]],
  [0x54, ['fcmp', null]],
  [0x58, ['fatan2', (r) => setF(r, Math.atan2(F(r), f32(r[1])))]], // (y, x)
  [0x5c, ['int642float', (r) => setF(r, bigToFloat(i64(r[0], r[1]), 0))]],
  [0x60, ['fix642float', (r) => setF(r, bigToFloat(i64(r[0], r[1]), r[2] | 0))]],
  [0x64, ['uint642float', (r) => setF(r, bigToFloat(u64(r[0], r[1]), 0))]],
  [0x68, ['ufix642float', (r) => setF(r, bigToFloat(u64(r[0], r[1]), r[2] | 0))]],
  [0x6c, ['float2int64', (r) => set64(r, toBig(F(r), ...I64, neg32(r[0])))]],
  [0x70, ['float2fix64', (r) => set64(r, toBig(F(r) * pow2(r[1] | 0), ...I64, neg32(r[0])))]],
  [0x74, ['float2uint64', (r) => set64(r, toBig(F(r), ...U64, neg32(r[0])))]],
  [0x78, ['float2ufix64', (r) => set64(r, toBig(F(r) * pow2(r[1] | 0), ...U64, neg32(r[0])))]],
  [0x7c, ['float2double', (r) => setD(r, F(r))]],
]);

// The soft-double table: a double in r0:r1, a second one in r2:r3.
const softDouble = new Map([
  [0x00, ['dadd', (r) => setD(r, D(r) + D(r, 2))]],
  [0x04, ['dsub', (r) => setD(r, D(r) - D(r, 2))]],
  [0x08, ['dmul', (r) => setD(r, D(r) * D(r, 2))]],
  [0x0c, ['ddiv', (r) => setD(r, D(r) / D(r, 2))]],
  [0x10, ['dcmp_fast', null]],
  [0x14, ['dcmp_fast_flags', null]],
  [0x18, ['dsqrt', (r) => setD(r, Math.sqrt(D(r)))]],
  [0x1c, ['double2int', (r) => setI(r, toInt(D(r), -(2 ** 31), 2 ** 31 - 1, neg64(r[1])))]],
  [0x20, ['double2fix', (r) => setI(r, toInt(D(r) * pow2(r[2] | 0), -(2 ** 31), 2 ** 31 - 1, neg64(r[1])))]],
  [0x24, ['double2uint', (r) => setI(r, toInt(D(r), 0, 2 ** 32 - 1, neg64(r[1])))]],
  [0x28, ['double2ufix', (r) => setI(r, toInt(D(r) * pow2(r[2] | 0), 0, 2 ** 32 - 1, neg64(r[1])))]],
  [0x2c, ['int2double', (r) => setD(r, r[0] | 0)]],
  [0x30, ['fix2double', (r) => setD(r, (r[0] | 0) * pow2(-(r[1] | 0)))]],
  [0x34, ['uint2double', (r) => setD(r, r[0] >>> 0)]],
  [0x38, ['ufix2double', (r) => setD(r, (r[0] >>> 0) * pow2(-(r[1] | 0)))]],
  [0x3c, ['dcos', (r) => setD(r, Math.cos(D(r)))]],
  [0x40, ['dsin', (r) => setD(r, Math.sin(D(r)))]],
  [0x44, ['dtan', (r) => setD(r, Math.tan(D(r)))]],
  [0x48, ['dsincos', (r) => { const x = D(r); setD(r, Math.sin(x)); setD(r, Math.cos(x), 2); }]],
  [0x4c, ['dexp', (r) => setD(r, Math.exp(D(r)))]],
  [0x50, ['dln', (r) => setD(r, Math.log(D(r)))]],
  [0x54, ['dcmp', null]],
  [0x58, ['datan2', (r) => setD(r, Math.atan2(D(r), D(r, 2)))]], // (y, x)
  [0x5c, ['int642double', (r) => setD(r, Number(i64(r[0], r[1])))]], // Number(): rounded once
  [0x60, ['fix642double', (r) => setD(r, Number(i64(r[0], r[1])) * pow2(-(r[2] | 0)))]],
  [0x64, ['uint642double', (r) => setD(r, Number(u64(r[0], r[1])))]],
  [0x68, ['ufix642double', (r) => setD(r, Number(u64(r[0], r[1])) * pow2(-(r[2] | 0)))]],
  [0x6c, ['double2int64', (r) => set64(r, toBig(D(r), ...I64, neg64(r[1])))]],
  [0x70, ['double2fix64', (r) => set64(r, toBig(D(r) * pow2(r[2] | 0), ...I64, neg64(r[1])))]],
  [0x74, ['double2uint64', (r) => set64(r, toBig(D(r), ...U64, neg64(r[1])))]],
  [0x78, ['double2ufix64', (r) => set64(r, toBig(D(r) * pow2(r[2] | 0), ...U64, neg64(r[1])))]],
  [0x7c, ['double2float', (r) => setF(r, D(r))]],
]);

// The function table's functions but the flash ones (flashFunctions) and the table lookup.
const bits = (fn) => (r) => { r[0] = fn(r[0] >>> 0) >>> 0; };
function copy(r, mcu) { // memcpy(dest, src, n), forwards, returning dest
  for (let i = 0; i < r[2]; i++) mcu.writeUint8(r[0] + i, mcu.readUint8(r[1] + i));
}
function fill(r, mcu) { // memset(ptr, c, n), returning ptr
  for (let i = 0; i < r[2]; i++) mcu.writeUint8(r[0] + i, r[1] & 0xff);
}
const functions = [
  ['P3', 'popcount32', bits((x) => { let n = 0; for (; x; x &= x - 1) n++; return n; })],
  ['R3', 'reverse32', bits((x) => { let y = 0; for (let i = 0; i < 32; i++) y = (y << 1) | ((x >>> i) & 1); return y; })],
  ['L3', 'clz32', bits((x) => Math.clz32(x))],
  ['T3', 'ctz32', bits((x) => (x === 0 ? 32 : 31 - Math.clz32(x & -x)))],
  ['MS', 'memset', fill],
  ['S4', 'memset4', fill],
  ['MC', 'memcpy', copy],
  ['C4', 'memcpy44', copy],
  ['UB', 'reset_usb_boot', null],
  ['DT', 'debug_trampoline', null],
  ['DE', 'debug_trampoline_end', null],
  ['WV', 'wait_for_vector', null],
];

// What the flash functions do to the chip's flash (rp2040js has no flash commands); kept by
// code, so that the emulator answers them in the real bootrom too (--bootrom).
export const flashFunctions = new Map([
  ['IF', ['connect_internal_flash', () => {}]],
  ['EX', ['flash_exit_xip', () => {}]],
  ['RE', ['flash_range_erase', (r, mcu) => mcu.flash.fill(0xff, r[0], r[0] + r[1])]], // (addr, count, ...)
  ['RP', ['flash_range_program', (r, mcu) => { // (addr, data, count): NOR flash clears bits
    for (let i = 0; i < r[2]; i++) mcu.flash[r[0] + i] &= mcu.readUint8(r[1] + i);
  }]],
  ['FC', ['flash_flush_cache', () => {}]],
  ['CX', ['flash_enter_cmd_xip', () => {}]],
]);

// The ROM's image, its hooks (address of a slot → function(registers, mcu)) and each slot's
// name (address → name), for the emulator.
export function makeRom() {
  const rom = new Uint8Array(ROM_SIZE);
  const view = new DataView(rom.buffer);
  const hooks = new Map();
  const names = new Map();
  let at = 0x100; // the next free byte
  const slot = (name, fn) => {
    const address = at;
    view.setUint16(address, 0xbe00 | (names.size & 0xff), true); // bkpt #n
    view.setUint16(address + 2, 0x4770, true); // bx lr
    at += 4;
    names.set(address, name);
    if (fn) hooks.set(address, fn);
    return address;
  };
  const halt = slot('halt', null); // the vectors: the bootrom's own boot path is not here
  view.setUint32(0x00, 0x20042000, true); // the stack's top
  for (const vector of [0x04, 0x08, 0x0c]) view.setUint32(vector, halt | 1, true);
  rom.set([0x4d, 0x75, 0x01, VERSION], 0x10); // 'M', 'u', 1, the version

  // rom_table_lookup(table, code): the address paired with code in a 16-bit table, or 0
  const lookup = slot('rom_table_lookup', (r, mcu) => {
    let found = 0;
    for (let entry = r[0]; ; entry += 4) {
      const code = mcu.readUint16(entry);
      if (code === 0) break;
      if (code === (r[1] & 0xffff)) {
        found = mcu.readUint16(entry + 2);
        break;
      }
    }
    r[0] = found;
  });
  const table = [];
  for (const [code, name, fn] of functions) table.push([code, slot(name, fn) | 1]);
  for (const [code, [name, fn]] of flashFunctions) table.push([code, slot(name, fn) | 1]);

  // the soft-float and soft-double tables: 32-bit pointers, each table after its size in words
  const softTable = (prefix, entries) => {
    const slots = [...entries].map(([offset, [name, fn]]) => [offset, slot(`${prefix}:${name}`, fn)]);
    at = (at + 3) & ~3;
    view.setUint8(at + 2, 0x80 / 4); // the size, 2 bytes before the table (the SDK reads it)
    at += 4;
    const start = at;
    for (const [offset, address] of slots) view.setUint32(start + offset, address | 1, true);
    at += 0x80;
    return start;
  };
  const sf = softTable('SF', softFloat);
  const sd = softTable('SD', softDouble);

  const pairs = (entries) => {
    const start = at;
    for (const [code, value] of entries) {
      view.setUint8(at, code.charCodeAt(0));
      view.setUint8(at + 1, code.charCodeAt(1));
      view.setUint16(at + 2, value, true);
      at += 4;
    }
    view.setUint32(at, 0, true);
    at += 4;
    return start;
  };
  view.setUint16(0x14, pairs(table), true);
  view.setUint16(0x16, pairs([['SF', sf], ['SD', sd]]), true);
  view.setUint16(0x18, lookup | 1, true);
  if (at > ROM_SIZE) throw new Error('the ROM is full');
  return { image: new Uint32Array(rom.buffer), hooks, names };
}
