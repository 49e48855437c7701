"""The pieces of bastion.logship on their own: the queue's order, bound and drop count, an
event as an RFC 5424 message with RFC 6587 framing, and the Loki target against a small
receiver in this test that checks the push format (no real Loki is available offline: this is
a format check of Loki's documented JSON push API, not an interoperability test)."""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from bastion.logship import loki, syslog
from bastion.logship.queue import DiskQueue
from bastion.logship.shipper import Shipper, Target
from bastion.metrics import Metrics
from bastion.site.schema import LogsSection
from bastion.state.secrets import SecretStore
from hypothesis import given, settings
from hypothesis import strategies as st

EVENT = {"id": 12, "ts": 1764871526.25, "kind": "boot", "source": "controller", "mac": "52:54:00:12:34:01",
         "machine": "node1", "endpoint": "/ipxe", "profile": "w", "group": None, "status": 200,
         "payload": {"client": "10.77.0.50", "note": 'a "quoted" ]bracket\\'}}  # fmt: skip


def test_queue_keeps_order_across_reopen_and_drops_the_oldest_past_its_bound(tmp_path: Path):
    q = DiskQueue(tmp_path / "t.db", capacity=5)
    assert q.put_many(["a", "b", "c"]) == 0
    assert q.put_many(["d", "e", "f", "g"]) == 2  # a and b go
    assert [b for _, b in q.peek()] == ["c", "d", "e", "f", "g"]
    seqs = [s for s, _ in q.peek()]
    q.ack(seqs[1])
    q.close()
    q = DiskQueue(tmp_path / "t.db", capacity=5)  # durable: what was queued is still there
    assert [b for _, b in q.peek()] == ["e", "f", "g"] and len(q) == 3
    assert q.dropped == 2
    assert [b for _, b in q.peek(after=seqs[2])] == ["f", "g"]


def test_an_event_as_rfc5424_with_octet_counting():
    msg = syslog.message(EVENT, hostname="ctl", facility=16, site="home-lab")
    framed = syslog.frame(msg)
    length, _, rest = framed.partition(b" ")
    assert int(length) == len(rest) == len(msg)
    head = msg.decode()
    # <PRI>VERSION TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [SD] MSG; local0.info = 16*8+6
    m = re.match(r'<134>1 2025-12-04T18:05:26\.250000Z ctl edge-bastion - boot \[bastion@32473 (.*?[^\\])\] (.*)$', head)
    assert m, head
    assert 'id="12"' in m.group(1) and 'site="home-lab"' in m.group(1) and 'machine="node1"' in m.group(1)
    assert json.loads(m.group(2)) == EVENT
    bad = dict(EVENT, status=503)
    assert syslog.message(bad, hostname="ctl", facility=16, site="s").startswith(b"<131>")  # err
    escaped = syslog.message(dict(EVENT, machine='n"1]'), hostname="ctl", facility=16, site="s").decode()
    assert 'machine="n\\"1\\]"' in escaped


@pytest.mark.parametrize("ts", [1e14, -1e14, float("nan"), float("inf"), "x"])
def test_a_time_no_timestamp_can_say_is_the_nilvalue(ts):
    """RFC 5424 section 6.2.3: TIMESTAMP is NILVALUE when there is no usable time; a record the
    formatter cannot format blocks its queue for good (it is retried forever)."""
    msg = syslog.message(dict(EVENT, ts=ts), hostname="ctl", facility=16, site="s").decode()
    assert msg.startswith("<134>1 - ctl edge-bastion - boot [bastion@32473 "), msg


def test_a_long_event_is_cut_to_the_message_limit_and_stays_json():
    big = dict(EVENT, payload={"error": "é" * 20000})
    for limit in (480, 8096):
        msg = syslog.message(big, hostname="ctl", facility=16, site="s", max_bytes=limit)
        assert len(msg) <= limit
        event = json.loads(msg.decode().split("] ", 1)[1])
        assert event["id"] == 12 and event["payload"]["truncated"] == len(json.dumps(big["payload"], ensure_ascii=False, separators=(",", ":")))
        assert event["payload"]["head"].startswith('{"error":"éé')
    assert syslog.message(EVENT, hostname="ctl", facility=16, site="s", max_bytes=8096) == syslog.message(
        EVENT, hostname="ctl", facility=16, site="s")


