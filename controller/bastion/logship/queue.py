"""A bounded, durable FIFO of log records for one target: SQLite in WAL mode, synchronous=FULL.

Records go in as text (an event as JSON) in batches, each batch one transaction, so a batch is
on disk (fsync'd) or not at all. They come out in the order they went in: `peek(after, n)`
reads without removing, `ack(upto)` removes what the collector has taken. Sequence numbers only
grow (AUTOINCREMENT), so a sender can hold a cursor into the queue while it is being appended to.

The bound is `capacity` records. A batch that takes the queue past it removes the oldest
records: the newest are what a person looks at after an outage, and the queue stays in order
with one gap. What was removed is counted, in the file (`dropped`, kept across restarts) and
returned to the caller, which turns it into a metric and an event.

A queue is a cache of what waits for the collector, not the record of it (the history is): a
file that does not open as a queue (garbage after a power cut, a malformed b-tree, another
program's database: `is_damaged`) is renamed aside by `set_aside`, never deleted, and a new
queue is made in its place. A file that cannot be opened for now (locked, no permission) is
not damaged and is left alone. A file that opened but is found damaged later, when it is read
(a disk error, another program writing into it), still holds records that can be read:
`DiskQueue.copy_readable` copies those to a new queue before the file is moved aside.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from bastion import private

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
_COLUMNS = {"records": ["seq", "body"], "counters": ["name", "value"]}


class NotAQueue(sqlite3.DatabaseError):
    """An SQLite database, but not one of these queues."""


def _check_queue(db: sqlite3.Connection) -> None:
    """Raise NotAQueue unless the database is empty or has our tables, as we make them, only."""
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if tables - {*_COLUMNS, "sqlite_sequence"}:
        raise NotAQueue(f"not a log queue: it has the tables {sorted(tables)}")
    for table in tables & _COLUMNS.keys():
        have = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
        if have != _COLUMNS[table]:
            raise NotAQueue(f"not a log queue: its table {table} has the columns {have}")


def is_damaged(error: sqlite3.Error) -> bool:
    """Whether `error`, from opening or reading a queue file, says the file is not a queue (as
    against one that cannot be used for now: locked, no permission, a disk error)."""
    code = (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF  # the primary code of an extended one
    return isinstance(error, NotAQueue) or code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def move_with_wal(src: Path, dst: Path) -> None:
    """Rename an SQLite file with its -wal and -shm, the file itself last: stopped half way, the
    file is still found where it was, rather than a stale WAL beside another file."""
    for suffix in ("-wal", "-shm", ""):
        if Path(f"{src}{suffix}").exists():
            os.rename(f"{src}{suffix}", f"{dst}{suffix}")


def remove_with_wal(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def set_aside(path: Path) -> Path:
    """Rename a damaged queue file to `<name>.damaged-<UTC time>`, its -wal and -shm with it
    (so SQLite still reads the renamed file with its WAL, and the new queue does not start from
    a stale one); the new name."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside, n = path.with_name(f"{path.name}.damaged-{stamp}"), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    # stopped half way, the next start finds the file where it was and sets it aside then,
    # rather than a new queue starting beside its stale WAL
    move_with_wal(path, aside)
    return aside


