"""bastion.site: loading both site formats, and one clear error per kind of broken site file."""

import json
import shutil
from pathlib import Path

import pytest
from bastion.model import BootRequest
from bastion_testkit import EXAMPLES, assert_valid_ignition

from bastion.render.config import render_ignition
from bastion.site.load import SiteError, load_site


def test_edge_bastion_example_loads(site_dir):
    site = load_site(site_dir)
    assert site.name == "home-lab"
    assert [m.name for m in site.machines] == ["node1", "node2", "pi1"]
    node2 = site.machine("node2")
    assert node2.mac == "52:54:00:12:34:02" and node2.profile == "flatcar-control"
    pi1 = site.machine("pi1")
    assert (pi1.mac, pi1.arch, pi1.hostname, pi1.labels) == ("dc:a6:32:01:02:03", "arm64", "pi1.home.arpa", {"board": "rpi4"})
    assert pi1.metadata["timezone"] == "Europe/Berlin"  # the machine's own metadata wins
    assert site.machine("node1").metadata["timezone"] == "UTC"
    assert set(site.profiles) == {"flatcar-worker", "flatcar-control"}
    assert site.profiles["flatcar-worker"].boot_by_arch["arm64"].kernel.endswith("arm64/flatcar_production_pxe.vmlinuz")
    assert site.warnings == ()


def test_matchbox_example_loads_with_matchbox_semantics(matchbox_dir):
    site = load_site(matchbox_dir)
    ids = [g.id for g in site.groups]
    # matching order: most selectors first, then the greatest selector string
    assert ids == ["zone-b", "rack-a", "installed", "node1", "default"]
    assert site.group("node1").selector == {"mac": "52:54:00:89:d8:10"}  # normalised
    assert site.profiles["flatcar-installed"].boot is None
    assert site.ignition["installed.ign"].raw_ignition["ignition"]["version"] == "3.3.0"


def test_matchbox_repository_layout_with_nested_group_dirs_warns(matchbox_dir):
    (matchbox_dir / "groups" / "etcd").mkdir()
    (matchbox_dir / "groups" / "etcd" / "node9.json").write_text("{not json")
    (matchbox_dir / "profiles" / "notes.txt").write_text("x")
    site = load_site(matchbox_dir)
    assert "groups/etcd/: subdirectories are not read (as in matchbox)" in site.warnings
    assert "profiles/notes.txt: ignored (profiles are .json or .yaml files)" in site.warnings


@pytest.mark.parametrize("example", ["site", "matchbox"])
def test_every_declared_machine_renders_valid_ignition(example, site_dir, matchbox_dir, tmp_path):
    site = load_site(site_dir if example == "site" else matchbox_dir)
    rendered = 0
    for group in site.groups:
        profile = site.profiles[group.profile]
        if not profile.ignition:
            continue
        labels = dict(group.selector)
        req = BootRequest(labels, "&".join(f"{k}={v}" for k, v in labels.items()), "http://10.77.0.1:8080")
        assert_valid_ignition(render_ignition(site, group, profile, req), tmp_path)
        rendered += 1
    assert rendered >= 3


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def _json_edit(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc, indent=2))


S, M = "site", "matchbox"

