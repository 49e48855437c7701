"""Event history in SQLite (WAL mode): boot requests, callbacks, site reloads, device events.

One table holds every kind of event. The columns are what the controller filters on (kind, MAC,
machine, endpoint, profile, status); everything else rides in `payload`, a JSON object, so a new
kind of event (dhcp, tftp, power, watchdog from the device link) needs no schema change:

    id        integer primary key, increasing: clients page with `after=<id>`
    ts        unix time (float seconds)
    kind      boot | callback | site | dhcp | tftp | power | watchdog | device | ...
    source    who reported it: controller, node, device, api
    mac       the machine's MAC (normalised) when known
    machine   the machine's name when the site declares it
    endpoint  for boot requests: /ipxe, /ignition, ...
    profile, grp   the profile and group that answered
    status    HTTP status for boot requests
    payload   JSON object with the rest

The history is not precious (design: it can be lost); WAL with synchronous=NORMAL keeps each
insert cheap, and a lost tail after a power cut is acceptable. A commit is in the WAL file (the
kernel's page cache, not yet on the disk) when it returns: it survives the controller's crash,
kill -9 included. `record_many` commits several events in one transaction: the boot endpoints
batch their events that way (group commit, bastion.api.deps.GroupCommit) and answer only after
their batch has committed, so every answered boot request is in the history after a crash. It is bounded (`max_events`,
`max_bytes`, `max_age_s`: serve's --history-events, --history-size and --history-days): when an
insert takes the table past max_events, the oldest rows go, down to nine tenths of it, so that
no more than max_events are ever kept and the deletes come in batches; the same for max_bytes
(down to 98% of it: large rows cost their size to delete),
the events' size (`event_size`: the payload's bytes and ROW_BYTES for the rest of the row and
its index entries), which bounds the file when the events are large (a LAN host's boot
requests with 8 KiB queries take 8,263 bytes each in the file: 830 MB for 100,000); rows
older than max_age_s go when the store opens and then once a minute, at an insert. Ids only
grow (AUTOINCREMENT), so a deleted id is never
reused and clients following with `after=` miss nothing but what was deleted. Pruning deletes
from `events` alone: the one-time tokens and install marks in the same file are never touched.

A device event (source `device`) is stored once: its payload's `boot` (the device's boot id)
and `seq` (the device's number for it in that boot) are a unique key (the index
events_device_seq), and an insert of one already stored adds nothing and returns the stored
one's id. The controller may fetch an event from the device's ring again after a restart
(bastion.state.eventcursor keeps its place only every few seconds, and a controller that is
killed loses the last few); the history keeps it once. A history made before the index had
it added at open, its duplicate device events (a later copy of the same boot and seq) deleted
first.

The same file also holds two small tables of controller state that must not lose a write
(`open_state_db`): one-time Ignition tokens (bastion.state.onetime) and install-once marks
(bastion.state.install). Deleting the file forgets them too; see those modules for what that means.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from bastion import private

# 2: the unique index events_device_seq (a device event is stored once)
SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT 'controller',
    mac TEXT,
    machine TEXT,
    endpoint TEXT,
    profile TEXT,
    grp TEXT,
    status INTEGER,
    payload TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS events_kind ON events (kind, id);
CREATE INDEX IF NOT EXISTS events_mac ON events (mac, id);
CREATE INDEX IF NOT EXISTS events_machine ON events (machine, id);
CREATE INDEX IF NOT EXISTS events_unnamed_client
    ON events (json_extract(payload, '$.client'), id) WHERE machine IS NULL AND mac IS NULL;
"""

# The device's key of a device event: (boot id, seq). A partial index, so the other events pay
# nothing for it; rows without a boot or a seq (NULL) never collide.
_DEVICE_KEY = "json_extract(payload, '$.boot'), json_extract(payload, '$.seq')"
_DEVICE_INDEX = (f"CREATE UNIQUE INDEX IF NOT EXISTS events_device_seq ON events ({_DEVICE_KEY})"
                 " WHERE source = 'device'")
# The later copies of a device event, which a history made before the index may hold.
_DEVICE_DUPLICATES = f"""
DELETE FROM events WHERE source = 'device'
    AND json_extract(payload, '$.boot') IS NOT NULL AND json_extract(payload, '$.seq') IS NOT NULL
    AND id NOT IN (SELECT MIN(id) FROM events WHERE source = 'device' GROUP BY {_DEVICE_KEY})
"""
_INSERT = ("INSERT INTO events (ts, kind, source, mac, machine, endpoint, profile, grp, status,"
           " payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")

