// An emulated RP2040 (rp2040js) running a UF2 image, for the rp2 tests (tests/rp2kit.py).
//
//   node emulator.mjs --image FIRMWARE.uf2 [--bootrom ROM.bin] [--serial-fd N] [--w5500]
//                     [--flash-file FLASH.bin]
//
// - The chip's USB CDC serial line is file descriptor N (a pseudo-terminal's master; its slave is
//   the board's /dev/ttyACM0 for mpremote and pyserial).
// - The ROM is this directory's stand-in for the bootrom (rom.mjs: its functions answered here in
//   JavaScript), or with --bootrom a real RP2040 bootrom (16 KiB), which is not in this
//   repository (tools/rp2040-bootrom).
// - The chip starts at the flash's first byte (boot2, then the image), as rp2040js's own demo
//   does: the bootrom's way there reads the flash with SSI commands, which rp2040js does not
//   emulate. For the same reason the bootrom's flash routines are answered here when the core
//   calls them, in either ROM: erase sets bytes to 0xff, program clears bits (NOR flash), the
//   rest (connect, exit XIP, flush, enter XIP) do nothing. MicroPython's littlefs (rp2.Flash)
//   writes through them, so files written by mpremote are in the flash after a reset.
// - A breakpoint (the SDK's panic, or a ROM function the stand-in does not have) stops the
//   emulator: {"ev": "break", "pc": ..., "rom": NAME} on stdout, the same on stderr.
// - Every end (a breakpoint, SIGTERM or SIGINT, the serial line's read or write failing, an
//   error not caught, among them a write to stdout once its reader is gone) writes the flash
//   file, if any, says why on stderr, and kills the process (SIGKILL: see stop()); no exit
//   status tells them apart.
// - A watchdog reset (its timer running out, or machine.reset(), which triggers it) starts the
//   chip again with the same flash, as a real board comes back with its files.
// - Written to stdout, one JSON object a line, `ms` the chip's own clock: every change of a
//   GPIO's level but the W5500's own pins (16-21) ({"ev": "gpio", "pin": 6, "value": "low"}),
//   the watchdog's first enabling after each start ("watchdog-enabled"), each start ("boot",
//   with its reason), the USB line coming up ("usb"), and the chip's clock once a second of the
//   wall's ("clock"). The emulation keeps its own time: it runs at a fraction of a real chip's
//   speed, and an idle chip's timers run ahead of the wall clock. A chip asleep with no timer
//   set (MicroPython's REPL waiting for a byte) stops its clock and the emulator sleeps until
//   the host writes a byte or a frame.
// - --flash-file: the flash is read from this file when it exists (the image is then not
//   loaded) and written to it when the emulator ends.
// - --w5500: a W5500 Ethernet chip on SPI0 (chip select GPIO 17, reset GPIO 20), as on the
//   W5500-EVB-Pico: its registers and buffers, its link up at 100 Mb/s full duplex, each socket
//   command done at once. Each frame the chip is asked to send is reported ({"ev": "eth", "len":
//   342, "frame": "ffff..."}); frames written to stdin ({"frame": "<hex>"}, a line each) are
//   received by socket 0 in MACRAW mode, INTn (GPIO 21) low until the driver has taken them.
//   A model of the register interface
//   MicroPython's WIZNET5K driver uses (W5500 datasheet, section 2 and 4), not of the chip's
//   timing or its TCP/IP offload.
//   W5500_TRACE=1 in the environment writes each SPI frame to stderr.
// - Three more places where rp2040js differs from the chip are worked around here, each where it
//   is done: a UART's TX interrupt (quietTx), USB reads while the host has nothing to send, and
//   the sleep with no timer set (run).
import fs from 'node:fs';
import { parseArgs } from 'node:util';
import { ConsoleLogger, GPIOPinState, LogLevel, Simulator, USBCDC } from 'rp2040js';
import { flashFunctions, makeRom } from './rom.mjs';