def test_syslog_messages_cut_to_max_message_are_counted_per_target(tmp_path: Path):
    """Before, a message cut to `max_message` was sent with nothing to tell it had been:
    no metric, so a collector's operator could not see that events arrived shortened. Now
    `bastion_logship_cut_total{target}` counts them (0 from the target's start), against a
    collector on loopback that reads every message whole."""
    collector = socket.socket()
    collector.bind(("127.0.0.1", 0))
    collector.listen()
    collector.settimeout(30)
    metrics = Metrics()
    shipper = Shipper(tmp_path / "q", metrics)
    section = LogsSection.model_validate({"targets": [{"name": "central", "type": "syslog", "host": "127.0.0.1",
                                                      "port": collector.getsockname()[1], "max_message": 2048}]})  # fmt: skip
    events = [dict(EVENT, id=1), dict(EVENT, id=2, payload={"note": "p" * 5000}), dict(EVENT, id=3),
              dict(EVENT, id=4, machine="m" * 3000)]  # fmt: skip
    got: list[bytes] = []
    try:
        shipper.configure(section, site="s", site_root=tmp_path)
        cut = metrics.registry.get_sample_value("bastion_logship_cut_total", {"target": "central"})
        assert cut == 0  # on /metrics before anything was sent
        for e in events:
            shipper.offer(e)
        conn, _ = collector.accept()
        conn.settimeout(30)
        data = b""
        while len(got) < len(events):
            chunk = conn.recv(65536)
            assert chunk, ("closed", got)
            messages, data = octet_frames(data + chunk)
            got += messages
        conn.close()
    finally:
        shipper.close()
        collector.close()
    sent = [_check_fits(msg, 2048) for msg in got]
    assert [e.get("id") for e in sent] == [1, 2, 3, None]  # the last one's MSG is {"truncated", "head"}
    assert "truncated" in sent[1]["payload"] and "truncated" in sent[3]
    assert metrics.registry.get_sample_value("bastion_logship_cut_total", {"target": "central"}) == 2
    assert metrics.registry.get_sample_value("bastion_logship_sent_total", {"target": "central"}) == 4


def test_fit_message_says_whether_it_cut():
    whole, was_cut = syslog.fit_message(EVENT, hostname="ctl", facility=16, site="s", max_bytes=8096)
    assert (whole, was_cut) == (syslog.message(EVENT, hostname="ctl", facility=16, site="s"), False)
    short, was_cut = syslog.fit_message(dict(EVENT, payload={"note": "p" * 9000}), hostname="ctl", facility=16,
                                        site="s", max_bytes=8096)  # fmt: skip
    assert was_cut and len(short) <= 8096


# RFC 5424 section 6, as strict as the grammar: PARAM-VALUE escapes '"', '\' and ']'
_SD_PARAM = r'[!#-<>-\\^-~]{1,32}="(?:[^"\\\]]|\\["\\\]])*"'
_RFC5424 = re.compile(r"<(\d{1,3})>1 (\S+) ([!-~]{1,255}) ([!-~]{1,48}) ([!-~]{1,128}) ([!-~]{1,32}) "
                      r"(-|\[bastion@32473(?: " + _SD_PARAM + r")*\]) (.*)\Z", re.DOTALL)  # fmt: skip


def octet_frames(data: bytes) -> tuple[list[bytes], bytes]:
    """The whole messages at the start of `data` (RFC 6587 octet counting: LEN SP MSG), and
    what is left of a message still arriving."""
    out = []
    while b" " in data:
        length, _, rest = data.partition(b" ")
        if len(rest) < int(length):
            break
        out.append(rest[: int(length)])
        data = rest[int(length) :]
    return out, data


