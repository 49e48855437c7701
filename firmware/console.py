# The device's end of the serial protocol: requests in, one reply each, events out.
#
# Pure over a write(bytes) callable and bytes fed in; serve() at the bottom is the thin shell
# that reads the USB serial line (stdin) on MicroPython. docs/serial-protocol.md is the
# reference; in short:
#   - every line is a frame (firmware.frame); lines that are not frames are counted and skipped.
#   - a request {"id": 7, "op": "power", ...} gets one reply {"id": 7, "ok": true, ...} or
#     {"id": 7, "ok": false, "error": "...", "code": "..."}; events are pushed as they happen
#     (the Log's sink), as objects with "ev", "boot", "seq" and no "id".
#   - "hello" opens a session (the controller's random token). Every other op needs one, so a
#     device that restarted (and forgot its reply cache) says "nosession" to a retried request
#     instead of running it a second time; the controller then knows the outcome is unknown.
#   - replies to ops that change state are kept, the last cache_size of them, keyed by request
#     id: a retry (same id, same request) is answered from the cache, never executed again. A
#     new session empties the cache. Read-only ops are simply run again.
#   - while a controller holds the line, Ctrl-C on it is a plain byte (noise), not an
#     interrupt: "hello" and "hold" take the hold, any request keeps it, and it is let go after
#     contact_ms without a request or at once by "release" (what `bastion flash` sends before
#     mpremote asks for the REPL). The switch is the shell's (interrupt_switch); "reboot"
#     stays the deliberate way to restart.
import gc

from firmware import frame
from firmware.compat import heap_used, sleep_ms, ticks_diff, ticks_ms

PROTO = 1


class BadRequest(ValueError):
    pass


def _arg(req, key, kind, default=None):
    v = req.get(key, default)
    if v is None and default is None:
        raise BadRequest("missing %r" % key)
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        raise BadRequest("%r has the wrong type" % key)
    return v


def _channel_ref(req):
    v = req.get("channel")
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise BadRequest("'channel' must be a channel number or name")
    return v


def new_boot_id():
    """8 hex digits that differ from one boot to the next."""
    try:
        from os import urandom

        b = urandom(4)
    except (ImportError, AttributeError, OSError):
        t = ticks_ms()
        b = bytes((t >> 24 & 255, t >> 16 & 255, t >> 8 & 255, t & 255))
    return "%02x%02x%02x%02x" % (b[0], b[1], b[2], b[3])


