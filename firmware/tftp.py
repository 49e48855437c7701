# TFTP for a read-only boot server, without sockets or files: the packet codec, the request
# policy and the state machine of one read transfer (RFC 1350, options per RFC 2347/2348/2349,
# windowsize per RFC 7440). The shell (firmware/tftpd.py) feeds it datagrams and timeouts and
# sends what it builds.
#
# Theory of operation. A read request is parsed (parse_request: parse or raise Malformed, never
# anything else; a malformed request gets no reply), then checked (check: raises Refused with the
# TFTP error to send; it never touches the file system). The shell opens the file and starts a
# Transfer in a free slot. From then on the transfer is driven by two calls, each returning the
# length of a packet built into the transfer's own preallocated buffer (0: send nothing):
#   on_packet(mv, n, now)  a datagram from the client (ACK n: advance; ERROR: end quietly)
#   on_timeout(now)        the deadline passed: resend the OACK or the current window, or give
#                          up after `retries` resends
# and after either, more() builds the next DATA packet of the window until it returns 0.
#
# Blocks are counted absolutely (1, 2, ... without bound) and put on the wire modulo 65536, so
# the block after 65535 is 0 (the common convention; tftp-hpa and curl follow it). An ACK is
# placed relative to the oldest unacknowledged block: one that moves nothing forward (a duplicate
# or a stale one) is ignored and never causes a send. Only the timer resends, which is RFC 1350's
# cure for the Sorcerer's Apprentice bug. Each DATA packet is read from the file when it is
# built (seek + readinto into the buffer), so a file is never held in RAM and a resend re-reads
# flash instead of keeping a window of copies.
#
# A silent client cannot hold a transfer for long: a timeout it asks for is acknowledged only
# up to CLIENT_TIMEOUT_MAX_S, and whatever the resend schedule, a transfer that has heard
# nothing new from its client (no ACK that moves it forward) for Transfer.max_silence_ms gives
# up. The shell may also end one early when a new request finds every slot busy (`since`).
from firmware.compat import const, ticks_add, ticks_diff

RRQ = const(1)
WRQ = const(2)
DATA = const(3)
ACK = const(4)
ERROR = const(5)
OACK = const(6)

# RFC 1350 error codes, and RFC 2347's code 8.
E_UNDEFINED = const(0)
E_NOT_FOUND = const(1)
E_ACCESS = const(2)
E_ILLEGAL = const(4)
E_OPTION = const(8)

_MAX_BLKSIZE = const(65464)  # RFC 2348: 8..65464
_MAX_TIMEOUT = const(255)  # RFC 2349: 1..255 s
_MAX_WINDOW = const(65535)  # RFC 7440: 1..65535
_BACKOFF_MAX = const(2)  # the device's own timeout doubles per resend, up to 4x

# The longest resend timeout a client may negotiate (s). RFC 2349 lets a server accept the
# timeout option only as asked ("the specified timeout value must match the value specified
# by the client"), so a larger one is not answered with a smaller value: it is left out of
# the OACK (RFC 2347: the server omits an option it does not accept), and the transfer runs
# on the device's own timeout and backoff, as for a client that asked nothing.
CLIENT_TIMEOUT_MAX_S = const(5)

# Which options a transfer acknowledges in its OACK (Transfer.oack; the transfer keeps the
# timeout it acknowledged above them, from bit _O_TIMEOUT_SHIFT).
_O_BLKSIZE = const(1)
_O_TSIZE = const(2)
_O_TIMEOUT = const(4)
_O_WINDOW = const(8)
_O_TIMEOUT_SHIFT = const(8)

# The texts of the errors the server sends: bytes, so no encoding happens on a refusal.
MSG_READ_ONLY = b"read-only server: writes are refused"
MSG_BAD_NAME = b"bad file name"
MSG_NOT_FOUND = b"file not found"
MSG_OCTET_ONLY = b"only octet mode is served"
MSG_BAD_OPTION = b"bad option value"
MSG_READ_ERROR = b"read error"
MSG_EVICTED = b"busy: silent too long, gave way; try again"  # a slot given to a new request


class Malformed(ValueError):
    """A datagram that is not the TFTP packet it claims to be."""


