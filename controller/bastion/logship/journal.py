"""The systemd journal export format, as systemd-journal-upload sends it (Content-Type
application/vnd.fdo.journal), parsed sans-I/O: bytes in, entries out, or `Malformed`.

The format (systemd's JOURNAL_EXPORT_FORMATS document): entries one after another, each a run of
fields ended by an empty line. A field is either

    NAME=value\\n                           text without a newline, or
    NAME\\n <64-bit little-endian length> <that many bytes> \\n    anything (binary, newlines)

NAME is upper-case letters, digits and underscores. Fields starting with `__` are the journal's
own (`__CURSOR`, `__REALTIME_TIMESTAMP` in microseconds, ...). systemd-journal-upload sends a
value that is printable UTF-8 without a newline as text, whatever its length, anything else
as binary (journal-upload-journal.c).

`ExportParser.feed(chunk)` takes the body as it arrives (any split, a byte at a time included)
and returns the entries completed by it; `close()` says whether the body ended inside an entry.
Anything that is not the format raises Malformed, never anything else; the entries the chunk
completed before the bad byte come with it (`Malformed.entries`).

The bound. The parser holds at most `max_entry` (1 MiB) of an entry's fields: names, values
and their separators, counted as they are on the wire. journald itself takes far more: a field
of up to 768 MiB and an entry of up to 770 MiB (DATA_SIZE_MAX, ENTRY_SIZE_MAX in systemd's
journal-importer.h, checked in journald-native.c), which is how systemd-coredump, with
Storage=journal, puts a core of up to 767 MiB in COREDUMP= (JournalSizeMax=). So a field that
would take its entry past the bound is *cut*, not refused: refusing it refused the upload, and
the uploader, sending again from its saved cursor, met the same entry every time, so nothing
after it was ever shipped. A cut field is never held: a binary one is skipped by the length it
gives first, a text one is skipped up to its newline from the moment it cannot fit. Its name
and size (the value's bytes) go into the entry's `cut` (the first `max_cut_named` names;
`cut_count` counts them all) and the entry is returned without it. Whether a field is cut
depends on the entry alone, never on how the body was split.
"""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Collection

_NAME = re.compile(rb"[A-Z0-9_]{1,64}")
_NAME_MAX = 64


class Malformed(ValueError):
    """The body is not the journal export format. `entries`: those completed before the bad
    byte in the chunk that held it (whole entries, which the caller ships all the same)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.entries: list[Entry] = []


class Entry(dict[str, str]):
    """One journal entry: field name -> value (UTF-8, undecodable bytes replaced), and `cut`,
    the fields left out because they would take the entry past the parser's bound: name ->
    the value's size in bytes."""

    __slots__ = ("cut", "cut_count")

    def __init__(self) -> None:
        super().__init__()
        self.cut: dict[str, int] = {}
        self.cut_count = 0  # every field cut, named in `cut` or not


