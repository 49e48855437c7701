"""Logs off-site against the real collector: Debian's rsyslog (imtcp, octet-counted framing)
in a network namespace that has only loopback, and `bastion serve` in the same namespace
shipping to it. Boot requests make the events; rsyslog writes each message's MSGID, severity,
structured data and MSG to a file, from which the test reads the event ids that arrived.

What it shows (issue 18): every event of a run arrives; rsyslog stopped in the middle of the
stream and started again later gets the events of the outage afterwards, in order, none lost;
with a small queue bound, the oldest records are dropped and counted (metric and event)."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bastion.lab.netns import Namespace
from certkit import make_pki
from netkit import need_root
from rsyslogkit import PORT, Rsyslog

pytestmark = pytest.mark.netns

HTTP = "127.0.0.1:8080"


def _site(site_dir: Path, logs: str) -> Path:
    with open(site_dir / "site.yaml", "a") as f:
        f.write(logs)
    return site_dir


def _serve(ns: Namespace, site: Path, db: Path, secrets: Path | None = None) -> subprocess.Popen:
    # the same name again stops the earlier one first (SIGTERM: it shuts down cleanly)
    more = ["--secrets", str(secrets)] if secrets is not None else []
    proc = ns.start([sys.executable, "-m", "bastion.serve_cli", "serve", "--site", str(site), "--db", str(db),
                     "--listen", HTTP, "--poll", "0", "--no-access-log", "--log-level", "warning", *more],
                    name="bastion", log=db.with_suffix(".log"))  # fmt: skip
    _in_ns(ns, f"""
import time, urllib.request
deadline = time.monotonic() + 30
while True:
    try:
        urllib.request.urlopen("http://{HTTP}/healthz", timeout=1).read(); break
    except OSError:
        assert time.monotonic() < deadline, "bastion serve did not come up"
        time.sleep(0.05)
""")
    return proc


def _to_rsyslog(ns: Namespace, site_dir: Path, tmp_path: Path, journal: bool = False) -> tuple[Rsyslog, Path]:
    """rsyslog running and `bastion serve` up shipping its events (and with `journal`, the
    nodes' journals) to it: (rsyslog, the history's database)."""
    journal_line = "  journal: true\n" if journal else ""
    site = _site(site_dir, f"\nlogs:\n{journal_line}  targets:\n    - name: central\n      type: syslog\n"
                           f"      host: 127.0.0.1\n      port: {PORT}\n")  # fmt: skip
    db = tmp_path / "events.db"
    rs = Rsyslog(ns, tmp_path / "rsyslog")
    rs.start()
    _serve(ns, site, db)
    return rs, db


def _in_ns(ns: Namespace, code: str) -> str:
    r = ns.run(sys.executable, "-c", code, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _boots(ns: Namespace, n: int, start: int) -> None:
    """n boot requests (each one `boot` event, a 404 for an unknown MAC: no assets needed)."""
    _in_ns(ns, f"""
