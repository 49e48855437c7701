# Serial frame codec, shared by the device (console) and the controller (bastion.device.link).
#
# The USB serial line is also the MicroPython REPL, so the protocol must survive REPL banners,
# tracebacks, prompts, partial lines and line noise. One frame is one line:
#
#     #EB< 1c291ca3 {"ev":"boot","seq":0}\n
#     |    |        |
#     |    |        JSON object (ASCII or UTF-8, never a raw newline: JSON escapes them)
#     |    CRC-32 of the JSON bytes, 8 lowercase hex digits
#     marker: "#EB<" device -> controller, "#EB>" controller -> device
#
# A '\r' before the '\n' is ignored (a tty in cooked mode turns "\n" into "\r\n"). A receiver
# looks for its marker anywhere in a line, so REPL text glued in front of a frame costs only the
# text; a line with no valid frame is skipped and counted, never raised. docs/serial-protocol.md
# describes the whole protocol.
#
# The invariant: decode() parses or raises Malformed, never anything else; Deframer.feed()
# never raises on any input.
import json

from firmware.compat import const

try:
    from binascii import crc32
except ImportError:  # a port built without binascii.crc32
    crc32 = None

TO_HOST = b"#EB<"  # device -> controller
TO_DEVICE = b"#EB>"  # controller -> device
_MARK_LEN = const(4)
_HEAD_LEN = const(14)  # marker, space, 8 hex digits, space


class Malformed(ValueError):
    pass


def crc32_slow(data, crc=0):
    """CRC-32 (IEEE 802.3, the one binascii.crc32 computes) bit by bit, for ports without it."""
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


if crc32 is None:
    crc32 = crc32_slow


def frame(payload, mark=TO_HOST):
    """The line for an already serialised JSON object (str or bytes), as bytes."""
    if isinstance(payload, str):
        payload = payload.encode()
    return b"%s %08x %s\n" % (mark, crc32(payload) & 0xFFFFFFFF, payload)


def encode(obj, mark=TO_HOST):
    """The line for a JSON-serialisable object, as bytes."""
    return frame(json.dumps(obj, separators=(",", ":")), mark)


class TooLong(ValueError):
    """The frame does not fit the buffer it was to be built in."""


try:
    from io import IOBase as _Stream
except ImportError:  # a port without io.IOBase: json.dump then needs a native stream
    _Stream = object


class _Sink(_Stream):
    # json.dump writes an object in small pieces: the first pass only sums their CRC and
    # length, the second copies them into the caller's buffer. Nothing grows, nothing is
    # joined, so a large reply costs no more heap than a small one.
    def __init__(self, buf=None, at=0):
        self.buf = buf
        self.at = at
        self.crc = 0
        self.n = 0

    def write(self, b):
        if isinstance(b, str):
            b = b.encode()
        m = len(b)
        if self.buf is None:
            self.crc = crc32(b, self.crc)
        else:
            end = self.at + m
            if end > len(self.buf):
                raise TooLong("frame longer than its buffer")
            self.buf[self.at : end] = b
            self.at = end
        self.n += m
        return m


def _head_into(buf, mark, crc, n):
    # marker, space, 8 hex digits of the CRC, space; then the payload; then "\n" at n.
    buf[0:_MARK_LEN] = mark
    buf[_MARK_LEN] = 0x20
    crc &= 0xFFFFFFFF
    for i in range(8):
        buf[_HEAD_LEN - 2 - i] = b"0123456789abcdef"[(crc >> (4 * i)) & 15]
    buf[_HEAD_LEN - 1] = 0x20
    buf[n] = 0x0A


def encode_into(buf, obj, mark=TO_HOST):
    """Build the line for a JSON-serialisable object in the preallocated bytearray buf;
    returns its length. Raises TooLong (buf unchanged past its header) if it does not fit."""
    first = _Sink()
    json.dump(obj, first, separators=(",", ":"))
    n = _HEAD_LEN + first.n
    if n + 1 > len(buf):
        raise TooLong("frame of %d bytes, the buffer holds %d" % (n + 1, len(buf)))
    json.dump(obj, _Sink(buf, _HEAD_LEN), separators=(",", ":"))
    _head_into(buf, mark, first.crc, n)
    return n + 1