class ExportParser:
    max_entry = 1024 * 1024  # bytes of an entry's fields held (see the module docstring)
    max_cut_named = 32  # names an entry's `cut` keeps; a sender chooses how many fields it cuts

    def __init__(self, keep: Collection[str] | None = None) -> None:
        # the field names an entry holds (None: every one): the others count towards the bound
        # and are let go, so that an entry of many small fields costs no more than its few kept
        # (an entry of 110,000 distinct 10-byte fields held 10.8 MB, 133 KB with keep=)
        self._wanted = None if keep is None else frozenset(keep)
        self._buf = bytearray()
        self._entry = Entry()
        self._entry_bytes = 0
        # the field being cut: its name, the bytes of it still to skip (binary: its value, then
        # its newline; -1: text, up to its newline) and its value's size so far
        self._cut_name: str | None = None
        self._cut_left = 0
        self._cut_size = 0

    def feed(self, data: bytes) -> list[Entry]:
        out: list[Entry] = []
        data, i = bytes(data), 0
        try:
            while i < len(data):
                if self._cut_name is not None:
                    i = self._skip(data, i)
                    continue
                self._buf += data[i:] if i else data
                data, i = self._fields(out), 0  # what followed a field it cut, or b""
        except Malformed as e:
            e.entries = out
            raise
        return out

    def close(self) -> None:
        """The body ended: raise Malformed if it ended inside an entry."""
        if self._buf or self._entry_bytes or self._entry.cut_count or self._cut_name is not None:
            raise Malformed("the body ends inside an entry")

    def _fields(self, out: list[Entry]) -> bytes:
        """Parse the buffer's whole fields into the entry, and whole entries into `out`. When a
        field is to be cut: start cutting it, empty the buffer and return what the buffer held
        after that field (b"" while the field goes on); otherwise return b""."""
        buf = self._buf
        pos = 0
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                # a text field whose newline has not come: cut it once it cannot fit (its newline
                # is one byte more); it is text as soon as its name is followed by "="
                partial = len(buf) - pos
                if self._entry_bytes + partial + 1 > self.max_entry:
                    eq = buf.find(b"=", pos, pos + _NAME_MAX + 1)
                    if eq >= 0:
                        return self._start_cut(self._name(bytes(buf[pos:eq])), -1, 0, eq + 1)
                if partial > _NAME_MAX and buf.find(b"=", pos, pos + _NAME_MAX + 1) < 0:
                    raise Malformed(f"{bytes(buf[pos : pos + _NAME_MAX])!r}... is not a journal field name")
                break
            if nl == pos:  # the empty line that ends an entry
                if self._entry_bytes or self._entry.cut_count:
                    out.append(self._entry)
                self._entry, self._entry_bytes = Entry(), 0
                pos = nl + 1
                continue
            eq = buf.find(b"=", pos, nl)
            if eq >= 0:
                name = self._name(bytes(buf[pos:eq]))
                used = nl + 1 - pos
                if self._entry_bytes + used > self.max_entry:
                    self._cut(name, nl - eq - 1)
                else:
                    self._keep(name, bytes(buf[eq + 1 : nl]), used)
                pos = nl + 1
                continue
            name = self._name(bytes(buf[pos:nl]))
            head = nl + 1
            if len(buf) < head + 8:
                break  # the length is not here yet
            (size,) = struct.unpack_from("<Q", buf, head)
            used = head + 8 + size + 1 - pos
            if self._entry_bytes + used > self.max_entry:
                return self._start_cut(name, size + 1, size, head + 8)
            end = head + 8 + size
            if len(buf) < end + 1:
                break
            if buf[end] != 0x0A:
                raise Malformed(f"binary field {name!r} does not end with a newline")
            self._keep(name, bytes(buf[head + 8 : end]), used)
            pos = end + 1
        del buf[:pos]
        return b""

    @staticmethod
    def _name(name: bytes) -> str:
        if not _NAME.fullmatch(name):
            raise Malformed(f"{name[:_NAME_MAX]!r} is not a journal field name")
        return name.decode()

    def _keep(self, name: str, value: bytes, used: int) -> None:
        self._entry_bytes += used
        if self._wanted is None or name in self._wanted:
            self._entry[name] = value.decode("utf-8", errors="replace")

    def _start_cut(self, name: str, left: int, size: int, value_at: int) -> bytes:
        """Cut the field whose value starts at `value_at` in the buffer: skip what the buffer
        holds of it, empty the buffer, and return what followed the field (b"" if the field
        goes on). Nothing of the value is copied."""
        self._cut_name, self._cut_left, self._cut_size = name, left, size
        end = self._skip(self._buf, value_at)
        rest = bytes(self._buf[end:])
        self._buf.clear()
        return rest

    def _skip(self, data: bytes | bytearray, i: int) -> int:
        """Skip what comes of the field being cut; the index in `data` after it."""
        if self._cut_left < 0:  # text: up to its newline
            nl = data.find(b"\n", i)
            if nl < 0:
                self._cut_size += len(data) - i
                return len(data)
            self._cut_size += nl - i
            i = nl + 1
        else:  # binary: its value, then its newline
            n = min(self._cut_left - 1, len(data) - i)
            self._cut_left -= n
            i += n
            if self._cut_left > 1 or i == len(data):
                return i
            if data[i] != 0x0A:
                raise Malformed(f"binary field {self._cut_name!r} does not end with a newline")
            i += 1
        name, self._cut_name = self._cut_name, None
        self._cut(name, self._cut_size)
        return i

    def _cut(self, name: str, size: int) -> None:
        entry = self._entry
        entry.cut_count += 1
        if name in entry.cut or len(entry.cut) < self.max_cut_named:
            entry.cut[name] = size


# Fields a shipped entry keeps (the rest, the journal's trusted fields about the process, stay
# on the node): journal field -> payload key.
KEPT = {
    "MESSAGE": "message", "PRIORITY": "priority", "SYSLOG_IDENTIFIER": "identifier",
    "_SYSTEMD_UNIT": "unit", "_HOSTNAME": "host", "_BOOT_ID": "boot_id", "_PID": "pid",
    "_TRANSPORT": "transport", "__CURSOR": "cursor",
}  # fmt: skip
# What as_event reads of an entry: ExportParser(keep=READ) holds nothing else.
READ = frozenset({*KEPT, "__REALTIME_TIMESTAMP"})


# the end of year 9999: RFC 5424's TIMESTAMP has four digits for the year
_REALTIME_MAX_S = 253402300800


def _realtime_s(realtime: str | None) -> float | None:
    """__REALTIME_TIMESTAMP (microseconds since the epoch, unsigned) in seconds, or None when
    it is missing or not a time a collector can take."""
    if realtime is None or not realtime.isascii() or not realtime.isdigit():
        return None
    us = int(realtime)
    return us / 1e6 if 0 < us < _REALTIME_MAX_S * 1_000_000 else None


def as_event(entry: dict[str, str], *, client: str | None, machine: str | None, mac: str | None) -> dict:
    """A journal entry as the event shape bastion.logship ships (kind `journal`, source `node`;
    not in the history: it has no id). An entry without a usable __REALTIME_TIMESTAMP (missing,
    not digits, 0, past year 9999: the sender's word) gets the time it arrived, and keeps what
    it said as `realtime`: a syslog TIMESTAMP cannot say year 10000 and Loki refuses such times.
    The fields the parser cut (Entry.cut: journal field name -> bytes) are named in `cut`."""
    payload: dict = {key: entry[field] for field, key in KEPT.items() if field in entry}
    cut = getattr(entry, "cut", None)
    if cut:
        payload["cut"] = dict(cut)
    if "priority" in payload:
        try:
            payload["priority"] = int(payload["priority"])
        except ValueError:
            del payload["priority"]
    payload["client"] = client
    realtime = entry.get("__REALTIME_TIMESTAMP")
    ts = _realtime_s(realtime)
    if ts is None:  # the sender's word, and not a time: the entry gets the time it arrived
        ts = time.time()
        if realtime is not None:
            payload["realtime"] = realtime
    return {"id": None, "ts": ts, "kind": "journal", "source": "node", "mac": mac, "machine": machine,
            "endpoint": None, "profile": None, "group": None, "status": None, "payload": payload}  # fmt: skip