class Refused(Exception):
    """A well-formed request this server will not serve: send ERROR code with msg (bytes)."""

    def __init__(self, code, msg):
        self.code = code
        self.msg = msg


class Request:
    """A parsed RRQ/WRQ. name and mode are bytes (mode lower-cased); options is a list of
    (lower-cased name, value) bytes pairs in the order sent. check() adds the negotiated
    values: path, blksize, window, timeout (s, 0 = not asked) and oack (_O_* bits)."""

    def __init__(self, op, name, mode, options):
        self.op = op
        self.name = name
        self.mode = mode
        self.options = options
        self.path = None
        self.blksize = 512  # RFC 1350
        self.window = 1
        self.timeout = 0
        self.oack = 0


def _field(data, i):
    """The NUL-terminated field at data[i:] and the index after its NUL."""
    end = data.find(b"\0", i)
    if end < 0:
        raise Malformed("field not NUL-terminated")
    return data[i:end], end + 1


def parse_request(data):
    """An RRQ or WRQ datagram (bytes) -> Request, or raise Malformed.

    Options follow RFC 2347: NUL-terminated name/value pairs, names case-insensitive. Parsing
    stops at an empty name, so the NUL padding some PXE ROMs append is accepted."""
    n = len(data)
    if n < 4:
        raise Malformed("short request")
    op = (data[0] << 8) | data[1]
    if op != RRQ and op != WRQ:
        raise Malformed("not a request")
    name, i = _field(data, 2)
    mode, i = _field(data, i)
    options = []
    while i < n and data[i]:
        key, i = _field(data, i)
        if i >= n:
            raise Malformed("option without value")
        value, i = _field(data, i)
        options.append((key.lower(), value))
    return Request(op, name, mode.lower(), options)


def _decimal(b):
    """The value of 1..10 ASCII digits, else -1 (no sign, spaces or '_' as int() would take)."""
    if not 0 < len(b) <= 10:
        return -1
    v = 0
    for c in b:
        if not 48 <= c <= 57:
            return -1
        v = v * 10 + c - 48
    return v


def _check_name(name):
    # Names are relative to the TFTP root: no absolute paths, no '..' component, no
    # backslashes (a Windows-style separator that some servers map to '/'), nothing outside
    # printable ASCII. A NUL ends the name in parse_request, so it can never hide a suffix.
    if not name or name[0] == 47:  # '/'
        raise Refused(E_ACCESS, MSG_BAD_NAME)
    for c in name:
        if c < 32 or c > 126 or c == 92:  # controls, non-ASCII, '\'
            raise Refused(E_ACCESS, MSG_BAD_NAME)
    # A '..' component, found without splitting (no allocation that grows with the name).
    n = len(name)
    i = name.find(b"..")
    while i >= 0:
        if (i == 0 or name[i - 1] == 47) and (i + 2 == n or name[i + 2] == 47):
            raise Refused(E_ACCESS, MSG_BAD_NAME)
        i = name.find(b"..", i + 1)


