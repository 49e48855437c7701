# The firmware's entry point: restore the relays, load the config, start every service on one
# asyncio loop.
#
# On a board, the flash's /main.py calls run(). On the sim board (MicroPython unix port) the
# supervisor starts `micropython main.py listen IP dhcp-port N ...` in the flash directory,
# and those words override the config for the lab and for tests.
#
# Order at boot matters (docs/device.md, "Boot order"):
#   1. board.json, then the relay outputs are driven to their persisted desired state, before
#      anything else can fail: an MCU reset, a watchdog reset or a reflash never glitches a
#      running node. This step does not depend on device.json being valid.
#   2. the maintenance flag (docs/device.md, "Maintenance mode"): a maintenance boot runs the
#      console alone, with the relays held, no network services and no watchdog.
#   3. the network (a real board's Ethernet, from device.json's `net`), then device.json; a bad
#      one is reported as a `boot` event and the network services stay off, but the console,
#      the relays and the watchdog keep running so the device can be fixed.
#   4. the services: console (USB serial), proxyDHCP, TFTP, power, heap sampler, link watch,
#      watchdog.
import gc
import sys

import asyncio

from firmware.compat import const, heap_used, sleep_ms, ticks_diff, ticks_ms, tty_raw, unload
from firmware.log import Log

VERSION = "0.2.0"

# How long each critical task may go without checking in before the watchdog stops feeding
# the hardware WDT (and so resets the board). The listeners are judged by their asyncio
# task still running; a task that blocks the loop stops every check-in at once.
TASK_DEADLINES_MS = {"console": 3000, "power": 3000, "dhcp": 3000, "tftp": 3000}
_WATCHDOG_PERIOD_MS = const(500)
_STALL_MS = const(2000)  # a listener stalled by the heap this long counts as hung (net.py's)
# Free heap the node consoles need at start: what they hold (about 20 KB with the sim board's
# four channels on the 64-bit port, less on a 32-bit board) plus the 12 KB the services keep
# for their own work.
NODECONS_MIN_FREE = const(32768)
# Interned names. MicroPython keeps each identifier, module name and short (up to 10
# characters) string constant of the loaded .mpy files, and on the unix port each word of
# argv, in a table of interned strings that only grows, by a new block twice the size of the
# last: blocks of 20, 40, 80, 160 and 320 hold 620 names, and the 621st allocates room for 640
# more at once, 7.1 KB on the 64-bit sim, never given back. A boot interns about 600
# (micropython.qstr_info() after boot and an mpremote exec, 2026-12-06: the sim 609, the sim
# dressed as a board 610; the sim's argv is bare `listen IP dhcp-port N ...` words, whose
# names the firmware has already: `--listen` and its like were five names more), so a new name
# costs a few bytes until a boot crosses 620, then 7 KB. A name first interned after boot, into a spent heap, fails where it is
# interned: asyncio.gather's lazy load of asyncio.funcs killed the DHCP listener of the
# dressed boards at 128k while the boot event still listed it. Hence `_NAME = const(n)` for
# constants (the compiler keeps no name) and one-use key tuples written where they are used.


def _options(argv):
    """The sim board's overrides (boards have no argv): the words `name value name value ...`
    (one word of argv may hold several, split at white space). The names are bare because the
    unix port interns every word of argv ("Interned names", above): `listen` is a name the
    firmware has already, `--listen` was one more."""
    words = " ".join(argv[1:]).split()
    opts = {}
    while len(words) > 1:
        name = words.pop(0)  # (not in one statement: the value would be popped first)
        opts[name] = words.pop(0)
    return opts


class Heap:
    """Tracks the heap: `code` is what is held after imports, `peak` the live high-water mark
    sampled after a collection each period (so it counts data, not garbage)."""

    period_ms = 1000
    step = 1024  # a new peak is reported once it exceeds the last reported one by this much

    def __init__(self, log):
        self.log = log
        gc.collect()
        self.code = heap_used()
        self.peak = self.code
        self._reported = self.code

    def sample(self):
        gc.collect()
        used = heap_used()
        if used > self.peak:
            self.peak = used
            if used - self._reported >= self.step:
                self._reported = used
                self.log.event("heap", ("used", "peak", "code"), (used, self.peak, self.code))
        return used

    def op(self, req, now):
        """The console's "heap" op: now, peak and code, plus what is free."""
        d = {"used": heap_used(), "peak": self.peak, "code": self.code}
        if hasattr(gc, "mem_free"):
            d["free"] = gc.mem_free()
        return d

    async def run(self):
        while True:
            await sleep_ms(self.period_ms)
            self.sample()


