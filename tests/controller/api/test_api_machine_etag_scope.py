"""A machine's ETag is a digest of what an edit of it can change: its entry as machines.yaml
writes it and its declaration as GET shows it, not its k3s plan. The plan also holds what other
entries decide (the first server's address, which every other node joins): an edit of the
first server made every other node's If-Match fail, though no edit of theirs lost anything."""

from __future__ import annotations

import pytest
from bastion_testkit import auth


@pytest.fixture
def home_lab(tmp_path, client_for, monkeypatch):
    from mirrorkit import home_lab_copy

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("BASTION_SECRETS_DIR", raising=False)
    site = tmp_path / "home-lab"
    home_lab_copy(site)
    return client_for(site)


def test_the_first_servers_new_address_leaves_the_other_nodes_etags(home_lab):
    c = home_lab
    tags = {n: c.get(f"/api/v1/machines/{n}").headers["etag"] for n in ("pi2", "nuc1", "nuc2")}
    join = c.app.state.runtime.holder.site.machine("nuc2").node["server_url"]
    r = c.patch("/api/v1/machines/pi1", json={"address": "192.168.1.29"}, headers=auth())
    assert r.status_code == 200, r.text
    # what the others boot did change: they join the first server at its new address
    assert c.app.state.runtime.holder.site.machine("nuc2").node["server_url"] != join
    for name, tag in tags.items():
        assert c.get(f"/api/v1/machines/{name}").headers["etag"] == tag, name
    r = c.patch(
        "/api/v1/machines/nuc2", json={"power": "off"}, headers={**auth(), "If-Match": tags["nuc2"]}
    )
    assert r.status_code == 200, r.text


def test_every_field_of_the_entry_is_in_the_etag(home_lab):
    # networks:, disk:, wireguard: and k3s: reach the site only through the plan: the entry as
    # written keeps them in the tag, so two edits of them cannot overwrite each other unseen
    c = home_lab
    for name, change, back in (
        ("nuc2", {"wireguard": True}, {"wireguard": False}),
        (
            "pi2",
            {"disk": "/dev/disk/by-id/usb-other-0:0"},
            {"disk": "/dev/disk/by-id/usb-Samsung_Portable_SSD_T7_S5T2NS0W100002-0:0"},
        ),
        ("nuc1", {"k3s": {"node_labels": {"home-lab/class": "x86", "zone": "b"}}}, {"k3s": None}),
    ):
        old = c.get(f"/api/v1/machines/{name}").headers["etag"]
        r = c.patch(f"/api/v1/machines/{name}", json=change, headers={**auth(), "If-Match": old})
        assert r.status_code == 200, r.text
        assert r.headers["etag"] != old
        r = c.patch(f"/api/v1/machines/{name}", json=back, headers={**auth(), "If-Match": old})
        assert r.status_code == 412, (name, r.text)


def test_a_hand_edit_not_yet_loaded_gives_a_tag_no_edit_matches(client_for, site_dir):
    # the site served says one thing, machines.yaml on disk another: GET's body is the first, so
    # its tag must not let an edit write over the second
    c = client_for(site_dir)
    yaml = site_dir / "machines.yaml"
    yaml.write_text(
        yaml.read_text().replace("name: node1\n", "name: node1\n    hostname: by-hand\n", 1)
    )
    r = c.get("/api/v1/machines/node1")
    assert r.json()["hostname"] == "node1"  # not loaded yet
    hand = yaml.read_bytes()
    r = c.put("/api/v1/machines/node1", json={"mac": "52:54:00:12:34:01", "role": "worker"},
              headers={**auth(), "If-Match": r.headers["etag"]})  # fmt: skip
    assert r.status_code == 412, r.text
    assert yaml.read_bytes() == hand


def test_machines_yaml_is_parsed_for_a_tag_once_per_change_not_once_per_get(home_lab,
                                                                           monkeypatch):  # fmt: skip
    # a client that reads every machine in turn paid a parse of the whole file per machine
    from bastion import yamlfile
    from bastion.api import edits

    parsed = []
    real = yamlfile.load

    def counted(data, name, *a, **kw):
        if name == "machines.yaml":
            parsed.append(name)
        return real(data, name, *a, **kw)

    c = home_lab
    c.get("/api/v1/machines/pi2")  # the file as it is now, parsed once for its tags
    monkeypatch.setattr(edits.yamlfile, "load", counted)
    tags = {n: c.get(f"/api/v1/machines/{n}").headers["etag"] for n in ("pi2", "nuc1", "nuc2")}
    assert parsed == [], parsed
    r = c.patch("/api/v1/machines/nuc1", json={"power": "off"}, headers=auth())
    assert r.status_code == 200, r.text
    parsed.clear()
    after = {n: c.get(f"/api/v1/machines/{n}").headers["etag"] for n in ("pi2", "nuc1", "nuc2")}
    assert len(parsed) <= 1, parsed  # the changed file, once (the edit may have parsed it first)
    assert after["nuc1"] != tags["nuc1"] and after["pi2"] == tags["pi2"], (tags, after)