_COLUMNS = ("id", "ts", "kind", "source", "mac", "machine", "endpoint", "profile", "grp", "status", "payload")


@dataclass(frozen=True)
class Event:
    id: int
    ts: float
    kind: str
    source: str = "controller"
    mac: str | None = None
    machine: str | None = None
    endpoint: str | None = None
    profile: str | None = None
    group: str | None = None
    status: int | None = None
    payload: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The event's fields as a dict, its payload the event's own (not a deep copy, as
        dataclasses.asdict makes: an Event is made afresh from its row at every query, and the
        operator turns every machine's event into a dict: 6% of a boot storm's CPU)."""
        return {name: getattr(self, name) for name in _EVENT_FIELDS}


_EVENT_FIELDS = tuple(f.name for f in fields(Event))
AGE_PRUNE_EVERY_S = 60.0

#: How far back, in ids, the controller names the steps of an address once it learns whose the
#: address is (EventStore.attribute's `after_id`): an event further back than this that names
#: no machine stays so, which is what lets a reader of machines' events skip past it.
ATTRIBUTABLE_IDS = 10000


class EventStore:
    """Thread-safe: one connection, one lock (inserts take tens of microseconds)."""

    def __init__(self, path: Path | str, max_events: int | None = None,
                 max_age_s: float | None = None, clock: Callable[[], float] = time.time,
                 max_bytes: int | None = None, readonly: bool = False):  # fmt: skip
        """readonly: open an existing history to read it (open_readonly), writing nothing to
        it: no schema, no journal mode, no bounds."""
        self.path = Path(path)
        self.max_events = max_events
        self.max_bytes = max_bytes
        # the events' size (_bytes) is kept for a store bounded by it only: summing it reads every
        # payload (25 ms for 100,000 events at open, where a count takes 1)
        self._size_sum = f"COALESCE(SUM({_SIZE_SQL}), 0)" if max_bytes is not None else "0"
        # Where the size bound cuts, without reading the table: (id, the size of the events up
        # to and with it, counted from the oldest at open) about every hundredth of max_bytes,
        # oldest first, and that running size through the newest event (_through). Finding the
        # cut by a window over the table read nine tenths of max_bytes of payloads each time,
        # under the lock, at an insert: 240 ms for 128 MiB, once per 1,600 events of 8 KiB.
        # Kept and counted only for a store bounded by size.
        self._marks: deque[tuple[int, int]] = deque()
        self._through = 0
        self._mark_every = max(1, (max_bytes or 0) // 100)
        self.max_age_s = max_age_s
        self.clock = clock
        self.pruned = 0  # rows deleted by the bounds since the store opened
        self.duplicates_removed = 0  # device events stored twice, deleted at open (schema 2)
        self._lock = threading.Lock()
        self._aged_at = float("-inf")
        if readonly:
            self._db = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=ro", uri=True,
                                       check_same_thread=False, isolation_level=None)  # fmt: skip
            self._db.execute("PRAGMA busy_timeout=5000")
            self._recount()
            return
        if str(path) != ":memory:":
            _create_private(self.path)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        self._add_device_index()
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._recount()
        with self._lock:
            newest = self._db.execute("SELECT MAX(id) FROM events").fetchone()[0]
            if newest is not None:
                self._bound(newest)
            self._age()

    def _add_device_index(self) -> None:
        """Schema 2 on a history made before it: the device events stored twice lose their
        later copies, and the unique index comes, in one transaction."""
        found = self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name ="
                                 " 'events_device_seq'").fetchone()  # fmt: skip
        if found is not None:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self.duplicates_removed = self._db.execute(_DEVICE_DUPLICATES).rowcount
            self._db.execute(_DEVICE_INDEX)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def journal_mode(self) -> str:
        with self._lock:
            return self._db.execute("PRAGMA journal_mode").fetchone()[0]

    def record(
        self,
        kind: str,
        *,
        source: str = "controller",
        mac: str | None = None,
        machine: str | None = None,
        endpoint: str | None = None,
        profile: str | None = None,
        group: str | None = None,
        status: int | None = None,
        payload: dict[str, Any] | None = None,
        ts: float | None = None,
    ) -> int:
        """Store one event; returns its id (a device event already stored: the stored one's,
        and nothing is added)."""
        row = _row(kind, source, mac, machine, endpoint, profile, group, status, payload, ts)
        return self._insert([row])[0]

    def record_many(self, events: list[tuple[str, dict[str, Any]]],
                    new: list[bool] | None = None) -> list[int]:  # fmt: skip
        """Store (kind, fields) events, fields as record() takes them, in one transaction (one
        WAL write for all): their ids, in order. All or none: an error stores none of them.
        `new`, when given, gets one flag per event: False for a device event stored before."""
        rows = [_row(kind, **fields) for kind, fields in events]
        return self._insert(rows, new) if rows else []

    def _insert(self, rows: list[tuple], new: list[bool] | None = None) -> list[int]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if any(row[2] == "device" for row in rows):
                    ids, added = self._insert_device(rows)
                else:
                    self._db.executemany(_INSERT, rows)
                    # AUTOINCREMENT gives the rows of one write transaction consecutive ids
                    last = self._db.execute("SELECT last_insert_rowid()").fetchone()[0]
                    ids = list(range(last - len(rows) + 1, last + 1))
                    added = list(zip(ids, rows))
                self._count += len(added)
                if self.max_bytes is not None:
                    before = self._through
                    for eid, row in added:
                        self._mark(eid, event_size(row[-1]))
                    self._bytes += self._through - before
                if added:
                    self._bound(added[-1][0])
                if new is not None:
                    fresh = {eid for eid, _ in added}
                    new[:] = [eid in fresh for eid in ids]
                if self.clock() - self._aged_at >= AGE_PRUNE_EVERY_S:
                    self._age()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._recount()
                raise
            return ids

    def _insert_device(self, rows: list[tuple]) -> tuple[list[int], list[tuple[int, tuple]]]:
        """Insert rows one at a time, a device event already stored (the same boot and seq)
        skipped: (each row's id, the stored one's for a skipped row; (id, row) of those added)."""
        ids: list[int] = []
        added: list[tuple[int, tuple]] = []
        for row in rows:
            cur = self._db.execute(_INSERT + " ON CONFLICT DO NOTHING", row)
            if cur.rowcount == 1:
                ids.append(cur.lastrowid)
                added.append((cur.lastrowid, row))
                continue
            (stored,) = self._db.execute(
                "SELECT id FROM events WHERE source = 'device'"
                " AND json_extract(payload, '$.boot') = json_extract(?1, '$.boot')"
                " AND json_extract(payload, '$.seq') = json_extract(?1, '$.seq')", (row[-1],),
            ).fetchone()
            ids.append(stored)
        return ids, added

    def _recount(self) -> None:
        self._marks.clear()
        self._through = 0
        if self.max_bytes is None:
            self._count, self._bytes = self._db.execute("SELECT COUNT(*), 0 FROM events").fetchone()
            return
        self._count = 0
        for eid, size in self._db.execute(f"SELECT id, {_SIZE_SQL} FROM events ORDER BY id"):
            self._count += 1
            self._mark(eid, size)
        self._bytes = self._through

    def _mark(self, eid: int, size: int) -> None:
        # one more event in the running size; a mark when it has grown by _mark_every
        self._through += size
        if not self._marks or self._through - self._marks[-1][1] >= self._mark_every:
            self._marks.append((eid, self._through))

    def _bound(self, newest: int) -> None:
        """Past max_events: keep the newest nine tenths of it (ids only grow). Past max_bytes:
        the newest 98% of it, give or take a mark: each event that passes it costs a delete of
        large rows, whose time is the size deleted (a tenth of 128 MiB held the lock 60 ms)."""
        if self.max_events is not None and self._count > self.max_events:
            keep = max(1, self.max_events - self.max_events // 10)
            self._delete("id <= ?", newest - keep)
        if self.max_bytes is not None and self._bytes > self.max_bytes:
            # the oldest mark after which the newer events' sizes add up to `keep` or less
            # (what the bounds deleted before came from the oldest end, or by age: newer
            # events deleted by age only make what is left smaller)
            keep = self.max_bytes - self.max_bytes // 50
            cut = next((eid for eid, through in self._marks if self._through - through <= keep), newest)
            self._delete("id <= ?", cut)

    def _delete(self, where: str, arg: float) -> None:
        # What goes is counted from the rows about to go, which the DELETE reads anyway: counting
        # the whole table again afterwards read every payload (with the size), 30 MB each time
        # the count bound cut 10,000 events
        n, size = self._db.execute(
            f"SELECT COUNT(*), {self._size_sum} FROM events WHERE {where}", (arg,)).fetchone()
        if n:
            self._db.execute(f"DELETE FROM events WHERE {where}", (arg,))
            self.pruned += n
            self._count -= n
            self._bytes -= size
            if self._marks:
                oldest = self._db.execute("SELECT MIN(id) FROM events").fetchone()[0]
                while self._marks and (oldest is None or self._marks[0][0] < oldest):
                    self._marks.popleft()

    def _age(self) -> None:
        self._aged_at = self.clock()
        if self.max_age_s is None:
            return
        self._delete("ts < ?", self._aged_at - self.max_age_s)

    def query(
        self,
        *,
        limit: int = 100,
        after: int | None = None,
        kind: str | None = None,
        mac: str | None = None,
        machine: str | None = None,
        newest_first: bool = True,
        of_machines: bool = False,
        before: int | None = None,
    ) -> list[Event]:
        """Events matching every given filter; the newest `limit` of them (or the oldest after
        `after`, for following the history forward). `of_machines`: only events that name a
        machine; `before`: only events with a smaller id (paging back through the history)."""
        where, args = [], []
        for column, value in (("kind", kind), ("mac", mac), ("machine", machine)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if of_machines:
            where.append("machine IS NOT NULL")
        if after is not None:
            where.append("id > ?")
            args.append(after)
            newest_first = False
        if before is not None:
            where.append("id < ?")
            args.append(before)
        sql = f"SELECT {', '.join(_COLUMNS)} FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY id {'DESC' if newest_first else 'ASC'} LIMIT ?"
        args.append(max(0, min(limit, 10000)))
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [_event(r) for r in rows]

    def newest_per_machine(self, kind: str) -> list[Event]:
        """Each machine's newest event of `kind` (for what the nodes' heartbeats said last,
        read at start: bastion.state.heartbeats)."""
        sql = (f"SELECT {', '.join(_COLUMNS)} FROM events WHERE id IN (SELECT MAX(id) FROM events"
               " WHERE kind = ? AND machine IS NOT NULL GROUP BY machine) ORDER BY id")  # fmt: skip
        with self._lock:
            rows = self._db.execute(sql, (kind,)).fetchall()
        return [_event(r) for r in rows]

    def newest_id(self) -> int:
        """The id of the newest event (0 when there is none): every event with an id up to it
        is already in the history, since ids only grow and commits come one at a time."""
        with self._lock:
            return self._db.execute("SELECT MAX(id) FROM events").fetchone()[0] or 0

    def attribute(self, client: str, mac: str, machine: str, since: float, after_id: int = 0) -> int:
        """Name the machine of the steps recorded by address alone (kinds tftp, asset, boot;
        no MAC, no machine) from `client` since `since` (and after event `after_id`, which
        bounds the scan): what a node asked before its address was known to be its own
        (bastion.state.addresses). Returns how many events it named. The partial index
        events_unnamed_client finds them: without it each newly learned address read the
        ATTRIBUTABLE_IDS events before it (4 ms here), a thousand times over in the first
        boot of a site of a thousand machines."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE events INDEXED BY events_unnamed_client SET mac = ?, machine = ?, "
                "payload = json_set(payload, '$.attributed', 'address') "
                "WHERE id > ? AND ts >= ? AND machine IS NULL AND mac IS NULL "
                "AND kind IN ('tftp', 'asset', 'boot') AND json_extract(payload, '$.client') = ?",
                (mac, machine, after_id, since, client),
            )
            return cur.rowcount

    def count(self, kind: str | None = None) -> int:
        with self._lock:
            if kind is None:
                return self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
            return self._db.execute("SELECT COUNT(*) FROM events WHERE kind = ?", (kind,)).fetchone()[0]


