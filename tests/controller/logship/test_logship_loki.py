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
from datetime import UTC, datetime
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


def _loki(*, max_body: int = 1_048_576, max_line: int = 256_000, burst: int = 6_000_000, tls=None,
          oldest: float | None = None, count: str = "loki3", rate_limited: int = 0,
          stream_budget: int | None = None, budget_pushes: int = 0):  # fmt: skip
    """A push endpoint with Loki's limits and a proxy's in front of it: a body past `max_body`
    is a 413 (nginx's client_max_body_size, 1 MiB by default); lines totalling more than
    `burst` bytes a 429 (Loki's ingestion burst: such a push is refused at every try); a line
    past `max_line` bytes a 400 for that entry, the others kept (Loki's max_line_size,
    256KB). With `oldest`, an entry before that time is a 400 for that entry, the others kept,
    answered as Loki's ingester answers it (pkg/ingester/stream.go): a line per refused entry,
    then `count` says how many: "loki3" as Loki 3 (`user 'fake', total ignored: N out of M for
    stream: {..}`, a line per stream), "loki2" as Loki 2 (`total ignored: N out of M`), "none"
    not at all. The first `rate_limited` pushes are a 429 whatever they hold (a tenant's rate
    used up for now). The first `budget_pushes` pushes each take at most `stream_budget` bytes of
    lines a stream, charging every entry, an entry already stored too (Loki's per-stream rate
    limit, its bucket emptied by one push: pkg/ingester/stream.go validateEntries), and answer
    429 for the rest, naming them as the ingester does (errorForFailedEntries). An entry equal to
    one already stored (stream, time and line) is dropped, as Loki drops it, and counted in
    `duplicates`. Keeps what it took, in order, and every answer with its body's size."""
    got = SimpleNamespace(events=[], answers=[], peers=[], pushes=[], duplicates=0)
    stored: set[tuple] = set()

    def go_time(ns: int) -> str:  # Go's time.Time.String() of a UTC time
        seconds, fraction = divmod(ns, 1_000_000_000)
        text = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))
        return text + (f".{fraction:09d}".rstrip("0") if fraction else "") + " +0000 UTC"

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            status, answer = self._take(body)
            got.answers.append((status, len(body)))
            if hasattr(self.connection, "getpeercert") and self.connection.getpeercert():
                got.peers.append(dict(x[0] for x in self.connection.getpeercert()["subject"])["commonName"])
            self.send_response(status)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def _take(self, body: bytes) -> tuple[int, bytes]:
            if len(body) > max_body:
                return 413, b""
            if len(got.answers) < rate_limited:
                return 429, b"Ingestion rate limit exceeded for user fake (limit: 4194304 bytes/sec)"
            streams = json.loads(body)["streams"]
            got.pushes.append([json.loads(line).get("id") for s in streams for _, line in s["values"]])
            limited = stream_budget is not None and len(got.answers) < budget_pushes
            lines = [line for s in streams for _, line in s["values"]]
            if sum(len(line.encode()) for line in lines) > burst:
                return 429, b""
            refused, answer, busy = 0, [], False
            for s in streams:
                name = "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(s["stream"].items())) + "}"
                ignored, left = 0, stream_budget
                for ns, line in s["values"]:
                    if limited and len(line.encode()) > left:
                        ignored += 1
                        busy = True
                        answer.append(f"entry with timestamp {go_time(int(ns))} ignored, reason: 'Per stream rate limit "
                                      f"exceeded (limit: {stream_budget} B/sec) while attempting to ingest for stream "
                                      f"'{name}' totaling {len(line)}B, consider splitting a stream via additional "
                                      "labels or contact your Loki administrator to see if the limit can be "
                                      "increased',")  # fmt: skip
                        continue
                    if limited:
                        left -= len(line.encode())
                    if (name, ns, line) in stored:
                        got.duplicates += 1
                    elif len(line.encode()) > max_line:
                        refused += 1
                    elif oldest is not None and int(ns) < oldest * 1e9:
                        ignored += 1
                        when = datetime.fromtimestamp(int(ns) / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S.%f +0000 UTC")
                        answer.append(f"entry with timestamp {when} ignored, reason: 'entry too far behind, entry "
                                      f"timestamp is: {when}, oldest acceptable timestamp is: {oldest}',")  # fmt: skip
                    else:
                        stored.add((name, ns, line))
                        got.events.append(json.loads(line))
                if ignored and count == "loki3":
                    answer.append(f"user 'fake', total ignored: {ignored} out of {len(s['values'])} for stream: {name}")
                elif ignored and count == "loki2":
                    answer.append(f"total ignored: {ignored} out of {len(s['values'])}")
                refused += ignored
            return (429 if busy else 400 if refused else 204), "\n".join(answer).encode()

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


def _counted(metrics: Metrics, name: str, target: str) -> float:
    return metrics.registry.get_sample_value(f"bastion_logship_{name}_total", {"target": target}) or 0


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
    assert _counted(metrics, "cut", "loki") == 2  # the two too long for a line, once each
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


@pytest.mark.parametrize("count", ["loki3", "loki2", "none"])
def test_a_400_that_refuses_some_entries_counts_only_those_as_rejected(tmp_path: Path, monkeypatch, count):
    """Loki answers 400 to a push when it refuses some of its entries (too far behind, out of
    order), stores the others, and says how many it ignored at the end of its answer (after a
    line per refused entry: more than 500 bytes for three). Before, the whole batch counted as
    refused: 10 dropped as `rejected` and none sent, when Loki had stored 7. Now the count in
    the answer is what is rejected, the rest sent; without a count (nothing says which were
    taken) the whole batch is, as before. Either way the batch is pushed once, not again."""
    monkeypatch.setattr(Target, "backoff_max_s", 0.3)
    server, url, got = _loki(oldest=EVENT["ts"], count=count)
    metrics, events = Metrics(), []
    shipper = Shipper(tmp_path / "q", metrics, lambda kind, **f: events.append(f["payload"]))
    old = {3, 4, 7}  # behind what Loki takes for their stream
    queue = DiskQueue(tmp_path / "q" / "loki.db", 1000)
    queue.put_many(json.dumps(dict(EVENT, id=i, ts=EVENT["ts"] - 7200 * (i in old))) for i in range(1, 11))
    queue.close()
    try:
        shipper.configure(LogsSection.model_validate({"targets": [{"name": "loki", "type": "loki", "url": url}]}),
                          site="s", site_root=tmp_path)  # fmt: skip
        _wait(lambda: _dropped(metrics, "loki") > 0)
    finally:
        shipper.close()
        server.shutdown()
    assert [e["id"] for e in got.events] == [1, 2, 5, 6, 8, 9, 10]
    assert got.answers[0][0] == 400 and len(got.answers) == 1  # pushed once
    rejected = 10 if count == "none" else 3
    assert (_dropped(metrics, "loki"), _counted(metrics, "sent", "loki")) == (rejected, 10 - rejected)
    (dropped,) = [e for e in events if e["action"] == "dropped"]
    assert (dropped["count"], dropped["reason"], dropped["queued"]) == (rejected, "rejected", 0)


def test_what_loki_says_it_ignored_is_read_from_its_answer():
    three = ("entry with timestamp 2025-12-04 16:05:26.25 +0000 UTC ignored, reason: 'entry out of order',\n" * 3
             + "user 'home', total ignored: 3 out of 10 for stream: {job=\"edge-bastion\", kind=\"boot\"}")  # fmt: skip
    assert loki.ignored(three) == 3
    assert loki.ignored("total ignored: 2 out of 5") == 2  # Loki 2
    assert loki.ignored("user 'a', total ignored: 2 out of 5 for stream: {k=\"x\"}\n"
                        "user 'a', total ignored: 1 out of 1 for stream: {k=\"y\"}") == 3  # fmt: skip
    assert loki.ignored("error at least one label pair is required per stream") is None


def test_one_event_past_the_tenants_burst_is_cut_and_the_queue_moves_on(tmp_path: Path, monkeypatch):
    """A tenant whose burst (here 100 kB) is below one event's line (200 kB) answers 429 to a
    push of that event alone at every try. Before, it was retried forever and every event
    queued behind it waited for good. Now, after `loki_lone_busy_tries` 429s to it alone, it is
    sent cut to `loki_busy_floor` bytes (its id and the start of its payload kept, counted as
    cut) and the events after it follow."""
    monkeypatch.setattr(Target, "backoff_max_s", 0.05)
    monkeypatch.setattr(Target, "loki_lone_busy_tries", 3, raising=False)  # not there before
    server, url, got = _loki(burst=100_000)
    metrics = Metrics()
    shipper = Shipper(tmp_path / "q", metrics)
    queue = DiskQueue(tmp_path / "q" / "loki.db", 1000)
    queue.put_many(json.dumps(e) for e in [dict(EVENT, id=1, payload={"message": "z" * 200_000}), dict(EVENT, id=2)])
    queue.close()
    try:
        shipper.configure(LogsSection.model_validate({"targets": [{"name": "loki", "type": "loki", "url": url}]}),
                          site="s", site_root=tmp_path)  # fmt: skip
        _wait(lambda: len(got.events) == 2 or len(got.answers) >= 30)
    finally:
        shipper.close()
        server.shutdown()
    assert [e["id"] for e in got.events] == [1, 2]
    # the push of both halves the bound (the big event cut to 100 kB, still past the burst),
    # then 3 tries of it alone, then it cut to the floor, then the next event
    assert [status for status, _ in got.answers] == [429, 429, 429, 429, 204, 204]
    assert got.answers[0][1] > 200_000 and 64_000 < got.answers[1][1] <= 100_300 and got.answers[4][1] <= 64_000
    cut = got.events[0]
    assert cut["payload"]["truncated"] == 200_000 + len('{"message":""}') and cut["payload"]["head"].startswith("{")
    assert got.events[1] == dict(EVENT, id=2)
    assert (_counted(metrics, "cut", "loki"), _dropped(metrics, "loki")) == (1, 0)


def test_a_small_event_rate_limited_for_a_while_is_retried_whole(tmp_path: Path, monkeypatch):
    """A 429 to a small push is a rate limit, not a bound: it is retried, with backoff, as many
    times as it takes, and arrives whole (not cut, not dropped)."""
    monkeypatch.setattr(Target, "backoff_max_s", 0.05)
    monkeypatch.setattr(Target, "loki_lone_busy_tries", 3, raising=False)  # not there before
    server, url, got = _loki(rate_limited=8)
    metrics = Metrics()
    shipper = Shipper(tmp_path / "q", metrics)
    shipper.configure(LogsSection.model_validate({"targets": [{"name": "loki", "type": "loki", "url": url}]}),
                      site="s", site_root=tmp_path)  # fmt: skip
    try:
        shipper.offer(dict(EVENT, id=1, payload={"message": "m" * 20_000}))
        _wait(lambda: len(got.events) == 1)
    finally:
        shipper.close()
        server.shutdown()
    assert [status for status, _ in got.answers] == [429] * 8 + [204]
    assert got.events == [dict(EVENT, id=1, payload={"message": "m" * 20_000})]
    assert (_counted(metrics, "cut", "loki"), _dropped(metrics, "loki"), _counted(metrics, "sent", "loki")) == (0, 0, 1)


def test_a_429_that_stores_the_head_of_a_push_sends_only_the_rest_again(tmp_path: Path, monkeypatch):
    """Past a stream's own rate Loki stores the entries its bucket allows and answers 429 naming
    the others (pkg/ingester/stream.go). Before, the whole push was sent again: Loki dropped the
    4 it had as duplicates, after charging them to the stream's rate again. Now only the 6 it
    refused are sent again, each record is counted sent once, and all 10 arrive, in order."""
    monkeypatch.setattr(Target, "backoff_max_s", 0.05)
    server, url, got = _loki(stream_budget=4 * 1200, budget_pushes=1)
    metrics = Metrics()
    shipper = Shipper(tmp_path / "q", metrics)
    queue = DiskQueue(tmp_path / "q" / "loki.db", 1000)
    # one stream (same source and kind), a line of about 1,100 bytes each: 4 fit the budget
    queue.put_many(json.dumps(dict(EVENT, id=i, ts=EVENT["ts"] + i, payload={"m": "r" * 900})) for i in range(1, 11))
    queue.close()
    try:
        shipper.configure(LogsSection.model_validate({"targets": [{"name": "loki", "type": "loki", "url": url}]}),
                          site="s", site_root=tmp_path)  # fmt: skip
        _wait(lambda: len(got.events) == 10)
    finally:
        shipper.close()
        server.shutdown()
    assert [status for status, _ in got.answers] == [429, 204]
    assert got.pushes == [list(range(1, 11)), list(range(5, 11))]
    assert got.duplicates == 0
    assert [e["id"] for e in got.events] == list(range(1, 11))
    assert (_counted(metrics, "sent", "loki"), _dropped(metrics, "loki")) == (10, 0)


def test_what_loki_says_it_stored_of_a_push_is_read_only_where_it_can_be_told():
    def go_time(ns: int, zone: str = "+0000 UTC", shift: int = 0) -> str:  # Go's time.Time.String()
        seconds, fraction = divmod(ns, 1_000_000_000)
        text = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds + shift))
        return text + (f".{fraction:09d}".rstrip("0") if fraction else "") + " " + zone

    def named(*times: int, total: int, out_of: int) -> str:
        lines = [f"entry with timestamp {go_time(t)} ignored, reason: 'Per stream rate limit exceeded'," for t in times]
        return "\n".join([*lines, f"user 'fake', total ignored: {total} out of {out_of} for stream: {{kind=\"boot\"}}"])

    ns = [(1764871526 + i) * 1_000_000_000 + 250_000_000 for i in range(4)] + [1764871530 * 1_000_000_000]
    assert loki.stored_head(named(ns[3], ns[4], total=2, out_of=5), ns) == 3
    assert loki.stored_head(named(ns[4], ns[3], total=2, out_of=5), ns) == 3  # named in any order
    assert loki.stored_head(named(ns[1], ns[4], total=2, out_of=5), ns) == 0  # not the last ones
    assert loki.stored_head(named(ns[4], total=2, out_of=5), ns) == 0  # one of the two not named
    assert loki.stored_head(named(ns[4], total=1, out_of=6), ns) == 0  # another push's count
    assert loki.stored_head(named(*ns, total=5, out_of=5), ns) == 0  # the whole stream refused
    assert loki.stored_head(named(ns[4], total=1, out_of=5), [*ns[:3], ns[4], ns[4]]) == 0  # its time twice
    assert loki.stored_head(named(ns[4], total=1, out_of=5) + "\n" + named(ns[4], total=1, out_of=5), ns) == 0
    assert loki.stored_head("Ingestion rate limit exceeded for user fake (limit: 4194304 bytes/sec)", ns) == 0
    # the time as a Loki whose zone is not UTC says it (Go's time.Unix gives the Local zone), Loki 2's count
    local = go_time(ns[3], "+0100 CET", shift=3600)
    assert loki.stored_head(f"entry with timestamp {local} ignored, reason: 'x',\ntotal ignored: 1 out of 4", ns[:4]) == 3