const { values: args } = parseArgs({
  options: {
    bootrom: { type: 'string' },
    image: { type: 'string' },
    'serial-fd': { type: 'string', default: '3' },
    w5500: { type: 'boolean', default: false },
    'flash-file': { type: 'string' },
  },
});
if (!args.image) {
  process.stderr.write('usage: node emulator.mjs --image FIRMWARE.uf2 [--bootrom ROM.bin] [--serial-fd N] [--w5500] [--flash-file F]\n');
  process.exit(2);
}
const serialFd = Number(args['serial-fd']);
const FLASH_START = 0x10000000;

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function readBootrom(path) {
  const bytes = fs.readFileSync(path);
  if (bytes.length !== 16384) {
    throw new Error(`${path}: ${bytes.length} bytes, an RP2040 bootrom is 16384`);
  }
  return new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.length / 4).slice();
}

// UF2: 512-byte blocks; magics at 0 and 4 and at the end, the target address at 12, the
// payload's size at 16, the payload from 32.
function loadUf2(path, flash) {
  const data = fs.readFileSync(path);
  const view = new DataView(data.buffer, data.byteOffset, data.length);
  let blocks = 0;
  for (let at = 0; at + 512 <= data.length; at += 512) {
    if (view.getUint32(at, true) !== 0x0a324655 || view.getUint32(at + 4, true) !== 0x9e5d5157
        || view.getUint32(at + 508, true) !== 0x0ab16f30) {
      throw new Error(`${path}: block ${blocks} is not a UF2 block`);
    }
    const address = view.getUint32(at + 12, true);
    const size = view.getUint32(at + 16, true);
    if (address < FLASH_START || address + size > FLASH_START + flash.length || size > 476) {
      throw new Error(`${path}: block ${blocks} writes outside the flash (0x${address.toString(16)})`);
    }
    flash.set(data.subarray(at + 32, at + 32 + size), address - FLASH_START);
    blocks += 1;
  }
  return blocks;
}

// The bootrom's function table (RP2040 datasheet 2.8.3): a 16-bit pointer at 0x14 to pairs of
// (two-letter code, 16-bit address), ending with code 0.
function romFunctions(bootrom) {
  const bytes = new Uint8Array(bootrom.buffer);
  const u16 = (a) => bytes[a] | (bytes[a + 1] << 8);
  const found = new Map();
  for (let at = u16(0x14); u16(at) !== 0; at += 4) {
    const code = String.fromCharCode(bytes[at], bytes[at + 1]);
    found.set(code, u16(at + 2) & ~1);
  }
  return found;
}

// The ROM, the routines answered here (address → function(registers, mcu)) and the names of
// the ROM's functions by address.
function loadRom() {
  if (!args.bootrom) return makeRom();
  const image = readBootrom(args.bootrom);
  const table = romFunctions(image);
  const hooks = new Map();
  const names = new Map();
  for (const [code, [name, fn]] of flashFunctions) {
    if (!table.has(code)) throw new Error(`the bootrom has no '${code}' function`);
    hooks.set(table.get(code), fn);
  }
  for (const [code, address] of table) names.set(address, code);
  return { image, hooks, names };
}
const { image: bootrom, hooks, names: romNames } = loadRom();
let flash = new Uint8Array(16 * 1024 * 1024).fill(0xff); // carried from one boot to the next
let blocks = 0;
if (args['flash-file'] && fs.existsSync(args['flash-file'])) {
  fs.readFileSync(args['flash-file']).copy(flash);
} else {
  blocks = loadUf2(args.image, flash);
}
// Every way out goes through here. Not process.exit(): Node's exit waits for its thread pool,
// where the serial line's read blocks until the line's other end writes or closes, and a test
// (or a process it started) may hold that end open: the exit then never ends, and the process
// no longer answers SIGTERM either. The flash is written (synchronously) first.
function stop(why) {
  try {
    if (args['flash-file']) fs.writeFileSync(args['flash-file'], sim ? sim.rp2040.flash : flash);
    if (why) fs.writeSync(2, why.endsWith('\n') ? why : why + '\n');
  } finally {
    process.kill(process.pid, 'SIGKILL');
  }
}
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => stop(''));
// Anything thrown and not caught, among them a write to stdout once whoever read it is gone
// (EPIPE): a test process killed outright. Node's own handling would exit, and hang as above.
process.on('uncaughtException', (err) => stop(`emulator: ${err.stack ?? err}`));