import urllib.request, urllib.error
for i in range({start}, {start + n}):
    try:
        urllib.request.urlopen("http://{HTTP}/ipxe?mac=02-00-00-00-%02x-%02x" % (i // 256, i % 256), timeout=10).read()
    except urllib.error.HTTPError:
        pass
""")


def _metrics(ns: Namespace) -> str:
    return _in_ns(ns, f'import urllib.request; print(urllib.request.urlopen("http://{HTTP}/metrics").read().decode())')


def _db_ids(db: Path) -> list[int]:
    with sqlite3.connect(db) as c:
        return [r[0] for r in c.execute("SELECT id FROM events ORDER BY id")]


def _db_logship(db: Path) -> list[str]:
    with sqlite3.connect(db) as c:
        return [r[0] for r in c.execute("SELECT payload FROM events WHERE kind = 'logship' ORDER BY id")]


def _wait_for(what, until, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if until(value):
            return value
        assert time.monotonic() < deadline, f"gave up waiting; last: {value!r}"[:2000]
        time.sleep(0.1)


def _first_seen(ids: list[int]) -> list[int]:
    seen, out = set(), []
    for i in ids:
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


@pytest.fixture
def ns():
    need_root("rsyslogd", "ss")
    with Namespace(f"eblog{os.getpid() % 100000}") as namespace:
        yield namespace


def test_every_event_arrives_and_an_outage_is_replayed_in_order(ns, site_dir, tmp_path):
    rs, db = _to_rsyslog(ns, site_dir, tmp_path)

    _boots(ns, 100, 0)
    got = _wait_for(rs.ids, lambda ids: set(_db_ids(db)) <= set(ids))
    before = _db_ids(db)
    assert _first_seen(got) == before, "every event of the run, in order"

    # the collector goes away in the middle of the stream, and comes back later
    _boots(ns, 50, 100)
    rs.stop()
    _boots(ns, 150, 150)
    during = [i for i in _db_ids(db) if i > before[-1]]
    rs.start()
    _boots(ns, 20, 300)
    got = _wait_for(rs.ids, lambda ids: set(_db_ids(db)) <= set(ids))
    every = _db_ids(db)
    first = _first_seen(got)
    assert first == every, "all events, in order, none lost"
    assert len(first) == len(every) >= 100 + 50 + 150 + 20
    dups = len(got) - len(first)
    print(f"events {len(every)}, recorded during the outage (or around it) {len(during)}, "
          f"received {len(got)} of which {dups} again after the reconnect")
    actions = [p for p in _db_logship(db)]
    assert any('"action":"down"' in p for p in actions) and any('"action":"up"' in p for p in actions)
    assert 'bastion_logship_dropped_total{' not in _metrics(ns)  # nothing had to be dropped


def test_the_queue_bound_drops_the_oldest_and_counts_them(ns, site_dir, tmp_path):
    site = _site(site_dir, f"\nlogs:\n  targets:\n    - name: central\n      type: syslog\n"
                           f"      host: 127.0.0.1\n      port: {PORT}\n      queue_max: 20\n")  # fmt: skip
    db = tmp_path / "events.db"
    rs = Rsyslog(ns, tmp_path / "rsyslog")
    _serve(ns, site, db)  # no collector yet: everything waits in the queue
    _boots(ns, 60, 0)
    metrics = _wait_for(lambda: _metrics(ns), lambda m: 'bastion_logship_dropped_total{reason="bound",target="central"}' in m)
    dropped = float(re.search(r'bastion_logship_dropped_total\{reason="bound",target="central"\} (\S+)', metrics).group(1))
    assert dropped >= 60 - 20
    assert any('"action":"dropped"' in p for p in _db_logship(db)), "the drop is an event too"
    status = subprocess.run([str(Path(sys.executable).parent / "bastion"), "logs", "status", "--db", str(db), "--json"],
                            capture_output=True, text=True, check=True)  # fmt: skip
    queue = json.loads(status.stdout)
    assert queue["target"] == "central" and queue["queued"] == 20 and queue["dropped"] >= 40

    rs.start()
    every = _db_ids(db)
    got = _wait_for(rs.ids, lambda ids: every[-1] in ids)
    first = _first_seen(got)
    assert first == sorted(first), "what survived arrives in order"
    assert set(first) <= set(_db_ids(db))
    # the newest events survive the bound; the oldest were the ones dropped
    assert every[-1] in first and every[0] not in first
    assert len(first) <= len(every) - 40
    print(f"events {len(every)}, dropped {dropped:.0f}, received {len(first)}")



def test_the_queue_outlives_a_controller_restart(ns, site_dir, tmp_path):
    """Events queued while the collector is down stay queued across a restart of the
    controller, and arrive, in order, once the collector is back."""
    site = _site(site_dir, f"\nlogs:\n  targets:\n    - name: central\n      type: syslog\n"
                           f"      host: 127.0.0.1\n      port: {PORT}\n")  # fmt: skip
    db = tmp_path / "events.db"
    rs = Rsyslog(ns, tmp_path / "rsyslog")
    _serve(ns, site, db)
    _boots(ns, 60, 0)
    _serve(ns, site, db)  # stops the first controller, starts a second on the same history
    _boots(ns, 10, 60)
    assert rs.ids() == []
    rs.start()
    got = _wait_for(rs.ids, lambda ids: set(_db_ids(db)) <= set(ids))
    assert _first_seen(got) == _db_ids(db)
    assert len(_db_ids(db)) >= 70


def test_an_oversize_event_is_cut_to_fit_and_the_stream_stays_whole(ns, site_dir, tmp_path):
    """rsyslog's default limit is 8096 bytes; a longer message would be cut by rsyslog and its
    rest read as bogus messages. An event with a 12 KB query arrives cut to fit, valid JSON,
    and every line rsyslog writes is one of our events."""
    rs, db = _to_rsyslog(ns, site_dir, tmp_path)
    _boots(ns, 3, 0)
    _in_ns(ns, f"""
import urllib.request, urllib.error
try:
    urllib.request.urlopen("http://{HTTP}/ipxe?mac=02-00-00-00-10-00&pad=" + "y" * 12000, timeout=10).read()
except urllib.error.HTTPError:
    pass
""")
    _boots(ns, 3, 10)
    got = _wait_for(rs.ids, lambda ids: set(_db_ids(db)) <= set(ids))
    assert _first_seen(got) == _db_ids(db)
    lines = rs.out.read_text().splitlines()
    assert len(lines) == len(got), "no bogus lines from a cut-off message"
    cut = [json.loads(ln.split("] ", 1)[1]) for ln in lines if '"truncated"' in ln]
    assert len(cut) == 1 and cut[0]["payload"]["truncated"] > 12000

def test_tls_to_rsyslog_gtls(ns, site_dir, tmp_path):
    """RFC 5425: the same stream over TLS to rsyslog's gtls driver (Debian's rsyslog-gnutls),
    the collector's certificate checked against the site's CA file and name."""
    if not Path("/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so").exists():
        pytest.skip("rsyslog-gnutls is not installed (tools/setup installs it)")
    certs = make_pki(tmp_path / "pki")
    site = _site(site_dir, f"\nlogs:\n  targets:\n    - name: central\n      type: syslog\n"
                           f"      host: 127.0.0.1\n      port: {PORT}\n"
                           f"      tls: {{ca_file: {certs['ca']}, server_name: collector.test}}\n")  # fmt: skip
    db = tmp_path / "events.db"
    rs = Rsyslog(ns, tmp_path / "rsyslog", tls=certs)
    rs.start()
    _serve(ns, site, db)
    _boots(ns, 30, 0)
    got = _wait_for(rs.ids, lambda ids: set(_db_ids(db)) <= set(ids), timeout=30)
    assert _first_seen(got) == _db_ids(db)
    assert len(got) == len(_db_ids(db)), "no reconnects on a healthy TLS connection"


def test_mutual_tls_waits_for_the_client_key_then_delivers(ns, site_dir, tmp_path):
    """rsyslog that takes only clients with a certificate from the CA (x509/certvalid): the
    controller presents the site's certificate with its key from the secret store. Until the
    key is there, nothing is sent and nothing is lost (a `down` event names the secret); once
    it is put there, every event arrives, those of the wait first. A TLS client without a
    certificate gets nothing through to the same rsyslog."""
    if not Path("/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so").exists():
        pytest.skip("rsyslog-gnutls is not installed (tools/setup installs it)")
    certs = make_pki(tmp_path / "pki")
    site = _site(site_dir, f"\nlogs:\n  targets:\n    - name: central\n      type: syslog\n"
                           f"      host: 127.0.0.1\n      port: {PORT}\n"
                           f"      tls: {{ca_file: {certs['ca']}, server_name: collector.test, "
                           f"cert_file: {certs['client_cert']}}}\n")  # fmt: skip
    db = tmp_path / "events.db"
    secrets = tmp_path / "secrets"
    rs = Rsyslog(ns, tmp_path / "rsyslog", tls=certs, tls_auth="x509/certvalid")
    rs.start()
    _serve(ns, site, db, secrets)
    _boots(ns, 10, 0)
    down = _wait_for(lambda: [p for p in _db_logship(db) if '"action":"down"' in p], bool)
    assert "logs/central/client.key is not in the secret store" in down[0]
    assert rs.ids() == []
    # a client without a certificate: the handshake or the first read fails, and rsyslog
    # writes nothing of what it sent
    _in_ns(ns, f"""
import socket, ssl
ctx = ssl.create_default_context(cafile="{certs['ca']}")
try:
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", {PORT}), timeout=10),
                         server_hostname="collector.test") as s:
        msg = b'<134>1 - h edge-bastion - boot [bastion@32473 id="999999"] {{}}'
        s.sendall(b"%d %s" % (len(msg), msg))
        s.recv(1)
