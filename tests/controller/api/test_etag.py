"""Optimistic concurrency for the site edits (RFC 9110 8.8.3 ETag, 13.1.1 If-Match): GET of a
machine, profile or group answers its ETag, and an edit sent with If-Match is made only while
the entry still has it; otherwise 412 with the ETag of now, and no file is touched."""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from bastion_testkit import auth

MACHINE = "/api/v1/machines/node1"
SPARE = {"name": "Spare", "boot": {"kernel": "/assets/flatcar/amd64/flatcar_production_pxe.vmlinuz",
                                   "initrd": ["/assets/flatcar/amd64/flatcar_production_pxe_image.cpio.gz"]}}  # fmt: skip


@pytest.fixture
def c(client_for, site_dir):
    return client_for(site_dir)


def tag_of(r) -> str:
    tag = r.headers["etag"]
    assert re.fullmatch(r'"[0-9a-f]{32}"', tag), tag  # strong: no W/
    return tag


def test_a_stale_if_match_on_patch_is_412_and_machines_yaml_is_untouched(c, site_dir):
    old = tag_of(c.get(MACHINE))
    assert c.patch(MACHINE, json={"hostname": "n1.lan"}, headers=auth()).status_code == 200
    now = tag_of(c.get(MACHINE))
    before = (site_dir / "machines.yaml").read_bytes()
    r = c.patch(MACHINE, json={"power": "off"}, headers={**auth(), "If-Match": old})
    assert r.status_code == 412, r.text
    assert r.headers["etag"] == now
    assert r.json()["detail"] == (f"machine 'node1' has changed: its ETag is {now}, not If-Match {old}; "
                                  "nothing was written (GET it again and make the edit on what it is now)")  # fmt: skip
    assert (site_dir / "machines.yaml").read_bytes() == before
    assert c.get(MACHINE).json()["power"] is None


def test_a_matching_if_match_edits_and_answers_the_new_etag(c, site_dir):
    old = tag_of(c.get(MACHINE))
    r = c.patch(
        MACHINE, json={"hostname": "n1.lan"}, headers={**auth(), "If-Match": f'"0000", {old}'}
    )
    assert r.status_code == 200, r.text
    new = tag_of(r)
    assert new != old and new == tag_of(c.get(MACHINE))
    assert "hostname: n1.lan" in (site_dir / "machines.yaml").read_text()
    # PUT takes the new one, and answers the one after
    r = c.put(
        MACHINE,
        json={"mac": "52:54:00:12:34:01", "role": "worker"},
        headers={**auth(), "If-Match": new},
    )
    assert r.status_code == 200, r.text
    assert tag_of(r) not in (old, new)


def test_an_edit_of_another_machine_leaves_this_ones_etag(c):
    node1, pi1 = tag_of(c.get(MACHINE)), tag_of(c.get("/api/v1/machines/pi1"))
    # node2 above pi1 in the file grows by a line: pi1's line moves, its definition does not
    assert (
        c.patch(
            "/api/v1/machines/node2", json={"hostname": "n2.lan", "power": "off"}, headers=auth()
        ).status_code
        == 200
    )
    assert c.put("/api/v1/machines/node9", json={"mac": "52:54:00:12:34:09", "role": "worker"},
                 headers=auth()).status_code == 200  # fmt: skip
    assert tag_of(c.get(MACHINE)) == node1 and tag_of(c.get("/api/v1/machines/pi1")) == pi1
    r = c.patch(MACHINE, json={"labels": {"rack": "b"}}, headers={**auth(), "If-Match": node1})
    assert r.status_code == 200, r.text


def test_if_match_on_delete_profile(c, site_dir):
    r = c.put("/api/v1/profiles/spare", json=SPARE, headers=auth())
    assert r.status_code == 200, r.text
    first = tag_of(r)
    assert tag_of(c.get("/api/v1/profiles/spare")) == first
    r = c.put(
        "/api/v1/profiles/spare",
        json={**SPARE, "name": "Spare 2"},
        headers={**auth(), "If-Match": first},
    )
    assert r.status_code == 200, r.text
    second = tag_of(r)
    file = site_dir / "profiles" / "spare.json"
    held = file.read_bytes()
    r = c.delete("/api/v1/profiles/spare", headers={**auth(), "If-Match": first})
    assert r.status_code == 412 and r.headers["etag"] == second, r.text
    assert file.read_bytes() == held and c.get("/api/v1/profiles/spare").status_code == 200
    r = c.delete("/api/v1/profiles/spare", headers={**auth(), "If-Match": second})
    assert r.status_code == 204, r.text
    assert not file.exists() and c.get("/api/v1/profiles/spare").status_code == 404


def test_if_match_star_needs_the_entry_to_exist(c, site_dir):
    before = (site_dir / "machines.yaml").read_bytes()
    body = {"mac": "52:54:00:12:34:09", "role": "worker"}
    r = c.put("/api/v1/machines/node9", json=body, headers={**auth(), "If-Match": "*"})
    assert r.status_code == 412, r.text
    assert r.json()["detail"] == "machine 'node9' does not exist (If-Match: *); nothing was written"
    assert "etag" not in r.headers
    assert (site_dir / "machines.yaml").read_bytes() == before
    r = c.put(
        "/api/v1/groups/spare",
        json={"profile": "flatcar-worker"},
        headers={**auth(), "If-Match": "*"},
    )
    assert r.status_code == 412 and not (site_dir / "groups" / "spare.json").exists(), r.text
    # an entry that exists: * holds
    r = c.put(
        MACHINE,
        json={"mac": "52:54:00:12:34:01", "role": "worker"},
        headers={**auth(), "If-Match": "*"},
    )
    assert r.status_code == 200, r.text