// --- the W5500 --------------------------------------------------------------------------------
// An SPI frame while chip select is low: a 16-bit address, a control byte (block select << 3,
// read/write << 2, mode), then data to or from consecutive addresses of that block. Block 0
// holds the common registers, 4n+1 socket n's registers, 4n+2 its TX buffer, 4n+3 its RX buffer.
class W5500 {
  constructor() {
    this.blocks = new Map();
    this.reset();
  }

  reset() {
    this.blocks.clear();
    const common = this.block(0);
    common[0x2e] = 0xbf; // PHYCFGR: reset done, all capable, 100 Mb/s full duplex, link up
    common[0x39] = 0x04; // VERSIONR
    for (let n = 0; n < 8; n++) {
      const regs = this.block(4 * n + 1);
      regs[0x1e] = 2; // Sn_RXBUF_SIZE, KB
      regs[0x1f] = 2; // Sn_TXBUF_SIZE, KB
    }
    this.select(false);
  }

  block(bsb) {
    let b = this.blocks.get(bsb);
    if (!b) {
      b = new Uint8Array(65536);
      this.blocks.set(bsb, b);
    }
    return b;
  }

  select(low) {
    if (!low && process.env.W5500_TRACE && this.frame && this.frame.length >= 3) {
      process.stderr.write(`w5500 ${this.writing ? 'W' : 'R'} bsb=${this.bsb} at=0x${((this.frame[0] << 8) | this.frame[1]).toString(16)} n=${this.addr - ((this.frame[0] << 8) | this.frame[1])} last=${this.last}\n`);
    }
    this.frame = low ? [] : null;
  }

  u16(regs, at) {
    return (regs[at] << 8) | regs[at + 1];
  }

  set16(regs, at, v) {
    regs[at] = (v >> 8) & 0xff;
    regs[at + 1] = v & 0xff;
  }

  // one byte in from the controller's MOSI; the byte it reads on MISO meanwhile
  transfer(byte) {
    if (this.frame === null) return 0;
    const f = this.frame;
    if (f.length < 3) {
      f.push(byte);
      if (f.length === 3) {
        this.addr = (f[0] << 8) | f[1];
        this.bsb = f[2] >> 3;
        this.writing = (f[2] & 0x04) !== 0;
      }
      return f.length; // the W5500 answers 1, 2, 3 during the header
    }
    const at = this.masked(this.bsb, this.addr & 0xffff);
    this.addr += 1;
    if (this.writing) {
      this.last = byte;
      this.write(this.bsb, at, byte);
      return 0;
    }
    this.last = this.read(this.bsb, at);
    return this.last;
  }

  // a socket's TX and RX buffers are addressed modulo their size (Sn_TXBUF_SIZE, Sn_RXBUF_SIZE)
  masked(bsb, at) {
    const kind = bsb % 4;
    if (bsb === 0 || kind === 1) return at; // the common registers, a socket's registers
    const regs = this.block(bsb - kind + 1);
    const size = (kind === 2 ? regs[0x1f] : regs[0x1e]) * 1024;
    return size > 0 ? at % size : at;
  }

  read(bsb, at) {
    if (bsb % 4 === 1) { // socket n's registers (block 4n+1)
      const regs = this.block(bsb);
      if (at === 0x01) return 0; // Sn_CR: every command is done at once
      if (at === 0x20 || at === 0x21) { // Sn_TX_FSR
        const free = regs[0x1f] * 1024 - ((this.u16(regs, 0x24) - this.u16(regs, 0x22)) & 0xffff);
        return at === 0x20 ? (free >> 8) & 0xff : free & 0xff;
      }
      if (at === 0x26 || at === 0x27) { // Sn_RX_RSR
        const used = (this.u16(regs, 0x2a) - this.u16(regs, 0x28)) & 0xffff;
        return at === 0x26 ? (used >> 8) & 0xff : used & 0xff;
      }
    }
    if (bsb === 0 && at === 0x00) return this.block(0)[0] & 0x7f; // MR: its reset bit clears
    return this.block(bsb)[at];
  }