def _row(kind: str, source: str = "controller", mac: str | None = None, machine: str | None = None,
         endpoint: str | None = None, profile: str | None = None, group: str | None = None,
         status: int | None = None, payload: dict[str, Any] | None = None,
         ts: float | None = None) -> tuple:  # fmt: skip
    """An event as the INSERT's parameters."""
    return (ts if ts is not None else time.time(), kind, source, mac, machine, endpoint, profile,
            group, status, payload_json(payload or {}))  # fmt: skip


#: What an event counts for against max_bytes besides its payload: its other columns, the
#: row's own overhead and its entries in the indexes. Measured: 20,000 boot events with
#: payloads of 157 bytes made a file of 290 bytes an event, of 7,961 bytes 8,263 an event.
ROW_BYTES = 160
_SIZE_SQL = f"length(payload) + {ROW_BYTES}"  # payloads are ASCII JSON: characters are bytes


def event_size(payload_text: str) -> int:
    """What an event whose payload is stored as `payload_text` counts for against max_bytes."""
    return len(payload_text) + ROW_BYTES


#: The most JSON an event's payload keeps. What a node sends (a /callback's fields, a boot
#: request's query: 64 KiB each) is its own to choose: 100,000 events of 64 KiB were 6.5 GB on
#: disk, and one open read of 10,000 of them took the controller to 2.7 GB.
MAX_PAYLOAD = 8192
_KEPT_FIELDS = 24
_KEPT_CHARS = 200