except (OSError, ssl.SSLError):
    pass
""")
    key = secrets / "logs" / "central" / "client.key"
    key.parent.mkdir(parents=True)
    key.write_bytes(certs["client_key"].read_bytes())
    key.chmod(0o600)
    _boots(ns, 10, 10)
    got = _wait_for(rs.ids, lambda ids: set(_db_ids(db)) <= set(ids))
    assert 999999 not in got
    assert _first_seen(got) == _db_ids(db)
    assert any('"action":"up"' in p for p in _db_logship(db))


def test_tls_refuses_a_collector_with_another_name(ns, site_dir, tmp_path):
    if not Path("/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so").exists():
        pytest.skip("rsyslog-gnutls is not installed (tools/setup installs it)")
    certs = make_pki(tmp_path / "pki")
    site = _site(site_dir, f"\nlogs:\n  targets:\n    - name: central\n      type: syslog\n"
                           f"      host: 127.0.0.1\n      port: {PORT}\n"
                           f"      tls: {{ca_file: {certs['ca']}, server_name: other.test}}\n")  # fmt: skip
    db = tmp_path / "events.db"
    rs = Rsyslog(ns, tmp_path / "rsyslog", tls=certs)
    rs.start()
    _serve(ns, site, db)
    _boots(ns, 5, 0)
    down = _wait_for(lambda: [p for p in _db_logship(db) if '"action":"down"' in p], bool)
    assert "certificate" in down[0].lower() or "hostname" in down[0].lower()
    assert rs.ids() == []


def _journal_file(d: Path, n: int) -> Path:
    """A journal file of n entries from node1 (made from the export format by Debian's
    systemd-journal-remote), one with a binary, two-line MESSAGE."""
    remote = need_tool_at("/lib/systemd/systemd-journal-remote")
    d.mkdir(parents=True, exist_ok=True)
    export = bytearray()
    for i in range(n):
        export += b"__REALTIME_TIMESTAMP=%d\n_HOSTNAME=node1\nPRIORITY=%d\nSYSLOG_IDENTIFIER=t\n" % (
            1764871526000000 + i, 3 if i == 0 else 6)
        if i == 1:
            text = b"two\nlines %d" % i
            export += b"MESSAGE\n" + len(text).to_bytes(8, "little") + text + b"\n\n"
        else:
            export += b"MESSAGE=entry %d\n\n" % i
    (d / "in.export").write_bytes(bytes(export))
    subprocess.run([remote, f"--output={d / 'node.journal'}", str(d / "in.export")], check=True,
                   capture_output=True)
    return d / "node.journal"


def need_tool_at(path: str) -> str:
    if not Path(path).exists():
        pytest.skip(f"{path} is not installed (tools/setup installs systemd-journal-remote)")
    return path


def test_a_node_journal_through_the_controller_to_rsyslog(ns, site_dir, tmp_path):
    """The real systemd-journal-upload (what Flatcar ships) sends a journal to the controller's
    POST /journal/upload; its entries reach rsyslog, named after the machine, with their own
    severity, in order."""
    upload = need_tool_at("/lib/systemd/systemd-journal-upload")
    journal = _journal_file(tmp_path / "node", 40)
    rs, _ = _to_rsyslog(ns, site_dir, tmp_path, journal=True)
    r = ns.run(upload, f"--url=http://{HTTP}/journal", f"--file={journal}", "--follow=no",
               capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr

    def journal_lines():
        return [ln for ln in rs.out.read_text().splitlines() if ln.startswith("journal ")] if rs.out.exists() else []

    lines = _wait_for(journal_lines, lambda ls: len(ls) >= 40)
    assert len(lines) == 40
    assert all('machine="node1"' in ln for ln in lines)
    messages = [json.loads(ln.split("] ", 1)[1])["payload"]["message"] for ln in lines]
    severities = [int(ln.split(" ", 2)[1]) for ln in lines]
    assert severities == [3] + [6] * 39  # the entry's PRIORITY is the message's severity
    assert messages[0] == "entry 0" and messages[1] == "two\nlines 1" and messages[-1] == "entry 39"
    assert [int(m.split()[-1]) for m in messages] == list(range(40))
    assert 'bastion_journal_entries_total{result="shipped"} 40.0' in _metrics(ns)

    # node2 boots from the uploader's address: entries from there are node2's, whatever their
    # _HOSTNAME says (it named them node1, and any host could ship entries as any node)
    _in_ns(ns, f"""