  write(bsb, at, byte) {
    if (bsb === 0 && at === 0x00 && (byte & 0x80)) {
      this.reset();
      this.frame = [0, 0, 0]; // the rest of this frame goes nowhere
      return;
    }
    if (bsb === 0 && (at === 0x2e || at === 0x39)) return; // PHYCFGR's link and VERSIONR stay
    if (bsb % 4 === 1) { // socket n's registers (block 4n+1)
      const regs = this.block(bsb);
      const n = (bsb - 1) / 4;
      if (at === 0x01) return this.command(n, regs, byte);
      if (at === 0x02) { // Sn_IR: a 1 clears that bit
        regs[0x02] &= ~byte;
        this.interrupt();
        return;
      }
    }
    this.block(bsb)[at] = byte;
  }

  // A frame off the wire for socket 0 in MACRAW mode: in its RX buffer behind a 2-byte length
  // (the frame's and its own), Sn_RX_RSR grows, Sn_IR's RECV is set. False when the socket is
  // not open in MACRAW mode or the buffer has no room (the chip drops it).
  receive(frame) {
    const regs = this.block(1);
    if (regs[0x03] !== 0x42) return false;
    const size = regs[0x1e] * 1024;
    const wr = this.u16(regs, 0x2a);
    const used = (wr - this.u16(regs, 0x28)) & 0xffff;
    if (used + frame.length + 2 > size) return false;
    const buf = this.block(3);
    const packet = [((frame.length + 2) >> 8) & 0xff, (frame.length + 2) & 0xff, ...frame];
    packet.forEach((byte, i) => { buf[(wr + i) % size] = byte; });
    this.set16(regs, 0x2a, (wr + packet.length) & 0xffff);
    regs[0x02] |= 0x04; // RECV
    this.interrupt();
    return true;
  }

  // INTn is low while a socket has an interrupt its Sn_IMR lets through (and SIMR, for it)
  interrupt() {
    const common = this.block(0);
    let pending = false;
    for (let n = 0; n < 8; n++) {
      const regs = this.block(4 * n + 1);
      if ((common[0x18] & (1 << n)) && (regs[0x02] & regs[0x2c])) pending = true;
    }
    if (this.onInterrupt) this.onInterrupt(pending);
  }

  command(n, regs, cmd) {
    const SR = 0x03;
    switch (cmd) {
      case 0x01: { // OPEN
        const protocol = regs[0x00] & 0x0f;
        regs[SR] = { 1: 0x13, 2: 0x22, 3: 0x32, 4: 0x42 }[protocol] ?? 0x00;
        for (const at of [0x22, 0x24, 0x28, 0x2a]) this.set16(regs, at, 0);
        break;
      }
      case 0x02: // LISTEN
        if (regs[SR] === 0x13) regs[SR] = 0x14;
        break;
      case 0x04: // CONNECT: nobody answers
        regs[SR] = 0x00;
        regs[0x02] |= 0x08; // TIMEOUT
        break;
      case 0x08: // DISCON
      case 0x10: // CLOSE
        regs[SR] = 0x00;
        break;
      case 0x20: // SEND
      case 0x21: // SEND_MAC
      case 0x22: { // SEND_KEEP
        const size = regs[0x1f] * 1024;
        const rd = this.u16(regs, 0x22);
        const len = (this.u16(regs, 0x24) - rd) & 0xffff;
        const buf = this.block(4 * n + 2);
        const bytes = Array.from({ length: len }, (_, i) => buf[(rd + i) % size]);
        emit({ ev: 'eth', socket: n, len, frame: Buffer.from(bytes).toString('hex') });
        this.set16(regs, 0x22, this.u16(regs, 0x24));
        regs[0x02] |= 0x10; // SENDOK
        break;
      }
      case 0x40: // RECV: the driver moved Sn_RX_RD
        break;
    }
  }
}

// rp2040js raises a UART's TX interrupt at every check ("TODO ... a proper FIFO for TX"): once
// MicroPython enables it, the interrupt is pending again as soon as its handler clears it, and
// the chip does little else (the node console UARTs of board.json). A PL011 raises it when its
// TX FIFO drains to the trigger level; rp2040js's FIFO is empty at once, so here it is raised by
// each byte written, and clearing it (UARTICR) holds.
function quietTx(uart) {
  const TXINTR = 1 << 5;
  uart.checkInterrupts = function checkInterrupts() {
    this.rp2040.setInterrupt(this.irq, !!(this.interruptStatus & this.interruptMask));
  };
  const write = uart.writeUint32.bind(uart);
  uart.writeUint32 = (offset, value) => {
    write(offset, value);
    if (offset === 0x0) { // UARTDR: the byte is out, the FIFO below its level again
      uart.interruptStatus |= TXINTR;
      uart.checkInterrupts();
    }
  };
}