def check(req, cfg):
    """Apply the server's policy (cfg: tftp_root, tftp_max_blksize, tftp_max_window) to a
    parsed request; sets req.path and the negotiated values, or raises Refused.

    - WRQ: ERROR 2 (access violation). Writing is a valid TFTP operation (so not 4, illegal
      operation) that this server grants on no file; RFC 1350 reserves 2 for refused access.
    - mode other than octet: ERROR 0. Boot files are binary, and serving netascii as octet
      would hand a netascii client silently altered bytes; the message says what to use.
    - a name escaping the root: ERROR 2. (A missing file is ERROR 1, found by the shell.)
    - RFC 2347: unknown options are left out of the OACK; a known option with a value outside
      its RFC's range is refused with ERROR 8. blksize and windowsize are lowered to this
      server's bounds (RFC 2348 and RFC 7440 let a server answer smaller); timeout is echoed
      as asked up to CLIENT_TIMEOUT_MAX_S and left out of the OACK above it (RFC 2349 allows
      no other answer); tsize is answered by start() with the file's size (RFC 2349).
    """
    if req.op != RRQ:
        raise Refused(E_ACCESS, MSG_READ_ONLY)
    if req.mode != b"octet":
        raise Refused(E_UNDEFINED, MSG_OCTET_ONLY)
    _check_name(req.name)
    for key, value in req.options:
        v = _decimal(value)
        if key == b"blksize":
            if not 8 <= v <= _MAX_BLKSIZE:
                raise Refused(E_OPTION, MSG_BAD_OPTION)
            req.blksize = min(v, cfg.tftp_max_blksize)
            req.oack |= _O_BLKSIZE
        elif key == b"tsize":
            if v < 0:
                raise Refused(E_OPTION, MSG_BAD_OPTION)
            req.oack |= _O_TSIZE
        elif key == b"timeout":
            if not 1 <= v <= _MAX_TIMEOUT:
                raise Refused(E_OPTION, MSG_BAD_OPTION)
            if v <= CLIENT_TIMEOUT_MAX_S:
                req.timeout = v
                req.oack |= _O_TIMEOUT
        elif key == b"windowsize":
            if not 1 <= v <= _MAX_WINDOW:
                raise Refused(E_OPTION, MSG_BAD_OPTION)
            req.window = min(v, cfg.tftp_max_window)
            req.oack |= _O_WINDOW
    req.path = cfg.tftp_root + "/" + req.name.decode()
    return req


def build_error(buf, code, msg):
    """ERROR code with msg (bytes) into buf; returns its length (msg cut to fit buf)."""
    msg = msg[: len(buf) - 5]
    buf[0] = 0
    buf[1] = ERROR
    buf[2] = 0
    buf[3] = code
    end = 4 + len(msg)
    buf[4:end] = msg
    buf[end] = 0
    return end + 1


def _put(buf, i, b):
    end = i + len(b)
    buf[i:end] = b
    buf[end] = 0
    return end + 1


# The per-block path calls no method of the transfer by its instance. On MicroPython a method is
# looked for in the instance's table of attributes first, where it is not, and only then in the
# class: measured on the unix port, a call of a method found so costs about twice the
# instructions of a call of a function found by a global name. Those lookups (five a block in
# lock-step: on_packet, more twice, the read ahead and the read it makes) were about a tenth
# of the firmware's instructions per block (callgrind, docs/benchmarks.md). So the file read is
# this module's function, the read ahead is part of more(), more() is called through the class
# (Transfer.more(self)), and the shell (tftpd) calls on_packet and more through the class too,
# once looked up per transfer. No new name: each costs the sim board (firmware/main.py).


def _read(t):
    # The payload's worth of the file from where it stands: its length, -1 on a read error.
    try:
        return t.f.readinto(t._payload) or 0
    except OSError:
        return -1


