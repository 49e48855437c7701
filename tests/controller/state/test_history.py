"""One history per site, bounded: the default event database is the site's own (two sites served
one after the other keep apart, a site served again finds its own), a 10,000-request boot storm
leaves at most --history-events rows, old rows go by --history-days, and neither bound touches
the one-time Ignition tokens and install marks that share the SQLite file."""

from __future__ import annotations

import os
import shutil
import sqlite3

import pytest
from bastion.settings import Settings, SettingsError, default_db_path
from bastion.state.events import EventStore
from bastion.state.install import InstallMarks
from bastion.state.onetime import IgnitionTokens
from bastion_testkit import EXAMPLES, write_assets
from fastapi.testclient import TestClient
from mirrorkit import home_lab_copy


def app_for(site, **settings):
    from bastion.api.main import create_app

    return create_app(Settings(site_dir=site, poll_seconds=0, **settings))


@pytest.fixture
def example_site(tmp_path):
    d = tmp_path / "site"
    shutil.copytree(EXAMPLES / "site", d)
    write_assets(d, ("flatcar/amd64", "flatcar/arm64"))
    return d


@pytest.fixture
def home_lab(tmp_path):
    d = tmp_path / "home-lab"
    home_lab_copy(d)
    return d


def kinds(client) -> list[tuple[str, str | None]]:
    return [(e["kind"], e["endpoint"]) for e in client.get("/api/v1/events", params={"limit": 1000}).json()]


def test_two_sites_served_one_after_the_other_keep_separate_histories(example_site, home_lab, tmp_path):
    # examples/site and examples/home-lab are both named home-lab: their directories tell apart
    with TestClient(app_for(example_site)) as c:
        c.get("/ipxe", params={"mac": "52:54:00:12:34:01"})
        first = c.app.state.runtime.store.path
        assert ("boot", "/ipxe") in kinds(c)
    with TestClient(app_for(home_lab)) as c:
        second = c.app.state.runtime.store.path
        assert ("boot", "/ipxe") not in kinds(c)  # none of the other site's
        c.get("/metadata", params={"mac": "dc:a6:32:00:00:01"})
    assert first != second
    assert first == default_db_path("home-lab", example_site)
    assert first.parent.parent == second.parent.parent == \
        tmp_path.parent.parent / os.environ["XDG_STATE_HOME"] / "edge-bastion" / "history"  # fmt: skip
    with TestClient(app_for(example_site)) as c:  # served again: its own history is there
        got = kinds(c)
        assert ("boot", "/ipxe") in got and ("boot", "/metadata") not in got
        assert [k for k, _ in got].count("site") == 2


def test_a_boot_storm_leaves_at_most_the_bound_and_keeps_tokens_and_marks(example_site, tmp_path):
    db = tmp_path / "events.db"
    with TestClient(app_for(example_site, db_path=db, history_events=1000)) as c:
        runtime = c.app.state.runtime
        token, grant = runtime.provisioning.tokens.issue(
            machine="node1", mac="52:54:00:12:34:01", group="g", profile="p", client="10.0.0.9")
        runtime.provisioning.installs.mark("node1", mac="52:54:00:12:34:01", profile="p", callback=1)
        most = 0
        for i in range(10_000):
            c.get("/ipxe", params={"mac": f"52:54:00:00:{i // 256:02x}:{i % 256:02x}"})
            if i % 500 == 0:
                most = max(most, runtime.store.count())
        last = c.get("/api/v1/events", params={"limit": 1}).json()[0]
        assert runtime.store.count() <= 1000 and most <= 1000
        assert runtime.store.pruned >= 9000
        assert last["id"] > 10_000 and last["payload"]["query"] == "mac=52%3A54%3A00%3A00%3A27%3A0f"
    # a fresh look at the file: the bound held, and the other tables are untouched
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] <= 1000
    assert IgnitionTokens(db).lookup(token) == grant
    assert InstallMarks(db).get("node1").mac == "52:54:00:12:34:01"


