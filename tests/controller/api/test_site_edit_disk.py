"""Site edits through the API against the files on disk: a hand edit of the same file saved
while the edit is validated is kept (409, nothing written), a site that a hand edit broke is
said to be broken on disk rather than by the edit, and what the edit writes keeps its text."""

from __future__ import annotations

import pytest
from bastion.site import holder as holder_mod
from bastion_testkit import auth

NODE7 = "\n  - name: node7\n    mac: 52:54:00:12:34:07\n    role: worker\n"


@pytest.fixture
def hand_edit_during_validation(monkeypatch):
    """hand_edit_during_validation(f): f() runs while the next API edit's site is loaded."""

    def arm(hand_edit):
        real = holder_mod.load_site

        def load_site(root, overlay=None, **kw):
            if overlay:
                monkeypatch.setattr(holder_mod, "load_site", real)  # once
                hand_edit()
            return real(root, overlay=overlay, **kw)

        monkeypatch.setattr(holder_mod, "load_site", load_site)

    return arm


def test_a_hand_edit_of_machines_yaml_saved_during_an_api_edit_is_kept(
    site_dir, client_for, hand_edit_during_validation
):
    c = client_for(site_dir)
    p = site_dir / "machines.yaml"
    saved = p.read_text() + NODE7
    hand_edit_during_validation(lambda: p.write_text(saved))
    r = c.patch("/api/v1/machines/node1", json={"power": "off"}, headers=auth())
    assert r.status_code == 409, r.text
    assert r.json()["detail"] == "machines.yaml changed on disk during the edit; try again"
    assert p.read_text() == saved  # the person's file, comments and all
    assert c.get("/api/v1/machines/node1").json()["power"] is None  # nothing served either
    # sent again, the edit is made against the file as the person left it
    r = c.patch("/api/v1/machines/node1", json={"power": "off"}, headers=auth())
    assert r.status_code == 200, r.text
    assert {m["name"] for m in c.get("/api/v1/machines").json()} >= {"node1", "node7"}


def test_an_edit_while_another_file_is_broken_on_disk_says_so(site_dir, client_for):
    c = client_for(site_dir)
    p = site_dir / "profiles" / "flatcar-control.yaml"
    p.write_text(p.read_text() + "bogus: 1\n")
    assert c.post("/api/v1/reload", headers=auth()).status_code == 422
    r = c.patch("/api/v1/machines/node1", json={"hostname": "n1.lan"}, headers=auth())
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail["message"] == ("the site files on disk do not load (not because of this edit): "
                                 "fix profiles/flatcar-control.yaml first")  # fmt: skip
    assert len(detail["problems"]) == 1 and "bogus" in detail["problems"][0]
    assert "n1.lan" not in (site_dir / "machines.yaml").read_text()


def test_an_edit_of_a_file_broken_on_disk_by_its_own_problem_says_so(site_dir, client_for):
    # the bad MAC is the file's, not the edit's, though the edit rewrites that very file
    c = client_for(site_dir)
    p = site_dir / "machines.yaml"
    p.write_text(p.read_text().replace("DC:A6:32:01:02:03", "DC:A6:32:01:02:zz"))
    r = c.patch("/api/v1/machines/node1", json={"hostname": "n1.lan"}, headers=auth())
    assert r.status_code == 422
    assert r.json()["detail"]["message"].startswith("the site files on disk do not load")
    # and an edit that breaks the site itself is still said to be the edit's
    p.write_text(p.read_text().replace("DC:A6:32:01:02:zz", "DC:A6:32:01:02:03"))
    r = c.patch("/api/v1/machines/node1", json={"relay": 1}, headers=auth())  # node2's relay
    assert r.status_code == 422 and r.json()["detail"]["message"] == "the edit would break the site"


def test_an_edit_of_a_machines_yaml_that_is_not_yaml_says_the_file_on_disk_does_not_load(
    site_dir, client_for
):
    c = client_for(site_dir)
    (site_dir / "machines.yaml").write_text("machines: [\n")  # caught while being saved
    r = c.patch("/api/v1/machines/node1", json={"power": "off"}, headers=auth())
    assert r.status_code == 409
    assert r.json()["detail"].startswith("the site files on disk do not load (not because of this "
                                         "edit): machines.yaml is not valid YAML now")  # fmt: skip


def test_an_edit_keeps_text_as_written(site_dir, client_for):
    p = site_dir / "machines.yaml"
    p.write_text(
        p.read_text().replace("      rack: a\n", "      rack: a\n      note: café ☕\n", 1)
    )
    c = client_for(site_dir)
    assert (
        c.patch("/api/v1/machines/node1", json={"hostname": "n1.lan"}, headers=auth()).status_code
        == 200
    )
    text = p.read_text(encoding="utf-8")
    assert "note: café ☕" in text, text
    assert c.get("/api/v1/machines/node1").json()["labels"]["note"] == "café ☕"


def test_an_edit_is_one_api_site_event_naming_its_files(site_dir, client_for):
    c = client_for(site_dir)
    assert (
        c.patch("/api/v1/machines/node1", json={"power": "off"}, headers=auth()).status_code == 200
    )
    generation = c.get("/api/v1/site").json()["generation"]
    api = [e["payload"] for e in c.get("/api/v1/events", params={"kind": "site"}).json()
           if e["source"] == "api"]  # fmt: skip
    assert api == [{"edit": ["machines.yaml"], "generation": generation}]
    # it reaches what a reload reaches, without passing for one (no second event, no reload
    # counted)
    reloads = [e["payload"] for e in c.get("/api/v1/events", params={"kind": "site"}).json()
               if e["source"] != "api"]  # fmt: skip
    assert reloads == [] or all(r["generation"] < generation for r in reloads)
    counted = [line for line in c.get("/metrics").text.splitlines()
               if line.startswith("bastion_site_reloads_total{") and not line.endswith(" 0.0")]  # fmt: skip
    assert counted == []
