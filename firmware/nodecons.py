# Node consoles: the serial consoles of the nodes, wired to UARTs of the device, carried over
# the serial link beside requests, replies and events. docs/consoles.md tells the whole story,
# docs/serial-protocol.md ("Node consoles") the frames.
#
# Pure over ports and the console's writer. A port is what the board layer makes of one wired
# console (machine.UART on a board, a unix socket on the sim board): readinto(buf) -> n or
# None (nothing waiting), write(mv) -> bytes taken (0: try again later). The console's loop
# (firmware.console.serve) calls pump() once per pass, after that pass's requests were read
# and answered, before the watchdog check-in:
#   1. each port is drained into its channel's ring (ring_size bytes, allocated once). A full
#      ring loses its OLDEST bytes (the newest output says most about a node in trouble);
#      every byte lost is counted in the channel's `dropped`, so that at rest
#      rx == sent + dropped, exactly.
#   2. then at most `budget` bytes, all channels together, leave as frames
#         {"cons":2,"at":1234,"d":"aGVsbG8K"}
#      cons: the channel (the relay channel of the node it is wired to); at: the offset in that
#      channel's byte stream (since boot, mod 2**30) of the frame's first byte; d: the bytes,
#      base64. A gap in `at` is bytes dropped. Channels take turns, a frame each per round, the
#      first to send moving on each pass, so one flooding node cannot starve another.
#   3. bytes typed in (op "cin") wait in the channel's tx buffer (tx_size) and go to the port
#      as it takes them; the reply says how many bytes were taken: the rest is the
#      controller's to send again (credit-style flow control: a full buffer refuses, it never
#      drops what was typed).
# Why console traffic cannot starve the rest: replies and events are written when they happen,
# console frames only here and at most `budget` bytes a pass; reading a port is bounded by its
# ring; the pass ends with the check-in. So the link's share for consoles is budget per pass.
#
# Heap: each frame is built in place in the console's own frame buffer (no copy, no string),
# with the payload's fixed head made once per channel at start. What a channel holds:
# ring_size + tx_size bytes and a few ints (docs/consoles.md has the measured number).
from firmware import frame
from firmware.compat import const

_MASK = const(0x3FFFFFFF)  # counters and offsets wrap here: small ints, never a bigint
_AT = const(14)  # where a frame's JSON starts: after "#EB< ", 8 hex digits, " " (firmware.frame)
_B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64_into(dst, at, src, start, n):
    """Base64 (RFC 4648, padded) of src[start:start+n] written into dst at `at`; returns the
    index after it. Nothing allocated."""
    end = start + n
    i = start
    while i + 3 <= end:
        v = (src[i] << 16) | (src[i + 1] << 8) | src[i + 2]
        dst[at] = _B64[v >> 18]
        dst[at + 1] = _B64[(v >> 12) & 63]
        dst[at + 2] = _B64[(v >> 6) & 63]
        dst[at + 3] = _B64[v & 63]
        at += 4
        i += 3
    left = end - i
    if left:
        v = src[i] << 16
        if left == 2:
            v |= src[i + 1] << 8
        dst[at] = _B64[v >> 18]
        dst[at + 1] = _B64[(v >> 12) & 63]
        dst[at + 2] = _B64[(v >> 6) & 63] if left == 2 else 0x3D
        dst[at + 3] = 0x3D
        at += 4
    return at


def _digits_into(dst, at, v):
    """Decimal digits of a non-negative int into dst at `at`; returns the index after them."""
    n = 1
    t = v
    while t >= 10:
        t //= 10
        n += 1
    i = at + n - 1
    while True:
        dst[i] = 0x30 + v % 10
        v //= 10
        if not v:
            break
        i -= 1
    return at + n


def _seal(buf, end):
    """Finish the frame whose JSON the caller wrote at buf[_AT:end], in place (marker, CRC,
    end of line: firmware.frame's layout, nothing copied); returns the frame's length. Kept
    here, not in firmware.frame, so the firmware without consoles does not load it."""
    frame._head_into(buf, frame.TO_HOST, frame.crc32(memoryview(buf)[_AT:end]), end)
    return end + 1