def test_old_events_go_by_age_at_open_and_then_once_a_minute(tmp_path):
    now = [1_000_000.0]
    db = tmp_path / "events.db"
    tokens = IgnitionTokens(db, clock=lambda: now[0])
    token, _ = tokens.issue(machine="m", mac=None, group="g", profile="p", client=None)
    store = EventStore(db, max_age_s=3600, clock=lambda: now[0])
    store.record("boot", ts=now[0] - 7200)  # already too old: kept until the next age pass
    store.record("boot", ts=now[0] - 60)
    assert store.count() == 2
    now[0] += 61  # a minute on: the next insert prunes by age
    store.record("boot", ts=now[0])
    assert [e.ts for e in store.query()] == [now[0], now[0] - 121]
    store.close()
    now[0] += 3700  # opened again an hour later: the old ones are gone at once
    again = EventStore(db, max_age_s=3600, clock=lambda: now[0])
    assert again.count() == 0
    assert tokens.lookup(token) is not None


def test_large_events_are_bounded_by_size_as_small_ones_are_by_count(tmp_path):
    from bastion.state.events import ROW_BYTES, event_size, payload_json

    db = tmp_path / "events.db"
    store = EventStore(db, max_events=1000, max_bytes=200_000)
    big = {"query": "k=" + "x" * 8000}  # a LAN host's boot request with an 8 KB query
    size = event_size(payload_json(big))
    most_bytes = most_count = 0
    for i in range(300):
        store.record("boot", endpoint="/ipxe", payload={**big, "n": i})
        total = sqlite3.connect(db).execute(
            f"SELECT COUNT(*), SUM(length(payload) + {ROW_BYTES}) FROM events").fetchone()
        most_count, most_bytes = max(most_count, total[0]), max(most_bytes, total[1])
    assert 200_000 - size < most_bytes <= 200_000  # never over, and filled to the last one that fit
    assert most_count == most_bytes // size
    assert [e.payload["n"] for e in store.query(limit=3)] == [299, 298, 297]  # the newest kept
    assert store.pruned == 300 - store.count()
    # small events: the count binds first, the size never does
    for i in range(3000):
        store.record("boot", endpoint="/ipxe", payload={"query": f"mac={i}"})
    assert store.count() <= 1000 and store.count() > 800
    store.close()
    # opened again with a smaller size: the bound holds at once, newest first
    again = EventStore(db, max_events=1000, max_bytes=20 * event_size(payload_json({"query": "mac=2999"})))
    assert again.count() <= 20 and again.query(limit=1)[0].payload == {"query": "mac=2999"}
    again.close()


def test_the_size_bound_reads_only_the_events_it_deletes(tmp_path):
    """Under a flood of large events the size bound cuts often. Finding the cut by a window
    over the table read nine tenths of the bound's payloads each time, at an insert, under the
    store's lock (240 ms for 128 MiB): every statement of an insert that cuts is now bounded
    by the cut (or reads one row), and what is left is 98% of the bound or just under."""
    from bastion.state.events import event_size, payload_json

    store = EventStore(tmp_path / "events.db", max_events=100_000, max_bytes=2_000_000)
    big = {"query": "k=" + "x" * 8000}
    size = event_size(payload_json(big))
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    cuts = 0
    for i in range(1000):
        statements.clear()
        store.record("boot", endpoint="/ipxe", payload=big)
        if any(s.startswith("DELETE") for s in statements):
            cuts += 1
            for s in statements:
                assert s.startswith(("BEGIN", "COMMIT", "INSERT", "SELECT last_insert_rowid()", "SELECT MIN(id)")) \
                    or " WHERE id <= " in s, s  # fmt: skip
            left = store._bytes
            assert 2_000_000 * 0.98 - 2 * size < left <= 2_000_000 * 0.98, left
    assert cuts > 10 and store.count() == store._bytes // size
    store.close()


def test_a_lan_hosts_large_boot_requests_keep_the_history_file_within_its_size(example_site, tmp_path):
    db = tmp_path / "events.db"
    with TestClient(app_for(example_site, db_path=db, history_size="1MiB")) as c:
        for i in range(600):  # 600 requests with 7 KB queries: 4.3 MB of events offered
            c.get("/ipxe", params={"mac": "52:54:00:12:34:01", "junk": f"{i}-" + "y" * 7000})
        store = c.app.state.runtime.store
        assert store.pruned > 400
        assert f"bastion_history_pruned_total {store.pruned:.1f}" in c.app.state.runtime.metrics.render().decode()
        newest = c.get("/api/v1/events", params={"limit": 1}).json()[0]
        assert newest["payload"]["query"].startswith("mac=52%3A54%3A00%3A12%3A34%3A01&junk=599-")
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    # the file: the events' bound, and what SQLite keeps besides (the other tables, free pages)
    assert db.stat().st_size < 1.3 * 1024 * 1024, db.stat().st_size