let sim = null;
let w5500 = null;
let cdc = null;
let connected = false;
let armed = null; // [endpoint, size]: the chip waits to read from the host, who had nothing
let feed = () => {};
let boots = 0;
const pending = []; // host to chip bytes that came while the USB line was down

function start(reason) {
  if (sim) {
    sim.stop();
    flash = sim.rp2040.flash;
  }
  sim = new Simulator();
  const mcu = sim.rp2040;
  mcu.logger = new ConsoleLogger(LogLevel.Error); // not each unemulated register touched
  mcu.onBreak = (code) => {
    const pc = (mcu.core.PC - 2) >>> 0;
    const what = { ev: 'break', code, pc, rom: romNames.get(pc) ?? null, lr: mcu.core.LR >>> 0 };
    emit(what);
    stop(`stopped at a breakpoint: ${JSON.stringify(what)}`);
  };
  mcu.loadBootrom(bootrom);
  mcu.flash.set(flash);
  // From the start of the flash (boot2, then the image), as rp2040js's own demo: the bootrom's
  // own way there reads the flash through SSI commands, which rp2040js does not emulate.
  mcu.core.PC = FLASH_START;
  boots += 1;
  const boot = boots;
  emit({ ev: 'boot', n: boot, reason, uf2_blocks: blocks });
  const nowMs = () => sim.clock.nanos / 1e6;
  mcu.gpio.forEach((pin, n) => {
    if (args.w5500 && n >= 16 && n <= 21) return; // the W5500's SPI bus: thousands a second
    pin.addListener((state) => {
      if (boot !== boots) return;
      const value = state === GPIOPinState.High ? 'high' : state === GPIOPinState.Low ? 'low' : 'input';
      emit({ ev: 'gpio', pin: n, value, ms: nowMs() });
    });
  });
  const watchdog = mcu.peripherals[0x40058];
  const watchdogWrite = watchdog.writeUint32.bind(watchdog);
  let enabled = false;
  watchdog.writeUint32 = (offset, value) => {
    watchdogWrite(offset, value);
    if (offset === 0x00 && !enabled && (value & (1 << 30))) { // CTRL.ENABLE
      enabled = true;
      emit({ ev: 'watchdog-enabled', ms: nowMs() });
    }
  };
  watchdog.onWatchdogTrigger = () => {
    emit({ ev: 'watchdog', ms: nowMs() });
    setImmediate(() => start('watchdog'));
  };
  mcu.uart.forEach(quietTx);
  if (args.w5500) {
    const chip = new W5500();
    const spi = mcu.spi[0];
    mcu.gpio[17].addListener((state) => chip.select(state === GPIOPinState.Low));
    mcu.gpio[20].addListener((state) => { if (state === GPIOPinState.Low) chip.reset(); }); // RSTn
    // each byte answered after its time on the wire (8 bits at 20 MHz), on the chip's clock:
    // answered at once, from inside the SPI block's own call, DMA transfers stalled
    let reply = 0;
    const done = mcu.clock.createAlarm(() => spi.completeTransmit(reply));
    spi.onTransmit = (value) => {
      reply = chip.transfer(value);
      done.schedule(400);
    };
    mcu.gpio[21].setInputValue(true); // INTn, idle high
    chip.onInterrupt = (pending) => mcu.gpio[21].setInputValue(!pending);
    w5500 = chip;
  }
  connected = false;
  const usb = mcu.usbCtrl;
  cdc = new USBCDC(usb);
  cdc.onDeviceConnected = () => {
    connected = true;
    emit({ ev: 'usb', connected: true, ms: nowMs() });
    for (const byte of pending.splice(0)) cdc.sendSerialByte(byte);
    feed();
  };
  cdc.onSerialData = (data) => write(Buffer.from(data));
  // A host NAKs the chip's reads while it has nothing to send; rp2040js's CDC answers them at
  // once with nothing, and the chip asks again, 10 us later, for as long as the line is quiet:
  // the emulation then never idles, and a byte from the host waits for its turn among those
  // polls. Here a read finds the bytes when they come.
  const answer = usb.onEndpointRead;
  armed = null;
  usb.onEndpointRead = (endpoint, size) => {
    if (endpoint === cdc.outEndpoint && cdc.txFIFO.empty) {
      armed = [endpoint, size];
      return;
    }
    answer(endpoint, size);
  };
  feed = () => {
    if (armed !== null && !cdc.txFIFO.empty) {
      const [endpoint, size] = armed;
      armed = null;
      answer(endpoint, size);
    }
  };
  run(sim);
}

