"""The management API: who may write and read secrets, what a bad edit does, reloads (by hand and
by the poller of a real `bastion serve`), OpenAPI and /metrics."""

from __future__ import annotations

import json
import os
import re
import stat
import time
import warnings
from pathlib import Path

import pytest
import yaml
from bastion.site.load import load_site
from bastion_testkit import TOKEN, assert_valid_ignition, auth, metric, parse_prometheus

NODE1 = {"mac": "52-54-00-12-34-01"}  # examples/site/machines.yaml

# Every route that writes, and every read that may show secrets: (method, path, JSON body).
ADMIN_ROUTES = [
    ("PUT", "/api/v1/machines/node9", {"mac": "52:54:00:12:34:09", "role": "worker"}),
    ("DELETE", "/api/v1/machines/node2", None),
    ("PUT", "/api/v1/profiles/custom", {"boot": {"kernel": "/assets/k"}}),
    ("DELETE", "/api/v1/profiles/flatcar-control", None),
    ("PUT", "/api/v1/groups/rack-b", {"profile": "flatcar-worker", "selector": {"rack": "b"}}),
    ("DELETE", "/api/v1/groups/rack-b", None),
    ("POST", "/api/v1/reload", None),
    ("POST", "/api/v1/events", {"kind": "dhcp", "mac": "52:54:00:12:34:01"}),
    ("POST", "/api/v1/machines/node1/power", {"state": "on"}),
    ("POST", "/api/v1/device/power/0", {"state": "off"}),
    ("GET", "/api/v1/machines/node1/ignition", None),
    ("GET", "/api/v1/groups/machine:node1/metadata", None),
    ("POST", "/api/v1/machines/node1/reprovision", None),
    ("PATCH", "/api/v1/machines/node1", {"power": "off"}),
    ("POST", "/api/v1/machines/node1/hold", None),
    ("POST", "/api/v1/machines/node1/release", None),
    ("POST", "/api/v1/apply", {}),
    ("GET", "/api/v1/auth", None),
    ("GET", "/api/v1/machines/node1/console", None),  # a console shows secrets
    ("GET", "/api/v1/plan", None),  # loads and renders the whole site: the read before apply
]
ROUTE_IDS = [f"{m} {p}" for m, p, _ in ADMIN_ROUTES]


def call(client, method: str, path: str, body, headers=None):
    return client.request(method, path, json=body, headers=headers or {})


def site_files(site: Path) -> dict[str, bytes]:
    return {str(p.relative_to(site)): p.read_bytes() for p in sorted(site.rglob("*"))
            if p.is_file() and "assets" not in p.parts}  # fmt: skip


def event_ids(client) -> list[int]:
    return [e["id"] for e in client.get("/api/v1/events", params={"limit": 1000}).json()]


