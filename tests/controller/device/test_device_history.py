"""Device events in the event history (bastion.state.events) are stored once, keyed by the
device's boot id and seq: a controller that was killed fetches the events of its last seconds
again from the device's ring (its EventCursor, bastion.state.eventcursor, is kept every few
seconds), and the history keeps one copy. Against real SQLite files, the real sim board and a
controller process that is really killed (SIGKILL)."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from types import SimpleNamespace as NS

import pytest
from bastion.device.hub import DeviceHub
from bastion.state.eventcursor import EventCursor
from bastion.state.events import SCHEMA_VERSION, EventStore
from simkit import SimProcess, wait_for

pytestmark = pytest.mark.timeout(180)

POWER = {"stagger_ms": 0, "channels": [{"name": f"node{i}", "min_off_ms": 0} for i in range(4)]}
NO_MACHINES = NS(machines=[], machine_by_mac=lambda mac: None, machine=lambda name: None)


def device_keys(db) -> list[tuple[str, int, int]]:
    """(boot, seq, copies) of every device event with a seq, in the file."""
    with sqlite3.connect(db) as c:
        return c.execute(
            "SELECT json_extract(payload, '$.boot') AS b, json_extract(payload, '$.seq') AS s,"
            " COUNT(*) FROM events WHERE source = 'device' AND s IS NOT NULL GROUP BY b, s"
            " ORDER BY b, s").fetchall()  # fmt: skip


def test_a_device_event_recorded_again_is_stored_once(tmp_path):
    store = EventStore(tmp_path / "events.db")
    first = store.record("power", source="device", payload={"boot": "b1", "seq": 7, "ch": 2})
    again = store.record("power", source="device", payload={"boot": "b1", "seq": 7, "ch": 2})
    assert again == first and store.count() == 1
    ids = store.record_many([
        ("power", {"source": "device", "payload": {"boot": "b1", "seq": 7, "ch": 2}}),
        ("power", {"source": "device", "payload": {"boot": "b1", "seq": 8, "ch": 2}}),
        ("power", {"source": "device", "payload": {"boot": "b2", "seq": 7, "ch": 2}}),  # new boot
        ("boot", {"endpoint": "/ipxe", "payload": {"boot": "b1", "seq": 7}}),  # not the device's
        ("boot", {"endpoint": "/ipxe", "payload": {"boot": "b1", "seq": 7}}),
        ("device", {"source": "device", "payload": {"state": "connected", "boot": "b1"}}),
        ("device", {"source": "device", "payload": {"state": "connected", "boot": "b1"}}),
    ])
    assert ids[0] == first and len(set(ids)) == len(ids)
    assert store.count() == 7 and store.count("power") == 3
    assert [e.id for e in store.query(limit=100, newest_first=False)] == sorted(ids)
    assert device_keys(tmp_path / "events.db") == [("b1", 7, 1), ("b1", 8, 1), ("b2", 7, 1)]


# The history's schema before the device key (version 1): what an existing file holds.
_SCHEMA_1 = """
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, kind TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT 'controller', mac TEXT, machine TEXT, endpoint TEXT,
    profile TEXT, grp TEXT, status INTEGER, payload TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX events_kind ON events (kind, id);
CREATE INDEX events_mac ON events (mac, id);
CREATE INDEX events_machine ON events (machine, id);
CREATE INDEX events_unnamed_client
    ON events (json_extract(payload, '$.client'), id) WHERE machine IS NULL AND mac IS NULL;
