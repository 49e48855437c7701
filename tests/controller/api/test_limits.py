"""Request bodies are refused by their size and sender before they are read (bastion.api.limits):
on the wire against a real `bastion serve`, and through the application for each route."""

from __future__ import annotations

import json
import socket

import pytest
import yaml
from bastion.api import limits
from bastion.settings import Settings
from bastion_testkit import TOKEN, auth, metric, push_body, request_head, vm_peak_kb

MiB = 1024 * 1024


# -- on the wire, a real server -----------------------------------------------------------------


def read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response off the socket (status, headers, body by its Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    top, _, body = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = s.recv(65536)
        assert chunk, "closed before the body was complete"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def refused_after_a_few_bytes(port: int, request_head: bytes, sent: int = 4096):
    """Send the head and `sent` bytes of its body, then wait for an answer without sending more:
    a server that waits for the rest of the body never answers (the guard timeout ends that)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request_head + b"x" * sent)
        status, headers, body = read_response(s)
        # and it hangs up: the rest of the body is not awaited to reuse the connection
        assert s.recv(65536) == b""
        return status, headers, json.loads(body)


@pytest.fixture
def server(serve, site_dir):
    return serve(site_dir)


def test_an_unauthenticated_write_is_refused_before_its_body(server):
    big = f"Content-Length: {200 * MiB}"
    for method, path in (("PUT", "/api/v1/machines/evil"), ("POST", "/api/v1/events"),
                         ("POST", "/api/v1/reload")):  # fmt: skip
        status, headers, body = refused_after_a_few_bytes(
            server.port, request_head(method, path, server.port, "Content-Type: application/json", big)
        )
        assert (status, body) == (401, {"detail": "a bearer token is required"}), path
        assert headers["connection"] == "close"


def test_an_oversized_body_is_refused_by_its_content_length(server):
    cases = [
        ("/callback", [], 64 * 1024 + 1, "more than 65536 bytes (/callback's limit)"),
        ("/heartbeat", [], 4096 + 1, "more than 4096 bytes (/heartbeat's limit)"),
        ("/api/v1/events", [f"Authorization: Bearer {TOKEN}"], MiB + 1,
         "more than 1048576 bytes (--max-body)"),
        ("/ipxe", [], MiB + 1, "more than 1048576 bytes (--max-body)"),
    ]  # fmt: skip
    for path, extra, length, why in cases:
        request = request_head("POST", path, server.port, *extra, f"Content-Length: {length}")
        status, headers, body = refused_after_a_few_bytes(server.port, request)
        assert (status, body) == (413, {"detail": f"request body too large: {why}"}), path
    status, _, body = refused_after_a_few_bytes(
        server.port, request_head("POST", "/callback", server.port, f"Content-Length: {200 * MiB}"), 16
    )
    assert status == 413


def test_the_server_does_not_take_a_refused_body_into_memory(server):
    """A client that pushes 200 MB as fast as it can: the server answers and hangs up after a
    little of it, and its peak memory stays where it was (it was 202 -> 807 MB)."""
    pid = server.proc.pid
    assert server.get("/healthz").status_code == 200
    before = vm_peak_kb(pid)
    total = 200 * MiB
    put = request_head("PUT", "/api/v1/machines/evil", server.port, "Content-Type: application/json",
               f"Content-Length: {total}")  # fmt: skip
    status, took = push_body(server.port, put, total)
    assert status == 401
    callback = request_head("POST", "/callback", server.port, "Transfer-Encoding: chunked")
    status_chunked, took_chunked = push_body(server.port, callback, total, chunked=True)
    assert status_chunked == 413
    after = vm_peak_kb(pid)
    print(f"\nbody bytes the server took: PUT {took}, chunked /callback {took_chunked} of {total}; "
          f"peak memory {before} -> {after} kB")  # fmt: skip
    # what the kernel's socket buffers hold is all a client gets in before the answer
    assert took < total // 4 and took_chunked < total // 4
    assert after - before < 32 * 1024, (before, after)
    assert server.get("/healthz").status_code == 200


# -- each route, through the application --------------------------------------------------------


def test_writes_over_max_body_are_refused_and_nothing_is_stored(site_dir, client_for):
    c = client_for(site_dir)
    machines = (site_dir / "machines.yaml").read_bytes()
    ten_mb = "x" * (10 * MiB)
    r = c.put("/api/v1/machines/node9", json={"mac": "52:54:00:12:34:09", "role": "worker",
                                               "labels": {"junk": ten_mb}}, headers=auth())  # fmt: skip
    assert r.status_code == 413, r.text[:200]
    assert r.json() == {"detail": "request body too large: more than 1048576 bytes (--max-body)"}
    assert (site_dir / "machines.yaml").read_bytes() == machines
    r = c.post("/api/v1/events", json={"kind": "dhcp", "payload": {"junk": ten_mb}}, headers=auth())
    assert r.status_code == 413
    assert all("junk" not in e["payload"] for e in c.get("/api/v1/events").json())
    assert metric(c, "bastion_request_bodies_refused_total") == 2
    # within the limit, the same writes work
    r = c.post(
        "/api/v1/events", json={"kind": "dhcp", "payload": {"note": "x" * 1000}}, headers=auth()
    )
    assert r.status_code == 201, r.text


def test_max_body_is_a_setting(site_dir, tmp_path):
    from bastion.api.main import create_app
    from fastapi.testclient import TestClient

    settings = Settings(site_dir=site_dir, db_path=tmp_path / "e.db", api_token=TOKEN, poll_seconds=0,
                        max_body="4KiB")  # fmt: skip
    assert settings.max_body == 4096
    with TestClient(create_app(settings)) as c:
        assert c.post("/api/v1/events", json={"kind": "dhcp", "payload": {"n": "x" * 4000}},
                      headers=auth()).status_code == 201  # fmt: skip
        r = c.post(
            "/api/v1/events", json={"kind": "dhcp", "payload": {"n": "x" * 5000}}, headers=auth()
        )
        assert r.status_code == 413
        assert r.json()["detail"] == "request body too large: more than 4096 bytes (--max-body)"


def test_chunked_bodies_are_counted_as_they_come(site_dir, client_for):
    c = client_for(site_dir)

    def chunks(n: int, size: int):
        for _ in range(n):
            yield b"x" * size

    # a body without Content-Length (httpx sends a generator chunked)
    r = c.post("/callback?mac=52:54:00:12:34:01", content=chunks(70, 1024))
    assert r.status_code == 413
    assert r.json() == {
        "detail": "request body too large: more than 65536 bytes (/callback's limit)"
    }
    r = c.post("/callback", content=(x for x in [b"mac=52:54:00:12:34:01", b"&stage=booted"]),
               headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert r.status_code == 200, r.text
    last = c.get("/api/v1/events", params={"kind": "callback", "limit": 1}).json()[0]
    assert last["payload"]["stage"] == "booted" and last["machine"] == "node1"


def test_a_chunked_journal_upload_streams_and_is_refused_past_its_limit(site_dir, client_for, monkeypatch):
    """/journal/upload takes a chunked body as it comes (its handler parses it as it arrives:
    test_logship_rsyslog.py shows entries shipped before the body ends), counted against its
    limit all the same."""
    monkeypatch.setitem(limits.BODY_LIMITS, "/journal/upload", 4096)
    with open(site_dir / "site.yaml", "a") as f:
        f.write("\nlogs:\n  journal: true\n")
    c = client_for(site_dir)
    journal = {"Content-Type": "application/vnd.fdo.journal"}
    entry = b"MESSAGE=%s\n\n" % (b"m" * 90)
    r = c.post("/journal/upload", content=(entry for _ in range(40)), headers=journal)
    assert r.status_code == 202 and r.text == "OK. 40 entries.\n"
    r = c.post("/journal/upload", content=(entry for _ in range(41)), headers=journal)
    assert r.status_code == 413 and r.headers["connection"] == "close"
    assert r.json() == {"detail": "request body too large: more than 4096 bytes (/journal/upload's limit)"}
    assert metric(c, "bastion_request_bodies_refused_total") == 1


def test_node_routes_take_their_limit_and_no_more(site_dir, client_for):
    c = client_for(site_dir)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    body = b"mac=52:54:00:12:34:01&stage=up&message="
    exactly = body + b"m" * (64 * 1024 - len(body))
    assert c.post("/callback", content=exactly, headers=form).status_code == 200
    assert c.post("/callback", content=exactly + b"m", headers=form).status_code == 413
    beat = b"mac=52:54:00:12:34:01&pad="
    assert (
        c.post("/heartbeat", content=beat + b"p" * (4096 - len(beat)), headers=form).status_code
        == 200
    )
    r = c.post("/heartbeat", content=beat + b"p" * 4096, headers=form)
    assert r.status_code == 413  # it used to cut the body at 4 KiB and carry on


def test_the_token_is_checked_before_the_body_and_counted_once(site_dir, client_for):
    c = client_for(site_dir)
    before = (site_dir / "machines.yaml").read_bytes()
    r = c.put("/api/v1/machines/node9", content=b"{" + b" " * (2 * MiB) + b"}")
    assert r.status_code == 401  # not 413: who asks comes before what they send
    assert r.json() == {"detail": "a bearer token is required"}
    assert metric(c, "bastion_api_auth_failures_total") == 1
    assert metric(c, "bastion_request_bodies_refused_total") == 0
    assert (site_dir / "machines.yaml").read_bytes() == before
    machines = yaml.safe_load(before)["machines"]
    assert "node9" not in {m["name"] for m in machines}


def test_a_request_head_over_64_kib_gets_431_and_is_not_read_on(server):
    # The front hands a head over 8 KiB to uvicorn's parser, which kept every header line: a
    # 300 MB head was read whole and answered with the process at 1.1 GB.
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        sent = 0
        try:
            while sent < 8 * MiB:  # it stops reading well before: the send fails or blocks
                s.sendall(b"X-Filler: " + b"a" * 1000 + b"\r\n")
                sent += 1012
        except OSError:
            pass
        status, headers, body = read_response(s)
    assert status == 431 and headers["connection"] == "close"
    assert body == b"request head over 65536 bytes\n"
    assert sent < 4 * MiB
    # a head of 40 KiB is still a request
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Filler: " + b"a" * 40000 + b"\r\n\r\n")
        assert read_response(s)[0] == 200
    text = server.get("/metrics").text
    assert 'bastion_http_connections_closed_total{reason="head-too-large"} 1.0' in text