// rp2040js's own Simulator.execute, with the ROM's routines answered here (hooks): at the
// routine's first instruction, do what it does and return to its caller.
function run(mine) {
  const { clock, rp2040: mcu } = mine;
  const { core } = mcu;
  const cycleNanos = 1e9 / 125e6;
  mine.stopped = false;
  const step = () => {
    mine.wake = null;
    if (mine.stopped) return;
    for (let i = 0; i < 200000 && !mine.stopped; i++) {
      if (core.waiting) {
        if (clock.nextAlarm === null) {
          // Asleep with no timer set: only the host can wake it (a byte on the serial line, a
          // frame for the W5500). rp2040js's own loop spins here, its clock still, a core of
          // the machine's CPU gone and the host's bytes waiting up to a whole round of it.
          // Sleep instead, until one comes or for a millisecond of the wall's.
          const timer = setTimeout(step, 1);
          mine.wake = () => {
            mine.wake = null; // once: a second step chain would run the chip twice as often
            clearTimeout(timer);
            setImmediate(step);
          };
          return;
        }
        const nanos = clock.nanosToNextAlarm;
        clock.tick(nanos);
        i += nanos / cycleNanos;
        continue;
      }
      const hook = hooks.get(core.PC);
      if (hook !== undefined) {
        hook(core.registers, mcu);
        core.PC = core.LR & ~1;
        clock.tick(cycleNanos);
        continue;
      }
      clock.tick(core.executeInstruction() * cycleNanos);
    }
    setImmediate(step); // after the serial line's I/O, without setTimeout's millisecond
  };
  step();
}

// chip to host: in order, without blocking the emulation
let writing = false;
const outQueue = [];
function write(buf) {
  outQueue.push(buf);
  if (!writing) drain();
}
function drain() {
  const buf = outQueue.shift();
  if (buf === undefined) {
    writing = false;
    return;
  }
  writing = true;
  fs.write(serialFd, buf, 0, buf.length, null, (err, n) => {
    if (err && err.code !== 'EAGAIN') stop(`serial write: ${err.message}`);
    if (!err && n < buf.length) outQueue.unshift(buf.subarray(n));
    if (err) outQueue.unshift(buf);
    drain();
  });
}

// host to chip
const input = fs.createReadStream(null, { fd: serialFd, autoClose: false, highWaterMark: 4096 });
input.on('data', (chunk) => {
  for (const byte of chunk) {
    if (connected) cdc.sendSerialByte(byte);
    else pending.push(byte);
  }
  feed();
  sim?.wake?.();
});
input.on('error', (err) => stop(`serial read: ${err.message}`));

// Frames for the W5500 to receive, from stdin: one JSON object a line, {"frame": "<hex>"};
// each is reported as {"ev": "eth-in", "seq": k, "len": n, "taken": true|false}, k counting
// from 0.
let control = '';
let received = 0;
process.stdin.on('data', (chunk) => {
  control += chunk.toString();
  let nl;
  while ((nl = control.indexOf('\n')) >= 0) {
    const line = control.slice(0, nl);
    control = control.slice(nl + 1);
    const { frame } = JSON.parse(line);
    const bytes = Buffer.from(frame, 'hex');
    const taken = w5500 !== null && w5500.receive(bytes);
    emit({ ev: 'eth-in', seq: received++, len: bytes.length, taken, ms: sim.clock.nanos / 1e6 });
    sim?.wake?.();
  }
});

start('power-on');
// the chip's clock once a second of the wall's: how far the emulation has run
setInterval(() => emit({ ev: 'clock', ms: sim.clock.nanos / 1e6 }), 1000);
