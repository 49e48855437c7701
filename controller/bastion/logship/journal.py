"""The systemd journal export format, as systemd-journal-upload sends it (Content-Type
application/vnd.fdo.journal), parsed sans-I/O: bytes in, entries out, or `Malformed`.

The format (systemd's JOURNAL_EXPORT_FORMATS document): entries one after another, each a run of
fields ended by an empty line. A field is either

    NAME=value\\n                           text without a newline, or
    NAME\\n <64-bit little-endian length> <that many bytes> \\n    anything (binary, newlines)

NAME is upper-case letters, digits and underscores. Fields starting with `__` are the journal's
own (`__CURSOR`, `__REALTIME_TIMESTAMP` in microseconds, ...).

`ExportParser.feed(chunk)` takes the body as it arrives (any split, a byte at a time included)
and returns the entries completed by it; `close()` says whether the body ended inside an entry.
An entry is bounded (`max_entry`, 1 MiB: journald's own limit on a field is far below); past
it, or on anything that is not the format, it raises Malformed, never anything else.
"""

from __future__ import annotations

import re
import struct
import time

_NAME = re.compile(rb"[A-Z0-9_]{1,64}")


class Malformed(ValueError):
    """The body is not the journal export format."""


class ExportParser:
    max_entry = 1024 * 1024

    def __init__(self) -> None:
        self._buf = bytearray()
        self._entry: dict[str, str] = {}
        self._entry_bytes = 0

    def feed(self, data: bytes) -> list[dict[str, str]]:
        self._buf += data
        out: list[dict[str, str]] = []
        pos = 0
        buf = self._buf
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                if len(buf) - pos + self._entry_bytes > self.max_entry:
                    raise Malformed(f"an entry larger than {self.max_entry} bytes")
                break
            line = bytes(buf[pos:nl])
            if not line:  # the empty line that ends an entry
                if self._entry:
                    out.append(self._entry)
                self._entry, self._entry_bytes = {}, 0
                pos = nl + 1
                continue
            eq = line.find(b"=")
            if eq >= 0:
                name, value, used = line[:eq], line[eq + 1 :], nl + 1 - pos
            else:
                name = line
                head = nl + 1
                if len(buf) < head + 8:
                    break  # the length is not here yet
                (size,) = struct.unpack_from("<Q", buf, head)
                if size + self._entry_bytes > self.max_entry:
                    raise Malformed(f"field {name[:64]!r} of {size} bytes: an entry larger than {self.max_entry}")
                end = head + 8 + size
                if len(buf) < end + 1:
                    break
                if buf[end] != 0x0A:
                    raise Malformed(f"binary field {name[:64]!r} does not end with a newline")
                value, used = bytes(buf[head + 8 : end]), end + 1 - pos
            if not _NAME.fullmatch(name):
                raise Malformed(f"{name[:64]!r} is not a journal field name")
            self._entry_bytes += used
            if self._entry_bytes > self.max_entry:
                raise Malformed(f"an entry larger than {self.max_entry} bytes")
            self._entry[name.decode()] = value.decode("utf-8", errors="replace")
            pos += used
        del buf[:pos]
        return out

    def close(self) -> None:
        """The body ended: raise Malformed if it ended inside an entry."""
        if self._buf or self._entry:
            raise Malformed("the body ends inside an entry")


# Fields a shipped entry keeps (the rest, the journal's trusted fields about the process, stay
# on the node): journal field -> payload key.
KEPT = {
    "MESSAGE": "message", "PRIORITY": "priority", "SYSLOG_IDENTIFIER": "identifier",
    "_SYSTEMD_UNIT": "unit", "_HOSTNAME": "host", "_BOOT_ID": "boot_id", "_PID": "pid",
    "_TRANSPORT": "transport", "__CURSOR": "cursor",
}  # fmt: skip


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
    it said as `realtime`: a syslog TIMESTAMP cannot say year 10000 and Loki refuses such times."""
    payload: dict = {key: entry[field] for field, key in KEPT.items() if field in entry}
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
