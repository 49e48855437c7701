"""JSON the controller takes is JSON it can store and answer back (bastion.api.jsonbody): what
Python's json module accepts beyond RFC 8259 (NaN, Infinity, 1e999, a lone surrogate escape,
nesting that exhausts the recursion) gets a 400 that says what and where, and nothing is
stored; what the API is asked for beyond its bounds gets a 4xx, not a 500."""

from __future__ import annotations

import json

import pytest
from bastion.api import jsonbody
from bastion_testkit import TOKEN

AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}
MAC = "52:54:00:12:34:01"


@pytest.mark.parametrize(("text", "says"), [
    ('{"a": NaN}', "NaN is not a JSON number"),
    ('[Infinity]', "Infinity is not a JSON number"),
    ('{"a": -Infinity}', "-Infinity is not a JSON number"),
    ('{"a": 1e999}', "the number 1e999 is beyond a double's range"),
    ('{"x": "\\ud800"}', "a lone surrogate \\ud800 at x is not text"),
    ('{"\\udc80": 1}', "a lone surrogate \\udc80 is not text"),
    ('{"a": [{"b": "ok\\udfff"}]}', "a lone surrogate \\udfff at a[0].b is not text"),
    ("[" * 3000 + "]" * 3000, "nested more than 64 levels deep"),
    ("[" * 65 + "]" * 65, "nested more than 64 levels deep"),
])  # fmt: skip
def test_loads_refuses_what_is_not_json_text(text, says):
    with pytest.raises(jsonbody.BadJson) as e:
        jsonbody.loads(text)
    assert says in str(e.value)


def test_loads_takes_json_text_as_json_does():
    text = '{"emoji": "\\ud83d\\ude00", "e": "\\u00e9", "n": [1, 2.5, -0.0, 1e308], "deep": ' + "[" * 63 + "]" * 63 + "}"
    assert jsonbody.loads(text) == json.loads(text)
    with pytest.raises(json.JSONDecodeError):  # not JSON at all: json's own error, as before
        jsonbody.loads('{"a": }')


def test_a_callback_with_a_lone_surrogate_is_refused_and_the_history_stays_readable(site_dir, client_for):
    c = client_for(site_dir)
    r = c.post("/callback", content=f'{{"mac": "{MAC}", "x": "\\ud800"}}', headers=JSON)
    assert r.status_code == 400 and "lone surrogate \\ud800 at x" in r.json()["detail"], r.text
    r = c.post("/callback", content="[" * 3000 + "]" * 3000, headers=JSON)
    assert r.status_code == 400 and "nested more than 64" in r.json()["detail"], r.text
    r = c.post("/callback", content="[1]", headers=JSON)
    assert r.status_code == 400 and r.json()["detail"] == "callback body must be a JSON object, not list"
    r = c.post("/callback", content='"stage=booted"', headers=JSON)
    assert r.status_code == 400 and "not str" in r.json()["detail"]
    assert [e for e in c.get("/api/v1/events").json() if e["kind"] == "callback"] == []
    r = c.post("/callback", content=f'{{"mac": "{MAC}", "stage": "booted \\u00e9\\ud83d\\ude00"}}', headers=JSON)
    assert r.status_code == 200, r.text
    (ev,) = [e for e in c.get("/api/v1/events").json() if e["kind"] == "callback"]
    assert ev["payload"]["stage"] == "booted é😀"


def test_a_surrogate_stored_before_is_answered_as_a_replacement_character(site_dir, client_for):
    c = client_for(site_dir)
    c.app.state.runtime.store.record("callback", mac=MAC, payload={"x": "a\ud800b", "\udc80": 1})
    r = c.get("/api/v1/events")
    assert r.status_code == 200, r.text
    (ev,) = [e for e in r.json() if e["kind"] == "callback"]
    assert ev["payload"] == {"x": "a\ufffdb", "\ufffd": 1}


