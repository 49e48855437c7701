"""The nodes' journals: the export-format parser (bastion.logship.journal), POST /journal/upload
(off unless site.yaml says logs.journal), the systemd-journal-upload config in the built-in
Flatcar profile, and `bastion site check` on a bad logs: section. The real uploader against the
controller and rsyslog is in test_logship_rsyslog.py."""

from __future__ import annotations

import random
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
from bastion.cli import main
from bastion.logship import journal, syslog
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


def test_a_bad_name_is_malformed():
    with pytest.raises(Malformed):
        ExportParser().feed(b"lower=case\n")
    with pytest.raises(Malformed):  # no name is this long, text or binary: not worth waiting for its end
        ExportParser().feed(b"A" * 65)


# --- the bound: a field that would take its entry past max_entry is cut, never held ----------


def _text(name: bytes, value: bytes) -> bytes:
    return name + b"=" + value + b"\n"


def _binary(name: bytes, value: bytes) -> bytes:
    return name + b"\n" + struct.pack("<Q", len(value)) + value + b"\n"


def _parser(bound: int) -> ExportParser:
    p = ExportParser()
    p.max_entry = bound
    return p


def _parse_with(p: ExportParser, chunks) -> list[tuple[dict, dict, int]]:
    out = [e for c in chunks for e in p.feed(c)]
    p.close()
    return [(dict(e), e.cut, e.cut_count) for e in out]


def _expected(entries: list[list[tuple[bytes, bytes, bool]]], bound: int) -> list[tuple[dict, dict, int]]:
    """The rule, written plainly: fields are taken in order, each costing its bytes on the wire
    (name, separator, length, value, newline); one that would take the entry past the bound is
    cut, named with its value's size (the first 32 names)."""
    out = []
    for fields in entries:
        kept, cut, count, held = {}, {}, 0, 0
        for name, value, binary in fields:
            wire = len(name) + 1 + len(value) + 1 + (8 if binary else 0)
            if held + wire > bound:
                count += 1
                if name.decode() in cut or len(cut) < ExportParser.max_cut_named:
                    cut[name.decode()] = len(value)
            else:
                held += wire
                kept[name.decode()] = value.decode("utf-8", errors="replace")
        out.append((kept, cut, count))
    return out


def _body(entries: list[list[tuple[bytes, bytes, bool]]]) -> bytes:
    return b"".join(b"".join((_binary if b else _text)(n, v) for n, v, b in fields) + b"\n" for fields in entries)


def test_around_the_bound_whole_byte_by_byte_and_at_every_split():
    bound = 40
    # MESSAGE=<v>\n costs 9 + len(v); MESSAGE\n<8><v>\n costs 17 + len(v)
    entries = [
        [(b"MESSAGE", b"x" * 31, False)],  # 40: fits exactly
        [(b"MESSAGE", b"x" * 32, False)],  # 41: cut
        [(b"MESSAGE", b"y" * 23, True)],  # 40: fits exactly
        [(b"MESSAGE", b"y" * 24, True), (b"PRIORITY", b"3", False)],  # 41: cut, and the next one fits
        [(b"A", b"1", False), (b"COREDUMP", b"\x00\n" * 100, True), (b"MESSAGE", b"after", False)],
        [(b"MESSAGE", b"z" * 100, False)],  # cut: the entry is only a cut field, and still an entry
        [(b"A", b"1", False)],
    ]
    body = _body(entries)
    want = _expected(entries, bound)
    assert [w[1] for w in want] == [{}, {"MESSAGE": 32}, {}, {"MESSAGE": 24}, {"COREDUMP": 200}, {"MESSAGE": 100}, {}]
    assert _parse_with(_parser(bound), [body]) == want
    assert _parse_with(_parser(bound), [body[i : i + 1] for i in range(len(body))]) == want
    for cut in range(len(body) + 1):
        assert _parse_with(_parser(bound), [body[:cut], body[cut:]]) == want


_FIELD = st.tuples(
    st.sampled_from([b"MESSAGE", b"COREDUMP", b"A", b"_PID", b"X_1"]),
    st.integers(0, 90),
    st.booleans(),
    st.sampled_from([b"v", b"\xff", b"\n"]),
).map(lambda f: (f[0], (f[3] if f[2] else b"v") * f[1], f[2]))


@given(st.lists(st.lists(_FIELD, min_size=1, max_size=6), min_size=1, max_size=5), st.data())
@settings(max_examples=300, deadline=None)
def test_around_the_bound_in_random_chunks_the_entries_the_rule_says(entries, data):
    bound = 64
    body = _body(entries)
    splits = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=12)))
    chunks = [body[a:b] for a, b in zip([0, *splits], [*splits, len(body)], strict=True)]
    assert _parse_with(_parser(bound), chunks) == _expected(entries, bound)