# (name, which example, edit(dir), the single error must start with, and contain)
BROKEN = [
    ("bad MAC", S, lambda d: _edit(d / "machines.yaml", "52-54-00-12-34-02", "zz:54:00:12:34:02"),
     "machines.yaml:13: machines[1].mac:", "'zz:54:00:12:34:02' is not a MAC address"),
    ("duplicate MAC in another notation", S, lambda d: _edit(d / "machines.yaml", "52-54-00-12-34-02", "52:54:00:12:34:01"),
     "machines.yaml:13: machines[1].mac:", "52:54:00:12:34:01 is also the MAC of machines[0]"),
    ("two machines on one relay", S, lambda d: _edit(d / "machines.yaml", "relay: 1", "relay: 0"),
     "machines.yaml:16: machines[1].relay:", "channel 0 also powers machines[0]"),
    ("two machines on one address", S,
     lambda d: _edit(d / "machines.yaml", "relay: 1\n", "relay: 1\n    address: 10.0.0.5\n")
     or _edit(d / "machines.yaml", "relay: 0\n", "relay: 0\n    address: 10.0.0.5\n"),
     "machines.yaml:18: machines[1].address:", "10.0.0.5 is also the address of machines[0]"),
    # `$` in a pattern also matches before a final line break: "node1\n" passed as a name
    ("machine name with a line break", S, lambda d: _edit(d / "machines.yaml", "name: node2", 'name: "node2\\n"'),
     "machines.yaml:12: machines[1].name:", "'node2\\n' is not a valid machine name"),
    ("UUID with a line break", S, lambda d: _edit(d / "machines.yaml", "    arch: x86_64\n    role: control-plane", '    uuid: "8a2f6a4e-6f0c-4b8e-9a53-1f0e2d3c4b5a\\n"\n    arch: x86_64\n    role: control-plane'),
     "machines.yaml:14: machines[1].uuid:", "is not a UUID"),
    ("duplicate machine name", S, lambda d: _edit(d / "machines.yaml", "name: node2", "name: node1"),
     "machines.yaml:12: machines[1].name:", "'node1' is also machines[0]"),
    ("unknown profile in machines.yaml", S, lambda d: _edit(d / "machines.yaml", "role: control-plane", "profile: flatcar-gpu"),
     "machines.yaml:15: machines[1].profile:", "no profile 'flatcar-gpu'"),
    ("role without a profile", S, lambda d: _edit(d / "machines.yaml", "role: control-plane", "role: storage"),
     "machines.yaml:15: machines[1].role:", "role 'storage' is not in site.yaml roles"),
    ("unknown profile in site.yaml roles", S, lambda d: _edit(d / "site.yaml", "worker: flatcar-worker", "worker: flatcar-wrker"),
     "site.yaml: roles.worker:", "no profile 'flatcar-wrker'"),
    ("bad YAML", S, lambda d: _edit(d / "machines.yaml", "    arch: x86_64\n    role: worker", "    arch: [x86_64\n    role: worker"),
     "machines.yaml:", "bad YAML"),
    ("wrong type: labels as a list", S, lambda d: _edit(d / "machines.yaml", "    labels:\n      rack: a\n\n  - name: node2", "    labels: [rack, a]\n\n  - name: node2"),
     "machines.yaml:9: machines[0].labels:", "must be a mapping"),
    ("wrong type: a number where text goes", S, lambda d: _edit(d / "machines.yaml", "board: rpi4", "board: 4"),
     "machines.yaml:", "machines[2].labels.board: must be a string, not 4"),
    ("unknown architecture", S, lambda d: _edit(d / "machines.yaml", "arch: arm64", "arch: sparc"),
     "machines.yaml:22: machines[2].arch:", "'sparc' is not an architecture"),
    ("missing name", S, lambda d: _edit(d / "machines.yaml", "  - name: pi1\n    mac", "  - mac"),
     "machines.yaml:", "machines[2].name: is required"),
    ("unknown field (typo) in site.yaml", S, lambda d: _edit(d / "site.yaml", "site: home-lab", "sitename: home-lab"),
     "site.yaml:2: sitename:", "is not a known field"),
    ("controller_url not a URL", S, lambda d: _edit(d / "site.yaml", "# controller_url: http://10.77.0.1:8080", "controller_url: 10.77.0.1:8080"),
     "site.yaml:", "controller_url: '10.77.0.1:8080' is not an http(s) URL"),
    ("missing Ignition file", S, lambda d: _edit(d / "profiles" / "flatcar-control.yaml", "ignition: control.bu", "ignition: kontrol.bu"),
     "profiles/flatcar-control.yaml: ignition:", "ignition/kontrol.bu does not exist"),
    ("Ignition path escape", S, lambda d: _edit(d / "profiles" / "flatcar-control.yaml", "ignition: control.bu", "ignition: ../../etc/passwd"),
     "profiles/flatcar-control.yaml:8: ignition:", "leaves the ignition/ directory"),
    ("asset path escape", S, lambda d: _edit(d / "profiles" / "flatcar-control.yaml", "kernel: /assets/flatcar/amd64/", "kernel: /assets/../../../boot/"),
     "profiles/flatcar-control.yaml: kernel:", "leaves the assets/ directory"),
    ("profile id differs from file name", S, lambda d: _edit(d / "profiles" / "flatcar-control.yaml", "name: Flatcar control plane", "id: control\nname: x"),
     "profiles/flatcar-control.yaml:1: id:", "must match the file name"),
    ("broken Butane for a machine", S, lambda d: _edit(d / "ignition" / "control.bu", "      mode: 0755", "      mode: rwxr-xr-x"),
     "ignition/control.bu:19:", "storage.directories[0].mode: must be an integer"),
    ("Jinja syntax error", S, lambda d: _edit(d / "ignition" / "control.bu", "(machine.hostname or \"\")", "(machine.hostname or \"\""),
     "ignition/control.bu:16:", "unexpected"),
    ("Jinja undefined variable", S, lambda d: _edit(d / "ignition" / "control.bu", "(machine.hostname", "(machine.hostnme"),
     "ignition/control.bu:16:", "hostnme"),
    ("Butane local: escapes files/", S, lambda d: _edit(d / "ignition" / "worker.bu", "local: motd", "local: ../site.yaml"),
     "ignition/worker.bu:21:", "leaves the files/ directory"),
    ("unknown profile in a matchbox group", M, lambda d: _json_edit(d / "groups" / "node1.json", lambda g: g.update(profile="etcd")),
     "groups/node1.json: profile:", "no profile 'etcd'"),
    ("bad JSON", M, lambda d: (d / "groups" / "rack-a.json").write_text('{\n  "id": "rack-a",\n  "profile": "rack"\n  "selector": {}\n}\n'),
     "groups/rack-a.json:4:", "bad JSON"),
    ("wrong type in a matchbox selector", M, lambda d: _json_edit(d / "groups" / "rack-a.json", lambda g: g.update(selector={"rack": 1})),
     "groups/rack-a.json: selector.rack:", "must be a string, not 1"),
    ("bad MAC in a matchbox selector", M, lambda d: _json_edit(d / "groups" / "node1.json", lambda g: g.update(selector={"mac": "52:54:00"})),
     "groups/node1.json: selector.mac:", "'52:54:00' is not a MAC address"),
    ("two default groups", M, lambda d: _json_edit(d / "groups" / "installed.json", lambda g: g.pop("selector")),
     "groups/", "no selector (both are default groups)"),
    ("matchbox profile without id", M, lambda d: _json_edit(d / "profiles" / "rack.json", lambda p: p.update(id="")),
     "profiles/rack.json: id:", "is required"),
    ("raw Ignition that is invalid", M, lambda d: _edit(d / "ignition" / "installed.ign", '"hello.service"', '"hello"'),
     "ignition/installed.ign:", "invalid systemd unit extension"),
    ("raw Ignition using 3.4-only fields", M, lambda d: _edit(d / "ignition" / "installed.ign", '"systemd"', '"storage": {"luks": [{"name": "x", "device": "/dev/vda", "discard": true}]},\n  "systemd"'),
     "ignition/installed.ign:", "needs Ignition spec 3.4.0"),
    ("Go template syntax error", M, lambda d: _edit(d / "ignition" / "flatcar.yaml", "{{.etcd_name}}", "{{.etcd_name"),
     "ignition/flatcar.yaml:14:", "template:"),
    ("generic_id escape", M, lambda d: _json_edit(d / "profiles" / "flatcar.json", lambda p: p.update(generic_id="/etc/shadow")),
     "profiles/flatcar.json: generic_id:", "leaves the generic/ directory"),
]  # fmt: skip


