"""`bastion events` picks its history: an explicit --db or --site wins over a BASTION_URL that a
shell exported for the device commands; --url, or the variable alone, reads the API."""

from __future__ import annotations

from pathlib import Path

from bastion.cli import main
from bastion.state.events import EventStore
from click.testing import CliRunner

DEAD_URL = "http://127.0.0.1:9"  # the discard port: nothing listens there


def _db(tmp_path: Path) -> Path:
    path = tmp_path / "events.db"
    store = EventStore(path)
    store.record("boot", mac="52:54:00:12:34:01", endpoint="/ipxe", status=200)
    store.close()
    return path


def test_an_explicit_db_wins_over_an_exported_url(tmp_path):
    db = _db(tmp_path)
    r = CliRunner().invoke(main, ["events", "--db", str(db), "--json"], env={"BASTION_URL": DEAD_URL})
    assert r.exit_code == 0, r.output
    assert '"endpoint": "/ipxe"' in r.output or '"endpoint":"/ipxe"' in r.output


def test_the_exported_url_alone_reads_the_api(tmp_path):
    r = CliRunner().invoke(main, ["events"], env={"BASTION_URL": DEAD_URL})
    assert r.exit_code == 1, r.output  # a clear error, not a traceback
    assert f"Error: {DEAD_URL}: " in r.output and "refused" in r.output, r.output


def test_url_on_the_command_line_reads_the_api_even_with_db(tmp_path):
    db = _db(tmp_path)
    r = CliRunner().invoke(main, ["events", "--db", str(db), "--url", DEAD_URL])
    assert r.exit_code == 1 and f"Error: {DEAD_URL}: " in r.output, r.output


def test_control_characters_from_a_node_are_shown_escaped_not_sent_to_the_terminal(tmp_path):
    # A /callback field (no token needed) with an OSC title sequence and a line of its own: it
    # set the operator's terminal title and printed a forged history line.
    path = tmp_path / "events.db"
    store = EventStore(path)
    store.record("callback", mac="52:54:00:12:34:01", source="node",
                 payload={"stage": "booted\x1b]0;pwned\x07\n 99999  2026-12-06 00:00:00  site  FORGED\u202e"})
    store.close()
    r = CliRunner().invoke(main, ["events", "--db", str(path)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert len(lines) == 1 and "\x1b" not in r.output and "\x07" not in r.output
    assert "stage=booted\\x1b]0;pwned\\x07\\n 99999" in lines[0] and lines[0].endswith("FORGED\\u202e")
    # --json keeps the data as it is (JSON escapes it)
    r = CliRunner().invoke(main, ["events", "--db", str(path), "--json"])
    assert "\\u001b]0;pwned\\u0007\\n" in r.output



def test_events_from_the_api_page_on_past_an_answers_byte_bound(tmp_path, monkeypatch):
    # GET /api/v1/events stops an answer at ANSWER_BYTES (large callbacks: fewer events than
    # asked for); `bastion events --url -n N` asked once and showed what came
    import threading
    import time

    import uvicorn
    from bastion.api import events as events_api
    from bastion.api.main import create_app
    from bastion.settings import Settings
    from mirrorkit import home_lab_copy

    site = tmp_path / "home-lab"
    home_lab_copy(site)
    db = tmp_path / "events.db"
    store = EventStore(db)
    for i in range(60):
        store.record("callback", source="node", payload={"stage": f"s{i:02d}", "message": "x" * 2000})
    store.close()
    monkeypatch.setattr(events_api, "ANSWER_BYTES", 20_000)  # about nine of these events
    app = create_app(Settings(site_dir=site, db_path=db, poll_seconds=0, secrets_dir=tmp_path / "secrets"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        r = CliRunner().invoke(main, ["events", "--url", f"http://127.0.0.1:{port}", "-n", "50", "--kind", "callback"])
    finally:
        server.should_exit = True
        t.join(timeout=10)
    assert r.exit_code == 0, r.output
    stages = [line.split("stage=")[1][:3] for line in r.output.splitlines()]
    assert stages == [f"s{i:02d}" for i in range(10, 60)], stages