def test_two_patches_with_the_same_if_match_at_once_one_wins(c, site_dir):
    tag = tag_of(c.get(MACHINE))
    names = [f"n1-{i}.lan" for i in range(8)]
    start = threading.Barrier(len(names))

    def patch(hostname: str):
        start.wait()
        return c.patch(MACHINE, json={"hostname": hostname}, headers={**auth(), "If-Match": tag})

    with ThreadPoolExecutor(len(names)) as pool:
        answers = list(pool.map(patch, names))
    codes = [r.status_code for r in answers]
    assert sorted(codes) == [200] + [412] * (len(names) - 1), [r.text for r in answers]
    winner = names[codes.index(200)]
    won = answers[codes.index(200)].headers["etag"]
    assert all(r.headers["etag"] == won for r in answers if r.status_code == 412)
    assert c.get(MACHINE).json()["hostname"] == winner
    assert f"hostname: {winner}" in (site_dir / "machines.yaml").read_text()


def test_a_hand_edit_not_yet_loaded_fails_the_precondition(c, site_dir):
    # the client read the site served; the file on disk already says otherwise (the poll has
    # not loaded it yet): the edit is judged against the file, not the site served
    tag = tag_of(c.get(MACHINE))
    p = site_dir / "machines.yaml"
    p.write_text(p.read_text().replace("relay: 0", "relay: 5"))
    hand = p.read_bytes()
    r = c.put(MACHINE, json={"mac": "52:54:00:12:34:01", "role": "worker", "relay": 0},
              headers={**auth(), "If-Match": tag})  # fmt: skip
    assert r.status_code == 412, r.text
    assert p.read_bytes() == hand


def test_groups_and_weak_or_malformed_tags(c, site_dir):
    r = c.put("/api/v1/groups/spare", json={"profile": "flatcar-worker"}, headers=auth())
    assert r.status_code == 200, r.text
    tag = tag_of(r)
    assert tag_of(c.get("/api/v1/groups/spare")) == tag
    assert tag_of(c.get("/api/v1/groups/machine:node1"))  # the groups machines.yaml makes too
    # RFC 9110 8.8.3.2: If-Match compares strongly; a weak tag never matches
    r = c.delete("/api/v1/groups/spare", headers={**auth(), "If-Match": f"W/{tag}"})
    assert r.status_code == 412, r.text
    r = c.delete("/api/v1/groups/spare", headers={**auth(), "If-Match": tag.strip('"')})
    assert r.status_code == 400 and "not * nor a list of entity tags" in r.json()["detail"], r.text
    assert (
        json.loads((site_dir / "groups" / "spare.json").read_text())["profile"] == "flatcar-worker"
    )
    assert c.delete("/api/v1/groups/spare", headers={**auth(), "If-Match": tag}).status_code == 204


def test_without_if_match_edits_are_made_as_before(c):
    assert c.patch(MACHINE, json={"hostname": "a.lan"}, headers=auth()).status_code == 200
    assert c.patch(MACHINE, json={"hostname": "b.lan"}, headers=auth()).status_code == 200
    assert c.get(MACHINE).json()["hostname"] == "b.lan"


def test_the_schema_gives_412_for_every_conditional_edit(c):
    paths = c.get("/openapi.json").json()["paths"]
    for path in ("/api/v1/machines/{name}", "/api/v1/profiles/{pid}", "/api/v1/groups/{gid}"):
        for method in ("put", "delete") + (("patch",) if "machines" in path else ()):
            op = paths[path][method]
            assert op["responses"]["412"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Refusal"
            }
            assert "ETag" in op["responses"]["412"]["headers"]
            assert any(p["name"] == "If-Match" and p["in"] == "header" for p in op["parameters"]), (
                path,
                method,
            )


def test_if_match_on_an_entry_removed_meanwhile_is_404(c, site_dir):
    # the site served still has the profile; its file went away by hand, not yet loaded
    r = c.put("/api/v1/profiles/spare", json=SPARE, headers=auth())
    tag = tag_of(r)
    (site_dir / "profiles" / "spare.json").unlink()
    r = c.delete("/api/v1/profiles/spare", headers={**auth(), "If-Match": tag})
    assert r.status_code == 404, r.text
    assert r.json()["detail"] == "profile 'spare' does not exist now; nothing was written"
    r = c.patch(
        "/api/v1/machines/node9", json={"power": "off"}, headers={**auth(), "If-Match": "*"}
    )
    assert r.status_code == 404, r.text


def test_a_k3s_nodes_etag_covers_its_k3s_fields(tmp_path, client_for, monkeypatch):
    # a node's k3s:, disk: and wireguard: fields reach the site only as its k3s plan: an ETag
    # without the plan let two edits of its node labels overwrite each other unseen
    from mirrorkit import home_lab_copy

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("BASTION_SECRETS_DIR", raising=False)
    site = tmp_path / "home-lab"
    home_lab_copy(site)
    c = client_for(site)
    nuc1, nuc2 = (tag_of(c.get(f"/api/v1/machines/{n}")) for n in ("nuc1", "nuc2"))
    labels = {"node_labels": {"home-lab/class": "x86", "zone": "b"}}
    r = c.patch("/api/v1/machines/nuc1", json={"k3s": labels}, headers={**auth(), "If-Match": nuc1})
    assert r.status_code == 200, r.text
    assert tag_of(r) != nuc1 and tag_of(c.get("/api/v1/machines/nuc2")) == nuc2
    r = c.patch("/api/v1/machines/nuc1", json={"k3s": None}, headers={**auth(), "If-Match": nuc1})
    assert r.status_code == 412, r.text