def _check_fits(msg: bytes, limit: int) -> dict:
    """`msg` is at most `limit` bytes and valid RFC 5424 with MSG a JSON object; that object."""
    assert len(msg) <= limit, (len(msg), msg)
    m = _RFC5424.match(msg.decode("utf-8"))
    assert m, msg
    return json.loads(m.group(8))


@pytest.mark.parametrize("field", ["machine", "endpoint", "mac", "source", "status", "profile", "kind", "site",
                                   "hostname", "all"])  # fmt: skip
def test_a_message_never_exceeds_max_message_whichever_field_is_long(field):
    """Before, only the payload was cut: with max_message 480, a 300-character machine name
    (in the structured data and in MSG) made a message of 1020 bytes, which a collector cuts
    mid-JSON. Now the structured data's values and MSG are cut too, and it stays RFC 5424."""
    long = 'é"]\\' * 75  # 300 characters, each one that takes more room escaped or in UTF-8
    event, site, hostname = dict(EVENT, payload={"error": "x" * 1000}), "home-lab", "ctl"
    for name in ("machine", "endpoint", "mac", "source", "status", "profile", "kind") if field == "all" else (field,):
        event[name] = long
    if field in ("site", "all"):
        site = long
    if field in ("hostname", "all"):
        hostname = "h" * 255
    msg = syslog.message(event, hostname=hostname, facility=16, site=site, max_bytes=480)
    body = _check_fits(msg, 480)
    assert body["truncated"] > 400 and isinstance(body["head"], str)
    assert msg.decode().split(" [bastion@32473 ", 1)[1].startswith('id="12"')  # the id to drop repeats by


_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=400)


_EVENTS = st.fixed_dictionaries(
    {"id": st.integers(0, 2**63), "ts": st.floats(), "kind": _TEXT},
    optional={name: _TEXT for name in ("source", "machine", "mac", "endpoint", "status", "profile", "payload")},
)


@given(event=_EVENTS, site=_TEXT, hostname=_TEXT, limit=st.integers(480, 2000))
@settings(max_examples=300, deadline=None)
def test_any_event_fits_max_message_as_rfc5424(event, site, hostname, limit):
    _check_fits(syslog.message(event, hostname=hostname, facility=16, site=site, max_bytes=limit), limit)