@pytest.mark.parametrize(("given", "problem"), [
    ({"history_events": 99}, "--history-events 99: expected 100 or more"),
    ({"history_days": 0}, "--history-days 0: expected days, more than 0"),
    ({"history_size": "1000"}, "--history-size 1000: expected 1MiB or more"),
    ({"history_size": "lots"}, "--history-size 'lots': expected a size in bytes"),
])  # fmt: skip
def test_bad_bounds_are_refused_naming_the_option(example_site, given, problem):
    with pytest.raises(SettingsError, match=problem):
        Settings.build(site_dir=example_site, **given)


def test_bastion_events_reads_the_history_serve_keeps_for_the_site(example_site, tmp_path):
    from bastion.serve_cli import events
    from click.testing import CliRunner

    with TestClient(app_for(example_site)) as c:
        c.get("/ipxe", params={"mac": "52:54:00:12:34:01"})
    r = CliRunner().invoke(events, ["--site", str(example_site), "--json", "--kind", "boot"])
    assert r.exit_code == 0, r.output
    assert '"endpoint": "/ipxe"' in r.output and '"machine": "node1"' in r.output
    r = CliRunner().invoke(events, [], env={"BASTION_SITE": None, "BASTION_DB": None})
    assert r.exit_code == 2 and "which history? give --site DIR" in r.output
    r = CliRunner().invoke(events, ["--site", str(tmp_path)])  # a site never served
    assert r.exit_code == 1 and "no event database at" in r.output


def test_a_payload_is_kept_to_8_kib_and_not_finite_numbers_as_null(tmp_path):
    from bastion.state.events import MAX_PAYLOAD

    store = EventStore(tmp_path / "events.db")
    big = {f"field{i}": "x" * 2000 for i in range(40)}
    big["nested"] = {"deep": ["y" * 5000]}
    small_id = store.record("callback", source="node", payload={"stage": "booted", "charge": float("nan"),
                                                                "inf": [float("inf")]})  # fmt: skip
    big_id = store.record("callback", source="node", payload=big)
    events = {e.id: e for e in store.query(limit=10)}
    store.close()
    assert events[small_id].payload == {"stage": "booted", "charge": None, "inf": [None]}
    kept = events[big_id].payload
    assert len(kept) == 25 and kept["cut"].startswith("17 more fields not kept (the payload was ")
    assert kept["field0"] == "x" * 200 + "... (2000 characters, not kept)"
    row = sqlite3.connect(tmp_path / "events.db").execute(
        "SELECT max(length(payload)) FROM events").fetchone()[0]
    assert row <= MAX_PAYLOAD


def test_the_history_is_the_controllers_alone_whatever_the_umask(tmp_path, umask_022):
    """Its directory 0700 and the database with its -wal and -shm 0600 under umask 022, whichever
    opens it first: the events, or the state tables (one-time tokens, install marks)."""
    for first in ("events", "tokens"):
        db = tmp_path / first / "edge-bastion" / "history" / "site-1234" / "events.db"
        opened = [EventStore(db)] if first == "events" else [IgnitionTokens(db)]
        opened += [IgnitionTokens(db), InstallMarks(db)] if first == "events" else [EventStore(db)]
        next(s for s in opened if isinstance(s, EventStore)).record("boot", payload={"x": 1})
        for d in (db.parent, db.parent.parent, db.parent.parent.parent):
            assert oct(d.stat().st_mode & 0o777) == oct(0o700), d
        names = {p.name for p in db.parent.iterdir()}
        assert {"events.db", "events.db-wal", "events.db-shm"} <= names
        for p in db.parent.iterdir():
            assert oct(p.stat().st_mode & 0o777) == oct(0o600), p
        for s in opened:
            s.close()