class Channel:
    """One wired console: its port, its ring (node -> controller), its tx buffer (controller
    -> node) and its counters (all mod 2**30)."""

    def __init__(self, ch, port, ring_size, tx_size):
        self.ch = ch
        self.port = port
        self.ring = bytearray(ring_size)
        self.start = 0  # the oldest byte held
        self.count = 0
        self.tx = bytearray(tx_size)
        self.tx_start = 0
        self.tx_count = 0
        self.rx = 0  # bytes read from the node
        self.sent = 0  # bytes sent to the controller
        self.dropped = 0  # bytes read from the node and lost (the ring was full)
        self.typed = 0  # bytes written to the node
        self.head = b'{"cons":%d,"at":' % ch  # the payload's fixed start, made once

    def put(self, src, n):
        """n bytes from src (a bytearray) into the ring, the oldest going when it is full."""
        size = len(self.ring)
        skip = 0
        if n > size:  # only the last `size` bytes can stay
            skip = n - size
        over = self.count + n - skip - size
        if over > 0:
            self.start = (self.start + over) % size
            self.count -= over
        self.dropped = (self.dropped + skip + max(over, 0)) & _MASK
        self.rx = (self.rx + n) & _MASK
        i = skip
        while i < n:
            end = (self.start + self.count) % size
            k = min(n - i, size - end)
            self.ring[end : end + k] = memoryview(src)[i : i + k]
            self.count += k
            i += k

    def take(self, src, n):
        """Typed bytes into the tx buffer, as many as fit; returns how many were taken."""
        size = len(self.tx)
        k = min(n, size - self.tx_count)
        i = 0
        while i < k:
            end = (self.tx_start + self.tx_count) % size
            m = min(k - i, size - end)
            self.tx[end : end + m] = src[i : i + m]
            self.tx_count += m
            i += m
        return k

    def status(self):
        return {"cons": self.ch, "rx": self.rx, "sent": self.sent, "dropped": self.dropped,
                "held": self.count, "typed": self.typed}  # fmt: skip


class NodeConsoles:
    """The device's wired consoles. ports: list of (relay channel, port). write and buf: the
    console's writer and frame buffer (firmware.console.Console.write, ._out), which the
    frames are built in between two requests.

    Bounds, each with what happens when it is hit:
      ring_size  bytes held per channel before the oldest are dropped (counted: `dropped`)
      tx_size    typed bytes waiting per channel; a "cin" beyond it is taken in part (`n`)
      budget     console bytes sent per pass, all channels together; the rest waits
      frame_max  bytes in one frame (a multiple of 3: base64 without padding mid-stream)
      read_max   bytes read from one port per pass (a UART must be drained: read it all)
    """

    def __init__(self, ports, write, buf, ring_size=1024, tx_size=128, budget=512,
                 frame_max=192, read_max=1024, scratch=256):  # fmt: skip
        # the longest frame: header, {"cons":N,"at":N,"d":"..."} with frame_max bytes, "\n"
        if len(buf) < _AT + 48 + (frame_max + 2) // 3 * 4:
            raise ValueError("nodecons: a %d-byte frame buffer cannot hold a %d-byte frame"
                             % (len(buf), frame_max))  # fmt: skip
        self.channels = [Channel(ch, port, ring_size, tx_size) for ch, port in ports]
        self.write = write
        self.buf = buf
        self.budget = budget
        self.frame_max = frame_max
        self.read_max = read_max
        self._scratch = bytearray(scratch)
        self._turn = 0  # the channel that sends first this pass
        self.frames = 0
        self.write_errors = 0
        self.errors = 0  # passes cut short by an error (firmware bug, port fault)

    def channel(self, ref):
        for c in self.channels:
            if c.ch == ref:
                return c
        raise ValueError("no node console on channel %r" % (ref,))

    # --- one pass -----------------------------------------------------------------------
    def pump(self):
        """Read every port, send at most `budget` bytes, write typed bytes out. Never raises:
        a fault here (a bug, a port gone wrong) is counted, the console's loop goes on."""
        try:
            self._pump()
        except Exception:  # noqa: BLE001 - the serial link must outlive a console's fault
            self.errors += 1

    def _pump(self):
        scratch = self._scratch
        for c in self.channels:
            got = 0
            while got < self.read_max:
                try:
                    n = c.port.readinto(scratch)
                except OSError:
                    n = None
                if not n:
                    break
                c.put(scratch, n)
                got += n
            if c.tx_count:
                self._type(c)
        left = self.budget
        chans = self.channels
        k = len(chans)
        busy = True
        while busy and left > 0:  # rounds of one frame per channel, so each gets its share
            busy = False
            for j in range(k):
                c = chans[(self._turn + j) % k]
                if c.count and left > 0:
                    left -= self._send(c, left)
                    busy = True
        if k:
            self._turn = (self._turn + 1) % k

    def _send(self, c, left):
        size = len(c.ring)
        n = min(c.count, size - c.start, self.frame_max, left)
        buf = self.buf
        at = _AT
        head = c.head
        buf[at : at + len(head)] = head
        at += len(head)
        at = _digits_into(buf, at, (c.rx - c.count) & _MASK)
        buf[at : at + 6] = b',"d":"'
        at += 6
        at = b64_into(buf, at, c.ring, c.start, n)
        buf[at] = 0x22  # "
        buf[at + 1] = 0x7D  # }
        at += 2
        m = _seal(buf, at)
        try:
            self.write(memoryview(buf)[:m])
        except OSError:
            self.write_errors += 1
        c.start = (c.start + n) % size
        c.count -= n
        c.sent = (c.sent + n) & _MASK
        self.frames += 1
        return n

    def _type(self, c):
        size = len(c.tx)
        n = min(c.tx_count, size - c.tx_start)
        try:
            k = c.port.write(memoryview(c.tx)[c.tx_start : c.tx_start + n])
        except OSError:
            k = 0
        if k:
            c.tx_start = (c.tx_start + k) % size
            c.tx_count -= k
            c.typed = (c.typed + k) & _MASK

    # --- the console's op and status ------------------------------------------------------
    def op_cin(self, req, now):
        """op "cin": {"cons": channel, "d": base64 bytes} -> {"cons", "n" taken, "free"}."""
        from binascii import a2b_base64

        ref = req.get("cons")
        if isinstance(ref, bool) or not isinstance(ref, int):
            raise ValueError("cin: 'cons' must be a channel number")
        c = self.channel(ref)
        d = req.get("d")
        if not isinstance(d, str):
            raise ValueError("cin: 'd' must be base64 text")
        try:
            data = a2b_base64(d)
        except ValueError:
            raise ValueError("cin: 'd' is not base64")
        n = c.take(data, len(data))
        return {"cons": c.ch, "n": n, "free": len(c.tx) - c.tx_count}

    def status(self):
        """The hello's and status's `consoles`: each channel's counters."""
        return [c.status() for c in self.channels]


