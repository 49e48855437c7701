"""The Loki target's bounds and safety (bastion.logship.loki and the shipper's Loki side):
pushes bounded by bytes, a line too long cut to fit, limits below ours (a proxy's 413, a
tenant's burst) learned; credentials never sent in cleartext or kept in a URL; the TLS context
made again when its files change. Against a receiver in this test that answers as Loki and a
proxy in front of it do at their limits (no real Loki is available offline)."""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pydantic
import pytest
from bastion.logship import loki
from bastion.logship.queue import DiskQueue
from bastion.logship.shipper import Shipper, Target
from bastion.metrics import Metrics
from bastion.site.schema import LogsSection, LogsTarget
from bastion.state.secrets import SecretStore
from hypothesis import given, settings
from hypothesis import strategies as st

EVENT = {"id": 1, "ts": 1764871526.25, "kind": "boot", "source": "controller", "mac": "52:54:00:12:34:01",
         "machine": "node1", "endpoint": "/ipxe", "profile": "w", "group": None, "status": 200, "payload": {}}  # fmt: skip


def _loki(*, max_body: int = 1_048_576, max_line: int = 256_000, burst: int = 6_000_000, tls=None):
    """A push endpoint with Loki's limits and a proxy's in front of it: a body past `max_body`
    is a 413 (nginx's client_max_body_size, 1 MiB by default); lines totalling more than
    `burst` bytes a 429 (Loki's ingestion burst: such a push is refused at every try); a line
    past `max_line` bytes a 400 for that entry, the others kept (Loki's max_line_size,
    256KB). Keeps what it took, in order, and every answer with its body's size."""
    got = SimpleNamespace(events=[], answers=[], peers=[])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            status = self._take(body)
            got.answers.append((status, len(body)))
            if hasattr(self.connection, "getpeercert") and self.connection.getpeercert():
                got.peers.append(dict(x[0] for x in self.connection.getpeercert()["subject"])["commonName"])
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _take(self, body: bytes) -> int:
            if len(body) > max_body:
                return 413
            lines = [line for s in json.loads(body)["streams"] for _, line in s["values"]]
            if sum(len(line.encode()) for line in lines) > burst:
                return 429
            refused = 0
            for line in lines:
                if len(line.encode()) > max_line:
                    refused += 1
                else:
                    got.events.append(json.loads(line))
            return 400 if refused else 204

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    scheme = "https" if tls is not None else "http"
    return server, f"{scheme}://127.0.0.1:{server.server_address[1]}/loki/api/v1/push", got


def _wait(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.02)


def _dropped(metrics: Metrics, target: str) -> float:
    return metrics.registry.get_sample_value("bastion_logship_dropped_total",
                                             {"target": target, "reason": "rejected"}) or 0  # fmt: skip


# Loki's defaults behind nginx's; a proxy that takes 100 kB; a tenant whose burst is 300 kB
@pytest.mark.parametrize("max_body,burst", [(1_048_576, 6_000_000), (100_000, 6_000_000), (10_000_000, 300_000)],
                         ids=["loki-defaults-behind-nginx", "small-proxy", "small-burst"])  # fmt: skip
