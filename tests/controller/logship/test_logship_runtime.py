"""The controller's side of shipping (bastion.api.deps.Runtime.record): every recorded event is
handed to each target in the order of its id, from any number of threads, and lands in the
target's on-disk queue while the collector is unreachable; a site reload that changes `logs:`
keeps that queue."""

from __future__ import annotations

import json
import logging
import socket
import threading
from pathlib import Path

import pytest
from bastion.logship.queue import DiskQueue
from bastion_testkit import make_app
from simkit import wait_for
from test_logship_formats import octet_frames


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: connections to it are refused


def test_events_from_many_threads_are_queued_in_id_order(site_dir: Path, tmp_path: Path):
    with open(site_dir / "site.yaml", "a") as f:
        f.write(f"\nlogs:\n  targets:\n    - {{name: central, type: syslog, host: 127.0.0.1, port: {_unused_port()}}}\n")
    app = make_app(site_dir, tmp_path / "events.db")
    runtime = app.state.runtime

    def record_many(n: int) -> None:
        for i in range(n):
            runtime.record("test", payload={"i": i})

    threads = [threading.Thread(target=record_many, args=(100,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recorded = [e.id for e in runtime.store.query(limit=10000, newest_first=False)]
    runtime.logship.close()  # the threads stop; what they held is on disk
    queue = DiskQueue(tmp_path / "events.logship" / "central.db", 100000)
    ids = [json.loads(body)["id"] for _, body in queue.peek(0, 10000)]
    queue.close()
    assert [i for i in ids if i is not None] == recorded  # every event, in id order
    assert len(recorded) >= 800


def test_a_reload_with_another_collector_keeps_the_queue(site_dir: Path, tmp_path: Path):
    port = _unused_port()
    with open(site_dir / "site.yaml", "a") as f:
        f.write(f"\nlogs:\n  targets:\n    - {{name: central, type: syslog, host: 127.0.0.1, port: {port}}}\n")
    app = make_app(site_dir, tmp_path / "events.db")
    runtime = app.state.runtime
    for i in range(20):
        runtime.record("test", payload={"i": i})
    text = (site_dir / "site.yaml").read_text().replace(f"port: {port}", f"port: {port}, facility: daemon")
    (site_dir / "site.yaml").write_text(text)
    assert runtime.holder.reload().ok
    assert runtime.logship.targets[0].spec.facility == "daemon"
    runtime.record("test", payload={"i": 20})
    runtime.logship.close()
    queue = DiskQueue(tmp_path / "events.logship" / "central.db", 100000)
    kinds = [json.loads(body)["kind"] for _, body in queue.peek(0, 10000)]
    queue.close()
    assert kinds.count("test") == 21 and kinds[0] == "site"


def test_a_full_inbox_drops_the_newest_and_counts_them(tmp_path: Path):
    """The inbox's bound (docs/logs.md): while the thread is not taking events in, the ones
    offered past `inbox_max` are dropped as they arrive, counted with reason inbox and in a
    `dropped` event; the ones that fit keep their order and reach the queue."""
    from bastion.logship.shipper import Target
    from bastion.metrics import Metrics
    from bastion.site.schema import LogsTarget

    metrics, recorded = Metrics(), []
    spec = LogsTarget(name="central", type="syslog", host="127.0.0.1", port=_unused_port())
    t = Target(spec, tmp_path / "q", site="home", site_root=tmp_path, hostname="bastion",
               metrics=metrics, record=lambda kind, **kw: recorded.append((kind, kw["payload"])))  # fmt: skip
    t.inbox_max = 5
    for i in range(8):  # the thread is not started yet: nothing leaves the inbox
        t.offer(json.dumps({"id": i}))
    assert [json.loads(b)["id"] for b in t.inbox] == [0, 1, 2, 3, 4]
    dropped = metrics.registry.get_sample_value("bastion_logship_dropped_total",
                                                {"target": "central", "reason": "inbox"})  # fmt: skip
    assert dropped == 3
    t.start()  # drains the inbox into the queue and reports the drops, then fails to connect
    t.stop()
    reports = [p for kind, p in recorded if kind == "logship" and p["action"] == "dropped"]
    assert [(p["target"], p["count"], p["reason"]) for p in reports] == [("central", 3, "inbox")]
    queue = DiskQueue(tmp_path / "q" / "central.db", 100000)
    assert [json.loads(b)["id"] for _, b in queue.peek(0, 100)] == [0, 1, 2, 3, 4]
    assert queue.dropped == 0  # the queue file counts its own bound only
    queue.close()


def test_a_queue_file_that_cannot_be_written_keeps_the_events_in_the_inbox(tmp_path: Path, caplog):
    """The disk, not the collector, stuck (here: another process holds the queue file's write
    lock past its busy timeout; a full disk is the same to SQLite). The batch taken from the
    inbox was lost with the failed transaction, uncounted; docs/logs.md says events wait in
    memory then, and only those past the inbox's bound are dropped (counted). Now the batch goes
    back to the inbox, an error names the queue file, and every event reaches the queue,
    in order, once the file can be written again."""
    import sqlite3

    from bastion.logship.shipper import Target
    from bastion.metrics import Metrics
    from bastion.site.schema import LogsTarget

    spec = LogsTarget(name="central", type="syslog", host="127.0.0.1", port=_unused_port())
    t = Target(spec, tmp_path / "q", site="home", site_root=tmp_path, hostname="bastion",
               metrics=Metrics(), record=None)  # fmt: skip
    t.backoff_max_s = 0.5
    caplog.set_level(logging.ERROR, logger="bastion.logship")


    t.start()
    try:
        for i in range(5):
            t.offer(json.dumps({"id": i}))
        wait_for(lambda: len(t.queue) == 5, 60)
        lock = sqlite3.connect(tmp_path / "q" / "central.db", isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        for i in range(5, 10):
            t.offer(json.dumps({"id": i}))
        wait_for(lambda: any("cannot write the queue file" in r.getMessage() and "central.db" in r.getMessage()
                             for r in caplog.records), 60)
        lock.execute("ROLLBACK")
        lock.close()
        wait_for(lambda: len(t.queue) == 10, 60)
    finally:
        t.stop()
    queue = DiskQueue(tmp_path / "q" / "central.db", 100000)
    assert [json.loads(b)["id"] for _, b in queue.peek(0, 100)] == list(range(10))
    queue.close()


def test_a_queue_is_the_controllers_alone_whatever_the_umask(tmp_path, umask_022):
    """A queue holds the nodes' journals on their way out: 0700 and 0600 under umask 022."""
    queue = DiskQueue(tmp_path / "events.logship" / "central.db", 10)
    queue.put_many(['{"MESSAGE": "a secret a node logged"}'])
    assert oct((tmp_path / "events.logship").stat().st_mode & 0o777) == oct(0o700)
    files = list((tmp_path / "events.logship").iterdir())
    assert {p.name for p in files} >= {"central.db", "central.db-wal", "central.db-shm"}
    for p in files:
        assert oct(p.stat().st_mode & 0o777) == oct(0o600), p
    queue.close()


def _damage_with_garbage(path: Path) -> None:
    path.write_bytes(b"power cut garbage, not a database " * 100)


def _damage_a_page(path: Path) -> None:
    # a queue with records whose pages in the middle were overwritten: SQLite's header is
    # fine, the b-tree is not
    queue = DiskQueue(path, 1000)
    queue.put_many(["x" * 200] * 500)
    queue.close()
    data = bytearray(path.read_bytes())
    data[3 * 4096 : 6 * 4096] = b"\xa5" * (3 * 4096)
    path.write_bytes(bytes(data))


def _damage_with_another_schema(path: Path) -> None:
    import sqlite3

    db = sqlite3.connect(path)
    db.execute("CREATE TABLE records (a TEXT, b TEXT)")  # a database, not a queue
    db.commit()
    db.close()


@pytest.mark.parametrize("damage", [_damage_with_garbage, _damage_a_page, _damage_with_another_schema])
def test_a_queue_file_that_is_not_our_queue_is_moved_aside_and_a_new_one_made(tmp_path: Path, caplog, damage):
    """A queue is a cache of what waits for the collector: a file that does not open as one (a
    power cut, a disk error, another program's database) must not keep the target, or the
    controller, from starting. It is renamed, not deleted, so what it held can still be looked
    at, and an event and an error name it and what SQLite said."""
    from bastion.logship.shipper import Target
    from bastion.metrics import Metrics
    from bastion.site.schema import LogsTarget

    (tmp_path / "q").mkdir()
    damage(tmp_path / "q" / "central.db")
    before = (tmp_path / "q" / "central.db").read_bytes()
    recorded: list[dict] = []
    caplog.set_level(logging.ERROR, logger="bastion.logship")
    spec = LogsTarget(name="central", type="syslog", host="127.0.0.1", port=_unused_port())
    t = Target(spec, tmp_path / "q", site="home", site_root=tmp_path, hostname="bastion",
               metrics=Metrics(), record=lambda kind, **kw: recorded.append(kw["payload"]))  # fmt: skip
    t.offer(json.dumps({"id": 1}))
    t.stop()  # never started: stop drains the inbox into the new queue
    aside = [p for p in (tmp_path / "q").iterdir() if p.name.startswith("central.db.damaged-")]
    assert [p.read_bytes() for p in aside] == [before]
    [event] = [p for p in recorded if p["action"] == "queue-damaged"]
    assert event["file"] == str(tmp_path / "q" / "central.db") and event["moved_to"] == str(aside[0])
    assert event["error"]
    assert any(str(aside[0]) in r.getMessage() and event["error"] in r.getMessage() for r in caplog.records)
    queue = DiskQueue(tmp_path / "q" / "central.db", 100)
    assert [json.loads(b)["id"] for _, b in queue.peek(0, 100)] == [1]
    queue.close()


def test_the_controller_starts_with_a_damaged_queue_file_and_records_it(site_dir: Path, tmp_path: Path):
    """`bastion serve`'s app (create_app) with a queue file of garbage: before, it did not start
    (sqlite3.DatabaseError out of configure); now it does, and its history has the event."""
    with open(site_dir / "site.yaml", "a") as f:
        f.write(f"\nlogs:\n  targets:\n    - {{name: central, type: syslog, host: 127.0.0.1, port: {_unused_port()}}}\n")
    (tmp_path / "events.logship").mkdir()
    _damage_with_garbage(tmp_path / "events.logship" / "central.db")
    runtime = make_app(site_dir, tmp_path / "events.db").state.runtime
    runtime.logship.close()
    damaged = [e.payload for e in runtime.store.query(limit=100, newest_first=False)
               if e.kind == "logship" and e.payload["action"] == "queue-damaged"]  # fmt: skip
    assert [p["file"] for p in damaged] == [str(tmp_path / "events.logship" / "central.db")]


def test_a_reload_onto_a_damaged_queue_file_starts_every_target(tmp_path: Path):
    """A reload that adds a target whose queue file is damaged: before, configure raised half way
    (no target started, the healthy one included, and every later event piled up in memory);
    now both run and every event reaches both queues."""
    from bastion.logship.shipper import Shipper
    from bastion.metrics import Metrics
    from bastion.site.schema import LogsSection

    def section(*names: str) -> LogsSection:
        return LogsSection.model_validate({"targets": [
            {"name": n, "type": "syslog", "host": "127.0.0.1", "port": _unused_port()} for n in names]})  # fmt: skip

    (tmp_path / "q").mkdir()
    _damage_with_garbage(tmp_path / "q" / "central.db")
    shipper = Shipper(tmp_path / "q", Metrics())
    shipper.configure(section("other"), site="s", site_root=tmp_path)
    shipper.offer({"id": 1})
    shipper.configure(section("other", "central"), site="s", site_root=tmp_path)
    assert sorted(t.spec.name for t in shipper.targets) == ["central", "other"]
    for i in range(2, 5):
        shipper.offer({"id": i})
    shipper.close()
    for name, ids in (("other", [1, 2, 3, 4]), ("central", [2, 3, 4])):
        queue = DiskQueue(tmp_path / "q" / f"{name}.db", 100)
        assert [json.loads(b)["id"] for _, b in queue.peek(0, 100)] == ids, name
        queue.close()


def test_a_queue_file_another_process_holds_is_opened_once_it_is_let_go(tmp_path: Path, caplog, monkeypatch):
    """Not damage (so it is not moved aside): another process holds the file's lock (SQLite's
    exclusive locking mode). Before, that target did not start until the controller restarted
    or `logs:` changed, and every event meanwhile was lost to it. Now it starts without its
    queue: an error and a `not-started` event name the file, its events wait in memory, the
    file is tried again with the usual backoff, and once the lock is let go it opens (an event
    `started`) and every event is queued, in order. The other target runs all along."""
    import sqlite3

    from bastion.logship.shipper import Shipper, Target
    from bastion.metrics import Metrics
    from bastion.site.schema import LogsSection

    monkeypatch.setattr(Target, "backoff_max_s", 0.5)
    DiskQueue(tmp_path / "q" / "central.db", 10).close()
    holder = sqlite3.connect(tmp_path / "q" / "central.db", isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("COMMIT")  # the lock stays: exclusive locking mode keeps it until close
    caplog.set_level(logging.ERROR, logger="bastion.logship")
    events: list[dict] = []
    shipper = Shipper(tmp_path / "q", Metrics(), lambda kind, **f: events.append(f["payload"]))


    try:
        shipper.configure(LogsSection.model_validate({"targets": [
            {"name": n, "type": "syslog", "host": "127.0.0.1", "port": _unused_port()} for n in ("central", "other")]}),
            site="s", site_root=tmp_path)  # fmt: skip
        for i in range(1, 6):
            shipper.offer({"id": i})
        (refused,) = [e for e in events if e["action"] == "not-started"]
        assert refused["target"] == "central", refused
        holder.close()
        wait_for(lambda: any(e["action"] == "started" for e in events), 60)
        assert "central.db" in refused["error"], refused  # the file, not only SQLite's word
        for i in range(6, 11):
            shipper.offer({"id": i})
        central = next(t for t in shipper.targets if t.spec.name == "central")
        wait_for(lambda: central.queue is not None and len(central.queue) == 10, 60)
    finally:
        shipper.close()
        holder.close()
    assert any("central" in r.getMessage() and "not started" in r.getMessage() for r in caplog.records)
    assert [p.name for p in (tmp_path / "q").iterdir() if "damaged" in p.name] == []
    for name in ("central", "other"):
        queue = DiskQueue(tmp_path / "q" / f"{name}.db", 100)
        assert [json.loads(b)["id"] for _, b in queue.peek(0, 100)] == list(range(1, 11)), name
        queue.close()


def test_an_event_with_a_lone_surrogate_reaches_syslog_and_so_do_the_ones_after_it(site_dir: Path, tmp_path: Path):
    """A str can hold a lone surrogate: a file name that os.fsdecode made of bytes that are not
    UTF-8, for one. The history stores such an event (its payload is ASCII JSON) and the
    shipper queues it; before, encoding its syslog message raised, the target logged an
    internal error and tried that record again forever: nothing after it was shipped. Now the
    surrogate is sent as U+FFFD, as the history answers it."""
    import os
    import time

    collector = socket.socket()
    collector.bind(("127.0.0.1", 0))
    collector.listen()
    collector.settimeout(30)
    with open(site_dir / "site.yaml", "a") as f:
        f.write(f"\nlogs:\n  targets:\n    - {{name: central, type: syslog, host: 127.0.0.1, "
                f"port: {collector.getsockname()[1]}}}\n")
    app = make_app(site_dir, tmp_path / "events.db")
    runtime = app.state.runtime
    name = os.fsdecode(b"/srv/assets/\xff.img")
    first = runtime.record("test", payload={"file": name})
    second = runtime.record("test", payload={"i": 2})
    assert {first, second} <= {e.id for e in runtime.store.query(limit=100)}  # the history took it
    got: dict[int, dict] = {}
    try:
        conn, _ = collector.accept()
        conn.settimeout(30)
        data, deadline = b"", time.monotonic() + 30
        while second not in got:
            assert time.monotonic() < deadline, ("gave up waiting", got)
            chunk = conn.recv(65536)
            assert chunk, ("closed", got)
            messages, data = octet_frames(data + chunk)
            for msg in messages:
                event = json.loads(msg.decode("utf-8").split("] ", 1)[1])
                got[event["id"]] = event
        conn.close()
    finally:
        runtime.logship.close()
        collector.close()
    assert got[first]["payload"] == {"file": "/srv/assets/\ufffd.img"}
    assert got[second]["payload"] == {"i": 2}


def test_logs_status_says_which_queue_file_is_damaged_and_goes_on(tmp_path: Path):
    """`bastion logs status` reads the files only: one that is not a queue is a line that says
    so, not a traceback, and the others are listed as usual: an empty file (made, never
    written) as an empty queue, which is what `bastion serve` makes of it, and a file
    `bastion serve` moved aside as one more line."""
    from bastion.logship.cli import status_command
    from click.testing import CliRunner

    where = tmp_path / "events.logship"
    where.mkdir()
    _damage_with_garbage(where / "central.db")
    (where / "empty.db").write_bytes(b"")
    queue = DiskQueue(where / "other.db", 10)
    queue.put_many(['{"id": 1, "ts": 1}'])
    queue.close()
    (where / "loki.db.damaged-20261204T120000Z").write_bytes(b"what bastion serve moved aside")
    result = CliRunner().invoke(status_command, ["--db", str(tmp_path / "events.db")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("central") and "cannot be read" in line and "file is not a database" in line
               for line in lines), result.output  # fmt: skip
    assert any(line.startswith("empty") and "queued        0" in line for line in lines), result.output
    assert any(line.startswith("other") and "queued        1" in line for line in lines), result.output
    assert any(line.startswith("loki") and "loki.db.damaged-20261204T120000Z" in line for line in lines), result.output
    result = CliRunner().invoke(status_command, ["--db", str(tmp_path / "events.db"), "--json"])
    rows = {r["target"]: r for r in map(json.loads, result.output.splitlines())}
    assert "file is not a database" in rows["central"]["error"] and rows["other"]["queued"] == 1


def test_a_reload_while_the_queue_files_cannot_be_written_queues_each_event_once_per_target(tmp_path: Path, caplog):
    """Two targets whose queue files another process holds locked, three events waiting in their
    inboxes, then a reload. Before, every old target's leftovers were offered to every new
    target (each event queued twice in each) and the log said they were lost. Now each new
    target takes over its own predecessor's inbox: once each, in order, and nothing is said
    to be lost."""
    import sqlite3

    from bastion.logship.shipper import Shipper
    from bastion.metrics import Metrics
    from bastion.site.schema import LogsSection

    def section(hostname: str) -> LogsSection:
        return LogsSection.model_validate({"hostname": hostname, "targets": [
            {"name": n, "type": "syslog", "host": "127.0.0.1", "port": _unused_port()} for n in ("a", "b")]})  # fmt: skip


    caplog.set_level(logging.INFO, logger="bastion.logship")
    shipper = Shipper(tmp_path / "q", Metrics())
    shipper.configure(section("h1"), site="s", site_root=tmp_path)
    locks = []
    try:
        for name in ("a", "b"):
            lock = sqlite3.connect(tmp_path / "q" / f"{name}.db", isolation_level=None)
            lock.execute("BEGIN EXCLUSIVE")
            locks.append(lock)
        for i in range(1, 4):
            shipper.offer({"id": i})
        wait_for(lambda: sum("cannot write the queue file" in r.getMessage() for r in caplog.records) >= 2, 60)
        shipper.configure(section("h2"), site="s", site_root=tmp_path)
        for lock in locks:
            lock.execute("ROLLBACK")
        wait_for(lambda: all(not t.inbox and len(t.queue) >= 3 for t in shipper.targets), 60)
    finally:
        for lock in locks:
            lock.close()
        shipper.close()
    for name in ("a", "b"):
        queue = DiskQueue(tmp_path / "q" / f"{name}.db", 100)
        assert [json.loads(b)["id"] for _, b in queue.peek(0, 100)] == [1, 2, 3], name
        queue.close()
    assert not [r.getMessage() for r in caplog.records if "lost" in r.getMessage()]


def test_a_queue_file_damaged_while_the_target_runs_is_moved_aside_keeping_what_can_be_read(tmp_path: Path, caplog):
    """The file is damaged after it opened (here: two pages of records' b-tree overwritten
    behind SQLite's back, as a disk error would). Before, only the next start looked at it:
    every read failed, the target logged an internal error at each try and shipped nothing
    more, ever. Now the read that meets the damage moves the file aside (bytes as they were
    then) after copying what can still be read to a new queue: a real collector on loopback
    gets every readable record, in order, then the events offered since; the unreadable ones
    are counted as dropped, with an event."""
    import sqlite3

    from bastion.logship.shipper import Target
    from bastion.metrics import Metrics
    from bastion.site.schema import LogsTarget

    port = _unused_port()
    spec = LogsTarget(name="central", type="syslog", host="127.0.0.1", port=port)
    recorded: list[dict] = []
    metrics = Metrics()
    t = Target(spec, tmp_path / "q", site="home", site_root=tmp_path, hostname="bastion", metrics=metrics,
               record=lambda kind, **kw: recorded.append(kw["payload"]))  # fmt: skip
    t.backoff_max_s = 0.2
    caplog.set_level(logging.ERROR, logger="bastion.logship")


    path = tmp_path / "q" / "central.db"
    collector = socket.socket()
    t.start()
    try:
        for i in range(1, 501):
            t.offer(json.dumps({"id": i, "kind": "test", "payload": "x" * 200}))
        wait_for(lambda: len(t.queue) == 500, 60)  # the collector is down: everything waits on disk
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the records into the file itself
        other.close()
        with open(path, "r+b") as f:
            f.seek(8 * 4096)
            f.write(b"\xa5" * (2 * 4096))
        damaged = path.read_bytes()
        collector.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        collector.bind(("127.0.0.1", port))
        collector.listen()
        collector.settimeout(60)
        wait_for(lambda: any(p["action"] == "queue-damaged" for p in recorded), 60)
        for i in range(501, 511):
            t.offer(json.dumps({"id": i, "kind": "test", "payload": "after"}))
        streams: list[list[int]] = []  # the ids each connection carried (the switch makes a new one)
        while not streams or 510 not in streams[-1]:
            conn, _ = collector.accept()
            conn.settimeout(60)
            streams.append([])
            rest = b""
            while data := conn.recv(65536):
                frames, rest = octet_frames(rest + data)
                streams[-1] += [json.loads(f[f.index(b"{") :])["id"] for f in frames]
                if 510 in streams[-1]:
                    break
            conn.close()
    finally:
        t.stop()
        collector.close()
    (event,) = [p for p in recorded if p["action"] == "queue-damaged"]
    aside = Path(event["moved_to"])
    assert aside.name.startswith("central.db.damaged-") and aside.read_bytes() == damaged
    # what the damaged file still gives, asked record by record: the readable ones
    readable, unreadable = [], []
    db = sqlite3.connect(f"file:{aside}?mode=ro", uri=True)
    for i in range(1, 501):
        try:
            row = db.execute("SELECT body FROM records WHERE seq = ?", (i,)).fetchone()
        except sqlite3.DatabaseError:
            unreadable.append(i)
        else:
            readable.append(json.loads(row[0])["id"])
    db.close()
    assert 0 < len(unreadable) <= 60 and len(readable) + len(unreadable) == 500  # two pages of ~20 records
    # each connection in order; one sent again after the switch may come twice, none is missing
    assert all(ids == sorted(set(ids)) for ids in streams), streams
    assert sorted({i for ids in streams for i in ids}) == readable + list(range(501, 511))
    assert streams[-1][-10:] == list(range(501, 511))
    assert event["kept"] == len(readable) and event["lost"] == len(unreadable)
    assert event["file"] == str(path) and event["error"]
    assert metrics.logship_dropped.labels(target="central", reason="damaged")._value.get() == len(unreadable)
    assert any(str(aside) in r.getMessage() for r in caplog.records)


def test_what_a_damaged_queue_still_holds_is_copied_whichever_page_is_damaged(tmp_path: Path):
    """DiskQueue.copy_readable, the salvage of a queue found damaged while it runs, with each
    page of a queue of 400 waiting records (100 more already taken) overwritten in turn: the
    root, the oldest records' leaf, the newest's, the counters, sqlite_sequence. What it copies
    is, in order, exactly what the damaged file gives when each record is asked for alone, and
    what it counts as lost is exactly what does not."""
    import sqlite3

    path = tmp_path / "q.db"
    queue = DiskQueue(path, 1000)
    queue.put_many([json.dumps({"id": i, "pad": "x" * 200}) for i in range(1, 501)])
    queue.ack(100)  # the sender's last acknowledged number: where the walk starts if the head is unreadable
    queue.close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    whole = path.read_bytes()
    assert len(whole) // 4096 > 20
    losses = []
    for page in range(1, len(whole) // 4096):  # every page but the header's
        path.write_bytes(whole)
        broken = DiskQueue(path, 1000)  # as the running target holds it: opened before the damage
        with open(path, "r+b") as f:
            f.seek(page * 4096)
            f.write(b"\xa5" * 4096)
        # a write through another connection (the header's page only, into the WAL): the open
        # queue's page cache is dropped and what is read comes from the damaged file
        other = sqlite3.connect(path, isolation_level=None)
        other.execute(f"PRAGMA user_version = {page}")
        other.close()
        readable, unreadable = [], 0
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        for seq in range(101, 501):
            try:
                row = db.execute("SELECT body FROM records WHERE seq = ?", (seq,)).fetchone()
            except sqlite3.DatabaseError:
                unreadable += 1
            else:
                readable.append(row[0])
        db.close()
        fresh = DiskQueue(tmp_path / f"fresh-{page}.db", 1000)
        assert broken.copy_readable(fresh, after=100) == (len(readable), unreadable), page + 1
        assert [b for _, b in fresh.peek(0, 1000)] == readable, page + 1
        broken.close()
        fresh.close()
        losses.append(unreadable)
    # the root's damage loses all 400, a leaf's a page of them, a freed page's or the counters' none
    assert 400 in losses and any(0 < n < 50 for n in losses) and 0 in losses, losses


def test_a_queue_file_that_stays_locked_is_tried_again_and_said_once(tmp_path: Path, caplog):
    """A target whose queue file another process holds at its start: it is tried again with the
    usual backoff (the events wait in memory), but the outage is one error in the log, not one
    at every try (up to four a minute, for as long as it lasts); the tries after it are debug,
    and the end of the outage says so."""
    import sqlite3

    from bastion.logship.shipper import Target
    from bastion.metrics import Metrics
    from bastion.site.schema import LogsTarget

    DiskQueue(tmp_path / "q" / "central.db", 10).close()
    holder = sqlite3.connect(tmp_path / "q" / "central.db", isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("COMMIT")  # the lock stays until close
    caplog.set_level(logging.DEBUG, logger="bastion.logship")
    metrics = Metrics()
    spec = LogsTarget(name="central", type="syslog", host="127.0.0.1", port=_unused_port())
    t = Target(spec, tmp_path / "q", site="home", site_root=tmp_path, hostname="bastion", metrics=metrics,
               record=None)  # fmt: skip
    t.backoff_max_s = 0.2

    def tries() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "cannot open the queue file" in r.getMessage()]


    t.start()
    try:
        for i in range(5):
            t.offer(json.dumps({"id": i}))
        wait_for(lambda: len(tries()) >= 3, 120)  # the start's and two more
        assert metrics.logship_up.labels(target="central")._value.get() == 0
        holder.close()
        wait_for(lambda: t.queue is not None and len(t.queue) == 5, 120)
    finally:
        t.stop()
        holder.close()
    assert [r.levelno for r in tries()][:3] == [logging.ERROR, logging.DEBUG, logging.DEBUG]
    assert [r.levelno for r in tries()].count(logging.ERROR) == 1
    assert any("central.db" in r.getMessage() and "opened" in r.getMessage() for r in caplog.records
               if r.levelno == logging.INFO)  # fmt: skip


def test_a_queue_file_found_damaged_by_a_write_takes_the_batch_into_the_new_queue(tmp_path: Path):
    """The damage met by a write (the newest records' page, where an append goes), the collector
    down. Before, the write's error was taken for a stuck disk: the batch waited in memory and
    was tried again, with the same error, for good. Now the file is moved aside, what can still
    be read of it queued again, and the batch after it, in order."""
    import sqlite3

    from bastion.logship.shipper import Target
    from bastion.metrics import Metrics
    from bastion.site.schema import LogsTarget

    spec = LogsTarget(name="central", type="syslog", host="127.0.0.1", port=_unused_port())
    recorded: list[dict] = []
    t = Target(spec, tmp_path / "q", site="home", site_root=tmp_path, hostname="bastion", metrics=Metrics(),
               record=lambda kind, **kw: recorded.append(kw["payload"]))  # fmt: skip
    t.backoff_max_s = 0.2


    path = tmp_path / "q" / "central.db"
    t.start()
    try:
        for i in range(1, 501):
            t.offer(json.dumps({"id": i, "payload": "x" * 200}))
        wait_for(lambda: len(t.queue) == 500, 60)
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        other.close()
        size = path.stat().st_size
        with open(path, "r+b") as f:  # the last page: the newest records, where the next ones go
            f.seek(size - 4096)
            f.write(b"\xa5" * 4096)
        for i in range(501, 506):
            t.offer(json.dumps({"id": i, "payload": "new"}))
        wait_for(lambda: any(p["action"] == "queue-damaged" for p in recorded), 60)
    finally:
        t.stop()
    (event,) = [p for p in recorded if p["action"] == "queue-damaged"]
    assert 0 < event["lost"] <= 30 and event["kept"] + event["lost"] == 500
    queue = DiskQueue(path, 1000)
    ids = [json.loads(b)["id"] for _, b in queue.peek(0, 1000)]
    queue.close()
    assert ids == list(range(1, event["kept"] + 1)) + list(range(501, 506))