class Faults:
    """Fault injection for tests, only on boards whose definition allows it (the sim board):
    `{"op": "fault", "task": "power"}` makes that task stop checking in with the watchdog
    while the rest of the firmware goes on, as a task stuck on a bus would."""

    def __init__(self):
        self.hung = set()

    def op(self, req, now):
        task = req.get("task")
        if task not in TASK_DEADLINES_MS:
            raise ValueError("fault: 'task' must be one of %s" % ", ".join(TASK_DEADLINES_MS))
        self.hung.add(task)
        return {"hung": task}


async def _power_loop(power, nodes, tasks, faults):
    while True:
        now = ticks_ms()
        power.tick(now)
        nodes.tick(now)
        if "power" not in faults.hung:
            tasks.checkin("power", now)
        await sleep_ms(100)


async def _watchdog_loop(wdt, tasks, services, faults):
    # Feeds the hardware WDT only while every critical task has checked in recently. A
    # listener checks in by being alive: its task has not ended (a socket error, a bug) and
    # it has not been stalled by the heap (firmware/net.py, waitless) for longer than _STALL_MS.
    while True:
        now = ticks_ms()
        for name in services:
            task, svc = services[name]
            stalled = svc.stalled_since
            if stalled is not None and ticks_diff(now, stalled) > _STALL_MS:
                continue
            if name not in faults.hung and not task.done():
                tasks.checkin(name, now)
        if tasks.may_feed(now):
            wdt.feed()
        await sleep_ms(_WATCHDOG_PERIOD_MS)


def _maintenance(board, console, now_in):
    # The console's "maintenance" op: leave the one-shot flag, then, once the reply is out,
    # reset into a maintenance boot (boot.py). A hard reset, because nothing else stops a
    # running RP2040 watchdog. In a maintenance boot the relays are held: switching is refused.
    def op(req, now):
        if req["op"] != "maintenance":
            raise ValueError("maintenance mode: the relays are held as they are; "
                             "restart the device (op reboot) to switch them")  # fmt: skip
        if not now_in:
            with open("maintenance", "w") as f:
                f.write("1\n")
            console.then(board.reset)
        return {"maintenance": True, "rebooting": not now_in}

    return op