# json.dumps with these arguments makes a new JSONEncoder every call (every boot request's
# event): one made once does the same (its C encoder) without that.
_ENCODE = json.JSONEncoder(separators=(",", ":"), default=str, allow_nan=False).encode


def payload_json(payload: dict[str, Any]) -> str:
    """A payload as stored: JSON text (numbers that are not finite, which JSON has no word for,
    as null), at most MAX_PAYLOAD characters: a longer one keeps its first _KEPT_FIELDS fields,
    each value cut to _KEPT_CHARS characters with a note of what it was."""
    try:
        text = _ENCODE(payload)
    except ValueError:  # NaN or an infinity somewhere
        payload = _finite(payload)
        text = json.dumps(payload, separators=(",", ":"), default=str)
    if len(text) <= MAX_PAYLOAD:
        return text
    kept: dict[str, Any] = {}
    for n, (key, value) in enumerate(payload.items()):
        if n == _KEPT_FIELDS:
            kept["cut"] = f"{len(payload) - n} more fields not kept (the payload was {len(text)} bytes)"
            break
        name = str(key)[:64]
        if not isinstance(value, str):
            value = json.dumps(value, separators=(",", ":"), default=str)
            if len(value) <= _KEPT_CHARS:
                kept[name] = json.loads(value)
                continue
        kept[name] = (value if len(value) <= _KEPT_CHARS
                      else f"{value[:_KEPT_CHARS]}... ({len(value)} characters, not kept)")  # fmt: skip
    text = json.dumps(kept, separators=(",", ":"), default=str)
    if len(text) > MAX_PAYLOAD:  # (the cuts above keep it under; this guards the bound)
        text = json.dumps({"cut": f"a payload of {len(text)} bytes, not kept"})
    return text


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _event(row: tuple) -> Event:
    id_, ts, kind, source, mac, machine, endpoint, profile, grp, status, payload = row
    try:
        data = json.loads(payload)
    except ValueError:
        data = {"raw": payload}
    if "\\ud" in payload or "\\uD" in payload:  # perhaps a lone surrogate, which no answer can carry
        data = _text_only(data)
    return Event(id_, ts, kind, source, mac, machine, endpoint, profile, grp, status, data)


