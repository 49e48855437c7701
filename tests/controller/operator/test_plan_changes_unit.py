"""The pure parts of the plan's changes (bastion.operator.declared, core.plan_id): which fields
are secrets, and what goes into a plan's id."""

from __future__ import annotations

import hashlib
import json

from bastion.operator.core import Action, plan_id
from bastion.operator.declared import Declared, DeclaredReader, machine_changes, site_changes


def test_a_plan_id_names_its_changes_and_without_any_is_what_its_actions_gave():
    acts = [Action("n1", "power-on", "declared on; its relay is off")]
    old_style = hashlib.sha256(json.dumps([("n1", "power-on", None, None)]).encode()).hexdigest()[:12]
    assert plan_id(acts) == plan_id(acts, []) == old_style
    mac = [{"machine": "n1", "field": "mac", "from": "52:54:00:00:00:01", "to": "52:54:00:00:00:02"}]
    other = [{**mac[0], "to": "52:54:00:00:00:03"}]
    assert len({plan_id(acts), plan_id(acts, mac), plan_id(acts, other), plan_id([], mac)}) == 4


def test_fields_that_may_hold_a_secret_are_hidden_and_the_rest_shown():
    before = {"labels.rack": "a", "metadata.db_password": "p1", "metadata.env": ["A=1"],
              "metadata.registry": [{"host": "r", "api_key": "k1"}], "metadata.ssh_authorized_keys": ["ssh-ed25519 A"]}  # fmt: skip
    after = {"labels.rack": "b", "metadata.db_password": "p2", "metadata.env": ["A=1", "TOKEN=t2"],
             "metadata.registry": [{"host": "r", "api_key": "k2"}], "metadata.ssh_authorized_keys": ["ssh-ed25519 B"]}  # fmt: skip
    out = machine_changes("n1", before, after)
    shown = {c["field"]: (c["from"], c["to"]) for c in out if not c.get("secret")}
    hidden = {c["field"] for c in out if c.get("secret")}
    assert shown == {"labels.rack": ("a", "b")}
    assert hidden == {"metadata.db_password", "metadata.env", "metadata.registry",
                      "metadata.ssh_authorized_keys"}  # fmt: skip
    text = json.dumps(out)
    for value in ("p1", "p2", "t2", "k1", "k2", "ssh-ed25519"):
        assert value not in text


def test_the_order_counts_only_the_machines_on_both_sides():
    a = Declared(order=("n1", "n2", "n3"), files={"site.yaml": "1" * 64})
    assert site_changes(a, Declared(order=("n1", "n3", "n4"), files=a.files)) == []
    assert site_changes(a, Declared(order=("n3", "n1"), files={})) == [
        {"machine": None, "file": "machines.yaml", "field": "order", "from": ["n1", "n3"], "to": ["n3", "n1"]},
        {"machine": None, "file": "site.yaml", "field": "sha256", "from": "1" * 64, "to": None},
    ]  # fmt: skip


def test_the_reader_reads_the_entries_canonically_and_a_broken_file_as_nothing(tmp_path):
    (tmp_path / "site.yaml").write_text("site: s\n")
    (tmp_path / "machines.yaml").write_text(
        "machines:\n  - name: n1\n    mac: 52-54-00-AB-00-01\n    power: on\n    disk: /dev/disk/by-id/usb-x\n")
    got = DeclaredReader(tmp_path).read()
    assert got.machines == {"n1": {"mac": "52:54:00:ab:00:01", "disk.device": "/dev/disk/by-id/usb-x"}}
    assert got.order == ("n1",) and set(got.files) == {"site.yaml"}
    assert Declared.of_json(got.as_json()) == got
    (tmp_path / "machines.yaml").write_text("machines: [\n")
    assert DeclaredReader(tmp_path).read().machines == {}
