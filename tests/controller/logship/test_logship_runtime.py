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

from bastion.logship.queue import DiskQueue
from bastion_testkit import make_app


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
    import time

    from bastion.logship.shipper import Target
    from bastion.metrics import Metrics
    from bastion.site.schema import LogsTarget

    spec = LogsTarget(name="central", type="syslog", host="127.0.0.1", port=_unused_port())
    t = Target(spec, tmp_path / "q", site="home", site_root=tmp_path, hostname="bastion",
               metrics=Metrics(), record=None)  # fmt: skip
    t.backoff_max_s = 0.5
    caplog.set_level(logging.ERROR, logger="bastion.logship")

    def wait(cond) -> None:
        deadline = time.monotonic() + 60
        while not cond():
            assert time.monotonic() < deadline
            time.sleep(0.05)

    t.start()
    try:
        for i in range(5):
            t.offer(json.dumps({"id": i}))
        wait(lambda: len(t.queue) == 5)
        lock = sqlite3.connect(tmp_path / "q" / "central.db", isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        for i in range(5, 10):
            t.offer(json.dumps({"id": i}))
        wait(lambda: any("cannot write the queue file" in r.getMessage() and "central.db" in r.getMessage()
                         for r in caplog.records))
        lock.execute("ROLLBACK")
        lock.close()
        wait(lambda: len(t.queue) == 10)
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