class _LokiReceiver(BaseHTTPRequestHandler):
    """Takes POST /loki/api/v1/push, checks it is Loki's JSON push format, keeps the entries;
    answers 503 while `down` is set (a Loki that is restarting)."""

    entries: ClassVar[list] = []
    down = threading.Event()
    problems: ClassVar[list] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.down.is_set():
            self.send_response(503)
            self.end_headers()
            return
        try:
            assert self.path == "/loki/api/v1/push"
            assert self.headers["Content-Type"] == "application/json"
            doc = json.loads(body)
            assert set(doc) == {"streams"}
            for s in doc["streams"]:
                assert set(s) == {"stream", "values"}
                assert all(isinstance(k, str) and isinstance(v, str) for k, v in s["stream"].items())
                # Loki's invalid_labels rule (docs/sources/operations/request-validation-rate-limits.md)
                assert all(re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", k) and not k.startswith("__") for k in s["stream"])
                for ts, line in s["values"]:
                    assert isinstance(ts, str) and ts.isdigit() and len(ts) >= 19  # ns since the epoch
                    event = json.loads(line)
                    assert s["stream"]["kind"] == event["kind"]
                    type(self).entries.append((s["stream"], int(ts), event))
        except (AssertionError, ValueError, KeyError, TypeError) as e:
            type(self).problems.append(repr(e))
            self.send_response(400)
            self.end_headers()
            return
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_loki_target_pushes_in_order_and_replays_after_an_outage(tmp_path: Path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _LokiReceiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/loki/api/v1/push"
    metrics = Metrics()
    shipper = Shipper(tmp_path / "q", metrics)
    section = LogsSection.model_validate({"targets": [{"name": "loki", "type": "loki", "url": url,
                                                       "labels": {"env": "test"}}]})  # fmt: skip
    shipper.configure(section, site="home-lab", site_root=tmp_path)
    up = lambda: metrics.registry.get_sample_value("bastion_logship_up", {"target": "loki"})

    def wait(cond):
        deadline = time.monotonic() + 60
        while not cond():
            assert time.monotonic() < deadline
            time.sleep(0.02)

    try:
        for i in range(1, 21):
            shipper.offer(dict(EVENT, id=i, ts=1764871526 + i))
        wait(lambda: len(_LokiReceiver.entries) == 20)
        _LokiReceiver.down.set()  # Loki answers 503: the shipper backs off, the queue holds
        for i in range(21, 41):
            shipper.offer(dict(EVENT, id=i, ts=1764871526 + i))
        wait(lambda: up() == 0)
        assert len(_LokiReceiver.entries) == 20
        _LokiReceiver.down.clear()
        for i in range(41, 51):
            shipper.offer(dict(EVENT, id=i, ts=1764871526 + i))
        wait(lambda: len(_LokiReceiver.entries) == 50)
    finally:
        shipper.close()
        server.shutdown()
    assert _LokiReceiver.problems == []
    ids = [e["id"] for _, _, e in _LokiReceiver.entries]
    assert ids == list(range(1, 51))
    stream, ts, _ = _LokiReceiver.entries[0]
    assert stream == {"job": "edge-bastion", "env": "test", "site": "home-lab", "source": "controller", "kind": "boot"}
    assert ts == (1764871526 + 1) * 10**9  # the event's time, in nanoseconds


def test_loki_push_body_groups_streams_and_keeps_order():
    events = [dict(EVENT, id=1, kind="boot"), dict(EVENT, id=2, kind="dhcp", source="device"), dict(EVENT, id=3)]
    doc = json.loads(loki.push_body(events, site="s", labels={}))
    assert [[json.loads(v[1])["id"] for v in s["values"]] for s in doc["streams"]] == [[1, 3], [2]]


def test_loki_times_are_the_events_microseconds_in_nanoseconds():
    """A journal entry's time is whole microseconds; ts * 1e9 in floating point made
    1764871526.123457 s into ...123457024 ns, a time the entry never had, and not the
    microsecond its syslog TIMESTAMP says."""
    events = [dict(EVENT, id=1, ts=1764871526123457 / 1e6), dict(EVENT, id=2, ts=1764871526.25)]
    doc = json.loads(loki.push_body(events, site="s", labels={}))
    assert [v[0] for v in doc["streams"][0]["values"]] == ["1764871526123457000", "1764871526250000000"]
    assert ".123457Z" in syslog.message(events[0], hostname="ctl", facility=16, site="s").decode()
    for bad in (float("nan"), float("inf"), "x"):  # never raises: now, rather than a queue stuck for good
        before = time.time_ns() - 1000
        (value,) = json.loads(loki.push_body([dict(EVENT, ts=bad)], site="s", labels={}))["streams"][0]["values"]
        assert before <= int(value[0]) <= time.time_ns() + 1000


def test_a_changed_logs_section_keeps_what_was_queued_and_the_order(tmp_path: Path):
    """A reload with another `logs:` restarts the threads on the same queue files."""
    _LokiReceiver.entries.clear()
    _LokiReceiver.down.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _LokiReceiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/loki/api/v1/push"

    def section(env: str) -> LogsSection:
        return LogsSection.model_validate({"targets": [{"name": "loki", "type": "loki", "url": url,
                                                        "labels": {"env": env}}]})  # fmt: skip

    shipper = Shipper(tmp_path / "q", Metrics())
    try:
        _LokiReceiver.down.set()  # the first events wait in the queue
        shipper.configure(section("a"), site="s", site_root=tmp_path)
        for i in range(1, 31):
            shipper.offer(dict(EVENT, id=i))
        shipper.configure(section("b"), site="s", site_root=tmp_path)
        _LokiReceiver.down.clear()
        for i in range(31, 41):
            shipper.offer(dict(EVENT, id=i))
        deadline = time.monotonic() + 60
        while len(_LokiReceiver.entries) < 40 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        shipper.close()
        server.shutdown()
    assert [e["id"] for _, _, e in _LokiReceiver.entries] == list(range(1, 41))
    assert {s["env"] for s, _, _ in _LokiReceiver.entries} == {"b"}  # sent after the change


class _GuardedLoki(BaseHTTPRequestHandler):
    """A push endpoint that takes a batch only with the `want` headers (401 without them, as a
    Loki behind an authenticating gateway answers), keeping the event ids and the headers of
    each request; over https, the CN of the client's certificate as well."""

    want: ClassVar[dict[str, str]] = {}
    ids: ClassVar[list[int]] = []
    seen: ClassVar[list[tuple[int, dict[str, str], str | None]]] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        peer = None
        if hasattr(self.connection, "getpeercert") and self.connection.getpeercert():
            peer = dict(x[0] for x in self.connection.getpeercert()["subject"])["commonName"]
        status = 204 if all(self.headers.get(k) == v for k, v in self.want.items()) else 401
        type(self).seen.append((status, dict(self.headers), peer))
        if status == 204:
            for s in json.loads(body)["streams"]:
                type(self).ids.extend(json.loads(line)["id"] for _, line in s["values"])
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args):
        pass


def _guarded_server(tls=None) -> tuple[ThreadingHTTPServer, str]:
    _GuardedLoki.ids.clear()
    _GuardedLoki.seen.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _GuardedLoki)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    scheme = "https" if tls is not None else "http"
    return server, f"{scheme}://127.0.0.1:{server.server_address[1]}/loki/api/v1/push"