_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins pairs: any left is alone


def _text_only(v: Any) -> Any:
    """v with each lone surrogate (stored before the API refused them) as U+FFFD, the
    replacement character: readable, and plainly not what was sent."""
    if isinstance(v, str):
        return _SURROGATE.sub("\ufffd", v)
    if isinstance(v, dict):
        return {_text_only(k): _text_only(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_text_only(x) for x in v]
    return v


def _create_private(path: Path) -> None:
    """The history's directory 0700 and its database 0600 whatever the umask (bastion.private):
    SQLite gives the -wal and -shm files the database's mode."""
    private.mkdir(path.parent)
    private.create(path)


def open_state_db(path: Path | str) -> sqlite3.Connection:
    """A connection to the history's database for controller state: its own connection, so that
    its writes are synchronous=FULL (a committed state change survives a power cut) while the
    events keep their cheap NORMAL inserts. Callers use `with conn:` for one transaction."""
    if str(path) != ":memory:":
        _create_private(Path(path))
    db = sqlite3.connect(str(path), check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA busy_timeout=5000")
    return db


class StateTable:
    """Controller state beside the events (one-time tokens, install marks): its own
    open_state_db connection, its schema created on open, one lock around every use."""

    def __init__(self, path: Path | str, schema: str):
        self._lock = threading.Lock()
        self._db = open_state_db(path)
        with self._lock, self._db:
            self._db.executescript(schema)

    def close(self) -> None:
        with self._lock:
            self._db.close()


class NotAHistory(ValueError):
    """A file that is not an event history (another program's database, or no database)."""


def open_readonly(path: Path | str) -> EventStore:
    """For `bastion events`: the same store, opened read-only on an existing file that is an
    event history already. Anything else is refused before it is read."""
    if not Path(path).exists():
        raise FileNotFoundError(f"no event database at {path}")
    try:
        probe = sqlite3.connect(f"{Path(path).absolute().as_uri()}?mode=ro", uri=True)
        try:
            found = probe.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'").fetchone()
        finally:
            probe.close()
    except sqlite3.DatabaseError as e:
        raise NotAHistory(f"{path} is not an event history: {e}") from None
    if found is None:
        raise NotAHistory(f"{path} is not an event history: it has no events table")
    # read-only too: a history the user may not write is read all the same (its schema and
    # journal mode were set again, and on a file it could not write that was a traceback)
    return EventStore(path, readonly=True)