def test_an_event_field_the_api_does_not_know_is_refused_not_dropped(site_dir, client_for):
    # {"machine": "node1"} was a 201 with machine null: the machine comes from the MAC
    c = client_for(site_dir)
    r = c.post("/api/v1/events", json={"kind": "dhcp", "machine": "node1"}, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "machine"], r.text
    assert r.json()["detail"][0]["type"] == "extra_forbidden"
    assert [e for e in c.get("/api/v1/events").json() if e["kind"] == "dhcp"] == []


def test_api_bodies_go_through_the_same_check_and_nothing_is_written(site_dir, client_for):
    c = client_for(site_dir)
    machines = (site_dir / "machines.yaml").read_bytes()
    r = c.post("/api/v1/events", content='{"kind": "dhcp", "payload": {"\\ud800": 1}}', headers={**AUTH, **JSON})
    assert r.status_code == 400 and r.json()["detail"].startswith("request body: a lone surrogate"), r.text
    r = c.post("/api/v1/events", content='{"kind": "dhcp", "payload": {"a": NaN}}', headers={**AUTH, **JSON})
    assert r.status_code == 400 and r.json()["detail"] == "request body: NaN is not a JSON number"
    r = c.patch("/api/v1/machines/node1", content='{"labels": {"x": "\\udc80"}}', headers={**AUTH, **JSON})
    assert r.status_code == 400 and "at labels.x" in r.json()["detail"], r.text
    r = c.put("/api/v1/groups/g1", content='{"profile": "flatcar-worker", "metadata": {"a": Infinity}}',
              headers={**AUTH, **JSON})  # fmt: skip
    assert r.status_code == 400, r.text
    assert (site_dir / "machines.yaml").read_bytes() == machines
    assert not (site_dir / "groups").exists() or not list((site_dir / "groups").glob("g1.*"))
    assert c.get("/api/v1/machines").status_code == 200
    assert c.get("/api/v1/events").status_code == 200
    r = c.patch("/api/v1/machines/node1", content='{"labels": {', headers={**AUTH, **JSON})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"  # not JSON: as before


def test_bounds_of_names_ids_and_cursors_are_4xx(site_dir, client_for):
    c = client_for(site_dir)
    r = c.get("/api/v1/events", params={"after": "99999999999999999999"})
    assert r.status_code == 422, r.text
    for n in (300, 5000):
        r = c.put(f"/api/v1/profiles/{'x' * n}", json={"name": "x"}, headers=AUTH)
        assert r.status_code == 422 and f"{n} characters, at most 128" in r.text, r.text
        r = c.put(f"/api/v1/groups/{'g' * n}", json={"profile": "flatcar-worker"}, headers=AUTH)
        assert r.status_code == 422 and f"{n} characters, at most 128" in r.text, r.text
    r = c.put("/api/v1/profiles/p2", json={"name": "p2", "ignition_id": "x" * 5000}, headers=AUTH)
    assert r.status_code == 422, r.text
    assert not (site_dir / "profiles" / "p2.yaml").exists()


def test_a_heartbeat_without_a_mac_says_so(site_dir, client_for):
    c = client_for(site_dir)
    for kw in ({}, {"json": {"mac": MAC}}):
        r = c.post("/heartbeat", **kw)
        assert r.status_code == 400 and r.json()["detail"].startswith("mac is missing"), r.text


def test_a_boot_request_with_a_mac_that_does_not_parse_is_told_so(site_dir, client_for):
    c = client_for(site_dir)
    for path in ("/ipxe", "/ignition", "/metadata"):
        r = c.get(path, params={"mac": "zz"})
        assert r.status_code == 404 and "mac='zz' is not a MAC address" in r.text, (path, r.text)
    r = c.get("/ipxe", params={"mac": "52:54:00:99:99:99"})  # a good MAC no group selects
    assert r.status_code == 404 and "is not a MAC address" not in r.text