def _wait(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.02)


def test_loki_basic_auth_and_tenant_wait_for_the_password_and_lose_nothing(tmp_path: Path, monkeypatch):
    """Basic authentication with the password from the secret store, and the tenant header.
    No password yet: nothing is sent, a `down` event names the secret. A wrong one: Loki's 401
    is retried, not a refusal that drops the batch. The right one: every event, in order."""
    monkeypatch.setattr(Target, "backoff_max_s", 0.3)
    _GuardedLoki.want = {"Authorization": "Basic " + base64.b64encode(b"site-7:s3cret").decode(),
                         "X-Scope-OrgID": "home-lab"}  # fmt: skip
    server, url = _guarded_server()
    secrets = SecretStore(tmp_path / "secrets")
    events: list[dict] = []
    metrics = Metrics()
    shipper = Shipper(tmp_path / "q", metrics, lambda kind, **f: events.append(f["payload"]), secrets=secrets)
    shipper.configure(LogsSection.model_validate({"targets": [{
        "name": "cloud", "type": "loki", "url": url, "tenant": "home-lab", "auth": "basic", "username": "site-7"}]}),
        site="s", site_root=tmp_path)  # fmt: skip
    try:
        for i in range(1, 11):
            shipper.offer(dict(EVENT, id=i))
        _wait(lambda: any(e["action"] == "down" for e in events))
        down = next(e for e in events if e["action"] == "down")
        assert "logs/cloud/password is not in the secret store" in down["error"]
        assert _GuardedLoki.seen == []  # nothing went out without the credentials
        secrets.put("logs/cloud/password", "wrong")
        _wait(lambda: len(_GuardedLoki.seen) >= 2)
        assert {s for s, _, _ in _GuardedLoki.seen} == {401} and _GuardedLoki.ids == []
        secrets.put("logs/cloud/password", "s3cret")
        for i in range(11, 21):
            shipper.offer(dict(EVENT, id=i))
        _wait(lambda: len(_GuardedLoki.ids) == 20)
    finally:
        shipper.close()
        server.shutdown()
    assert _GuardedLoki.ids == list(range(1, 21))
    assert metrics.registry.get_sample_value("bastion_logship_dropped_total",
                                             {"target": "cloud", "reason": "rejected"}) in (None, 0)  # fmt: skip