@pytest.mark.parametrize("name, which, edit, starts, contains", BROKEN, ids=[b[0] for b in BROKEN])
def test_each_broken_site_file_gives_one_clear_error(name, which, edit, starts, contains, site_dir, matchbox_dir):
    root = site_dir if which == S else matchbox_dir
    load_site(root)  # loads before the edit
    edit(root)
    with pytest.raises(SiteError) as e:
        load_site(root)
    problems = e.value.problems
    assert len(problems) == 1, "\n".join(problems)
    assert problems[0].startswith(starts), problems[0]
    assert contains in problems[0], problems[0]


def test_all_problems_are_listed_at_once(site_dir):
    _edit(site_dir / "machines.yaml", "52-54-00-12-34-02", "zz")
    _edit(site_dir / "site.yaml", "site: home-lab", "sitename: home-lab")
    with pytest.raises(SiteError) as e:
        load_site(site_dir)
    assert len(e.value.problems) == 2


def test_an_empty_directory_is_an_empty_site(tmp_path):
    site = load_site(tmp_path)
    assert site.groups == () and site.machines == () and site.profiles == {}


def test_not_a_directory(tmp_path):
    with pytest.raises(SiteError, match="not a directory"):
        load_site(tmp_path / "nope")


def test_unquoted_all_digit_macs_stay_macs(tmp_path):
    shutil.copytree(EXAMPLES / "site", tmp_path / "s")
    site = load_site(tmp_path / "s")
    # 52:54:00:12:34:01 would be a base-60 number in YAML 1.1
    assert site.machine("node1").mac == "52:54:00:12:34:01"