def frame_into(buf, payload, mark=TO_HOST):
    """Build the line for an already serialised JSON object (str or bytes) in buf; returns
    its length. Raises TooLong if it does not fit."""
    if isinstance(payload, str):
        payload = payload.encode()
    m = len(payload)
    n = _HEAD_LEN + m
    if n + 1 > len(buf):
        raise TooLong("frame of %d bytes, the buffer holds %d" % (n + 1, len(buf)))
    buf[_HEAD_LEN:n] = payload
    _head_into(buf, mark, crc32(payload), n)
    return n + 1


def decode(line, mark=TO_HOST):
    """The object in one frame, given the line without its end of line; raises Malformed."""
    n = len(line)
    if n < _HEAD_LEN + 2 or bytes(line[:_MARK_LEN]) != mark:
        raise Malformed("no frame marker")
    if line[_MARK_LEN] != 0x20 or line[_HEAD_LEN - 1] != 0x20:
        raise Malformed("bad frame header")
    want = 0
    for i in range(_MARK_LEN + 1, _HEAD_LEN - 1):
        c = line[i]  # strict lowercase hex: int(x, 16) would take "+", "_" and spaces
        if 0x30 <= c <= 0x39:
            c -= 0x30
        elif 0x61 <= c <= 0x66:
            c -= 0x57
        else:
            raise Malformed("bad checksum digits")
        want = (want << 4) | c
    payload = bytes(line[_HEAD_LEN:])
    if crc32(payload) & 0xFFFFFFFF != want:
        raise Malformed("checksum mismatch")
    try:
        obj = json.loads(payload)
    except (ValueError, RuntimeError, MemoryError):  # RuntimeError: nesting too deep
        raise Malformed("bad JSON")
    if not isinstance(obj, dict):
        raise Malformed("not a JSON object")
    return obj


class Deframer:
    """Turns a byte stream into the frames it carries.

    Feed it chunks of any size; feed() yields each decoded object. Lines without a valid frame
    are skipped and counted:
      noise     text without our marker (REPL banners, prompts, tracebacks), including text
                glued in front of a valid frame
      bad       a marker but no valid frame (cut short, corrupted: checksum or JSON)
      echo      a frame for the other direction (a tty echoing what the controller sent)
      overlong  lines longer than max_line, dropped up to the next end of line
    max_line bounds the buffer (bytes, without the end of line); it is allocated once.
    """

    def __init__(self, mark=TO_HOST, max_line=512):
        self.mark = mark
        self.other = TO_DEVICE if mark == TO_HOST else TO_HOST
        self.max_line = max_line
        self._buf = bytearray(max_line)
        self._len = 0
        self._dropping = False
        self.frames = 0
        self.noise = 0
        self.bad = 0
        self.echo = 0
        self.overlong = 0

    def counters(self):
        return {
            "frames": self.frames,
            "noise": self.noise,
            "bad": self.bad,
            "echo": self.echo,
            "overlong": self.overlong,
        }

    def reset(self):
        """Forget a partial line (the port was closed and reopened), counting it."""
        if self._len and not self._dropping:
            if self._buf.find(self.mark, 0, self._len) >= 0:
                self.bad += 1
            else:
                self.noise += 1
        self._len = 0
        self._dropping = False

    def feed(self, data):
        start = 0
        n = len(data)
        while start < n:
            nl = data.find(b"\n", start)
            end = n if nl < 0 else nl
            if not self._dropping:
                take = end - start
                if self._len + take > self.max_line:
                    self.overlong += 1
                    self._dropping = True
                    self._len = 0
                else:
                    self._buf[self._len : self._len + take] = data[start:end]
                    self._len += take
            if nl < 0:
                return
            start = nl + 1
            if self._dropping:
                self._dropping = False
                continue
            obj = self._line()
            self._len = 0
            if obj is not None:
                yield obj

    def _line(self):
        n = self._len
        while n and self._buf[n - 1] == 0x0D:  # '\r'
            n -= 1
        if n == 0:
            return None
        buf = self._buf
        line = memoryview(buf)[:n]
        i = buf.find(self.mark, 0, n)
        if i < 0:
            if buf.find(self.other, 0, n) >= 0:
                self.echo += 1
            else:
                self.noise += 1
            return None
        while i >= 0:
            try:
                obj = decode(line[i:], self.mark)
            except Malformed:
                i = buf.find(self.mark, i + 1, n)
                continue
            if i:
                self.noise += 1
            self.frames += 1
            return obj
        self.bad += 1
        return None