async def serve(board, power, cfg, log, opts, heap, error=None, net=None, maintenance=False):
    from firmware import console as console_mod
    from firmware.watchdog import NodeWatch, TaskWatch

    if cfg is not None:
        from firmware.proxydhcp import ProxyDhcp
        from firmware.tftpd import TftpServer
    # All the code first, then what holds big preallocated buffers (TFTP slots, the console's
    # frame buffer), one after the other in the heap's free top: loading code leaves holes,
    # and later 1.5 KB in one run may be hard to find.
    gc.collect()
    servers = []
    if cfg is not None:
        listen = opts.get("listen", "0.0.0.0")
        servers.append(("tftp", TftpServer(cfg, log, listen, int(opts.get("tftp-port", 69)))))
        # Broadcast DISCOVERs only reach a socket bound to the wildcard address: on a board
        # its one interface. The sim board told its interface (bastion sim --listen) binds
        # DHCP to the wildcard address on that interface alone and PXE to --listen; on
        # loopback, where no client broadcasts, both to --listen.
        dev = opts.get("dhcp-interface")
        if dev:
            dev = listen + "/" + dev  # ProxyDhcp's ADDR/INTERFACE
        elif listen.startswith("127."):
            dev = listen
        servers.append(("dhcp", ProxyDhcp(
            cfg,
            log,
            dev or "0.0.0.0",
            int(opts.get("dhcp-port", 67)),
            int(opts.get("pxe-port", 4011)),
        )))
    now = ticks_ms()
    faults = Faults()
    tasks = TaskWatch(dict(TASK_DEADLINES_MS), now, log)
    nodes = NodeWatch(power, now, log)
    console = console_mod.Console(
        console_mod.stdout_writer(),
        log=log,
        power=power,
        tasks=None if maintenance else tasks,
        nodes=None if maintenance else nodes,
        reboot=board.reset,
        info={"fw": VERSION, "board": board.name, "maintenance": maintenance},
        # maintenance is the flasher's turn: Ctrl-C stops the firmware even with a controller
        interrupts=None if maintenance else console_mod.interrupt_switch(),
    )
    console.add("heap", heap.op)
    op = _maintenance(board, console, maintenance)
    console.add("maintenance", op, True)
    if maintenance:
        for name in ("power", "watch", "unwatch", "beat"):
            console.add(name, op)
    if net is not None:
        console.live["net"] = net.status
    if board.defn.get("faults"):
        console.add("fault", faults.op, True)

    def console_checkin():
        if "console" not in faults.hung:
            tasks.checkin("console", ticks_ms())

    services = {}
    for name, svc in servers:
        services[name] = (asyncio.create_task(svc.run()), svc)
    del servers  # its list and tuples, else held for good (about 140 B, measured)
    await sleep_ms(0)  # let the listeners bind before the boot event says they are up
    # One that could not (its port taken: another server on the sim board's host) says why
    # and is not judged: a reset would find the port taken again, a reset loop that told
    # nobody anything but "watchdog".
    for name in ("dhcp", "tftp"):
        if name in services and services[name][0].done():
            try:
                await services.pop(name)[0]
            except Exception as e:
                log.event("listen", ("service", "error"), (name, str(e)))
        if name not in services:
            del tasks.deadlines[name]
    listening = sorted(services)  # reported by name, whatever order they were built in
    # Node consoles (firmware/nodecons.py): only into a heap with NODECONS_MIN_FREE left once
    # the services run (on the 64-bit sim board: --heap 160k; docs/consoles.md). Kept to these
    # few lines: at 128k the sim board has no byte of code to spare.
    pump = None
    if board.defn.get("node_consoles") and not maintenance and gc.mem_free() > NODECONS_MIN_FREE:
        # A never-run import costs its module name, one interned name ("Interned names",
        # above). It once pushed the sim dressed as w5500-evb-pico over 620 names, a 7 KB
        # block; __import__("firmware.nodecons") seemed to fix that only because its name is
        # a string constant too long to intern, and the 621st name then came after boot and
        # killed the DHCP listener. Measured 2026-12-05 at 128k, against __import__, this
        # holds 32 B less after boot on the sim and 64 B less on the dressed boards.
        from firmware.nodecons import start

        pump = start(board, console, log)
    gc.collect()
    heap.code = heap.peak = heap._reported = heap_used()
    led = board.led()
    if maintenance:
        log.event("boot", ("version", "board", "maintenance"), (VERSION, board.name, True))
        others = [asyncio.create_task(heap.run())]
        if led is not None:
            others.append(asyncio.create_task(led.blink()))
    else:
        if error is None:
            log.event("boot", ("version", "board", "heap_code", "services"),
                      (VERSION, board.name, heap.code, listening))  # fmt: skip
        else:
            log.event("boot", ("version", "board", "error"), (VERSION, board.name, error))
        wdt = board.watchdog(log)
        others = [
            asyncio.create_task(_power_loop(power, nodes, tasks, faults)),
            asyncio.create_task(heap.run()),
            asyncio.create_task(_watchdog_loop(wdt, tasks, services, faults)),
        ]
        if net is not None:
            others.append(asyncio.create_task(net.watch(board, led)))
    # The console runs in this task, so Ctrl-C on the serial line (KeyboardInterrupt) ends
    # serve() and leaves the REPL, as mpremote expects.
    try:
        await console_mod.serve(console, checkin=console_checkin, pump=pump)
    finally:
        for t in others + [task for task, _ in services.values()]:
            t.cancel()


def run(argv=None):
    tty = tty_raw()  # Ctrl-C as a byte, read between two steps (compat.tty_raw)
    opts = _options(argv if argv is not None else getattr(sys, "argv", []))
    log = Log(capacity=int(opts.get("log-capacity", 32)))
    from firmware import boot

    board, power, cfg, error, net, maintenance = boot.boot(opts, log)
    del boot
    unload("firmware.boot")  # boot-only code: its heap is worth more to the services
    heap = Heap(log)
    try:
        asyncio.run(serve(board, power, cfg, log, opts, heap, error, net, maintenance))
    finally:
        # Whoever stopped us (Ctrl-C from mpremote or bastion flash) gets the REPL, and needs
        # the heap (measured on the unix port at 128k: 18 KB free before this, 109 KB after).
        # MicroPython's asyncio keeps the interrupted task as asyncio.core.cur_task, and with
        # it serve()'s frame and every service, and a stopped loop keeps its cancelled tasks:
        # both are let go. The firmware's code (from .mpy, most of the heap) is forgotten as a
        # soft reset would; the boot stub (main.py) keeps no name for it.
        tty_raw(tty)  # as it was: the REPL's Ctrl-C interrupts what it runs
        core = sys.modules.get("asyncio.core")
        if core is not None and hasattr(core, "cur_task"):
            core.cur_task = None
        asyncio.new_event_loop()
        for name in [n for n in sys.modules if n == "firmware" or n.startswith("firmware.")]:
            unload(name)
        gc.collect()
    return 0