class DiskQueue:
    """Thread-safe: one connection, one lock; the network is never touched under it."""

    def __init__(self, path: Path | str, capacity: int):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.path = Path(path)
        self.capacity = capacity
        # the nodes' journals: 0700 and 0600 whatever the umask (-wal and -shm take the file's mode)
        private.mkdir(self.path.parent)
        private.create(self.path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA busy_timeout=5000")  # first: a file locked for a moment is waited for
            _check_queue(self._db)  # before anything writes: another program's database stays as it was
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a queued record survives a power cut
            self._db.executescript(_SCHEMA)
            # reads every page of the records' b-tree: most damage shows here, not at a later read
            self._len = self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __len__(self) -> int:
        return self._len

    @property
    def dropped(self) -> int:
        """Records removed by the bound since the file was made."""
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        return row[0] if row else 0

    def put_many(self, bodies: Iterable[str]) -> int:
        """Append the records in order, as one transaction; returns how many old records the
        bound removed to make room (0 when it was not hit)."""
        rows = [(b,) for b in bodies]
        if not rows:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT INTO records (body) VALUES (?)", rows)
                over = self._len + len(rows) - self.capacity
                dropped = 0
                if over > 0:
                    cur = self._db.execute(
                        "DELETE FROM records WHERE seq IN (SELECT seq FROM records ORDER BY seq LIMIT ?)",
                        (over,),
                    )
                    dropped = max(0, cur.rowcount)
                    self._db.execute(
                        "INSERT INTO counters (name, value) VALUES ('dropped', ?) "
                        "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                        (dropped,),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._len += len(rows) - dropped
            return dropped

    def peek(self, after: int = 0, limit: int = 100) -> list[tuple[int, str]]:
        """Up to `limit` records with a sequence number above `after`, oldest first."""
        with self._lock:
            return self._db.execute(
                "SELECT seq, body FROM records WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
            ).fetchall()

    def first_seq(self) -> int:
        """The oldest record's sequence number, 0 when the queue is empty."""
        with self._lock:
            row = self._db.execute("SELECT MIN(seq) FROM records").fetchone()
        return row[0] or 0

    def copy_readable(self, dest: DiskQueue, *, after: int = 0, chunk: int = 500) -> tuple[int, int]:
        """Copy, in order, every record of this (damaged) queue that can still be read to `dest`;
        (how many were copied, how many could not be read). Sequence numbers are contiguous
        (records are appended at the tail and removed at the head), so a stretch the b-tree
        cannot be walked through (a damaged page) is read one number at a time, up to the last
        number the file gave out. `after`: the caller's last acknowledged number, where the
        walk starts when the oldest record's own number cannot be read."""
        copied = lost = 0
        with self._lock:
            db = self._db

            def first(sql: str) -> int | None:
                try:
                    row = db.execute(sql).fetchone()
                except sqlite3.DatabaseError:
                    return None
                return row[0] if row and row[0] is not None else None

            oldest = first("SELECT MIN(seq) FROM records")
            if oldest is not None:
                after = oldest - 1
            # sqlite_sequence and the b-tree's right edge are other pages: either may be intact
            ends = [n for n in (first("SELECT seq FROM sqlite_sequence WHERE name = 'records'"),
                                first("SELECT MAX(seq) FROM records")) if n is not None]  # fmt: skip
            last = max(ends) if ends else None
            while last is None or after < last:
                try:
                    rows = db.execute("SELECT seq, body FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
                                      (after, chunk)).fetchall()  # fmt: skip
                    if not rows:
                        break
                    after = rows[-1][0]
                except sqlite3.Error:  # a damaged page in this stretch: number by number
                    end = after + chunk if last is None else min(after + chunk, last)
                    rows, unread = [], 0
                    for seq in range(after + 1, end + 1):
                        try:
                            row = db.execute("SELECT seq, body FROM records WHERE seq = ?", (seq,)).fetchone()
                        except sqlite3.Error:
                            unread += 1
                            continue
                        if row is not None:
                            rows.append(row)
                    lost += unread
                    after = end
                    if last is None and not rows:
                        break  # where the records end is not known: this is taken for it
                if rows:
                    dest.put_many(body for _, body in rows)
                    copied += len(rows)
        return copied, lost

    def ack(self, upto: int) -> int:
        """Remove every record up to sequence number `upto` (taken by the collector)."""
        with self._lock:
            cur = self._db.execute("DELETE FROM records WHERE seq <= ?", (upto,))
            self._len = max(0, self._len - max(0, cur.rowcount))
            return cur.rowcount


def summary(path: Path | str) -> dict[str, object]:
    """What a queue file holds, read-only (a running controller may be writing it): how many
    records wait, the oldest one's text, and how many the bound has dropped."""
    db = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)
    try:
        _check_queue(db)  # NotAQueue, as DiskQueue says it, rather than "no such column"
        if db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0:
            # an empty file (made, never written: `bastion serve` makes it a queue as it is)
            return {"queued": 0, "oldest": None, "dropped": 0}
        queued, first = db.execute("SELECT COUNT(*), MIN(seq) FROM records").fetchone()
        oldest = db.execute("SELECT body FROM records WHERE seq = ?", (first,)).fetchone() if first else None
        row = db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
    finally:
        db.close()
    return {"queued": queued, "oldest": oldest[0] if oldest else None, "dropped": row[0] if row else 0}
