"""The nodes' journals: the export-format parser (bastion.logship.journal), POST /journal/upload
(off unless site.yaml says logs.journal), the systemd-journal-upload config in the built-in
Flatcar profile, and `bastion site check` on a bad logs: section. The real uploader against the
controller and rsyslog is in test_logship_rsyslog.py."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest
from bastion.cli import main
from bastion.logship import syslog
from bastion.logship.journal import ExportParser, Malformed, as_event
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

ENTRIES = (
    b"__CURSOR=s=1;i=1\n__REALTIME_TIMESTAMP=1764871526000000\n_HOSTNAME=node1\nPRIORITY=3\nMESSAGE=a=b\n\n"
    b"__REALTIME_TIMESTAMP=1764871526500000\nMESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\n\n"
)


def _parse_in(chunks: list[bytes]) -> list[dict]:
    p = ExportParser()
    out = [e for c in chunks for e in p.feed(c)]
    p.close()
    return out


def test_whole_byte_by_byte_and_at_every_split_the_same_entries():
    whole = _parse_in([ENTRIES])
    assert whole == [
        {"__CURSOR": "s=1;i=1", "__REALTIME_TIMESTAMP": "1764871526000000", "_HOSTNAME": "node1",
         "PRIORITY": "3", "MESSAGE": "a=b"},
        {"__REALTIME_TIMESTAMP": "1764871526500000", "MESSAGE": "two\nlines"},
    ]  # fmt: skip
    assert _parse_in([ENTRIES[i : i + 1] for i in range(len(ENTRIES))]) == whole
    for cut in range(len(ENTRIES) + 1):
        assert _parse_in([ENTRIES[:cut], ENTRIES[cut:]]) == whole


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_garbage_is_entries_or_malformed_never_anything_else(data):
    p = ExportParser()
    try:
        p.feed(data)
        p.close()
    except Malformed:
        pass


def test_truncated_at_every_length_is_malformed_at_close():
    for cut in range(1, len(ENTRIES)):
        if ENTRIES[:cut].endswith(b"\n\n"):
            continue
        p = ExportParser()
        p.feed(ENTRIES[:cut])
        with pytest.raises(Malformed):
            p.close()


def test_an_entry_past_the_bound_is_malformed():
    p = ExportParser()
    with pytest.raises(Malformed):
        p.feed(b"MESSAGE\n" + struct.pack("<Q", 2 * ExportParser.max_entry))
    p = ExportParser()
    with pytest.raises(Malformed):
        p.feed(b"MESSAGE=" + b"x" * (ExportParser.max_entry + 10))
    with pytest.raises(Malformed):
        ExportParser().feed(b"lower=case\n")


def test_an_entry_as_an_event():
    e = as_event(_parse_in([ENTRIES])[0], client="10.77.0.50", machine="node1", mac="52:54:00:12:34:01")
    assert e["kind"] == "journal" and e["source"] == "node" and e["ts"] == 1764871526.0
    assert e["payload"] == {"message": "a=b", "priority": 3, "host": "node1", "cursor": "s=1;i=1",
                            "client": "10.77.0.50"}  # fmt: skip


@pytest.mark.parametrize("realtime", [b"99999999999999999999", b"9999999999999999999", b"-5", b"soon", None])
def test_an_entry_whose_time_is_not_a_time_gets_the_time_it_arrived(realtime):
    """__REALTIME_TIMESTAMP is the sender's word: past year 9999 no syslog TIMESTAMP can say it
    (the formatter raised, and the record blocked its queue for good) and no Loki takes it. The
    entry gets the controller's time and keeps what it said, in `realtime`."""
    body = b"MESSAGE=x\n" + (b"__REALTIME_TIMESTAMP=" + realtime + b"\n" if realtime else b"") + b"\n"
    before = time.time()
    e = as_event(_parse_in([body])[0], client="10.77.0.50", machine=None, mac=None)
    assert before <= e["ts"] <= time.time()
    assert e["payload"].get("realtime") == (realtime.decode() if realtime else None)
    syslog.message(e, hostname="ctl", facility=16, site="s")


def _with_logs(site_dir: Path, text: str) -> Path:
    with open(site_dir / "site.yaml", "a") as f:
        f.write(text)
    return site_dir