def wait_until(what: str, pred, timeout: float = 30.0):
    """Poll pred() until it returns something true; the deadline is a safety net, not a check."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


# -- auth -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, path, body", ADMIN_ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize(
    "headers, detail",
    [
        ({}, "a bearer token is required"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "a bearer token is required"),
        (auth("wrong-token-0123456789abcdef"), "wrong token"),
        (auth(TOKEN + "x"), "wrong token"),
    ],
    ids=["no-header", "basic-auth", "wrong-token", "token-plus-one"],
)
def test_without_the_right_token_it_is_401_and_nothing_happens(
    method, path, body, headers, detail, site_dir, client_for
):
    c = client_for(site_dir)
    before_files, before_events = site_files(site_dir), event_ids(c)
    generation = c.get("/api/v1/site").json()["generation"]
    r = call(c, method, path, body, headers)
    assert r.status_code == 401, r.text
    assert r.json() == {"detail": detail}
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert site_files(site_dir) == before_files
    assert event_ids(c) == before_events
    assert c.get("/api/v1/site").json()["generation"] == generation
    assert metric(c, "bastion_api_auth_failures_total") == 1


@pytest.mark.parametrize("method, path, body", ADMIN_ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("headers", [{}, auth(TOKEN)], ids=["no-header", "some-token"])
def test_with_no_token_configured_it_is_403(method, path, body, headers, site_dir, client_for):
    c = client_for(site_dir, token=None)
    before = site_files(site_dir)
    r = call(c, method, path, body, headers)
    assert r.status_code == 403, r.text
    assert "no token configured" in r.json()["detail"]
    assert "BASTION_API_TOKEN" in r.json()["detail"]
    assert site_files(site_dir) == before


def test_reads_without_secrets_are_open(site_dir, client_for):
    c = client_for(site_dir)
    for path in ("/api/v1/machines", "/api/v1/machines/node1", "/api/v1/profiles",
                 "/api/v1/profiles/flatcar-worker", "/api/v1/groups", "/api/v1/groups/machine:node1",
                 "/api/v1/events", "/api/v1/site", "/healthz"):  # fmt: skip
        assert c.get(path).status_code == 200, path
    machine = c.get("/api/v1/machines/node1").json()
    assert machine["mac"] == "52:54:00:12:34:01" and machine["profile"] == "flatcar-worker"
    # the machine and group reads leave metadata out (its own route needs the token, though
    # /metadata hands it to whoever sends the selector: not a place for secrets)
    assert "metadata" not in machine
    assert "metadata" not in c.get("/api/v1/groups/machine:node1").json()


def test_with_the_token_every_admin_route_works(site_dir, client_for, tmp_path):
    c = client_for(site_dir)
    h = auth(TOKEN)

    # machines: add one, it boots; the file keeps every other machine as it was
    r = c.put("/api/v1/machines/node9", json={"mac": "52:54:00:12:34:09", "role": "worker",
                                               "labels": {"rack": "b"}}, headers=h)  # fmt: skip
    assert r.status_code == 200, r.text
    assert (r.json()["name"], r.json()["mac"], r.json()["profile"]) == (
        "node9",
        "52:54:00:12:34:09",
        "flatcar-worker",
    )
    written = yaml.safe_load((site_dir / "machines.yaml").read_text())["machines"]
    assert [m["name"] for m in written] == ["node1", "node2", "pi1", "node9"]
    assert [m["mac"] for m in written] == ["52:54:00:12:34:01", "52-54-00-12-34-02", "DC:A6:32:01:02:03",
                                           "52:54:00:12:34:09"]  # fmt: skip
    assert [m.mac for m in load_site(site_dir).machines][-1] == "52:54:00:12:34:09"
    assert c.get("/ipxe", params={"mac": "52-54-00-12-34-09"}).status_code == 200

    ign = c.get("/api/v1/machines/node9/ignition", headers=h)
    assert ign.status_code == 200, ign.text
    assert_valid_ignition(ign.json(), tmp_path)
    assert c.get("/api/v1/groups/machine:node9/metadata", headers=h).json()["labels"] == {
        "rack": "b"
    }

    assert c.delete("/api/v1/machines/node9", headers=h).status_code == 204
    assert c.get("/ipxe", params={"mac": "52-54-00-12-34-09"}).status_code == 404
    assert c.delete("/api/v1/machines/node9", headers=h).status_code == 404

    # profiles and groups (matchbox format)
    r = c.put("/api/v1/profiles/rescue", json={"name": "Rescue", "boot": {
        "kernel": "/assets/flatcar/amd64/flatcar_production_pxe.vmlinuz", "args": ["rescue"]}}, headers=h)  # fmt: skip
    assert r.status_code == 200, r.text
    assert json.loads((site_dir / "profiles" / "rescue.json").read_text())["id"] == "rescue"
    r = c.put("/api/v1/groups/rescue", json={"profile": "rescue", "selector": {"mode": "rescue"},
                                              "metadata": {"secret": "s3cret"}}, headers=h)  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["selector"] == {"mode": "rescue"}
    assert c.get("/api/v1/groups/rescue/metadata", headers=h).json() == {"secret": "s3cret"}
    script = c.get("/ipxe", params={"mode": "rescue"}).text
    assert "kernel /assets/flatcar/amd64/flatcar_production_pxe.vmlinuz rescue\n" in script
    assert c.delete("/api/v1/groups/rescue", headers=h).status_code == 204
    assert c.get("/ipxe", params={"mode": "rescue"}).status_code == 404
    assert c.delete("/api/v1/profiles/rescue", headers=h).status_code == 204
    assert not (site_dir / "profiles" / "rescue.json").exists()

    # events (the device link) and reload
    r = c.post(
        "/api/v1/events",
        json={"kind": "dhcp", "mac": "52-54-00-12-34-01", "payload": {"arch": 7}},
        headers=h,
    )
    assert r.status_code == 201, r.text
    posted = r.json()
    assert (posted["kind"], posted["source"], posted["mac"], posted["machine"], posted["payload"]) == (
        "dhcp", "device", "52:54:00:12:34:01", "node1", {"arch": 7})  # fmt: skip
    assert c.get("/api/v1/events", params={"kind": "dhcp"}).json()[0]["id"] == posted["id"]
    generation = c.get("/api/v1/site").json()["generation"]
    r = c.post("/api/v1/reload", headers=h)
    assert r.status_code == 200 and r.json() == {
        "ok": True,
        "generation": generation + 1,
        "error": None,
    }

    # power needs a device; with the token the answer says so
    r = c.post("/api/v1/machines/node1/power", json={"state": "on"}, headers=h)
    assert r.status_code == 503 and "--device" in r.json()["detail"]


def test_deleting_a_machine_keeps_the_others(site_dir, client_for):
    c = client_for(site_dir)
    assert c.delete("/api/v1/machines/node2", headers=auth(TOKEN)).status_code == 204
    site = load_site(site_dir)
    assert [(m.name, m.mac) for m in site.machines] == [
        ("node1", "52:54:00:12:34:01"),
        ("pi1", "dc:a6:32:01:02:03"),
    ]
    assert c.get("/ipxe", params=NODE1).status_code == 200
    assert c.get("/ipxe", params={"mac": "52-54-00-12-34-02"}).status_code == 404


def test_machine_edits_at_once_all_land(site_dir, client_for):
    # Each edit read machines.yaml before taking the site's lock and wrote back its own copy:
    # twenty machines added at once were twenty 200s, and three of them in the file.
    from concurrent.futures import ThreadPoolExecutor

    c = client_for(site_dir)
    names = [f"race{i:02d}" for i in range(20)]

    def put(i: int) -> int:
        body = {"mac": f"52:54:00:aa:00:{i:02x}", "arch": "x86_64", "role": "worker"}
        return c.put(f"/api/v1/machines/{names[i]}", json=body, headers=auth(TOKEN)).status_code

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(put, range(20))) == [200] * 20
    with ThreadPoolExecutor(8) as pool:  # and changes and removals of them at once
        done = list(pool.map(lambda n: c.patch(f"/api/v1/machines/{n}", json={"labels": {"rack": n}},
                                               headers=auth(TOKEN)).status_code, names[:10]))  # fmt: skip
        done += list(pool.map(lambda n: c.delete(f"/api/v1/machines/{n}", headers=auth(TOKEN)).status_code,
                              names[10:]))  # fmt: skip
    assert done == [200] * 10 + [204] * 10
    site = load_site(site_dir)
    kept = {m.name: m for m in site.machines if m.name.startswith("race")}
    assert sorted(kept) == names[:10] and all(m.labels.get("rack") == n for n, m in kept.items())
    assert {m.name for m in site.machines} >= {"node1", "node2", "pi1"}


@pytest.mark.parametrize("text, says", [
    ("- name: x\n", "machines.yaml is not a mapping now (a list)"),
    ("machines: 5\n", "'machines' is not a list now (a int)"),
])  # fmt: skip
def test_a_machine_edit_against_a_hand_edited_file_of_another_shape_is_409(text, says, site_dir, client_for):
    # the last good site serves while machines.yaml is being edited by hand; an edit then was a
    # bare 500 (doc.get on a list, list(5))
    c = client_for(site_dir)
    (site_dir / "machines.yaml").write_text(text)
    for r in (c.put("/api/v1/machines/node9", json={"mac": "52:54:00:aa:00:09", "role": "worker"},
                    headers=auth(TOKEN)),
              c.patch("/api/v1/machines/node1", json={"power": "off"}, headers=auth(TOKEN)),
              c.delete("/api/v1/machines/node1", headers=auth(TOKEN))):  # fmt: skip
        assert r.status_code == 409 and says in r.json()["detail"], r.text
    assert (site_dir / "machines.yaml").read_text() == text  # nothing written


def test_an_edit_the_site_directory_cannot_take_says_so(site_dir, client_for, monkeypatch):
    # a site directory the controller's user may not write (install-service warns of it): a
    # bare 500; now the reason, and nothing changed
    from bastion import atomic

    c = client_for(site_dir)
    before = (site_dir / "machines.yaml").read_bytes()

    def refuse(path, data, *a, **kw):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(atomic, "write_bytes", refuse)
    r = c.patch("/api/v1/machines/node1", json={"power": "off"}, headers=auth(TOKEN))
    assert r.status_code == 500
    assert r.json()["detail"] == (f"the site's files could not be written in {site_dir}: "
                                  "Permission denied (nothing was changed)")  # fmt: skip
    assert (site_dir / "machines.yaml").read_bytes() == before


@pytest.mark.parametrize("path,allowed", [
    ("/api/v1/machines/node1", ["DELETE", "GET", "PATCH", "PUT"]),
    ("/api/v1/machines", ["GET"]),
])  # fmt: skip
def test_a_405_allows_every_method_the_path_has(path, allowed, site_dir, client_for):
    # RFC 9110 15.5.6. One route per method: the 405 named the first route's alone (Allow: GET
    # for a machine, which PUT, PATCH and DELETE edit).
    c = client_for(site_dir)
    r = c.request("POST", path, headers=auth(), json={})
    assert r.status_code == 405
    assert sorted(m.strip() for m in r.headers["allow"].split(",")) == allowed
    assert r.json() == {"detail": "Method Not Allowed"}
    for method in ("GET", "HEAD", "PUT", "PATCH", "DELETE"):  # it names those it takes
        taken = c.request(method, path, headers=auth()).status_code != 405
        assert taken == (method in allowed), method


@pytest.mark.parametrize("headers", [{}, {"Content-Type": "application/json"}],
                         ids=["no-body", "an-empty-json-body"])  # fmt: skip
def test_apply_with_no_body_does_whatever_the_plan_is_as_with_an_empty_object(
        headers, site_dir, client_for):  # fmt: skip
    # The docs say `{}` does whatever the plan is; no body at all was 422 "Field required".
    with (site_dir / "site.yaml").open("a") as f:
        f.write("operator:\n  sync: manual\n")
    c = client_for(site_dir)
    m = site_dir / "machines.yaml"
    m.write_text(m.read_text().replace("  - name: node2\n", "  - name: node2\n    maintenance: true\n"))
    plan = c.get("/api/v1/plan", headers=auth()).json()
    assert plan["changes"] == [{"machine": "node2", "field": "maintenance", "from": False, "to": True}]
    r = c.post("/api/v1/apply", headers={**auth(), **headers})
    assert r.status_code == 200, r.text
    assert (r.json()["id"], r.json()["changes"]) == (plan["id"], plan["changes"])
    assert c.get("/api/v1/plan", headers=auth()).json()["changes"] == []  # applied: nothing left to do


# -- OpenAPI --------------------------------------------------------------------------------------


def test_openapi_lists_the_routes(site_dir, client_for):
    c = client_for(site_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FastAPI warns while building a schema it knows is wrong
        r = c.get("/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    assert spec["openapi"].startswith("3.")
    assert spec["info"]["title"] == "Edge Bastion controller"
    paths = spec["paths"]
    expected = {  # at least these (the API grows)
        "/boot.ipxe": {"get"}, "/ipxe": {"get"}, "/grub/grub.cfg": {"get"}, "/grub": {"get"},
        "/ignition": {"get"}, "/generic": {"get"}, "/metadata": {"get"}, "/callback": {"post"},
        "/assets/{path}": {"get", "head"},
        "/healthz": {"get"}, "/metrics": {"get"}, "/api/v1/site": {"get"}, "/api/v1/reload": {"post"},
        "/api/v1/machines": {"get"}, "/api/v1/machines/{name}": {"get", "put", "patch", "delete"},
        "/api/v1/machines/{name}/hold": {"post"}, "/api/v1/machines/{name}/release": {"post"},
        "/api/v1/operator": {"get"}, "/api/v1/plan": {"get"}, "/api/v1/apply": {"post"},
        "/api/v1/machines/{name}/ignition": {"get"}, "/api/v1/machines/{name}/power": {"post"},
        "/api/v1/machines/{name}/reprovision": {"post"},
        "/api/v1/profiles": {"get"}, "/api/v1/profiles/{pid}": {"get", "put", "delete"},
        "/api/v1/groups": {"get"}, "/api/v1/groups/{gid}": {"get", "put", "delete"},
        "/api/v1/groups/{gid}/metadata": {"get"},
        "/api/v1/events": {"get", "post"},
        "/api/v1/device": {"get"}, "/api/v1/device/power/{channel}": {"post"},
        "/api/v1/auth": {"get"}, "/api/v1/machines/{name}/timeline": {"get"},
    }  # fmt: skip
    assert {p: set(ops) for p, ops in paths.items() if p in expected} == expected
    operation_ids = [op["operationId"] for ops in paths.values() for op in ops.values()]
    assert len(operation_ids) == len(set(operation_ids)), "operationIds must be unique (OpenAPI 3)"
    # the routes behind the token say so in the schema, and only they (a new one belongs in
    # ADMIN_ROUTES too, so that the auth tests above cover it)
    secured = {(p, m.upper()) for p, ops in paths.items() for m, op in ops.items()
               if {"HTTPBearer": []} in op.get("security", [])}  # fmt: skip
    assert secured == {
        ("/api/v1/machines/{name}", "PUT"), ("/api/v1/machines/{name}", "DELETE"),
        ("/api/v1/profiles/{pid}", "PUT"), ("/api/v1/profiles/{pid}", "DELETE"),
        ("/api/v1/groups/{gid}", "PUT"), ("/api/v1/groups/{gid}", "DELETE"),
        ("/api/v1/reload", "POST"), ("/api/v1/events", "POST"),
        ("/api/v1/machines/{name}/power", "POST"), ("/api/v1/device/power/{channel}", "POST"),
        ("/api/v1/machines/{name}/ignition", "GET"), ("/api/v1/groups/{gid}/metadata", "GET"),
        ("/api/v1/machines/{name}/reprovision", "POST"), ("/api/v1/machines/{name}", "PATCH"),
        ("/api/v1/machines/{name}/hold", "POST"), ("/api/v1/machines/{name}/release", "POST"),
        ("/api/v1/apply", "POST"), ("/api/v1/auth", "GET"),
        ("/api/v1/machines/{name}/console", "GET"), ("/api/v1/plan", "GET"),
    }  # fmt: skip
    assert len(secured) == len(ADMIN_ROUTES)


# -- bad edits through the API --------------------------------------------------------------------


def test_a_bad_machine_edit_is_422_naming_the_field_and_the_last_good_site_serves(
    site_dir, client_for
):
    c = client_for(site_dir)
    before_files = site_files(site_dir)
    before_script = c.get("/ipxe", params=NODE1).text
    generation = c.get("/api/v1/site").json()["generation"]

    r = c.put(
        "/api/v1/machines/node9",
        json={"mac": "zz:00:11:22:33:44", "role": "worker"},
        headers=auth(TOKEN),
    )
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail["message"] == "the edit would break the site"
    # One problem, about the edit: the machines already in the file are untouched by it.
    assert len(detail["problems"]) == 1, detail["problems"]
    assert re.fullmatch(r"machines\.yaml:\d+: machines\[3\]\.mac: 'zz:00:11:22:33:44' is not a MAC address",
                        detail["problems"][0])  # fmt: skip

    # PUT replaces node1's entry; with node2's MAC the two would be one machine
    r = c.put(
        "/api/v1/machines/node1",
        json={"mac": "52:54:00:12:34:02", "role": "worker"},
        headers=auth(TOKEN),
    )
    assert r.status_code == 422
    (problem,) = r.json()["detail"]["problems"]
    assert re.fullmatch(r"machines\.yaml:\d+: machines\[1\]\.mac: 52:54:00:12:34:02 is also the MAC of machines\[0\]",
                        problem)  # fmt: skip

    assert site_files(site_dir) == before_files
    assert c.get("/api/v1/site").json()["generation"] == generation
    assert c.get("/ipxe", params=NODE1).text == before_script
    assert c.get("/ipxe", params={"mac": "52-54-00-12-34-09"}).status_code == 404


@pytest.mark.parametrize(
    "body, loc",
    [({"mac": "52:54:00:12:34:09", "relay": "two"}, ["body", "relay"]),
     ({"mac": "52:54:00:12:34:09", "colour": "red"}, ["body", "colour"]),
     ({"labels": {"rack": ["a"]}}, ["body", "labels", "rack"])],
    ids=["wrong-type", "unknown-field", "nested"],
)  # fmt: skip
def test_a_malformed_machine_body_is_422_naming_the_field(body, loc, site_dir, client_for):
    c = client_for(site_dir)
    before = site_files(site_dir)
    r = c.put("/api/v1/machines/node9", json=body, headers=auth(TOKEN))
    assert r.status_code == 422
    assert [e["loc"] for e in r.json()["detail"]] == [loc]
    assert site_files(site_dir) == before


@pytest.mark.parametrize(
    "fmt, body, problem",
    [("matchbox", {"boot": {"kernel": "/assets/k"}, "ignition_id": "missing.yaml"},
      "profiles/broken.json: ignition_id: ignition/missing.yaml does not exist"),
     ("bastion", {"kernel": "/assets/k", "ignition": "missing.bu"},
      "profiles/broken.yaml: ignition: ignition/missing.bu does not exist"),
     ("matchbox", {"boot": {"kernel": "/assets/../../etc/passwd"}},
      "profiles/broken.json: boot.kernel: '/assets/../../etc/passwd' leaves the assets/ directory"),
     ("bastion", {"kernel": "/assets/k", "os": "windows"},
      "profiles/broken.yaml:2: os: must be 'flatcar' or 'custom', not 'windows'")],
    ids=["matchbox-missing-template", "bastion-missing-template", "asset-escape", "bad-os"],
)  # fmt: skip
def test_a_bad_profile_edit_is_422_naming_the_field(fmt, body, problem, site_dir, client_for):
    c = client_for(site_dir)
    before = site_files(site_dir)
    r = c.put("/api/v1/profiles/broken", params={"format": fmt}, json=body, headers=auth(TOKEN))
    assert r.status_code == 422, r.text
    assert r.json()["detail"]["problems"] == [problem]
    assert site_files(site_dir) == before
    assert c.get("/api/v1/profiles/broken").status_code == 404
    assert c.get("/ipxe", params=NODE1).status_code == 200


def test_a_bad_group_edit_is_422_naming_each_field(matchbox_dir, client_for):
    c = client_for(matchbox_dir)
    before = site_files(matchbox_dir)
    r = c.put(
        "/api/v1/groups/bad",
        json={"profile": "nope", "selector": {"mac": "not-a-mac"}},
        headers=auth(TOKEN),
    )
    assert r.status_code == 422
    assert r.json()["detail"]["problems"] == [
        "groups/bad.json: selector.mac: 'not-a-mac' is not a MAC address",
        "groups/bad.json: profile: no profile 'nope' (expected profiles/nope.yaml or profiles/nope.json)",
    ]
    # a second group that selects exactly what an existing one selects would make matching arbitrary
    r = c.put(
        "/api/v1/groups/twin",
        json={"profile": "rack", "selector": {"rack": "a"}},
        headers=auth(TOKEN),
    )
    assert r.status_code == 422
    assert "selects the same machines as groups/rack-a.json" in r.json()["detail"]["problems"][0]
    # a machine's own group is edited in machines.yaml, not here
    assert c.delete("/api/v1/groups/machine:node1", headers=auth(TOKEN)).status_code == 404
    assert site_files(matchbox_dir) == before
    assert c.get("/ipxe", params={"rack": "a"}).status_code == 200


# -- broken site files on disk ------------------------------------------------------------------------

BROKEN_MAC = "machines.yaml:5: machines[0].mac: 'zz:54:00:12:34:01' is not a MAC address"


def break_machines(site: Path) -> str:
    good = (site / "machines.yaml").read_text()
    (site / "machines.yaml").write_text(
        good.replace("mac: 52:54:00:12:34:01", "mac: zz:54:00:12:34:01")
    )
    return good


def test_a_broken_site_file_and_reload_keep_the_last_good_config(site_dir, client_for):
    c = client_for(site_dir)
    good_script = c.get("/ipxe", params=NODE1).text
    generation = c.get("/api/v1/site").json()["generation"]
    good = break_machines(site_dir)

    r = c.post("/api/v1/reload", headers=auth(TOKEN))
    assert r.status_code == 422
    assert r.json() == {"ok": False, "generation": generation, "error": BROKEN_MAC}
    status = c.get("/api/v1/site").json()
    assert (status["generation"], status["last_error"], status["machines"]) == (
        generation,
        BROKEN_MAC,
        3,
    )
    assert status["last_error_at"] is not None
    health = c.get("/healthz").json()
    assert (health["status"], health["last_error"], health["generation"]) == (
        "degraded",
        BROKEN_MAC,
        generation,
    )
    r = c.get("/ipxe", params=NODE1)
    assert (r.status_code, r.text) == (200, good_script)
    assert metric(c, "bastion_site_broken") == 1
    assert metric(c, "bastion_site_reloads_total", result="error") == 1
    event = c.get("/api/v1/events", params={"kind": "site", "limit": 1}).json()[0]
    assert event["payload"] == {"ok": False, "generation": generation, "error": BROKEN_MAC}

    # fixed, with a change: node1 becomes a control-plane machine
    (site_dir / "machines.yaml").write_text(good.replace("role: worker", "role: control-plane", 1))
    r = c.post("/api/v1/reload", headers=auth(TOKEN))
    assert r.status_code == 200
    assert r.json() == {"ok": True, "generation": generation + 1, "error": None}
    assert c.get("/healthz").json()["status"] == "ok"
    assert c.get("/api/v1/site").json()["last_error"] is None
    assert metric(c, "bastion_site_broken") == 0
    script = c.get("/ipxe", params=NODE1).text
    assert script != good_script
    assert (
        "console=tty0" not in script and "console=ttyS0,115200n8" in script
    )  # flatcar-control's args
    assert c.get("/api/v1/machines/node1").json()["profile"] == "flatcar-control"


def test_an_api_edit_while_a_file_is_broken_names_that_file(site_dir, client_for):
    c = client_for(site_dir)
    break_machines(site_dir)
    r = c.put(
        "/api/v1/groups/rack-b",
        json={"profile": "flatcar-worker", "selector": {"rack": "b"}},
        headers=auth(TOKEN),
    )
    assert r.status_code == 422
    assert r.json()["detail"]["problems"] == [BROKEN_MAC]
    assert not (site_dir / "groups" / "rack-b.json").exists()


def test_the_poller_does_not_load_a_file_caught_half_written(site_dir, client_for):
    # An editor that truncates machines.yaml and then writes it leaves an empty file for a moment,
    # and an empty machines.yaml is a valid one: loaded then, every machine would get a 404.
    # Driven by hand (poll=0: no background poller), one look at a time.
    c = client_for(site_dir)
    holder = c.app.state.runtime.holder
    good = (site_dir / "machines.yaml").read_text()
    (site_dir / "machines.yaml").write_text("")  # between the editor's truncate and its write
    assert holder.poll() is None  # changed, not yet settled
    assert c.get("/ipxe", params=NODE1).status_code == 200
    (site_dir / "machines.yaml").write_text(good.replace("role: worker", "role: control-plane", 1))
    assert holder.poll() is None  # changed again since the last look
    outcome = holder.poll()  # the same twice running: load it
    assert outcome is not None and outcome.ok
    assert c.get("/api/v1/site").json()["machines"] == 3
    assert c.get("/api/v1/machines/node1").json()["profile"] == "flatcar-control"
    assert holder.poll() is None  # nothing changed since


def test_the_poller_of_a_real_server_reloads_and_recovers(site_dir, serve):
    server = serve(site_dir, poll=0.1)
    good_script = server.get("/ipxe", params=NODE1).text
    generation = server.get("/api/v1/site").json()["generation"]
    good = break_machines(site_dir)

    status = wait_until("the poller to see the broken file",
                        lambda: (s := server.get("/api/v1/site").json())["last_error"] and s)  # fmt: skip
    assert status["last_error"] == BROKEN_MAC
    assert status["generation"] == generation
    health = server.get("/healthz").json()
    assert (health["status"], health["site"], health["generation"], health["last_error"]) == (
        "degraded", "home-lab", generation, BROKEN_MAC)  # fmt: skip
    r = server.get("/ipxe", params=NODE1)
    assert (r.status_code, r.text) == (200, good_script)

    (site_dir / "machines.yaml").write_text(good.replace("role: worker", "role: control-plane", 1))
    status = wait_until("the poller to load the fixed file",
                        lambda: (s := server.get("/api/v1/site").json())["last_error"] is None and s)  # fmt: skip
    assert status["generation"] == generation + 1
    assert server.get("/healthz").json()["status"] == "ok"
    assert "console=tty0" not in server.get("/ipxe", params=NODE1).text
    kinds = [(e["payload"].get("ok"), e["payload"].get("error")) for e in
             reversed(server.get("/api/v1/events", params={"kind": "site"}).json())]  # fmt: skip
    assert kinds[-2:] == [(False, BROKEN_MAC), (True, None)]


# -- /metrics -------------------------------------------------------------------------------------





def test_metrics_are_prometheus_text_with_the_boot_counters(site_dir, client_for):
    c = client_for(site_dir)
    for _ in range(2):
        assert c.get("/ipxe", params=NODE1).status_code == 200
    assert c.get("/ipxe", params={"mac": "02-00-00-00-00-01"}).status_code == 404
    assert c.get("/boot.ipxe").status_code == 200
    assert c.get("/ignition", params=NODE1).status_code == 200
    assert c.get("/assets/flatcar/amd64/flatcar_production_pxe.vmlinuz").status_code == 200
    assert c.get("/assets/nope").status_code == 404
    assert c.post("/api/v1/reload").status_code == 401

    r = c.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    types, samples = parse_prometheus(r.text)

    def value(name, **labels):
        return samples.get((name, frozenset(labels.items())))

    assert types["bastion_boot_requests_total"] == "counter"
    assert value("bastion_boot_requests_total", endpoint="/ipxe", status="200") == 2
    assert value("bastion_boot_requests_total", endpoint="/ipxe", status="404") == 1
    assert value("bastion_boot_requests_total", endpoint="/boot.ipxe", status="200") == 1
    assert value("bastion_boot_requests_total", endpoint="/ignition", status="200") == 1
    assert value("bastion_asset_requests_total", status="200") == 1
    assert value("bastion_asset_requests_total", status="404") == 1
    assert value("bastion_api_auth_failures_total") == 1
    assert value("bastion_events_total", kind="boot") == 5
    # the vmlinuz, and /assets/nope: the test client asked /ipxe as node1, so to the controller
    # its missing asset is a failed boot step of node1 (bastion.state.addresses)
    assert value("bastion_events_total", kind="asset") == 2
    # the group commit's: one request at a time, a transaction each, for /ipxe and /boot.ipxe
    assert types["bastion_history_commits_total"] == "counter"
    assert value("bastion_history_commits_total") == value("bastion_history_committed_events_total") == 4

    # the histogram: cumulative buckets ending in +Inf == _count, for each endpoint
    assert types["bastion_boot_request_seconds"] == "histogram"
    for endpoint, count in (("/ipxe", 3), ("/boot.ipxe", 1), ("/ignition", 1)):
        buckets = sorted(
            ((float(dict(k)["le"]), v) for (n, k), v in samples.items()
             if n == "bastion_boot_request_seconds_bucket" and dict(k)["endpoint"] == endpoint),
        )  # fmt: skip
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), "buckets are cumulative"
        assert buckets[-1] == (float("inf"), count)
        assert value("bastion_boot_request_seconds_count", endpoint=endpoint) == count
        assert value("bastion_boot_request_seconds_sum", endpoint=endpoint) >= 0

    assert types["bastion_site_machines"] == "gauge"
    assert value("bastion_site_machines") == 3
    assert value("bastion_site_profiles") == 2
    assert value("bastion_site_groups") == 3
    assert value("bastion_site_broken") == 0
    assert value("bastion_site_generation") == 1


def test_files_written_by_the_api_keep_their_mode(site_dir, client_for):
    """A site file rewritten through the API keeps its permissions (it used to become 0600, so a
    controller running as another user, or a git checkout's reader, lost it); a new file gets the
    usual 0644 under a 022 umask."""
    c = client_for(site_dir)
    machines = site_dir / "machines.yaml"
    os.chmod(machines, 0o664)
    old = os.umask(0o022)
    try:
        r = c.put("/api/v1/machines/node9", json={"mac": "52:54:00:12:34:09", "role": "worker"},
                  headers=auth(TOKEN))
        assert r.status_code == 200, r.text
        r = c.put("/api/v1/profiles/rescue", json={"name": "Rescue", "boot": {
            "kernel": "/assets/vmlinuz", "initrd": [], "args": []}}, headers=auth(TOKEN))
        assert r.status_code == 200, r.text
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(machines).st_mode) == 0o664
    new = [p for p in (site_dir / "profiles").iterdir() if p.stem == "rescue"]
    assert new and all(stat.S_IMODE(os.stat(p).st_mode) == 0o644 for p in new)


def test_the_api_machine_types_follow_the_model_and_the_schema():
    """One description of a machine: the API's write body has machines.yaml's fields (the
    schema checks the values), and its view names model.Machine's fields plus what only the API
    knows. A field added to the schema or the model without the API fails here."""
    import dataclasses

    from bastion.api.machines import MachineIn, MachineOut
    from bastion.model import Machine
    from bastion.site.schema import MachineEntry

    assert set(MachineIn.model_fields) == set(MachineEntry.model_fields) - {"name"}
    api_only = {"group", "install", "installed_at", "boots_from", "phase", "status"}
    model_fields = {f.name for f in dataclasses.fields(Machine)}
    assert set(MachineOut.model_fields) - api_only <= model_fields
