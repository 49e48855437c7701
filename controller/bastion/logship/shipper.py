"""The shipper: one thread per target, between the controller's events and a collector.

Theory of operation. `Shipper.offer(event)` is what the controller calls for every event it
records (bastion.api.deps.Runtime.record) and for every journal entry a node uploads; it
appends the event, as JSON, to each target's in-memory inbox and returns: no I/O, no lock held
across anything slow, so a request is never slowed by a collector. Each target's thread then

1. moves its inbox into the target's DiskQueue, one fsync'd transaction per batch (the queue
   drops its oldest records past its bound, and the drop is counted: metric and event);
2. sends from the queue's head, in order:
   - syslog: frames over one TCP/TLS connection. Syslog has no acknowledgement, so a record
     leaves the queue only once (a) the collector's kernel acknowledged every byte sent
     (SIOCOUTQ is 0) and (b) the connection was still open `confirm_s` after that. When the
     connection fails, sending starts again from the oldest record still queued: a collector
     stopped mid-stream may get a few records twice (each carries its event id), never none.
   - loki: one push request per batch, bounded by bytes (`loki_push_max`) as well as records
     (`batch`); a 2xx removes the batch. A 413 or a 429 to it halves that bound for the rest of
     the target's life: a proxy's or a tenant's limit below ours is learned, not hit forever.
     A 400 removes it too, counting as refused only the entries Loki says it ignored. One
     event past `loki_busy_floor` that a 429 answers `loki_lone_busy_tries` times, alone, is
     cut to that floor (a line past the tenant's burst is refused at every try).
3. on a failure closes the connection and waits before the next try: `backoff_min_s`,
   doubling up to `backoff_max_s`; records wait on disk meanwhile. When the queue file itself
   cannot be written or opened (disk full, locked, no permission), the events wait in the
   inbox, up to `inbox_max`, and are tried again with the same backoff; the first failure of
   such an outage logs an error that names the file (the tries after it, debug), its end an
   info, and a reload hands that inbox to the new target of the same name. A target whose
   queue file cannot be opened at its start is such a target (an event `not-started`, then
   `started` once the file opens). A queue file that does not open as a queue is moved aside
   and a new one made (bastion.logship.queue.set_aside): it never keeps a target, or the
   controller, from starting. One found damaged later, when a read or a write of the running
   target meets a damaged page, is moved aside then, after what can still be read of it is
   copied, in order, to the new queue (`_replace_damaged`); sending starts again from its
   head. A target whose site.yaml entry cannot be used safely (a Loki URL with credentials in
   it, credentials over plain http to another host) is refused: it is not started until
   `logs:` changes.

Credentials are read when they are used, from the secret store (`secret_name`): a Loki password
or token at each push, a client key (mutual TLS) at each new connection, the site's CA and
certificate files with it (Loki makes a connection per push: its TLS context is kept, and made
again when one of those files changes, by its inode, size or mtime). One that is missing or
does not load is a failure like a collector that is down (an event says which secret and where
it is looked for), so records wait on disk until it is put right, and a rotated one takes
effect without a restart.

A collector going away and coming back, and records dropped by the bound, are themselves
events (kind `logship`), recorded through the same `record` and so shipped too.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bastion.logship import loki, syslog
from bastion.logship.queue import DiskQueue, is_damaged, move_with_wal, remove_with_wal, set_aside
from bastion.metrics import Metrics
from bastion.site.schema import SYSLOG_FACILITIES, LogsSection, LogsTarget
from bastion.state.secrets import SecretStore

log = logging.getLogger("bastion.logship")

Record = Callable[..., Any]


def secret_name(target: str, what: str) -> str:
    """The secret store's name of a target's credential: password, token or client.key."""
    return f"logs/{target}/{what}"


class MissingSecret(OSError):
    """A credential the target needs is not in the secret store (or not usable)."""


class QueueUnwritable(OSError):
    """The target's queue file cannot be written or opened (disk full, locked, no permission):
    its events wait in the inbox."""


class TargetRefused(ValueError):
    """The target, as site.yaml gives it, is not used (the message says why)."""


class Target:
    """One collector: its queue, its inbox and the thread that sends."""

    batch = 200  # records per send, at most
    loki_push_max = loki.PUSH_MAX  # bytes of a push request's body, at most; 413 and 429 lower it
    loki_line_max = loki.LINE_MAX  # bytes of one Loki line; a longer event is cut to fit
    loki_busy_floor = 64_000  # a 429 (a rate limit, or a push past the burst) halves the bound down to this
    loki_push_least = 1024  # a 413 halves it down to this, then the record is refused for good
    # 429s to a push of one event bigger than loki_busy_floor before that event is cut to the floor:
    # a line past the tenant's burst is refused at every try, and the queue would wait behind it
    # for good; a smaller push that gets 429 is only rate-limited, and is retried as long as it takes
    loki_lone_busy_tries = 8
    inbox_max = 100_000  # events waiting for the thread; past it they are dropped and counted
    confirm_s = 1.0  # syslog: an acknowledged record is removed after the connection lived this long
    backoff_min_s = 0.2
    backoff_max_s = 15.0
    report_every_s = 10.0  # at most one `dropped` event per this many seconds

    def __init__(self, spec: LogsTarget, queue_dir: Path, *, site: str, site_root: Path,
                 hostname: str, metrics: Metrics, record: Record | None,
                 secrets: SecretStore | None = None):  # fmt: skip
        self.spec = spec
        self.secrets = secrets
        self.site = site
        self.site_root = site_root
        self.hostname = hostname
        self.metrics = metrics
        self.record = record
        if spec.type == "loki":
            refusal = loki.url_refusal(spec.url or "", spec.auth)
            if refusal is not None:
                raise TargetRefused(refusal)
        self.queue_path = queue_dir / f"{spec.name}.db"
        self.queue: DiskQueue | None = None  # None until the file opens (_open_queue)
        self.inbox: collections.deque[str] = collections.deque()
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._conn: syslog.SyslogConnection | None = None
        self._cursor = 0  # syslog: the last sequence number sent on this connection
        self._marks: collections.deque[tuple[int, float]] = collections.deque()  # (seq, acked at)
        self._retry_at = 0.0
        self._backoff = 0.0
        self._acked = 0  # the last sequence number removed from the queue as taken by the collector
        self._stuck = False  # the queue file cannot be opened or written: said once an outage
        self._up: bool | None = None  # None: not tried yet
        self._unreported: collections.Counter[str] = collections.Counter()  # by reason
        self._reported_at = float("-inf")
        self._https: ssl.SSLContext | None = None  # loki over https: made at first use, again after a failure
        self._https_files: tuple = ()  # what its files were when it was made (_tls_files)
        self._push_max = self.loki_push_max
        self._lone_busy = (0, 0)  # loki: (the queue's head, 429s to a push of it alone)
        self.metrics.logship_cut.labels(target=spec.name)  # 0 on /metrics until the first cut
        self._thread = threading.Thread(target=self._run, name=f"logship-{spec.name}", daemon=True)
        try:
            self._open_queue()
        except QueueUnwritable as e:  # locked, no permission: the thread tries again, with backoff
            log.error("logship %s: not started: %s; events wait in memory, opening it is tried again",
                      spec.name, e)  # fmt: skip
            self._event("not-started", error=str(e))
            self._stuck = True
            self._up = False  # what follows is `started`, then `up` once the collector takes records
            self._backoff = self.backoff_min_s
            self._retry_at = time.monotonic() + self._backoff
        self._gauges()

    def _open_queue(self) -> None:
        """Open the queue file; one that is not a queue is moved aside and a new one made.
        QueueUnwritable when it cannot be opened for now (locked, no permission): the file is
        not ours to move, and the events wait in the inbox until it opens."""
        path = self.queue_path
        try:
            try:
                self.queue = DiskQueue(path, self.spec.queue_max)
            except sqlite3.DatabaseError as e:
                if not is_damaged(e):
                    raise
                aside = set_aside(path)
                self.queue = DiskQueue(path, self.spec.queue_max)
                log.error("logship %s: the queue file %s is damaged (%s): moved aside to %s, a new queue started; "
                          "the records it held are not shipped", self.spec.name, path, e, aside)  # fmt: skip
                self._event("queue-damaged", file=str(path), error=str(e), moved_to=str(aside))
        except (OSError, sqlite3.Error) as e:
            raise QueueUnwritable(f"cannot open the queue file {path}: {e}") from e

    def _queued(self) -> int:
        return len(self.queue) if self.queue is not None else 0

    # --- the controller's side ----------------------------------------------------------------

    def offer(self, body: str) -> None:
        if len(self.inbox) >= self.inbox_max:
            self._dropped(1, "inbox")
            return
        self.inbox.append(body)
        self.wake.set()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the thread and queue what the inbox holds. What cannot be queued (the file cannot
        be written) stays in `inbox`: the caller says whether it is lost or carried on."""
        self._stop.set()
        self.wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        try:
            self._drain()
        except QueueUnwritable as e:
            log.error("logship %s: %s; %d events not queued", self.spec.name, e, len(self.inbox))
        self._close_conn()
        if self.queue is not None:
            self.queue.close()

    # --- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self.wake.clear()
            try:
                self._drain()
                self._report()
                busy = self._send_some()
            except QueueUnwritable as e:  # the disk, not the collector: an error once an outage
                (log.debug if self._stuck else log.error)("logship %s: %s; %d events wait in memory, tried again",
                                                          self.spec.name, e, len(self.inbox))  # fmt: skip
                self._stuck = True
                self._fail(str(e))
                busy = False
            except Exception:  # a bug must not stop shipping for good: log, wait, go on
                log.exception("logship %s: unexpected error", self.spec.name)
                self._fail("internal error")
                busy = False
            self._gauges()
            if not busy:
                self.wake.wait(self._idle_wait())
        self._report(force=True)

    def _idle_wait(self) -> float:
        now = time.monotonic()
        if self._retry_at > now:
            return self._retry_at - now
        if self._cursor and self._queued():
            return self.confirm_s / 4  # watch the connection until what was sent is confirmed
        return 5.0

    def _drain(self, *, damage_seen: bool = False) -> None:
        if self.queue is None:
            if time.monotonic() < self._retry_at:
                return  # the events wait in the inbox until the next try
            self._open_queue()
            log.info("logship %s: the queue file %s opened: started, %d events were waiting in memory",
                     self.spec.name, self.queue_path, len(self.inbox))  # fmt: skip
            self._event("started", waiting=len(self.inbox))
            self._stuck = False
            self._up = None  # the collector is yet to be tried: its `down` is news again
        bodies = []
        while self.inbox:
            bodies.append(self.inbox.popleft())
        if bodies:
            try:
                dropped = self.queue.put_many(bodies)
            except sqlite3.Error as e:  # the transaction is rolled back: the batch goes back, first
                self.inbox.extendleft(reversed(bodies))
                if is_damaged(e) and not damage_seen:
                    self._replace_damaged(e)
                    return self._drain(damage_seen=True)  # into the new queue
                raise QueueUnwritable(f"cannot write the queue file {self.queue.path}: {e}") from e
            if dropped:
                self._dropped(dropped, "bound")
            if self._stuck:
                log.info("logship %s: the queue file %s is written again", self.spec.name, self.queue_path)
                self._stuck = False

    def _replace_damaged(self, error: sqlite3.Error) -> None:
        """The open queue file was found damaged when it was read or written: what can still be
        read of it is copied, in order, to a new queue made beside it, the file is moved aside
        (as at start, _open_queue: kept for the operator) and the new queue takes its place.
        Sending starts again from the new queue's head: a syslog collector may get again what
        it was sent but not yet confirmed. QueueUnwritable when the new queue cannot be made:
        the damaged one is kept until the next try, or, past the rename, the file is opened
        again as at start."""
        old, path = self.queue, self.queue_path
        assert old is not None
        self._close_conn()  # its cursor and marks are the damaged file's sequence numbers
        fresh = path.with_name(f"{path.name}.salvage")
        try:
            remove_with_wal(fresh)  # left by a try that stopped half way
            new = DiskQueue(fresh, self.spec.queue_max)
            try:
                kept, lost = old.copy_readable(new, after=self._acked)
            finally:
                new.close()
            old.close()
            self.queue = None  # from here on, a failure leaves the file to be opened again (_drain)
            aside = set_aside(path)
            move_with_wal(fresh, path)
            self.queue = DiskQueue(path, self.spec.queue_max)
        except (OSError, sqlite3.Error) as e:
            raise QueueUnwritable(f"the queue file {path} is damaged ({error}) and cannot be replaced: {e}") from e
        self._acked = 0
        log.error("logship %s: the queue file %s is damaged (%s): moved aside to %s; %d records that could still "
                  "be read were queued again, %d could not be read and are not shipped", self.spec.name, path,
                  error, aside, kept, lost)  # fmt: skip
        self._event("queue-damaged", file=str(path), error=str(error), moved_to=str(aside), kept=kept, lost=lost)
        if lost:
            self._dropped(lost, "damaged")

    def _dropped(self, n: int, reason: str) -> None:
        self.metrics.logship_dropped.labels(target=self.spec.name, reason=reason).inc(n)
        self._unreported[reason] += n

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self._unreported or (not force and now - self._reported_at < self.report_every_s):
            return
        drops, self._unreported, self._reported_at = self._unreported, collections.Counter(), now
        for reason, n in sorted(drops.items()):
            why = {
                "bound": f"the queue's bound, {self.spec.queue_max}",
                "inbox": f"{self.inbox_max} were already waiting for the sender thread",
                "rejected": "the collector refused them for good",
                "damaged": "they were on a damaged page of the queue file",
            }.get(reason, reason)
            log.warning("logship %s: dropped %d records (%s)", self.spec.name, n, why)
            self._event("dropped", count=n, reason=reason, queue_max=self.spec.queue_max,
                        queued=self._queued())  # fmt: skip

    def _event(self, action: str, **payload: Any) -> None:
        if self.record is not None:
            self.record("logship", payload={"target": self.spec.name, "action": action, **payload})

    def _send_some(self) -> bool:
        """Send what is due; True when there may be more to do right away."""
        if time.monotonic() < self._retry_at or self.queue is None:
            return False
        try:
            if self.spec.type == "syslog":
                return self._send_syslog()
            return self._send_loki()
        except OSError as e:
            self._fail(str(e) or type(e).__name__)
            return False
        except sqlite3.Error as e:  # reading the queue, or removing what was taken
            if not is_damaged(e):  # locked, a disk error: the disk is stuck, as for a write
                raise QueueUnwritable(f"cannot read the queue file {self.queue_path}: {e}") from e
            self._replace_damaged(e)
            return True

    def _fail(self, why: str) -> None:
        self._close_conn()
        self._https = None  # a CA, certificate or key put right is read again at the next try
        self._backoff = min(self.backoff_max_s, max(self.backoff_min_s, self._backoff * 2))
        self._retry_at = time.monotonic() + self._backoff
        if self._up is not False:
            log.warning("logship %s: cannot ship: %s; retrying", self.spec.name, why)
            self._event("down", error=why, queued=self._queued())
        self._up = False

    def _succeeded(self) -> None:
        self._backoff = 0.0
        if self._up is False:
            log.info("logship %s: collector back, %d records queued", self.spec.name, self._queued())
            self._event("up", queued=self._queued())
        self._up = True

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._cursor = 0
        self._marks.clear()

    # --- credentials --------------------------------------------------------------------------

    def _site_file(self, name: str | None) -> str | None:
        # relative: to the site directory (an absolute name stays itself when joined)
        return None if name is None else str(self.site_root / name)

    def _secret_path(self, what: str) -> str:
        name = secret_name(self.spec.name, what)
        if self.secrets is None:
            raise MissingSecret(f"the secret {name} is needed, and the controller has no secret store")
        path = self.secrets.path(name)
        if not path.is_file():
            raise MissingSecret(f"the secret {name} is not in the secret store (looked for {path})")
        return str(path)

    def _secret(self, what: str) -> str:
        path = self._secret_path(what)
        name = secret_name(self.spec.name, what)
        try:
            value = self.secrets.get(name) or ""  # the store's own reading
        except UnicodeDecodeError:  # not UTF-8: not text, said as such below
            value = ""
        except OSError as e:
            raise MissingSecret(f"the secret {name} ({path}) cannot be read: {e.strerror or e}") from None
        if not value or not value.isprintable():
            raise MissingSecret(f"the secret {name} ({path}) is not one line of printable text")
        return value

    def _tls_context(self) -> ssl.SSLContext:
        """The site's CA (or the system's) and, for mutual TLS, its certificate with the key
        from the secret store."""
        tls = self.spec.tls
        assert tls is not None
        key = self._secret_path("client.key") if tls.cert_file is not None else None
        cert = self._site_file(tls.cert_file)
        try:
            return syslog.tls_context(self._site_file(tls.ca_file), cert, key)
        except syslog.ClientCertificateError as e:
            raise MissingSecret(f"the secret {secret_name(self.spec.name, 'client.key')} ({key}) does not load "
                                f"with the certificate {cert}: {e}") from None  # fmt: skip

    def _loki_headers(self) -> dict[str, str]:
        spec = self.spec
        what = {"basic": "password", "bearer": "token"}.get(spec.auth or "")
        return loki.auth_headers(tenant=spec.tenant, auth=spec.auth, username=spec.username,
                                 secret=self._secret(what) if what else None)  # fmt: skip

    def _send_syslog(self) -> bool:
        spec = self.spec
        if self._conn is None:
            if not len(self.queue):
                return False
            tls = self._tls_context() if spec.tls is not None else None
            self._conn = syslog.SyslogConnection(spec.host, spec.tcp_port, tls=tls,
                                                 server_name=spec.tls.server_name if spec.tls else None)  # fmt: skip
            self._succeeded()
        conn = self._conn
        if conn.closed_by_peer():
            raise ConnectionResetError("closed by the collector")
        now = time.monotonic()
        if self._cursor and conn.unacked() == 0 and (not self._marks or self._marks[-1][0] < self._cursor):
            self._marks.append((self._cursor, now))
        confirmed = 0
        while self._marks and now - self._marks[0][1] >= self.confirm_s:
            confirmed = self._marks.popleft()[0]
        if confirmed:
            self.queue.ack(confirmed)
            self._acked = confirmed
        rows = self.queue.peek(self._cursor, self.batch)
        if not rows:
            return False
        facility = SYSLOG_FACILITIES[spec.facility]
        messages = [syslog.fit_message(json.loads(body), hostname=self.hostname, facility=facility, site=self.site,
                                       max_bytes=spec.max_message) for _, body in rows]  # fmt: skip
        conn.send(b"".join(syslog.frame(msg) for msg, _ in messages))
        self._cursor = rows[-1][0]
        self.metrics.logship_sent.labels(target=spec.name).inc(len(rows))
        self._count_cut(sum(was_cut for _, was_cut in messages))
        return True

    def _count_cut(self, n: int) -> None:
        if n:
            self.metrics.logship_cut.labels(target=self.spec.name).inc(n)

    def _tls_files(self) -> tuple:
        """(path, inode, size, mtime) of the files a TLS context is made of: the CA, the
        certificate and its key; None for one that cannot be read."""
        tls = self.spec.tls
        assert tls is not None
        paths = [self._site_file(tls.ca_file), self._site_file(tls.cert_file)]
        if tls.cert_file is not None and self.secrets is not None:
            paths.append(str(self.secrets.path(secret_name(self.spec.name, "client.key"))))
        out = []
        for path in paths:
            try:
                st = os.stat(path) if path is not None else None
            except OSError:
                st = None
            out.append((path, st and (st.st_ino, st.st_size, st.st_mtime_ns)))
        return tuple(out)

    def _send_loki(self) -> bool:
        assert self.queue is not None
        rows = self.queue.peek(0, self.batch)
        if not rows:
            return False
        head, max_bytes = rows[0][0], self._push_max
        if self._lone_busy == (head, self.loki_lone_busy_tries):
            # past the tenant's burst, as far as can be told: sent alone, cut to what any burst takes
            rows, max_bytes = rows[:1], min(max_bytes, self.loki_busy_floor)
        body, taken, cut = loki.batch([json.loads(b) for _, b in rows], site=self.site, labels=dict(self.spec.labels),
                                      max_bytes=max_bytes, line_max=self.loki_line_max)  # fmt: skip
        if self.spec.tls is not None:
            files = self._tls_files()  # before reading them: a change while it is made is seen next time
            if self._https is None or files != self._https_files:
                self._https, self._https_files = self._tls_context(), files
        last = rows[taken - 1][0]
        try:
            loki.push(self.spec.url, body, headers=self._loki_headers(), context=self._https)
        except loki.LokiRejected as e:
            if isinstance(e, loki.LokiTooLarge) and len(body) // 2 >= self.loki_push_least:
                self._shrink(len(body) // 2, len(body), taken, e)
                return True  # at once: the collector is there, it wants less at a time
            # a 400 that counts what it ignored: Loki stored the rest (sent again, the ignored
            # ones would be ignored again, so the batch goes either way)
            refused = taken if e.ignored is None else min(e.ignored, taken)
            self.queue.ack(last)
            self._acked = last
            if refused < taken:
                log.error("logship %s: Loki refused %d of %d records, and took the others: %s", self.spec.name,
                          refused, taken, e)  # fmt: skip
                self.metrics.logship_sent.labels(target=self.spec.name).inc(taken - refused)
                self._count_cut(len(cut))
            else:
                log.error("logship %s: Loki refused %d records: %s", self.spec.name, taken, e)
            if refused:
                self._dropped(refused, "rejected")
            return True
        except loki.LokiBusy as e:
            streams = json.loads(body)["streams"]
            stored = loki.stored_head(e.answer, [int(ns) for ns, _ in streams[0]["values"]]) if len(streams) == 1 else 0
            if stored:
                # the stream's rate took the head of the push (loki.stored_head): it leaves the
                # queue, counted once, and only the rest is sent again, with backoff
                self.queue.ack(rows[stored - 1][0])
                self._acked = rows[stored - 1][0]
                self.metrics.logship_sent.labels(target=self.spec.name).inc(stored)
                ids = [json.loads(b).get("id") for _, b in rows[:stored]]
                self._count_cut(sum(1 for i in cut if i in ids))
                log.info("logship %s: Loki stored %d of %d records and refused the others for their stream's rate: "
                         "those are sent again", self.spec.name, stored, taken)  # fmt: skip
                raise
            # a push past the tenant's burst is refused at every try: a smaller one may not be
            if taken > 1 and len(body) > self.loki_busy_floor:
                self._shrink(max(self.loki_busy_floor, len(body) // 2), len(body), taken, e)
            elif taken == 1 and len(body) > self.loki_busy_floor:
                tries = self._lone_busy[1] + 1 if self._lone_busy[0] == head else 1
                self._lone_busy = (head, tries)
                if tries == self.loki_lone_busy_tries:
                    log.warning("logship %s: Loki answered %s to a push of one record (%d bytes) %d times: it is cut "
                                "to %d bytes at the next try", self.spec.name, e, len(body), tries,
                                self.loki_busy_floor)  # fmt: skip
            raise  # and retried with backoff, as any 429
        self._succeeded()
        self.queue.ack(last)
        self._acked = last
        self.metrics.logship_sent.labels(target=self.spec.name).inc(taken)
        self._count_cut(len(cut))
        if cut:
            log.warning("logship %s: %d records too long for a Loki line (%d bytes) or a push (%d) were cut "
                        "to fit: ids %s", self.spec.name, len(cut), self.loki_line_max, max_bytes, cut[:10])  # fmt: skip
        return True

    def _shrink(self, bound: int, size: int, records: int, why: Exception) -> None:
        self._push_max = bound
        log.warning("logship %s: Loki answered %s to a push of %d bytes (%d records): pushes are at most %d bytes "
                    "from now on (until a restart or a change of logs:)", self.spec.name, why, size, records, bound)  # fmt: skip

    def _gauges(self) -> None:
        self.metrics.logship_queued.labels(target=self.spec.name).set(self._queued())
        self.metrics.logship_up.labels(target=self.spec.name).set(1 if self._up else 0)


class Shipper:
    """Every target of site.yaml `logs:`; `offer` is the one call the controller makes per event."""

    def __init__(self, queue_dir: Path, metrics: Metrics, record: Record | None = None,
                 secrets: SecretStore | None = None):  # fmt: skip
        self.queue_dir = Path(queue_dir)
        self.metrics = metrics
        self.record = record
        self.secrets = secrets  # the targets' credentials (secret_name)
        self._targets: tuple[Target, ...] = ()
        self._held: collections.deque[str] | None = None  # offers made while reconfiguring
        self._section: LogsSection | None = None
        self._site: str | None = None
        self._lock = threading.Lock()  # configure and close only; offer never takes it

    @property
    def targets(self) -> tuple[Target, ...]:
        return self._targets

    def offer(self, event: dict[str, Any]) -> None:
        held = self._held
        targets = self._targets
        if held is not None:
            held.append(json.dumps(event, separators=(",", ":"), default=str))
            return
        if not targets:
            return
        body = json.dumps(event, separators=(",", ":"), default=str)
        for t in targets:
            t.offer(body)

    def configure(self, section: LogsSection | None, *, site: str, site_root: Path) -> None:
        """Ship to `section`'s targets from now on. Unchanged: nothing happens. Changed: the old
        threads stop (what they held goes to disk) and new ones start on the same queue files,
        so a change of collector loses nothing."""
        section = section or LogsSection()
        with self._lock:
            if section == self._section and site == self._site:
                return
            self._held = collections.deque()
            try:
                old, self._targets = self._targets, ()
                # what an old target did not queue (offered after its last drain, or its file
                # could not be written) is its own: it goes to the new target of its name, which
                # has the same queue file, and to no other (each target has every event once)
                unqueued: dict[str, list[str]] = {}
                for t in old:
                    t.stop()
                    unqueued[t.spec.name] = list(t.inbox)
                hostname = section.hostname or socket.gethostname()
                targets = []
                for spec in section.targets:
                    try:
                        targets.append(Target(spec, self.queue_dir, site=site, site_root=Path(site_root),
                                              hostname=hostname, metrics=self.metrics, record=self.record,
                                              secrets=self.secrets))  # fmt: skip
                    except (OSError, ValueError, sqlite3.Error) as e:  # TargetRefused, or a bug
                        log.error("logship %s: not started: %s", spec.name, e)
                        if self.record is not None:
                            self.record("logship", payload={"target": spec.name, "action": "not-started",
                                                            "error": str(e)})  # fmt: skip
                for t in targets:
                    carried = unqueued.pop(t.spec.name, ())
                    if carried:
                        log.info("logship %s: %d events not queued yet wait in memory for the restarted target",
                                 t.spec.name, len(carried))  # fmt: skip
                    for body in carried:
                        t.offer(body)
                for name, bodies in unqueued.items():
                    if bodies:
                        log.error("logship %s: %d events not queued are lost (the target is gone from logs:, "
                                  "or did not start)", name, len(bodies))  # fmt: skip
                self._section, self._site = section, site
                for t in targets:
                    t.start()
                self._targets = tuple(targets)
            finally:  # whatever happened above: what was offered meanwhile is shipped, nothing piles up
                held, self._held = self._held, None
                while held:
                    body = held.popleft()
                    for t in self._targets:
                        t.offer(body)

    def close(self) -> None:
        with self._lock:
            old, self._targets = self._targets, ()
            for t in old:
                t.stop()
                if t.inbox:
                    log.error("logship %s: %d events not queued are lost", t.spec.name, len(t.inbox))