import urllib.request
assert urllib.request.urlopen("http://{HTTP}/ipxe?mac=52:54:00:12:34:02", timeout=10).status == 200
""")
    r = ns.run(upload, f"--url=http://{HTTP}/journal", f"--file={journal}", "--follow=no",
               capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = _wait_for(journal_lines, lambda ls: len(ls) >= 80)
    assert len(lines) == 80 and all('machine="node2"' in ln for ln in lines[40:]), lines[40]


def test_a_journal_entry_with_an_impossible_time_does_not_stop_the_stream(ns, site_dir, tmp_path):
    """Anyone who reaches /journal/upload chooses __REALTIME_TIMESTAMP. One past year 9999 made
    the syslog formatter raise at every try: the target retried it forever and nothing after it
    reached the collector. Now it arrives with the time it came, and the events after it too."""
    rs, db = _to_rsyslog(ns, site_dir, tmp_path, journal=True)
    _in_ns(ns, f"""
import urllib.request
body = b"__REALTIME_TIMESTAMP=99999999999999999999\\n_HOSTNAME=node1\\nMESSAGE=from the future\\n\\n"
req = urllib.request.Request("http://{HTTP}/journal/upload", data=body, method="POST",
                             headers={{"Content-Type": "application/vnd.fdo.journal"}})