def test_loki_over_https_with_a_private_ca_a_client_certificate_and_a_token(tmp_path: Path, monkeypatch):
    """An https URL checked against the site's CA file, the controller's certificate presented
    (mutual TLS) with its key from the secret store, and a bearer token."""
    import ssl

    from certkit import make_pki

    monkeypatch.setattr(Target, "backoff_max_s", 0.3)
    pki = make_pki(tmp_path / "pki", dns=("localhost",), ips=("127.0.0.1",), client="bastion-ctl")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["ca"]))
    tls.load_cert_chain(pki["cert"], pki["key"])
    tls.verify_mode = ssl.CERT_REQUIRED
    _GuardedLoki.want = {"Authorization": "Bearer tok-123"}
    server, url = _guarded_server(tls)
    secrets = SecretStore(tmp_path / "secrets")
    secrets.put("logs/loki/token", "tok-123")
    events: list[dict] = []
    shipper = Shipper(tmp_path / "q", Metrics(), lambda kind, **f: events.append(f["payload"]), secrets=secrets)
    shipper.configure(LogsSection.model_validate({"targets": [{
        "name": "loki", "type": "loki", "url": url, "auth": "bearer",
        "tls": {"ca_file": "pki/ca.pem", "cert_file": "pki/client.pem"}}]}), site="s", site_root=tmp_path)  # fmt: skip
    try:
        for i in range(1, 6):
            shipper.offer(dict(EVENT, id=i))
        _wait(lambda: any(e["action"] == "down" for e in events))
        assert "logs/loki/client.key is not in the secret store" in events[0]["error"]
        secrets.put("logs/loki/client.key", pki["client_key"].read_text().strip())
        _wait(lambda: len(_GuardedLoki.ids) == 5)
    finally:
        shipper.close()
        server.shutdown()
    assert _GuardedLoki.ids == [1, 2, 3, 4, 5]
    assert {(s, peer) for s, _, peer in _GuardedLoki.seen} == {(204, "bastion-ctl")}
    assert any(e["action"] == "up" for e in events)


def _first_down(events: list[dict]) -> str:
    _wait(lambda: any(e["action"] == "down" for e in events))
    return next(e for e in events if e["action"] == "down")["error"]


def test_a_token_that_is_not_text_is_a_failure_that_names_the_secret(tmp_path: Path, caplog):
    """A token file of bytes that are not UTF-8: before, a UnicodeDecodeError ended in the
    catch-all (`down` said "internal error", a traceback at every retry)."""
    import logging

    secrets = SecretStore(tmp_path / "secrets")
    path = secrets.path("logs/cloud/token")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\xff\xfetok\n")
    caplog.set_level(logging.ERROR, logger="bastion.logship")
    events: list[dict] = []
    shipper = Shipper(tmp_path / "q", Metrics(), lambda kind, **f: events.append(f["payload"]), secrets=secrets)
    shipper.configure(LogsSection.model_validate({"targets": [{
        "name": "cloud", "type": "loki", "url": "http://127.0.0.1:9/loki/api/v1/push", "auth": "bearer"}]}),
        site="s", site_root=tmp_path)  # fmt: skip
    try:
        shipper.offer(dict(EVENT, id=1))
        error = _first_down(events)
    finally:
        shipper.close()
    assert "logs/cloud/token" in error and str(path) in error, error
    assert not [r for r in caplog.records if r.exc_info], "not a bug: no traceback"


