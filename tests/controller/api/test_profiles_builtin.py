"""A profile that no file under profiles/ holds (the `k3s` profile that site.yaml's `cluster:`
makes) cannot be deleted through the API: 409 saying where it comes from, as for the groups
made from machines.yaml, and nothing recorded. A profile of that id written with PUT is a file
of the site's own, which replaces the built-in one until it is deleted."""

from __future__ import annotations

from pathlib import Path

from bastion_testkit import auth
from mirrorkit import home_lab_copy

BUILTIN = "site.yaml (cluster: built-in profile k3s)"


def test_the_built_in_k3s_profile_is_409_and_a_file_of_that_id_replaces_it(tmp_path: Path, client_for):
    site = tmp_path / "home-lab"
    home_lab_copy(site)
    c = client_for(site)
    k3s = c.get("/api/v1/profiles/k3s").json()
    assert k3s["source"] == BUILTIN
    generation = c.get("/api/v1/site").json()["generation"]
    site_events = len(c.get("/api/v1/events", params={"kind": "site"}).json())

    r = c.delete("/api/v1/profiles/k3s", headers=auth())
    assert r.status_code == 409, r.text
    assert r.json()["detail"] == (f"profile 'k3s' comes from {BUILTIN}, not from a file under "
                                  "profiles/; edit that instead, or PUT a profile of this id to replace it")  # fmt: skip
    assert c.get("/api/v1/profiles/k3s").json() == k3s
    assert c.get("/api/v1/site").json()["generation"] == generation
    assert len(c.get("/api/v1/events", params={"kind": "site"}).json()) == site_events

    # PUT writes profiles/k3s.yaml, which the site now serves instead; DELETE removes that file
    # and the built-in profile is back
    amd64 = k3s["boot_by_arch"]["x86_64"]
    body = {"name": "our k3s ☕", "os": "flatcar", "kernel": amd64["kernel"], "initrd": amd64["initrd"],
            "ignition": "k3s.bu"}  # fmt: skip
    r = c.put("/api/v1/profiles/k3s", params={"format": "bastion"}, json=body, headers=auth())
    assert r.status_code == 200, r.text
    assert (r.json()["source"], r.json()["name"]) == ("profiles/k3s.yaml", "our k3s ☕")
    # written as text, as an edit of machines.yaml is (yamlfile.dump), not as "\u2615"
    assert "name: our k3s ☕\n" in (site / "profiles" / "k3s.yaml").read_text(encoding="utf-8")
    assert c.delete("/api/v1/profiles/k3s", headers=auth()).status_code == 204
    assert not (site / "profiles" / "k3s.yaml").exists()
    assert c.get("/api/v1/profiles/k3s").json()["source"] == BUILTIN
    assert c.delete("/api/v1/profiles/k3s", headers=auth()).status_code == 409