assert urllib.request.urlopen(req, timeout=10).status == 202
""")
    _boots(ns, 3, 0)
    last = _db_ids(db)[-1]
    _wait_for(rs.ids, lambda ids: last in ids, timeout=60)
    journal = [ln for ln in rs.out.read_text().splitlines() if ln.startswith("journal ")]
    assert len(journal) == 1 and json.loads(journal[0].split("] ", 1)[1])["payload"]["realtime"] == "99999999999999999999"


def test_a_chunked_journal_upload_is_shipped_as_it_arrives(ns, site_dir, tmp_path):
    """systemd-journal-upload sends its body chunked (it does not know the length). The body
    limit gathered a chunked body whole before the handler saw a byte (up to 1 GiB in memory
    per upload), so nothing of an upload in progress was shipped. Here the uploader sends five
    entries, waits until rsyslog has them, and only then ends the body."""
    rs, _ = _to_rsyslog(ns, site_dir, tmp_path, journal=True)
    host, port = HTTP.split(":")
    out = _in_ns(ns, f"""
import socket, time
from pathlib import Path
def chunk(b):
    return b"%x\\r\\n%s\\r\\n" % (len(b), b)
def entries(start, n):
    return b"".join(b"__REALTIME_TIMESTAMP=%d\\nMESSAGE=entry %d\\n\\n" % (1764871526000000 + i, i)
                    for i in range(start, start + n))
s = socket.create_connection(("{host}", {port}), timeout=30)
s.sendall(b"POST /journal/upload HTTP/1.1\\r\\nHost: x\\r\\n"
          b"Content-Type: application/vnd.fdo.journal\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n")
s.sendall(chunk(entries(0, 5)))
out = Path("{rs.out}")
deadline = time.monotonic() + 60
while not (out.exists() and out.read_text().count("journal ") >= 5):
    assert time.monotonic() < deadline, "the first entries were not shipped while the upload went on"
    time.sleep(0.1)
s.sendall(chunk(entries(5, 5)) + b"0\\r\\n\\r\\n")
print(s.recv(4096).decode().split("\\r\\n")[0])
""")
    assert out.strip() == "HTTP/1.1 202 Accepted", out
    lines = _wait_for(lambda: [ln for ln in rs.out.read_text().splitlines() if ln.startswith("journal ")],
                      lambda ls: len(ls) >= 10)
    assert [json.loads(ln.split("] ", 1)[1])["payload"]["message"] for ln in lines] == [f"entry {i}" for i in range(10)]


def test_a_journal_upload_cut_short_ships_its_whole_entries_quietly(ns, site_dir, tmp_path):
    """An uploader that goes away mid-body (a node powered off): its complete entries were
    shipped as they came; the cut one is not, and the controller logs no traceback for it."""
    rs, db = _to_rsyslog(ns, site_dir, tmp_path, journal=True)
    host, port = HTTP.split(":")
    _in_ns(ns, f"""