PRAGMA user_version = 1;
"""


def test_a_history_from_before_the_device_key_opens_upgraded_without_its_duplicates(tmp_path):
    db = tmp_path / "events.db"
    with sqlite3.connect(db) as c:
        c.executescript(_SCHEMA_1)
        rows = [  # as a killed controller left them: b1's seqs 4 and 5 recorded twice
            ("power", "device", '{"boot":"b1","seq":4,"ch":1}'),
            ("power", "device", '{"boot":"b1","seq":5,"ch":1}'),
            ("boot", "controller", '{"n":1}'),
            ("power", "device", '{"boot":"b1","seq":4,"ch":1}'),
            ("power", "device", '{"boot":"b1","seq":5,"ch":1}'),
            ("device", "device", '{"state":"connected","boot":"b1"}'),
            ("device", "device", '{"state":"connected","boot":"b1"}'),
            ("power", "device", '{"boot":"b1","seq":6,"ch":1}'),
            ("boot", "controller", '{"n":1}'),
        ]
        c.executemany("INSERT INTO events (ts, kind, source, payload) VALUES (1.0, ?, ?, ?)", rows)
    store = EventStore(db)
    kept = store.query(limit=100, newest_first=False)
    assert [e.id for e in kept] == [1, 2, 3, 6, 7, 8, 9]  # the first copy of each stays
    assert store.count() == 7 and store.duplicates_removed == 2
    assert store.record("power", source="device", payload={"boot": "b1", "seq": 6, "ch": 1}) == 8
    assert store.count() == 7
    store.close()
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert c.execute("SELECT 1 FROM sqlite_master WHERE name = 'events_device_seq'").fetchone()
    assert EventStore(db).count() == 7  # and it opens again as it is


# A controller (serve's DeviceHub with its EventCursor) that keeps its cursor, records a
# power event that comes after it, and is then killed before it keeps the cursor again.
CONTROLLER = """
import sys, time
from types import SimpleNamespace as NS
from bastion.device.hub import DeviceHub
from bastion.state.eventcursor import EventCursor
from bastion.state.events import EventStore

port, db = sys.argv[1], sys.argv[2]
store = EventStore(db)
site = NS(machines=[], machine_by_mac=lambda mac: None, machine=lambda name: None)
hub = DeviceHub(port, lambda: site, store.record, cursors=EventCursor(db))
hub.BEAT_EVERY_S = 3600  # its cursor is kept here, when this script says, not every 2 s
hub.start()
assert hub.link.wait_ready(30), hub.link.last_error
time.sleep(0.5)  # the catch-up's events recorded
hub._keep_cursor()
hub.power("2", "on")
while not any(e.payload.get("ch") == 2 and e.payload.get("state") == "on"
              for e in store.query(kind="power")):
    time.sleep(0.05)
print("recorded", flush=True)
time.sleep(3600)
"""


@pytest.fixture
def board(tmp_path):
    with SimProcess(tmp_path / "flash", tmp_path / "ttyACM0", {"power": POWER}) as s:
        yield s


def test_a_killed_controller_records_its_last_device_events_once_after_restart(board, tmp_path):
    port, db = str(board.link), tmp_path / "events.db"
    killed = subprocess.Popen([sys.executable, "-c", CONTROLLER, port, str(db)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert killed.stdout.readline().strip() == "recorded"
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
    store = EventStore(db)
    (power,) = [e for e in store.query(kind="power") if e.payload.get("ch") == 2]
    boot, kept = EventCursor(db).get()
    assert boot == power.payload["boot"] and kept <= power.payload["seq"]  # not kept past it
    fetched: list[dict] = []

    def record(kind, **kw):
        fetched.append(kw["payload"])
        return store.record(kind, **kw)

    hub = DeviceHub(port, lambda: NO_MACHINES, record, cursors=EventCursor(db)).start()
    try:
        wait_for(lambda: hub.resyncs, what="the restarted controller's resync")
    finally:
        hub.close()
    # it fetched the power event again from the device's ring, and the history kept one copy
    assert any(p.get("seq") == power.payload["seq"] for p in fetched)
    keys = device_keys(db)
    assert keys and all(copies == 1 for _, _, copies in keys), keys


def test_a_device_event_recorded_again_is_neither_shipped_nor_counted_again(client_for, site_dir):
    """What the history keeps once goes to the log collectors and the metrics once: the copy
    fetched again is not offered to logship (its id is the stored event's, already shipped)."""
    runtime = client_for(site_dir).app.state.runtime
    offered: list[dict] = []
    runtime.logship, shipper = NS(offer=offered.append), runtime.logship  # stand-in: its inbox
    event = {"source": "device", "payload": {"boot": "b9", "seq": 3, "ch": 1}}
    first = runtime.record("power", **event)
    assert runtime.record("power", **event) == first
    second = runtime.record("power", source="device", payload={"boot": "b9", "seq": 4, "ch": 1})
    runtime.logship = shipper  # the app closes its own at the end
    assert second > first and [o["id"] for o in offered] == [first, second]
    assert runtime.metrics.events.labels(kind="power")._value.get() == 2