def test_a_role_typo_with_a_default_profile_is_a_warning(site_dir):
    (site_dir / "site.yaml").write_text((site_dir / "site.yaml").read_text()
                                        .replace("# default_profile:", "default_profile:"))
    p = site_dir / "machines.yaml"
    p.write_text(p.read_text().replace("role: control-plane", "role: control-plain"))
    site = load_site(site_dir)
    assert site.machine("node2").profile == "flatcar-worker"
    assert any("machines[1].role: 'control-plain' is not in site.yaml roles" in w
               for w in site.warnings), site.warnings


# --- desired state (bastion.operator) -----------------------------------------------------------


def test_desired_state_comes_from_the_entry_then_site_defaults(site_dir):
    _edit(site_dir / "site.yaml", "site: home-lab", "site: home-lab\ndefaults:\n  power: on\n"
          "operator:\n  sync: manual\n  cycles: 2\n  step_timeouts: {script: 30}")
    _edit(site_dir / "machines.yaml", "    relay: 1\n", "    relay: 1\n    power: off\n"
          "    maintenance: true\n    reprovision: 2026-12-05\n")
    (site_dir / "machines.yaml").write_text((site_dir / "machines.yaml").read_text()
                                            + "  - name: nuc1\n    mac: 52:54:00:12:34:09\n"
                                              "    role: worker\n    reprovision: 7\n")
    site = load_site(site_dir)
    by = {m.name: m for m in site.machines}
    assert (by["node1"].power, by["node1"].maintenance, by["node1"].reprovision) == ("on", False, None)
    # YAML 1.1 reads `off` as false and a bare date as a date: both are what was written
    assert (by["node2"].power, by["node2"].maintenance, by["node2"].reprovision) == ("off", True, "2026-12-05")
    # no relay: the site default power does not apply (the operator cannot switch it)
    assert (by["nuc1"].power, by["nuc1"].reprovision) == (None, "7")
    op = site.settings.operator
    assert (op.sync, op.cycles, op.step_timeouts, op.backoff_s) == ("manual", 2, {"script": 30}, 30)


def test_an_unset_site_has_no_desired_power(site_dir):
    site = load_site(site_dir)
    assert {m.power for m in site.machines} == {None}
    assert site.settings.operator.sync == "auto"


DESIRED_BROKEN = [
    ("power without a relay", "machines.yaml", "    relay: 2\n", "    power: on\n",
     "machines.yaml:", "machines[2].power: needs relay"),
    ("power is on or off", "machines.yaml", "    relay: 0\n", "    relay: 0\n    power: running\n",
     "machines.yaml:9: machines[0].power:", "must be 'on' or 'off', not 'running'"),
    ("maintenance is true or false", "machines.yaml", "    relay: 0\n", "    relay: 0\n    maintenance: later\n",
     "machines.yaml:9: machines[0].maintenance:", "must be true or false"),
    ("an unknown boot step", "site.yaml", "site: home-lab", "site: home-lab\noperator:\n  step_timeouts: {kernal: 60}",
     "site.yaml:", "operator.step_timeouts: 'kernal' is not a boot step"),
    ("a step timeout of zero", "site.yaml", "site: home-lab", "site: home-lab\noperator:\n  step_timeouts: {tftp: 0}",
     "site.yaml:", "operator.step_timeouts.tftp:"),
    ("cycles as text", "site.yaml", "site: home-lab", "site: home-lab\noperator:\n  cycles: '3'",
     "site.yaml:", "operator.cycles: must be an integer, not '3'"),
    ("sync mode", "site.yaml", "site: home-lab", "site: home-lab\noperator:\n  sync: sometimes",
     "site.yaml:", "operator.sync: must be 'auto' or 'manual', not 'sometimes'"),
    ("defaults typo", "site.yaml", "site: home-lab", "site: home-lab\ndefaults:\n  powr: on",
     "site.yaml:", "defaults.powr: is not a known field"),
]  # fmt: skip


@pytest.mark.parametrize("name, rel, old, new, starts, contains", DESIRED_BROKEN,
                         ids=[b[0] for b in DESIRED_BROKEN])
def test_desired_state_mistakes_name_the_file_and_field(name, rel, old, new, starts, contains, site_dir):
    _edit(site_dir / rel, old, new)
    with pytest.raises(SiteError) as e:
        load_site(site_dir)
    problems = e.value.problems
    assert len(problems) == 1, "\n".join(problems)
    assert problems[0].startswith(starts) and contains in problems[0], problems[0]