def test_a_json_body_under_another_content_type_is_a_415_that_says_so(site_dir, client_for):
    c = client_for(site_dir)
    machines = (site_dir / "machines.yaml").read_bytes()
    r = c.patch("/api/v1/machines/node1", content='{"power": "off"}', headers={**AUTH, "Content-Type": "text/plain"})
    assert r.status_code == 415, r.text
    assert r.json()["detail"] == "the body is JSON: send it with Content-Type: application/json (this request's: text/plain)"
    assert (site_dir / "machines.yaml").read_bytes() == machines
    r = c.patch("/api/v1/machines/node1", content='{"power": "off"}', headers=AUTH)
    assert r.status_code == 415 and r.json()["detail"].endswith("(this request's: none)"), r.text
    for headers in (JSON, {"Content-Type": "application/merge-patch+json"}):
        r = c.patch("/api/v1/machines/node1", content='{"power": "off"}', headers={**AUTH, **headers})
        assert r.status_code == 200, (headers, r.text)
    # an empty body under another type: FastAPI's own 422 (its body was read once, for the
    # check; a second read once waited for the client for ever)
    import threading

    answers: list = []
    ask = threading.Thread(target=lambda: answers.append(c.patch(
        "/api/v1/machines/node1", content=b"", headers={**AUTH, "Content-Type": "text/plain"})), daemon=True)  # fmt: skip
    ask.start()
    ask.join(20)
    assert answers, "no answer in 20 s"
    assert answers[0].status_code == 422 and answers[0].json()["detail"][0]["type"] == "missing"


def test_a_body_that_breaks_off_is_no_application_error(site_dir, serve):
    """A malformed chunk in /callback's body: the HTTP protocol answers 400 and ends the
    connection; the route reading the body finds its client gone, which is not logged as an
    exception in the application."""
    import socket
    import time

    server = serve(site_dir)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as c:
        c.sendall(b"POST /callback HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                  b"Content-Type: application/json\r\n\r\nzz\r\nabc\r\n")  # fmt: skip
        assert c.recv(100).startswith(b"HTTP/1.1 400"), "the protocol answers the bad chunk"
    time.sleep(0.5)
    assert server.get("/healthz").status_code == 200
    log = server.log.read_text()
    assert "Invalid HTTP request received" in log and "Exception in ASGI application" not in log, log[-2000:]


def test_a_group_made_from_machines_yaml_is_edited_there_whatever_the_method(site_dir, client_for):
    c = client_for(site_dir)
    body = {"profile": "flatcar-worker"}
    for r in (c.put("/api/v1/groups/machine:node1", json=body, headers=AUTH),
              c.delete("/api/v1/groups/machine:node1", headers=AUTH)):  # fmt: skip
        assert r.status_code == 409 and "comes from machines.yaml" in r.json()["detail"], r.text
    r = c.put("/api/v1/groups/bad:id", json=body, headers=AUTH)  # no such group: the id is checked
    assert r.status_code == 422 and "is not a valid group id" in r.text, r.text


def test_a_web_page_cannot_post_a_nodes_reports(site_dir, client_for):
    # A text/plain or form POST is a "simple" request a page in an operator's browser may send
    # anywhere without asking: it marked machines installed and forged callbacks. Browsers say
    # where such a request comes from; nodes (curl, Ignition) never do.
    c = client_for(site_dir)
    before = len(c.get("/api/v1/events", params={"kind": "callback"}).json())
    for path, body in (("/callback", '{"mac": "%s", "stage": "installed"}' % MAC), ("/heartbeat", "mac=" + MAC)):
        for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                        {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}):  # fmt: skip
            # through an address: a page of the controller's own origin (bastion.api.hostcheck
            # refuses a browser's request through a name it does not know before this)
            r = c.post(path, content=body, headers={"Content-Type": "text/plain", "Host": "10.77.0.1",
                                                    **headers})  # fmt: skip
            assert r.status_code == 403 and "is for nodes, not web pages" in r.json()["detail"], (path, headers)
    assert len(c.get("/api/v1/events", params={"kind": "callback"}).json()) == before
    # a node's own requests, as curl sends them, still land
    assert c.post("/callback", json={"mac": MAC, "stage": "booted"}).status_code == 200
    assert c.post("/heartbeat", data={"mac": MAC}).status_code in (200, 202)