class Console:
    """The request dispatcher. Optional collaborators (None leaves their ops refused):
    power (firmware.power.Power), tasks (watchdog.TaskWatch), nodes (watchdog.NodeWatch),
    log (firmware.log.Log: events are pushed from it, counters read from it), reboot (a
    callable run after the reply to "reboot" is written), info (a dict merged into the hello
    reply, e.g. {"fw": "0.1.0", "board": "sim"}), interrupts (a callable(on): Ctrl-C on the
    line interrupts the firmware, or is a plain byte; None: the line is never held).

    contact_ms  how long a held line stays held without a request from the controller (its
                link sends "hold" every few seconds while idle); then Ctrl-C interrupts
                again, so mpremote works once the controller has gone.
    """

    contact_ms = 6000

    def __init__(
        self,
        write,
        log=None,
        power=None,
        tasks=None,
        nodes=None,
        reboot=None,
        info=None,
        boot_id=None,
        clock=ticks_ms,
        cache_size=4,
        max_line=512,
        max_out=1536,
        interrupts=None,
    ):
        self.write = write
        self.log = log
        self.power = power
        self.tasks = tasks
        self.nodes = nodes
        self.reboot = reboot
        self.info = info or {}
        self.boot_id = boot_id or new_boot_id()
        self.clock = clock
        self.started = clock()
        self.cache_size = cache_size  # replies kept for retries; the oldest is forgotten
        self.deframer = frame.Deframer(frame.TO_DEVICE, max_line)
        # Every frame the device sends is built here: one buffer for the device's life, so
        # a reply or an event costs no heap beyond its own fields. Longer ones are refused.
        self._out = bytearray(max_out)
        self.session = None
        self._cache = {}  # id -> (request, reply line)
        self._order = []  # cached ids, oldest first
        self.requests = 0
        self.retries = 0  # requests answered from the cache
        self.errors = 0  # replies with ok false
        self.write_errors = 0
        self.out_of_memory = 0  # replies or events that could not be built
        self.too_long = 0  # replies or events longer than max_out
        self.internal_errors = 0  # requests lost to an error outside their handler
        self.interrupts = interrupts
        self.held = False  # a controller holds the line: Ctrl-C is a plain byte
        self._contact = self.started  # ticks of the last request
        # op -> (handler(req, now) -> dict of reply fields, changes state?)
        self.ops = {
            "hello": (self._hello, False),
            "status": (self._status, False),
            "counters": (self._counters, False),
            "heap": (self._heap, False),
            "events": (self._events, False),
            "power": (self._power, True),
            # Idempotent: running one twice does no harm, so their replies are not cached
            # (the controller sends a beat every 2 s; caching them would fill the heap).
            "watch": (self._watch, False),
            "unwatch": (self._unwatch, False),
            "beat": (self._beat, False),
            "reboot": (self._reboot, True),
            # Idempotent, read nothing: not cached.
            "hold": (self._hold, False),
            "release": (self._hold, False),
        }
        self._after = None  # run once the current reply is written (reboot)
        self.live = {}  # name -> callable() whose result joins the hello and status replies
        if log is not None:
            log.boot = self.boot_id
            log.sink = self.push

    def add(self, op, handler, changes_state=False):
        """Register another op: handler(req, now) returns the reply's fields as a dict, or
        raises ValueError with the text for the operator."""
        self.ops[op] = (handler, changes_state)

    def then(self, fn):
        """Run fn() once the reply to the request being handled is written (a reset)."""
        self._after = fn

    # --- the byte stream ---------------------------------------------------------------
    def feed(self, data):
        """Bytes from the serial line (bytes or bytearray, any chunking)."""
        for req in self.deframer.feed(data):
            self.handle(req)

    def push(self, text):
        """The Log's sink: one event, already a JSON object that names this boot (the
        controller deduplicates events by boot and seq), out as a frame."""
        try:
            n = frame.frame_into(self._out, text, frame.TO_HOST)
        except frame.TooLong:  # the event is still in the ring: the controller can fetch it
            self.too_long += 1
            return
        self._send(memoryview(self._out)[:n])

    def _send(self, line):
        try:
            self.write(line)
        except OSError:  # never let a stuck serial line break the service that logged
            self.write_errors += 1

    # --- one request --------------------------------------------------------------------
    def handle(self, req):
        now = self.clock()
        self.requests += 1
        self._contact = now
        rid = req.get("id")
        if isinstance(rid, bool) or not isinstance(rid, int):
            return self._error(None, "request without an integer id", "badreq")
        op = req.get("op")
        if self.nodes is not None:
            self.nodes.contact(now, op == "hello")
        entry = self.ops.get(op) if isinstance(op, str) else None
        if entry is None:
            return self._error(rid, "unknown op %r" % (op,), "unknown")
        handler, changes_state = entry
        if op != "hello" and self.session is None:
            return self._error(rid, "no session: send hello first", "nosession")
        if changes_state:
            hit = self._cache.get(rid)
            if hit is not None and hit[0] == req:
                self.retries += 1
                self._send(hit[1])
                return None
        try:
            fields = handler(req, now)
        except BadRequest as e:
            return self._error(rid, "%s: %s" % (op, e), "badreq", req if changes_state else None)
        except ValueError as e:  # PowerError and other refusals: the text is for the operator
            return self._error(rid, str(e), "refused", req if changes_state else None)
        except Exception as e:  # a bug must not kill the console; Ctrl-C still stops it
            if self.log is not None:
                self.log.count("console.internal_error")
            return self._error(
                rid, "internal error: %s %s" % (type(e).__name__, e), "internal", None
            )
        fields["id"] = rid
        fields["ok"] = True
        try:
            n = frame.encode_into(self._out, fields, frame.TO_HOST)
        except frame.TooLong:
            n = None
        except MemoryError:
            fields = None
            gc.collect()
            self.out_of_memory += 1
            return self._error(rid, "out of memory building the reply", "internal", None)
        if n is None and "nodes" in fields:  # status: without these, each for an "only"
            fields.pop("consoles", None)
            del fields["nodes"]
            fields["partial"] = ("nodes", "consoles")
            try:
                n = frame.encode_into(self._out, fields, frame.TO_HOST)
            except frame.TooLong:
                pass
        evs = fields.get("events")
        while n is None and evs is not None and len(evs) > 1:
            # events: the oldest half, and the controller asks from `next` for the rest (sixteen
            # of a transfer's ends are twice a frame; its catch-up failed on every reconnect)
            del evs[(len(evs) + 1) // 2 :]
            fields["next"] = evs[-1]["seq"] + 1
            try:
                n = frame.encode_into(self._out, fields, frame.TO_HOST)
            except frame.TooLong:
                pass
        if n is None:
            self.too_long += 1
            return self._error(rid, "%s: the reply is longer than %d bytes" % (op, len(self._out)),
                               "internal", None)
        line = memoryview(self._out)[:n]
        if changes_state:
            self._remember(rid, req, bytes(line))
        self._send(line)
        after, self._after = self._after, None
        if after is not None:
            after()
        return None

    def _error(self, rid, text, code, req=None):
        self.errors += 1
        try:
            n = frame.encode_into(self._out, {"id": rid, "ok": False, "error": text, "code": code})
        except frame.TooLong:  # an error text beyond the buffer: say so in fewer words
            n = frame.encode_into(self._out, {"id": rid, "ok": False, "error": "error",
                                              "code": code})
        line = memoryview(self._out)[:n]
        if req is not None:  # a refusal is an answer too: a retry must get the same one
            self._remember(rid, req, bytes(line))
        self._send(line)

    def _remember(self, rid, req, line):
        if rid in self._cache:
            self._order.remove(rid)
        elif len(self._order) >= self.cache_size:
            del self._cache[self._order.pop(0)]
        self._cache[rid] = (req, line)
        self._order.append(rid)

    # --- ops -----------------------------------------------------------------------------
    def _hello(self, req, now):
        proto = req.get("proto", PROTO)
        if proto != PROTO:
            raise ValueError("protocol %r not supported (this device speaks %d)" % (proto, PROTO))
        session = _arg(req, "session", str)
        if session != self.session:
            self.session = session
            self._cache = {}
            self._order = []
        d = {
            "proto": PROTO,
            "boot": self.boot_id,
            "uptime_ms": ticks_diff(now, self.started),
            "seq": self._next_seq(),
            "channels": len(self.power.channels) if self.power is not None else 0,
        }
        for k in self.info:
            d[k] = self.info[k]
        for k in self.live:
            d[k] = self.live[k]()
        self._hold(req, now)  # op "hello": the controller holds the line
        return d

    # --- holding the line ------------------------------------------------------------------
    def tick(self, now=None):
        """The shell calls this often: a held line whose controller went quiet is let go."""
        if self.held:
            now = self.clock() if now is None else now
            if ticks_diff(now, self._contact) > self.contact_ms:
                self._hold({"op": "timeout"}, now)

    def _hold(self, req, now):
        # The ops "hold" and "release", and hello and tick: Ctrl-C is a plain byte (held) or
        # interrupts again (op "release", or "timeout"); a "console" event says which and why.
        op = req.get("op")
        on = op == "release" or op == "timeout"
        if self.interrupts is not None and self.held == on:
            try:
                self.interrupts(on)
                self.held = not on
                if self.log is not None:
                    self.log.event("console", ("interrupts", "why"), ("on" if on else "off", op))
            except Exception:  # noqa: BLE001 - the port could not: the line stays as it was
                if self.log is not None:
                    self.log.count("console.interrupt_switch_failed")
        return {"held": self.held, "contact_ms": self.contact_ms}

    def _status(self, req, now):
        d = {"boot": self.boot_id, "uptime_ms": ticks_diff(now, self.started)}
        if self.power is not None:
            d["power"] = self.power.status()
        if self.tasks is not None:
            d["tasks"] = self.tasks.status(now)
        if self.nodes is not None:
            d["nodes"] = self.nodes.status()
        d["heap"] = self.ops["heap"][0](req, now)
        for k in self.live:
            d[k] = self.live[k]()
        only = req.get("only")  # one section, for a reply that left it out ("partial")
        if only is not None and not isinstance(only, str):
            raise BadRequest("'only' has the wrong type")
        return d if only is None else {only: d.get(only)}  # counters have their own op: a status reply must fit the frame buffer

    def _counters(self, req, now):
        # Into the log's own table (sized at boot), not a copy: a copy is a fresh run of heap,
        # which a heap in pieces may not have when the counters matter most.
        c = self.log.counters if self.log is not None else {}
        df = self.deframer
        c["console.frames"] = df.frames
        c["console.noise"] = df.noise
        c["console.bad"] = df.bad
        c["console.echo"] = df.echo
        c["console.overlong"] = df.overlong
        c["console.requests"] = self.requests
        c["console.retries"] = self.retries
        c["console.errors"] = self.errors
        c["console.write_errors"] = self.write_errors
        c["console.out_of_memory"] = self.out_of_memory
        c["console.too_long"] = self.too_long
        c["console.internal_errors"] = self.internal_errors
        if self.log is not None:
            c["log.dropped"] = self.log.dropped
        return {"counters": c}

    def _heap(self, req, now):
        d = {"used": heap_used()}
        if hasattr(gc, "mem_free"):
            d["free"] = gc.mem_free()
        return d

    def _events(self, req, now):
        """Events still in the ring with seq >= since, oldest first, at most n (<= 16)."""
        since = _arg(req, "since", int, 0)
        n = _arg(req, "n", int, 8)
        n = max(1, min(n, 16))
        out = []
        first = None
        if self.log is not None:
            for e in self.log.recent():
                if first is None:
                    first = e["seq"]
                if e["seq"] >= since and len(out) < n:
                    out.append(e)
        nxt = out[-1]["seq"] + 1 if out else max(since, self._next_seq())
        return {"boot": self.boot_id, "events": out, "next": nxt, "first": first}

    def _next_seq(self):
        if self.log is None:
            return 0
        last = self.log.recent(1)
        return last[0]["seq"] + 1 if last else 0

    def _need(self, what, name):
        if what is None:
            raise ValueError("this device has no %s" % name)
        return what

    def _power(self, req, now):
        power = self._need(self.power, "relay channels")
        ref = _channel_ref(req)
        state = req.get("state")
        if state == "on":
            st = power.on(ref, now)
        elif state == "off":
            st = power.off(ref, now)
        elif state == "cycle":
            off_ms = req.get("off_ms")
            st = power.cycle(ref, now, off_ms)
        else:
            raise BadRequest("'state' must be on, off or cycle")
        return {"channel": st}

    def _watch(self, req, now):
        nodes = self._need(self.nodes, "node watchdog")
        ch = nodes.watch(
            _channel_ref(req), _arg(req, "timeout_ms", int), _arg(req, "boot_ms", int), now
        )
        return {"ch": ch}

    def _unwatch(self, req, now):
        return {"ch": self._need(self.nodes, "node watchdog").unwatch(_channel_ref(req))}

    def _beat(self, req, now):
        nodes = self._need(self.nodes, "node watchdog")
        chans = _arg(req, "channels", list)
        watched = []
        for ch in chans:
            if isinstance(ch, bool) or not isinstance(ch, (int, str)):
                raise BadRequest("'channels' must list channel numbers or names")
            if nodes.beat(ch, now):
                watched.append(ch)
        return {"watched": watched}

    def _reboot(self, req, now):
        if self.reboot is None:
            raise ValueError("this device cannot reboot on request")
        self._after = self.reboot
        return {"rebooting": True}


# --- the shell: the USB serial line on MicroPython ------------------------------------------
def interrupt_switch():
    """A callable(on) for Console(interrupts=...): Ctrl-C on the serial line interrupts the
    firmware (on) or reaches it as a plain byte (off); None where this port cannot switch.

    On a board, micropython.kbd_intr (3 on, -1 off). On the unix port (the sim board) the tty
    passes Ctrl-C as a byte all along (compat.tty_raw, off while the firmware runs), and
    serve() raises KeyboardInterrupt for it unless the line is held: the switch is the
    console's own `held`, and changes nothing here. Feature-detected: only the unix port has
    termios."""
    try:
        import termios
    except ImportError:
        termios = None
    if termios is not None:
        try:
            termios.tcgetattr(0)
        except OSError:  # stdin is not a tty: no Ctrl-C comes from it
            return None
        return lambda on: None
    try:
        from micropython import kbd_intr
    except ImportError:
        return None
    return lambda on: kbd_intr(3 if on else -1)


def stdout_writer():
    """write(bytes-like) for the USB serial line (sys.stdout's binary side where there is
    one). The console hands it a memoryview of its frame buffer, written before it returns."""
    import sys

    out = getattr(sys.stdout, "buffer", sys.stdout)
    return out.write


async def serve(console, stream=None, checkin=None, interval_ms=20, chunk=64, pump=None):
    """Feed the console from stdin forever. stdin is polled every interval_ms (so checkin(),
    the console's watchdog check-in, runs even when the line is quiet) and read a byte at a
    time while it has data, because a board's stdin read(n) blocks until it has n bytes.
    pump(): the node consoles' pass (firmware.nodecons), after this pass's requests were
    answered and before the check-in, so console bytes wait behind replies, never in front.
    Ctrl-C raises KeyboardInterrupt out of here and stops the firmware: not caught. Where it
    comes as a byte (the sim board), it is raised here, unless the line is held."""
    import select
    import sys

    stream = stream or sys.stdin
    raw = getattr(stream, "buffer", stream)
    poller = select.poll()
    poller.register(stream, select.POLLIN)
    one = bytearray(1)
    buf = bytearray(chunk)
    while True:
        n = 0
        while n < chunk and poller.poll(0):
            if not raw.readinto(one):  # end of file: Ctrl-D on a cooked tty, a closed pipe
                break
            if one[0] == 3 and not console.held:  # Ctrl-C, where the port passes it as a byte
                raise KeyboardInterrupt  # (the sim board: compat.tty_raw)
            buf[n] = one[0]
            n += 1
        if n:
            try:
                console.feed(buf[:n])
            except Exception:  # e.g. MemoryError mid-request: count it, keep the line alive
                console.internal_errors += 1
        if pump is not None:
            pump()  # never raises (firmware/nodecons.py)
        console.tick()
        if checkin is not None:
            checkin()
        await sleep_ms(0 if n == chunk else interval_ms)