def test_upload_is_off_unless_the_site_says_so_and_takes_only_the_export_format(site_dir, tmp_path, client_for):
    c = client_for(site_dir)
    r = c.post("/journal/upload", content=ENTRIES, headers={"Content-Type": "application/vnd.fdo.journal"})
    assert r.status_code == 404 and "logs.journal" in r.text
    c = client_for(_with_logs(site_dir, "\nlogs:\n  journal: true\n"))
    assert c.post("/journal/upload", content=ENTRIES, headers={"Content-Type": "text/plain"}).status_code == 415
    r = c.post("/journal/upload", content=ENTRIES, headers={"Content-Type": "application/vnd.fdo.journal"})
    assert r.status_code == 202 and "2 entries" in r.text
    r = c.post("/journal/upload", content=b"bad name\n", headers={"Content-Type": "application/vnd.fdo.journal"})
    assert r.status_code == 400 and "export format" in r.text


BAD = [
    ("targets: [{name: a, type: syslog}]", "logs.targets[0]: a syslog target needs host"),
    ("targets: [{name: a, type: loki, url: 'ftp://x'}]", "logs.targets[0].url: 'ftp://x' is not an http(s) URL"),
    ("targets: [{name: a, type: loki, url: 'http://x', port: 5}]",
     "logs.targets[0]: host and port are for syslog targets, not loki (the url has them)"),
    ("targets: [{name: a, type: loki, url: 'http://x', tls: {}}]", "logs.targets[0]: tls is for an https url"),
    ("targets: [{name: a, type: loki, url: 'https://x', tls: {server_name: y}}]",
     "logs.targets[0]: tls.server_name is for syslog targets: loki checks the url's host"),
    ("targets: [{name: a, type: loki, url: 'http://x', auth: basic}]",
     "logs.targets[0]: auth: basic needs username, and username is only for auth: basic"),
    ("targets: [{name: a, type: loki, url: 'http://x', auth: bearer, username: u}]",
     "logs.targets[0]: auth: basic needs username, and username is only for auth: basic"),
    ("targets: [{name: a, type: loki, url: 'http://x', auth: basic, username: 'a:b'}]",
     "logs.targets[0].username: 'a:b' is not a basic-auth user name"),
    ("targets: [{name: a, type: loki, url: 'http://x', auth: digest}]", "logs.targets[0].auth"),
    ("targets: [{name: a, type: loki, url: 'http://x', tenant: 'a b'}]",
     "logs.targets[0].tenant: 'a b' is not a Loki tenant ID"),
    ("targets: [{name: a, type: syslog, host: h, tenant: t, auth: bearer}]",
     "logs.targets[0]: tenant, auth: for loki targets, not syslog"),
    ("targets: [{name: a, type: syslog, host: h, tls: {cert_file: nope.pem}}]", "logs.targets[0].tls.cert_file:"),
    ("targets: [{name: a, type: syslog, host: h, facility: local9}]", "'local9' is not a syslog facility"),
    ("targets: [{name: a, type: syslog, host: h}, {name: a, type: syslog, host: h}]", "two targets are named 'a'"),
    ("targets: [{name: a, type: syslog, host: h, tls: {ca_file: nope.pem}}]", "logs.targets[0].tls.ca_file:"),
    ("targets: [{name: a, type: kafka}]", "logs.targets[0].type"),
    # Loki refuses a push with such a label for good (400, "invalid_labels"): every batch dropped
    ("targets: [{name: a, type: loki, url: 'http://x', labels: {env-name: home}}]",
     "logs.targets[0].labels: 'env-name' is not a Loki label name"),
    ("targets: [{name: a, type: loki, url: 'http://x', labels: {__env: home}}]",
     "logs.targets[0].labels: '__env' is not a Loki label name"),
    ("targets: [{name: a, type: loki, url: 'http://x', labels: {kind: mine}}]",
     "logs.targets[0].labels: 'kind' is set by the controller"),
]  # fmt: skip


@pytest.mark.parametrize(("section", "problem"), BAD)
def test_site_check_refuses_a_bad_logs_section(site_dir, section, problem):
    _with_logs(site_dir, f"\nlogs:\n  {section}\n")
    r = CliRunner().invoke(main, ["site", "check", str(site_dir)], terminal_width=200)
    assert r.exit_code == 1
    assert "site.yaml" in r.output and problem in r.output, r.output