def test_a_backlog_bigger_than_loki_takes_at_once_arrives_whole_in_order(tmp_path: Path, monkeypatch,
                                                                         max_body, burst):  # fmt: skip
    """Before, a push was 200 records whatever their size: 150 events of 7 kB and one of 600
    kB made a push of 1.7 MB, which a proxy refuses (413, dropped as a refusal: every record
    of it lost) and Loki past its burst answers 429 at every try (the queue never drains).
    Now a push is at most 1,000,000 bytes, a line at most 256,000, a 413 or 429 halves the
    bound, and every event arrives once, in order; the too-long ones cut to fit."""
    monkeypatch.setattr(Target, "backoff_max_s", 0.3)
    server, url, got = _loki(max_body=max_body, burst=burst)
    metrics = Metrics()
    shipper = Shipper(tmp_path / "q", metrics)
    events = [dict(EVENT, id=i, payload={"note": f"{i}:" + "x" * 7000}) for i in range(1, 151)]
    events[74]["payload"] = {"message": "y" * 600_000}  # a journal entry's MESSAGE can be 1 MiB
    events[119]["endpoint"] = "/" + "e" * 300_000  # too long even without its payload
    queue = DiskQueue(tmp_path / "q" / "loki.db", 1000)  # a backlog: what waited through an outage
    queue.put_many(json.dumps(e) for e in events)
    queue.close()
    try:
        shipper.configure(LogsSection.model_validate({"targets": [{"name": "loki", "type": "loki", "url": url}]}),
                          site="s", site_root=tmp_path)  # fmt: skip
        _wait(lambda: len(got.events) >= 150 or _dropped(metrics, "loki") > 0)
    finally:
        shipper.close()
        server.shutdown()
    assert [e["id"] for e in got.events] == list(range(1, 151))
    assert _dropped(metrics, "loki") == 0
    taken = [size for status, size in got.answers if status == 204]
    statuses = {status for status, _ in got.answers}
    assert (413 in statuses) == (max_body < loki.PUSH_MAX) and (429 in statuses) == (burst < loki.PUSH_MAX)
    assert max(taken) <= min(loki.PUSH_MAX, max_body)
    assert got.events[0] == events[0]  # the others whole
    cut = got.events[74]
    assert cut["payload"]["truncated"] == 600_000 + len('{"message":""}') and cut["payload"]["head"].startswith("{")
    assert {k: v for k, v in cut.items() if k != "payload"} == {k: v for k, v in events[74].items() if k != "payload"}
    cut = got.events[119]
    assert cut["id"] == 120 and cut["truncated"] > 300_000 and cut["head"].startswith('{"id":120,')


_TEXT = st.text(max_size=3000)  # lone surrogates included
_EVENTS = st.lists(st.fixed_dictionaries({"ts": st.floats(), "kind": st.sampled_from(["boot", "journal"])},
                                         optional={"machine": _TEXT, "payload": st.dictionaries(_TEXT, _TEXT, max_size=3)}),
                   min_size=1, max_size=30)  # fmt: skip


@given(events=_EVENTS, max_bytes=st.integers(1000, 20_000), line_max=st.integers(300, 5000))
@settings(max_examples=200, deadline=None)
def test_a_batch_is_within_its_bounds_in_order_and_takes_at_least_one(events, max_bytes, line_max):
    events = [dict(e, id=i) for i, e in enumerate(events)]
    body, taken, cut = loki.batch(events, site="s", labels={"env": "t"}, max_bytes=max_bytes, line_max=line_max)
    assert 1 <= taken <= len(events)
    assert len(body) <= max_bytes or taken == 1
    lines = [(int(ts), line) for s in json.loads(body)["streams"] for ts, line in s["values"]]
    assert len(lines) == taken and all(len(line.encode("utf-8", "surrogatepass")) <= line_max for _, line in lines)
    kept = [json.loads(line) for _, line in lines]
    assert sorted(e["id"] for e in kept) == list(range(taken))
    whole = [json.dumps(e, separators=(",", ":"), ensure_ascii=False) for e in events[:taken]]
    sent = {line for _, line in lines}
    assert set(cut) == {e["id"] for e, w in zip(events, whole) if w not in sent}
    if taken < len(events):  # it stopped because the next one did not fit (its count is a little over)
        more, _, _ = loki.batch(events[: taken + 1], site="s", labels={"env": "t"}, max_bytes=None, line_max=line_max)
        assert len(more) + 2 * (taken + 2) > max_bytes