import socket
body = b"".join(b"MESSAGE=entry %d\\n\\n" % i for i in range(3)) + b"MESSAGE=cut"
s = socket.create_connection(("{host}", {port}), timeout=30)
s.sendall(b"POST /journal/upload HTTP/1.1\\r\\nHost: x\\r\\n"
          b"Content-Type: application/vnd.fdo.journal\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n"
          + b"%x\\r\\n%s\\r\\n" % (len(body), body))
s.close()
""")
    _wait_for(lambda: 'bastion_journal_entries_total{result="malformed"} 1.0' in _metrics(ns), bool)
    assert 'bastion_journal_entries_total{result="shipped"} 3.0' in _metrics(ns)
    lines = _wait_for(lambda: [ln for ln in rs.out.read_text().splitlines() if ln.startswith("journal ")]
                      if rs.out.exists() else [], lambda ls: len(ls) >= 3)
    assert [json.loads(ln.split("] ", 1)[1])["payload"]["message"] for ln in lines] == ["entry 0", "entry 1", "entry 2"]
    assert "Traceback" not in db.with_suffix(".log").read_text()


def test_a_journal_entry_with_a_field_past_the_bound_does_not_stop_the_node_journal(ns, site_dir, tmp_path):
    """journald takes fields of up to 768 MiB (a core in COREDUMP=, a program's own huge MESSAGE);
    the controller holds at most 1 MiB of an entry. It answered such an entry with 400, and
    systemd-journal-upload, restarted (Restart=on-failure), sent again from its saved cursor and
    met the same entry every time: nothing after it was ever shipped. Now the field is left out
    (named, with its size, in the payload's `cut`), counted, and the rest of the journal goes on.
    Two such fields: a binary one (sent with its length first) and a printable MESSAGE, which
    the uploader sends as a `MESSAGE=...` line with no length."""
    upload = need_tool_at("/lib/systemd/systemd-journal-upload")
    remote = need_tool_at("/lib/systemd/systemd-journal-remote")
    big = 2 * 1024 * 1024
    d = tmp_path / "node"
    d.mkdir()
    export = bytearray()
    for i in range(30):
        export += b"__REALTIME_TIMESTAMP=%d\n_HOSTNAME=node1\nSYSLOG_IDENTIFIER=t\n" % (1764871526000000 + i)
        if i == 10:
            core = bytes(range(256)) * (big // 256)  # not text: the uploader sends it with its length
            export += b"COREDUMP\n" + len(core).to_bytes(8, "little") + core + b"\nMESSAGE=entry 10\n\n"
        elif i == 20:
            export += b"MESSAGE=" + b"y" * big + b"\n\n"
        else:
            export += b"MESSAGE=entry %d\n\n" % i
    (d / "in.export").write_bytes(bytes(export))
    subprocess.run([remote, f"--output={d / 'node.journal'}", str(d / "in.export")], check=True, capture_output=True)
    rs, _ = _to_rsyslog(ns, site_dir, tmp_path, journal=True)
    state = d / "upload.state"
    runs = []
    for _ in range(3):  # what Restart=on-failure does: again, from the cursor it saved
        r = ns.run(upload, f"--url=http://{HTTP}/journal", f"--file={d / 'node.journal'}", "--follow=no",
                   f"--save-state={state}", capture_output=True, text=True, timeout=120)  # fmt: skip
        runs.append((r.returncode, r.stderr[-500:]))
        if r.returncode == 0:
            break

    def journal_lines():
        return [ln for ln in rs.out.read_text().splitlines() if ln.startswith("journal ")] if rs.out.exists() else []

    shipped = [json.loads(ln.split("] ", 1)[1])["payload"].get("message") for ln in journal_lines()]
    assert runs[-1][0] == 0, f"the uploader failed at every try: {runs}; shipped so far: {shipped}"
    lines = _wait_for(journal_lines, lambda ls: len(ls) >= 30)
    payloads = [json.loads(ln.split("] ", 1)[1])["payload"] for ln in lines]
    assert len(payloads) == 30
    assert [p.get("message") for p in payloads] == [None if i == 20 else f"entry {i}" for i in range(30)]
    assert payloads[10]["cut"] == {"COREDUMP": big} and payloads[20]["cut"] == {"MESSAGE": big}
    assert all("cut" not in p for i, p in enumerate(payloads) if i not in (10, 20))
    metrics = _metrics(ns)
    assert 'bastion_journal_fields_cut_total 2.0' in metrics
    assert 'bastion_journal_entries_total{result="shipped"} 30.0' in metrics