def test_a_client_key_that_does_not_match_its_certificate_names_the_secret(tmp_path: Path):
    """Before, the `down` event said only OpenSSL's "key values mismatch"."""
    from certkit import make_pki

    pki = make_pki(tmp_path / "pki", client="bastion-ctl")
    secrets = SecretStore(tmp_path / "secrets")
    secrets.put("logs/central/client.key", pki["key"].read_text().strip())  # the server's key
    events: list[dict] = []
    shipper = Shipper(tmp_path / "q", Metrics(), lambda kind, **f: events.append(f["payload"]), secrets=secrets)
    shipper.configure(LogsSection.model_validate({"targets": [{
        "name": "central", "type": "syslog", "host": "127.0.0.1", "port": 9, "tls": {"cert_file": "pki/client.pem"}}]}),
        site="s", site_root=tmp_path)  # fmt: skip
    try:
        shipper.offer(dict(EVENT, id=1))
        error = _first_down(events)
    finally:
        shipper.close()
    key = secrets.path("logs/central/client.key")
    assert "logs/central/client.key" in error and str(key) in error and str(pki["client_cert"]) in error, error
    assert "key values mismatch" in error  # OpenSSL's word for it stays


# What the child of the test below runs: a shipper with one target, printing its first `down`.
_DOWN_CHILD = r"""
import json, sys, time
from pathlib import Path
from bastion.logship.shipper import Shipper
from bastion.metrics import Metrics
from bastion.site.schema import LogsSection
from bastion.state.secrets import SecretStore

target, root = json.loads(sys.argv[1])
events = []
shipper = Shipper(Path(root) / "q", Metrics(), lambda kind, **f: events.append(f["payload"]),
                  secrets=SecretStore(Path(root) / "secrets"))
shipper.configure(LogsSection.model_validate({"targets": [target]}), site="s", site_root=Path(root))
shipper.offer({"id": 1, "ts": 1, "kind": "x"})
while not any(e["action"] == "down" for e in events):
    time.sleep(0.05)
print("DOWN:", next(e for e in events if e["action"] == "down")["error"], flush=True)
shipper.close()
"""


@pytest.mark.parametrize("kind", ["syslog", "loki"])
def test_a_client_key_with_a_passphrase_does_not_load_and_nothing_asks_the_terminal(tmp_path: Path, kind):
    """Given no way to get the passphrase of an encrypted key, OpenSSL asks for it on the
    controlling terminal: a `bastion serve` started from a shell had its shipper thread wait
    there for good. Now such a key is one that does not load, like any other: a `down` event
    names the secret. The shipper runs in a child process whose controlling terminal is a pty
    this test reads."""
    import os
    import pty
    import select
    import signal
    import subprocess
    import sys

    from certkit import make_pki

    pki = make_pki(tmp_path / "pki", client="bastion-ctl")
    subprocess.run(["openssl", "pkey", "-in", str(pki["client_key"]), "-aes256", "-passout", "pass:hunter2",
                    "-out", str(tmp_path / "encrypted.key")], check=True, capture_output=True)  # fmt: skip
    SecretStore(tmp_path / "secrets").put("logs/central/client.key", (tmp_path / "encrypted.key").read_text().strip())
    tls = {"cert_file": "pki/client.pem"}
    target = ({"name": "central", "type": "syslog", "host": "127.0.0.1", "port": 9, "tls": tls} if kind == "syslog"
              else {"name": "central", "type": "loki", "url": "https://127.0.0.1:9/loki/api/v1/push", "tls": tls})  # fmt: skip
    pid, fd = pty.fork()
    if pid == 0:  # the child: a new session whose controlling terminal is the pty
        os.execv(sys.executable, [sys.executable, "-c", _DOWN_CHILD, json.dumps([target, str(tmp_path)])])
    out = b""
    try:
        deadline = time.monotonic() + 30
        while b"DOWN:" not in out and b"pass phrase" not in out and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    out += os.read(fd, 4096)
                except OSError:  # EIO: the child has gone
                    break
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fd)
    text = out.decode(errors="replace")
    assert "pass phrase" not in text, text
    assert "DOWN:" in text and "logs/central/client.key" in text and "passphrase" in text, text