def test_at_the_real_bound_a_2_mib_field_is_cut_text_or_binary():
    big = 2 * 1024 * 1024
    entries = [
        [(b"MESSAGE", b"before", False)],
        [(b"COREDUMP", bytes(range(256)) * (big // 256), True), (b"MESSAGE", b"core", False)],
        [(b"MESSAGE", b"y" * big, False)],
        [(b"MESSAGE", b"m" * (ExportParser.max_entry - 9), False)],  # exactly the bound: kept
        [(b"MESSAGE", b"after", False)],
    ]
    body = _body(entries)
    want = _expected(entries, ExportParser.max_entry)
    assert [w[1] for w in want] == [{}, {"COREDUMP": big}, {"MESSAGE": big}, {}, {}]
    assert _parse_with(ExportParser(), [body]) == want
    rnd = random.Random(5)
    splits = sorted(rnd.randrange(len(body)) for _ in range(300))
    chunks = [body[a:b] for a, b in zip([0, *splits], [*splits, len(body)], strict=True)]
    assert _parse_with(ExportParser(), chunks) == want


@pytest.mark.parametrize("binary", [True, False])
def test_a_field_being_cut_is_never_held(binary):
    """64 MiB of one field, fed in 64 KiB chunks: the parser holds no more than its bound."""
    chunk = (b"\x00" if binary else b"x") * 65536
    n = 1024
    head = b"COREDUMP\n" + struct.pack("<Q", n * len(chunk)) if binary else b"MESSAGE="
    p = ExportParser()
    tracemalloc.start()
    try:
        p.feed(head)
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(n):
            assert p.feed(chunk) == []
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    (entry,) = p.feed(b"\nMESSAGE=after\n\n")
    p.close()
    assert entry == {"MESSAGE": "after"}  # the field after the cut one is kept
    assert entry.cut == {("COREDUMP" if binary else "MESSAGE"): n * len(chunk)} and entry.cut_count == 1
    assert peak < ExportParser.max_entry + 4 * len(chunk), peak


def test_the_names_of_cut_fields_are_bounded_and_all_are_counted():
    p = _parser(16)
    (entry,) = p.feed(b"".join(_text(b"F%d" % i, b"x" * 20) for i in range(40)) + b"\n")
    assert len(entry.cut) == ExportParser.max_cut_named and entry.cut_count == 40
    assert entry.cut["F0"] == 20 and "F39" not in entry.cut


@pytest.mark.parametrize("body", [
    b"COREDUMP\n" + struct.pack("<Q", 100) + b"x" * 100,  # the body ends inside a field being cut
    b"MESSAGE=" + b"x" * 100,
    b"MESSAGE=" + b"x" * 100 + b"\n",  # ... or after it, inside its entry
])  # fmt: skip
def test_a_body_that_ends_inside_a_cut_field_is_malformed_at_close(body):
    p = _parser(32)
    assert p.feed(body) == []
    with pytest.raises(Malformed):
        p.close()


def test_a_cut_binary_field_without_its_newline_is_malformed():
    for split in (None, 100):
        p = _parser(32)
        body = b"COREDUMP\n" + struct.pack("<Q", 100) + b"x" * 100 + b"X\n\n"
        with pytest.raises(Malformed):
            for c in [body] if split is None else [body[:split], body[split:]]:
                p.feed(c)


def test_an_entry_as_an_event():
    e = as_event(_parse_in([ENTRIES])[0], client="10.77.0.50", machine="node1", mac="52:54:00:12:34:01")
    assert e["kind"] == "journal" and e["source"] == "node" and e["ts"] == 1764871526.0
    assert e["payload"] == {"message": "a=b", "priority": 3, "host": "node1", "cursor": "s=1;i=1",
                            "client": "10.77.0.50"}  # fmt: skip
    (cut,) = _parse_in([b"MESSAGE=" + b"x" * ExportParser.max_entry + b"\n_PID=7\n\n"])
    assert as_event(cut, client=None, machine=None, mac=None)["payload"] == {"pid": "7", "cut": {"MESSAGE": 1 << 20},
                                                                            "client": None}  # fmt: skip


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


def test_the_whole_entries_before_a_bad_byte_are_shipped_even_in_the_same_chunk(site_dir, client_for):
    """The entries completed in the chunk that holds the bad byte were lost with the exception
    (an upload of one chunk shipped none); docs/logs.md says they are shipped all the same."""
    p = ExportParser()
    with pytest.raises(Malformed) as e:
        p.feed(b"MESSAGE=a\n\nMESSAGE=b\n\nbad name\n")
    assert e.value.entries == [{"MESSAGE": "a"}, {"MESSAGE": "b"}]
    c = client_for(_with_logs(site_dir, "\nlogs:\n  journal: true\n"))
    r = c.post("/journal/upload", content=b"MESSAGE=a\n\nMESSAGE=b\n\nbad name\n",
               headers={"Content-Type": "application/vnd.fdo.journal"})  # fmt: skip
    assert r.status_code == 400 and "(after 2 entries)" in r.text, r.text


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


def test_an_entry_of_many_small_fields_holds_only_the_fields_read():
    """1 MiB of distinct small fields in one entry (a sender's choice: journald itself takes
    1,024 a entry) made 110,000 dict items, 10.8 MB a connection. With keep= the parser
    counts every field towards its bound and holds only those named; an entry of fields it lets
    go still comes out (an empty one), and one cut short still is Malformed."""
    fields = b"".join(b"F%06d=v\n" % i for i in range(110_000))  # 1.1 MB of fields
    body = b"__REALTIME_TIMESTAMP=1764871526000000\n" + fields + b"MESSAGE=last\n\n"
    p = ExportParser(keep=journal.READ)
    tracemalloc.start()
    try:
        entries = []
        for i in range(0, len(body), 65536):
            entries += p.feed(body[i : i + 65536])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    p.close()
    (entry,) = entries
    assert entry == {"__REALTIME_TIMESTAMP": "1764871526000000"}  # MESSAGE fell past the bound
    assert peak < 2 * ExportParser.max_entry + 4 * 65536, peak
    # every byte still counts towards the bound, as without keep=: the same fields are cut
    (whole,) = ExportParser().feed(body)
    assert "MESSAGE" not in whole and len(whole) > 100_000
    assert (entry.cut, entry.cut_count) == (whole.cut, whole.cut_count) and entry.cut_count > 5_000
    (empty,) = ExportParser(keep=journal.READ).feed(b"OTHER=x\n\n")
    assert empty == {} and not empty.cut_count
    p = ExportParser(keep=journal.READ)
    p.feed(b"OTHER=x\n")
    with pytest.raises(Malformed):
        p.close()
