"""k3s node labels and arguments go into the k3s unit's ExecStart= line (bastion.cluster.plan):
they are checked at load as Kubernetes checks labels, and no control character gets there (a
line break would end the line: systemd refuses the unit, or runs a line of the value's choosing).
Judged on copies of examples/home-lab."""

from __future__ import annotations

from pathlib import Path

import pytest
from bastion.cluster import plan
from bastion.site.load import SiteError, load_site
from bastion_testkit import TOKEN, auth

SITE = "home-lab"


def edit(site_dir: Path, name: str, change) -> None:
    path = site_dir / name
    path.write_text(change(path.read_text()))


def nodes(site_dir: Path) -> dict[str, dict]:
    return {m.name: m.node for m in load_site(site_dir).cluster_nodes}


def problems(site_dir: Path) -> list[str]:
    with pytest.raises(SiteError) as e:
        load_site(site_dir)
    return e.value.problems


@pytest.mark.parametrize(("label", "why"), [
    # e5: the value's line break ended ExecStart=, the next line was the site's own
    ('home-lab/class: "x86\\n        ExecStartPre=/bin/touch /tmp/pwned"', "is not a label value"),
    ('home-lab/class: "x 86"', "is not a label value"),
    (f"home-lab/class: {'a' * 64}", "is not a label value"),
    ("home-lab/class: -x86", "is not a label value"),
    ("Home.Lab/class: x86", "a label key's prefix is a lower-case DNS name"),
    (f"{'a' * 254}/class: x86", "a label key's prefix is a lower-case DNS name"),
    ("home-lab/: x86", "a label key's name is at most 63"),
    (f"home-lab/{'c' * 64}: x86", "a label key's name is at most 63"),
    ("a/b/c: x86", "a label key's prefix is a lower-case DNS name"),
    ('"home-lab/cl\\u0001ass": x86', "a label key's name is at most 63"),
])  # fmt: skip
def test_node_labels_are_kubernetes_labels(lab, label, why):
    edit(lab, "machines.yaml", lambda t: t.replace("        home-lab/class: x86\n", f"        {label}\n", 1))
    [problem] = problems(lab)
    assert problem.startswith("machines.yaml:43: machines[3].k3s.node_labels: "), problem
    assert why in problem, problem


def test_valid_node_labels_reach_the_k3s_command_line(lab):
    labels = "        home-lab/class: x86\n        tier: ''\n        a.b-c.example/x_y.z: A-1_b.2\n"
    edit(lab, "machines.yaml", lambda t: t.replace("        home-lab/class: x86\n", labels, 1))
    args = nodes(lab)["nuc1"]["exec"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--node-label"] == [
        "home-lab/class=x86", "tier=", "a.b-c.example/x_y.z=A-1_b.2"]  # fmt: skip


@pytest.mark.parametrize("arg", ["--node-label=a\x01b", "x\x7f", "line\nbreak", "tab\there"])
def test_systemd_quote_refuses_a_control_character(arg):
    with pytest.raises(ValueError, match="control character"):
        plan.systemd_quote(arg)


def test_an_argument_with_a_control_character_is_refused_at_load(lab):
    edit(lab, "machines.yaml", lambda t: t.replace("    k3s:\n      node_labels:", '    k3s:\n      args: ["--v=\\u0001"]\n      node_labels:', 1))  # fmt: skip
    [problem] = problems(lab)
    assert problem.startswith("machines.yaml:42: machines[3].k3s.args: "), problem
    assert "control characters" in problem


def test_the_api_refuses_a_label_that_would_break_the_unit(lab, client_for):
    """Through PATCH as through PUT: the site with the change does not load, nothing is written."""
    client = client_for(lab)
    before = (lab / "machines.yaml").read_bytes()
    r = client.patch("/api/v1/machines/nuc1", headers=auth(TOKEN),
                     json={"k3s": {"node_labels": {"home-lab/class": "x86\nExecStartPre=/bin/touch /tmp/x"}}})  # fmt: skip
    assert r.status_code == 422, r.text
    assert "k3s.node_labels" in r.text
    assert (lab / "machines.yaml").read_bytes() == before
