"""GET /api/v1/plan lists every difference between the site files on disk and the declaration
applied last, not only the words the operator acts on: a local edit of a machine's MAC, role,
address or labels, of site.yaml or of a template shows in `changes` (with no action), so the
fleet operator that writes git's declaration over it records what was undone. Secrets are named,
never shown; files by their digests, never their contents. Every change is in the plan's id.

Through the real API on a real SQLite file and real site files (docs/fleet.md, "A site cut off")."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from bastion_testkit import TOKEN, auth, make_app
from simkit import wait_for


def manual(site_dir) -> None:
    with (site_dir / "site.yaml").open("a") as f:
        f.write("operator:\n  sync: manual\n")


def edit(path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def plan(c) -> dict:
    r = c.get("/api/v1/plan", headers=auth())
    assert r.status_code == 200, r.text
    return r.json()


def test_a_local_edit_of_what_the_operator_does_not_act_on_is_in_the_plan(site_dir, client_for):
    manual(site_dir)
    c = client_for(site_dir)
    before = plan(c)
    assert before["changes"] == [] and before["actions"] == []
    m = site_dir / "machines.yaml"
    edit(m, "    mac: 52:54:00:12:34:01\n", "    mac: 52:54:00:12:34:11\n    address: 10.77.0.21\n")
    edit(m, "    role: control-plane\n", "    role: worker\n")
    edit(m, "      board: rpi4\n", "      board: rpi5\n")
    after = plan(c)
    assert after["changes"] == [
        {"machine": "node1", "field": "address", "from": None, "to": "10.77.0.21"},
        {"machine": "node1", "field": "mac", "from": "52:54:00:12:34:01", "to": "52:54:00:12:34:11"},
        {"machine": "node2", "field": "role", "from": "control-plane", "to": "worker"},
        {"machine": "pi1", "field": "labels.board", "from": "rpi4", "to": "rpi5"},
    ]  # fmt: skip
    assert after["actions"] == []  # nothing is switched for them
    # a plan made before the edit is not this one: its apply is refused and adopts nothing
    assert after["id"] != before["id"]
    r = c.post("/api/v1/apply", json={"plan": before["id"]}, headers=auth())
    assert r.status_code == 409, r.text
    assert r.json()["detail"]["plan"]["changes"] == after["changes"]
    assert plan(c)["changes"] == after["changes"]
    # the plan named is applied, and says what it adopted; after it nothing is left
    r = c.post("/api/v1/apply", json={"plan": after["id"]}, headers=auth())
    assert r.status_code == 200, r.text
    assert (r.json()["id"], r.json()["changes"], r.json()["done"]) == (after["id"], after["changes"], [])
    assert plan(c)["changes"] == []


def test_site_files_are_named_with_their_digests_not_their_contents(site_dir, client_for):
    manual(site_dir)
    c = client_for(site_dir)
    site_yaml, template = site_dir / "site.yaml", site_dir / "ignition" / "worker.bu"
    old_site, old_template = sha256(site_yaml), sha256(template)
    edit(site_yaml, "  timezone: UTC\n", "  timezone: Europe/Lisbon\n")
    template.write_text(template.read_text() + "# a local edit, marker-7f3a9\n")
    banner = site_dir / "files" / "banner"
    banner.write_text("marker-c41e2\n")
    r = c.get("/api/v1/plan", headers=auth())
    assert r.status_code == 200, r.text
    assert r.json()["changes"] == [
        {"machine": None, "file": "files/banner", "field": "sha256", "from": None, "to": sha256(banner)},
        {"machine": None, "file": "ignition/worker.bu", "field": "sha256", "from": old_template,
         "to": sha256(template)},
        {"machine": None, "file": "site.yaml", "field": "sha256", "from": old_site, "to": sha256(site_yaml)},
    ]  # fmt: skip
    assert r.json()["actions"] == []
    for contents in ("marker-7f3a9", "marker-c41e2", "Lisbon"):
        assert contents not in r.text
    # a file removed is one whose digest goes to null
    assert c.post("/api/v1/apply", json={"plan": r.json()["id"]}, headers=auth()).status_code == 200
    was = sha256(banner)
    banner.unlink()
    assert plan(c)["changes"] == [
        {"machine": None, "file": "files/banner", "field": "sha256", "from": was, "to": None}]


def test_a_secret_is_named_as_changed_without_its_values(site_dir, client_for):
    manual(site_dir)
    m = site_dir / "machines.yaml"
    edit(m, "      timezone: Europe/Berlin\n", "      timezone: Europe/Berlin\n"
         "      api_token: first-9d1c\n      motd: hello\n")  # fmt: skip
    edit(m, "      rack: a\n", "      rack: a\n    metadata:\n      extra_args: [--token=old-5b7e]\n")
    c = client_for(site_dir)
    assert plan(c)["changes"] == []
    edit(m, "      api_token: first-9d1c\n      motd: hello\n",
         "      api_token: second-44af\n      motd: good day\n")  # fmt: skip
    edit(m, "[--token=old-5b7e]", "[--token=new-0c3d]")
    r = c.get("/api/v1/plan", headers=auth())
    assert r.status_code == 200, r.text
    assert r.json()["changes"] == [
        # a text that sets one, as much as a key that names one
        {"machine": "node1", "field": "metadata.extra_args", "from": "(secret)", "to": "(secret)",
         "secret": True},
        {"machine": "pi1", "field": "metadata.api_token", "from": "(secret)", "to": "(secret)",
         "secret": True},
        {"machine": "pi1", "field": "metadata.motd", "from": "hello", "to": "good day"},
    ]  # fmt: skip
    for value in ("first-9d1c", "second-44af", "old-5b7e", "new-0c3d"):
        assert value not in r.text


def test_the_machines_order_is_a_change_of_the_site(site_dir, client_for):
    manual(site_dir)
    c = client_for(site_dir)
    m = site_dir / "machines.yaml"
    text = m.read_text()
    node1 = text[text.index("  - name: node1\n"):text.index("  - name: node2\n")]
    m.write_text(text.replace(node1, "") + "\n" + node1)  # node1 moved last
    p = plan(c)
    assert p["changes"] == [
        {"machine": None, "file": "machines.yaml", "field": "order", "from": ["node1", "node2", "pi1"],
         "to": ["node2", "pi1", "node1"]}]  # fmt: skip
    assert p["actions"] == []


def test_what_was_applied_is_remembered_across_a_restart(site_dir, tmp_path):
    # An edit made while the controller was down (the site cut off, its host restarted) is still
    # a change against what was applied before: the files at start are not taken as applied.
    from fastapi.testclient import TestClient

    manual(site_dir)
    db = tmp_path / "history.db"
    with TestClient(make_app(site_dir, db, TOKEN)) as c:
        assert plan(c)["changes"] == []
    edit(site_dir / "machines.yaml", "    mac: 52-54-00-12-34-02\n", "    mac: 52-54-00-12-34-12\n")
    with TestClient(make_app(site_dir, db, TOKEN)) as c:
        assert plan(c)["changes"] == [
            {"machine": "node2", "field": "mac", "from": "52:54:00:12:34:02", "to": "52:54:00:12:34:12"}]


def test_with_sync_auto_a_reload_is_applied_and_its_changes_are_gone(site_dir, client_for):
    c = client_for(site_dir)
    edit(site_dir / "machines.yaml", "      board: rpi4\n", "      board: rpi5\n")
    assert plan(c)["changes"] == [{"machine": "pi1", "field": "labels.board", "from": "rpi4", "to": "rpi5"}]
    assert c.post("/api/v1/reload", headers=auth()).status_code == 200
    passes = c.get("/api/v1/operator").json()["passes"]
    c.app.state.runtime.operator.wake()
    wait_for(lambda: c.get("/api/v1/operator").json()["passes"] > passes, what="a pass")
    assert plan(c)["changes"] == []


def test_bastion_plan_prints_each_change_and_no_secret(site_dir, serve):
    manual(site_dir)
    srv = serve(site_dir, poll=0)
    m = site_dir / "machines.yaml"
    edit(m, "    mac: 52:54:00:12:34:01\n", "    mac: 52:54:00:12:34:11\n")
    edit(m, "      timezone: Europe/Berlin\n", "      timezone: Europe/Berlin\n      password: hunter-2e\n")
    edit(site_dir / "site.yaml", "  timezone: UTC\n", "  timezone: Europe/Lisbon\n")
    env = {**os.environ, "BASTION_API_TOKEN": TOKEN}
    r = subprocess.run([str(Path(sys.executable).parent / "bastion"), "plan", "--url", srv.url],
                       capture_output=True, text=True, env=env, timeout=60, check=False)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    digest = sha256(site_dir / "site.yaml")[:12]
    assert "  node1: mac 52:54:00:12:34:01 -> 52:54:00:12:34:11\n" in r.stdout
    assert "  pi1: metadata.password changed (a secret: not shown)\n" in r.stdout
    assert "  site.yaml: sha256 " in r.stdout and f" -> {digest}\n" in r.stdout
    assert "hunter-2e" not in r.stdout and "Lisbon" not in r.stdout