# --- the firmware's start ---------------------------------------------------------------------
def ports(defn):
    """The node consoles wired to a board, as (relay channel, port) pairs: board.json's
    `node_consoles`, a list of UARTs on a real board (each names the relay channel of the node
    it is wired to, `relay`; one without is reserved, not wired), or on the sim board
    {"kind": "unix", "relays": [0, 1, ...], "dir": "consoles"}: a unix socket per channel,
    <dir>/<channel>.sock in the flash directory. The board layer's modules make the ports."""
    nc = defn.get("node_consoles")
    if isinstance(nc, dict) and nc.get("kind") == "unix":
        import os

        from firmware.board_sim import UnixConsole

        d = nc.get("dir", "consoles")
        try:
            os.mkdir(d)
        except OSError:  # there already
            pass
        return [(ch, UnixConsole("%s/%d.sock" % (d, ch))) for ch in nc.get("relays", ())]
    if not isinstance(nc, list):
        raise ValueError("board.json: node_consoles must be a list of UARTs")
    out = []
    for d in nc:
        if isinstance(d, dict) and isinstance(d.get("relay"), int):
            from firmware.board_hw import UartConsole

            out.append((d["relay"], UartConsole(d)))
    return out


def start(board, console, log):
    """Build the board's node consoles onto the console (firmware.console.Console): op "cin",
    `consoles` in hello and status; returns the pump for the console's loop, or None when they
    cannot start (a nodecons event says why: node consoles are a help, never a reason for the
    device to stop)."""
    try:
        return _start(board, console)
    except (MemoryError, OSError, ValueError) as e:
        log.count("nodecons.setup_failed")
        log.event("nodecons", ("error",), (repr(e),))
        return None


def _start(board, console):
    import gc

    sizes = board.defn.get("node_console_buffers") or {}
    p = ports(board.defn)
    gc.collect()
    # frames are built in the console's own frame buffer, between two requests
    cons = NodeConsoles(p, console.write, console._out, ring_size=sizes.get("ring", 1024),
                        tx_size=sizes.get("tx", 128), budget=sizes.get("budget", 512))  # fmt: skip
    console.add("cin", cons.op_cin, True)  # typed bytes must not be typed twice: cached
    console.live["consoles"] = cons.status
    return cons.pump