@pytest.mark.parametrize("url,auth,refusal", [
    ("http://loki.example.net:3100/loki/api/v1/push", "basic", "password in cleartext to loki.example.net"),
    ("http://10.0.0.5:3100/loki/api/v1/push", "bearer", "token in cleartext to 10.0.0.5"),
    ("https://site-7:s3cret@logs.example.net/loki/api/v1/push", None, "credentials in it"),
    ("http://site-7:s3cret@127.0.0.1:3100/loki/api/v1/push", None, "credentials in it"),
])  # fmt: skip
def test_credentials_in_cleartext_or_in_the_url_are_refused(tmp_path: Path, caplog, url, auth, refusal):
    """Before, such a target started: a password or token went over plain http to another
    host at every push, or sat in site.yaml (kept in git) inside the URL. Now it is refused:
    not started, an error and a `not-started` event that name the target and the reason
    (without the password); the other targets start."""
    caplog.set_level(logging.ERROR, logger="bastion.logship")
    events: list[dict] = []
    shipper = Shipper(tmp_path / "q", Metrics(), lambda kind, **f: events.append(f["payload"]))
    bad = {"name": "cloud", "type": "loki", "url": url, **({"auth": auth} if auth else {}),
           **({"username": "site-7"} if auth == "basic" else {})}  # fmt: skip
    local = {"name": "local", "type": "loki", "url": "http://127.0.0.1:9/loki/api/v1/push", "auth": "bearer"}
    # `bastion site check` (the schema) refuses it, in the same words, without the password
    with pytest.raises(pydantic.ValidationError) as refused:
        LogsSection.model_validate({"targets": [bad, local]})
    ((loc, msg),) = [(e["loc"], e["msg"]) for e in refused.value.errors()]
    assert loc == ("targets", 0) and refusal in msg and "s3cret" not in msg
    try:
        # and the shipper, for a section made without the schema's checks
        section = LogsSection.model_construct(targets=[LogsTarget.model_construct(**bad),
                                                       LogsTarget.model_validate(local)])  # fmt: skip
        shipper.configure(section, site="s", site_root=tmp_path)
        assert [t.spec.name for t in shipper.targets] == ["local"]
    finally:
        shipper.close()
    (event,) = [e for e in events if e["action"] == "not-started"]
    assert event["target"] == "cloud" and refusal in event["error"] and "s3cret" not in event["error"]
    (line,) = [r.getMessage() for r in caplog.records if "not started" in r.getMessage()]
    assert "logship cloud" in line and refusal in line and "s3cret" not in line


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "localhost", "LocalHost.", "[::1]", "x.localhost"])
def test_credentials_over_http_to_loopback_are_taken(host):
    """The collector on the controller's own host: nothing leaves it in cleartext."""
    assert loki.url_refusal(f"http://{host}:3100/loki/api/v1/push", "basic") is None
    assert loki.url_refusal("https://logs.example.net/loki/api/v1/push", "basic") is None
    assert loki.url_refusal("http://logs.example.net/loki/api/v1/push", None) is None  # nothing to hide


def test_a_rotated_client_certificate_is_used_at_the_next_push_without_a_failure(tmp_path: Path, monkeypatch):
    """Loki makes a connection per push, with a TLS context the target keeps. Before, it was
    made again only after a push failed: a client certificate renewed on disk (before the old
    one expires) was not presented until the collector refused the old one. Now a change of
    the CA, certificate or key file (inode, size or mtime) makes it again at the next push."""
    from certkit import make_pki

    monkeypatch.setattr(Target, "backoff_max_s", 0.3)
    old = make_pki(tmp_path / "pki", dns=("localhost",), ips=("127.0.0.1",), client="bastion-2025")
    new = make_pki(tmp_path / "pki-next", client="bastion-2026")  # another CA, both trusted for clients
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(old["ca"]))
    tls.load_verify_locations(cafile=str(new["ca"]))
    tls.load_cert_chain(old["cert"], old["key"])
    tls.verify_mode = ssl.CERT_REQUIRED
    server, url, got = _loki(tls=tls)
    secrets = SecretStore(tmp_path / "secrets")
    secrets.put("logs/loki/client.key", old["client_key"].read_text().strip())
    events: list[dict] = []
    shipper = Shipper(tmp_path / "q", Metrics(), lambda kind, **f: events.append(f["payload"]), secrets=secrets)
    shipper.configure(LogsSection.model_validate({"targets": [{
        "name": "loki", "type": "loki", "url": url, "tls": {"ca_file": "pki/ca.pem", "cert_file": "pki/client.pem"}}]}),
        site="s", site_root=tmp_path)  # fmt: skip
    try:
        shipper.offer(dict(EVENT, id=1))
        _wait(lambda: len(got.events) == 1)
        # the renewal: the key first, then the certificate, each replaced whole (a rename)
        secrets.put("logs/loki/client.key", new["client_key"].read_text().strip())
        (tmp_path / "pki" / "client.pem.new").write_bytes(new["client_cert"].read_bytes())
        (tmp_path / "pki" / "client.pem.new").rename(tmp_path / "pki" / "client.pem")
        shipper.offer(dict(EVENT, id=2))
        _wait(lambda: len(got.events) == 2)
    finally:
        shipper.close()
        server.shutdown()
    assert got.peers == ["bastion-2025", "bastion-2026"]
    assert [e["action"] for e in events] == []  # no `down`: nothing failed on the way