class Transfer:
    """One read transfer, reused from transfer to transfer (its slot's buffer never changes).

    buf       bytearray(4 + max blksize): every packet is built here
    retries   resends of one packet before giving up (cfg.tftp_retries)
    timeout_ms  the device's resend timeout (cfg.tftp_timeout_ms); it doubles per resend up to
              4x. A timeout the client negotiated (at most CLIENT_TIMEOUT_MAX_S) is used as
              asked, without backoff.
    max_silence_ms  the longest a transfer waits for its client to move it forward (an ACK
              of a new block), whatever timeout_ms and retries say: then it ends as
              "timeout". This bounds how long a client that went silent holds a slot.
    After start(): blksize, window, size (bytes, as stat'ed; once the last block is read, as
    read), deadline (ticks), done, result
    ("ok", "timeout", "aborted" by a client ERROR, whose code is in client_error, "read
    error", or what the shell passed to finish()), dup_acks and resends (for the shell's
    counters), since (ticks of the start or of the last ACK that moved it forward).
    """

    max_silence_ms = 20000
    # config.py's defaults: an instance keeps its own timeout_ms and retries only when they
    # differ, so that with them its table of attributes holds 23 (on MicroPython 416 B on the
    # unix port, where 24 to 29 take 512 B: 96 B less per slot, held from boot).
    timeout_ms = 1000
    retries = 5

    def __init__(self, buf, timeout_ms=1000, retries=5):
        self.buf = buf
        if timeout_ms != Transfer.timeout_ms:
            self.timeout_ms = timeout_ms
        if retries != Transfer.retries:
            self.retries = retries
        self.done = True
        self.f = self._payload = self.result = None
        # Every attribute start() sets exists from here on: the instance's table is sized when
        # the slots are made at boot, never grown (a fresh allocation) on a busy heap later.
        self.size = self.blksize = self.window = self.oack = self._pos = 0
        self.acked = self.sent = self.last = self._next = self._end = 0
        self.tries = self.dup_acks = self.resends = self.client_error = 0
        self.started = self.since = self.deadline = self._ack_wait = 0

    def start(self, req, f, size, now):
        """Begin serving file f (size bytes) for a checked request; returns the length of the
        first packet, an OACK when any option was acknowledged, else DATA 1."""
        self.f = f
        self.size = size
        self.blksize = req.blksize
        self.window = req.window
        self.oack = req.oack | (req.timeout << _O_TIMEOUT_SHIFT)
        self._payload = memoryview(self.buf)[4 : 4 + req.blksize]
        self._pos = 0  # file offset after the last read; ~off: block at off read ahead
        self.acked = -1 if req.oack else 0  # highest block acknowledged; the OACK is block 0
        self.sent = 0  # highest block sent
        self.last = 0  # the final block, once a short read has found it
        self._next = 1  # the window more() builds: blocks _next.._end (none yet)
        self._end = 0
        self.tries = 0
        self.dup_acks = 0
        self.resends = 0
        self.client_error = 0
        self.result = None
        self.done = False
        self.started = now
        self.since = now
        # The deadline after an ACK that moves the transfer forward (no resend yet, so no
        # backoff, and the silence bound starts again): one addition per block, on the hot path.
        w = req.timeout * 1000 if req.timeout else self.timeout_ms
        self._ack_wait = min(w, self.max_silence_ms)
        self._wait(now)
        if req.oack:
            return self._build_oack()
        return self._window(1)

    def last_sent(self):
        """Whether the file's last block has gone out: only then can the client have the whole
        file (and ask for it again)."""
        return self.last and self.sent >= self.last

    def bytes_acked(self):
        if self.acked <= 0:
            return 0
        if self.last and self.acked >= self.last:
            return self.size
        return self.acked * self.blksize

    def on_packet(self, mv, n, now):
        """The first n (>= 4) bytes of a client datagram; returns a packet length or 0."""
        # The hot path, once per window: locals over attributes, no call but more().
        if n < 4:
            raise Malformed("short packet")
        if mv[1] != ACK or mv[0]:
            return self._not_ack(mv)
        if self.done:
            return 0
        acked = self.acked
        delta = (((mv[2] << 8) | mv[3]) - acked) & 0xFFFF
        if delta == 0 or delta > self.sent - acked:
            self.dup_acks += 1  # a duplicate, stale or future ACK: no send (Sorcerer's Apprentice)
            return 0
        acked += delta
        self.acked = acked
        self.tries = 0
        self.since = now
        last = self.last
        if last and acked >= last:
            self.finish("ok")
            return 0
        self.deadline = ticks_add(now, self._ack_wait)  # _wait(now) with tries 0, since now
        self._next = acked + 1
        self._end = acked + self.window
        return Transfer.more(self)

    def _not_ack(self, mv):
        if ((mv[0] << 8) | mv[1]) != ERROR:
            raise Malformed("not an ACK")
        if not self.done:
            self.client_error = (mv[2] << 8) | mv[3]
            self.finish("aborted")
        return 0

    def on_timeout(self, now):
        """Resend after the deadline (the OACK, or the window from the oldest unacknowledged
        block), or give up after `retries` resends; returns a packet length or 0."""
        if self.done or ticks_diff(self.deadline, now) > 0:
            return 0
        self.tries += 1
        if self.tries > self.retries or ticks_diff(now, self.since) >= self.max_silence_ms:
            self.finish("timeout")
            return 0
        self.resends += 1
        self._wait(now)
        if self.acked < 0:
            return self._build_oack()
        return self._window(self.acked + 1)

    def more(self):
        """The next DATA packet of the current window, or 0 when the window is complete."""
        # Called twice per block, so its frame is kept within MicroPython's limit for a frame on
        # the C stack (11 words; more, or a try, and every call allocates the frame on the heap
        # and frees it: a search of the heap for a run of free blocks): few locals, and the try
        # around the read is in _read (one argument), the rare cases in _fill.
        k = self._next
        if self.done:
            return 0
        if k > self._end:
            # The window is sent (its packets have left the buffer): block k, the next window's
            # first, is read into the payload now, while the client acknowledges, so that its ACK
            # is answered without a file read. Lock-step, that takes the read off every round
            # trip; on a board, the flash read. Only a full block counts as read ahead: _pos is
            # then ~off, which no file offset equals. After a short read _pos is off + n, where
            # the file stands, and after an error off - 1, a block's start never: either way
            # the block is read again when due (seeking unless n was 0) and what it finds is
            # reported. Block 1 is read on the OACK's ACK: a resent OACK is built over the payload.
            off = (k - 1) * self.blksize
            if k > 1 and off == self._pos and not (self.last and k > self.last):
                n = _read(self)
                self._pos = ~off if n == self.blksize else off + n
            return 0
        if self.last and k > self.last:
            return 0
        self._next = k + 1
        # Block k into the payload area, straight after the 4 header bytes: the file is read
        # into the packet (readinto a preallocated memoryview), never copied. Blocks are read in
        # order, so the seek happens only on a resend. A block read ahead is already there.
        off = (k - 1) * self.blksize
        if off == self._pos:
            n = _read(self)
        elif ~off == self._pos:
            n = self.blksize
        else:
            n = -2
        if n < self.blksize:  # a resend, a short read, the end of the file or a read error
            n = self._fill(off, n)
            if n < 0:
                self.finish("read error")
                return build_error(self.buf, E_UNDEFINED, MSG_READ_ERROR)
            if n < self.blksize:  # a short block is the last one (RFC 1350)
                self.last = k
                self.size = off + n
        self._pos = off + n
        if k > self.sent:
            self.sent = k
        b = self.buf
        b[0] = 0
        b[1] = DATA
        b[2] = (k >> 8) & 0xFF
        b[3] = k & 0xFF
        return 4 + n

    def _fill(self, off, n):
        # more()'s slow path, after _read gave n (-2: not read, the file must seek to off
        # first): seek and read, then, as a stream may return less than asked before its end,
        # read on until the block is full or the file ends. The block's length, or -1.
        if n == -1:
            return n
        bs = self.blksize
        try:
            if n == -2:
                self.f.seek(off)
                n = self.f.readinto(self._payload) or 0
            while 0 < n < bs:
                m = self.f.readinto(self._payload[n:])
                if not m:
                    break
                n += m
        except OSError:
            return -1
        return n

    def close(self):
        f = self.f
        self.f = None
        self.done = True
        if f is not None:
            f.close()

    def _wait(self, now):
        # The next resend, never later than the end of the silence bound.
        timeout = self.oack >> _O_TIMEOUT_SHIFT
        if timeout:
            d = ticks_add(now, timeout * 1000)
        else:
            d = ticks_add(now, self.timeout_ms << min(self.tries, _BACKOFF_MAX))
        end = ticks_add(self.since, self.max_silence_ms)
        self.deadline = end if ticks_diff(d, end) > 0 else d

    def _window(self, first):
        self._next = first
        self._end = first + self.window - 1
        return Transfer.more(self)

    def finish(self, result):
        """End the transfer with result (the shell uses it when its socket fails)."""
        if not self.done:
            self.result = result
        self.done = True

    def _build_oack(self):
        buf = self.buf
        buf[0] = 0
        buf[1] = OACK
        i = 2
        o = self.oack
        if o & _O_BLKSIZE:
            i = _put(buf, i, b"blksize")
            i = _put(buf, i, str(self.blksize).encode())
        if o & _O_TSIZE:
            i = _put(buf, i, b"tsize")
            i = _put(buf, i, str(self.size).encode())
        if o & _O_TIMEOUT:
            i = _put(buf, i, b"timeout")
            i = _put(buf, i, str(o >> _O_TIMEOUT_SHIFT).encode())
        if o & _O_WINDOW:
            i = _put(buf, i, b"windowsize")
            i = _put(buf, i, str(self.window).encode())
        return i
