"""Graceful node shutdown on the built-in k3s node (site.yaml cluster.shutdown_grace_s): every
node's rendered Ignition (the built-in k3s.bu through the Butane translation, judged by Debian's
ignition-validate) carries the kubelet's grace periods in a KubeletConfiguration file that k3s
is pointed at, and logind's inhibitor delay to match; nothing else changes, and with
shutdown_grace_s: 0 nothing at all. What site.yaml and machines.yaml may not say is refused by
file, line and field.

Not run against a real k3s or a real logind here: no k3s in the package registries, and a
shutdown cannot be tried on the test host. docs/ups.md says what that leaves unproven."""

from __future__ import annotations

import shutil
import urllib.parse
from pathlib import Path

import pytest
import yaml
from bastion.cluster import plan as cluster
from bastion.site.load import SiteError, load_site
from bastion.state.secrets import SecretStore
from bastion_testkit import assert_valid_ignition
from mirrorkit import home_lab_copy, render_all

VERSION = "v1.31.4+k3s1"
KUBELET_FILE = "/etc/rancher/k3s/kubelet-config.yaml"
LOGIND_FILE = "/etc/systemd/logind.conf.d/60-edge-bastion-k3s.conf"
KUBELET_ARG = f"--kubelet-arg=config={KUBELET_FILE}"
SERVER, AGENT = "pi1", "nuc1"


@pytest.fixture(scope="module")
def fetched(tmp_path_factory) -> Path:
    """examples/home-lab with stand-in Flatcar images and a made-up k3s release, fetched."""
    site = tmp_path_factory.mktemp("home-lab") / "home-lab"
    home_lab_copy(site, VERSION)
    return site


def site_with(fetched: Path, root: Path, cluster_lines: str = "", machines_edit=None) -> Path:
    """A copy of the home lab whose `cluster:` gets `cluster_lines` (indented two spaces)."""
    site = root / "site"
    shutil.copytree(fetched, site)
    text = (site / "site.yaml").read_text()
    (site / "site.yaml").write_text(text.replace("cluster:\n  name: home\n", f"cluster:\n  name: home\n{cluster_lines}"))
    if machines_edit:
        (site / "machines.yaml").write_text(machines_edit((site / "machines.yaml").read_text()))
    return site


def rendered(site: Path, root: Path) -> dict[str, dict]:
    return render_all(site, SecretStore(root / "secrets"))


def files_of(config: dict) -> dict[str, str]:
    """path -> contents (the data: URLs decoded; a remote source as its URL)."""
    out = {}
    for f in config["storage"].get("files", []):
        source = f["contents"]["source"]
        out[f["path"]] = urllib.parse.unquote(source[len("data:,"):]) if source.startswith("data:,") else source
    return out


def modes_of(config: dict) -> dict[str, int]:
    return {f["path"]: f["mode"] for f in config["storage"].get("files", [])}


def units_of(config: dict) -> dict[str, dict]:
    return {u["name"]: u for u in config["systemd"].get("units", [])}


def exec_start(config: dict) -> list[str]:
    unit = units_of(config)["k3s.service"]["contents"]
    (line,) = [x for x in unit.splitlines() if x.startswith("ExecStart=")]
    return line.removeprefix("ExecStart=").split()


def kubelet_config(grace: int, critical: int) -> dict:
    return {"apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "shutdownGracePeriod": f"{grace}s", "shutdownGracePeriodCriticalPods": f"{critical}s"}  # fmt: skip


def logind_settings(text: str) -> dict[str, dict[str, str]]:
    """A systemd-style config as {section: {key: value}}; comments and blank lines dropped."""
    out: dict[str, dict[str, str]] = {}
    section = None
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = out.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        assert section is not None, text
        section[key] = value
    return out


@pytest.fixture(scope="module")
def configs(fetched, tmp_path_factory):
    """Each case's rendered Ignition by node: the default, declared periods, and off."""
    out = {}
    for case, lines in {"default": "", "declared": "  shutdown_grace_s: 120\n  shutdown_critical_s: 40\n",
                        "off": "  shutdown_grace_s: 0\n"}.items():  # fmt: skip
        root = tmp_path_factory.mktemp(case)
        out[case] = rendered(site_with(fetched, root, lines), root)
    return out


@pytest.mark.parametrize("case, grace, critical", [("default", 45, 15), ("declared", 120, 40)])
@pytest.mark.parametrize("node", [SERVER, AGENT])
def test_a_node_gets_the_kubelets_grace_periods_and_loginds_delay(configs, case, grace, critical, node, tmp_path):
    config = configs[case][node]
    files = files_of(config)
    assert yaml.safe_load(files[KUBELET_FILE]) == kubelet_config(grace, critical)
    # the kubelet needs InhibitDelayMaxSec of at least shutdownGracePeriod; a few seconds more
    # let it finish and report its pods
    assert logind_settings(files[LOGIND_FILE]) == {"Login": {"InhibitDelayMaxSec": str(grace + 5)}}
    assert modes_of(config)[KUBELET_FILE] == modes_of(config)[LOGIND_FILE] == 0o644
    words = exec_start(config)
    assert words.count(KUBELET_ARG) == 1
    assert [w for w in words if w.startswith("--kubelet-arg")] == [KUBELET_ARG]
    assert_valid_ignition(config, tmp_path)


@pytest.mark.parametrize("node", [SERVER, AGENT])
def test_the_setting_adds_exactly_two_files_and_one_argument(configs, node, tmp_path):
    """Off, the node renders as it did before graceful node shutdown existed; on, the two files
    and the k3s argument are all that differ: no unit is added or changed."""
    on, off = configs["default"][node], configs["off"][node]
    assert set(files_of(on)) - set(files_of(off)) == {KUBELET_FILE, LOGIND_FILE}
    assert set(files_of(off)) <= set(files_of(on))
    assert not any("kubelet" in p or "logind" in p for p in files_of(off))
    assert KUBELET_ARG not in exec_start(off)
    assert [w for w in exec_start(on) if w != KUBELET_ARG] == exec_start(off)
    assert set(units_of(on)) == set(units_of(off))
    for name, unit in units_of(off).items():
        if name not in ("k3s.service", "bastion-heartbeat.service"):
            assert units_of(on)[name] == unit, name
    assert_valid_ignition(off, tmp_path)


def test_the_plan_says_what_the_templates_get(fetched, tmp_path):
    site = load_site(site_with(fetched, tmp_path, "  shutdown_grace_s: 90\n"))
    node = site.machine(AGENT).node
    assert node["shutdown"]["grace_s"] == 90 and node["shutdown"]["critical_s"] == 30
    assert node["shutdown"]["inhibit_delay_s"] == 95
    assert node["shutdown"]["kubelet_config_file"] == KUBELET_FILE
    assert node["shutdown"]["logind_file"] == LOGIND_FILE
    off = load_site(site_with(fetched, tmp_path / "off", "  shutdown_grace_s: 0\n"))
    assert off.machine(AGENT).node["shutdown"] is None


@pytest.mark.parametrize("args, file", [
    (["--kubelet-arg=config=/etc/k.yaml"], "/etc/k.yaml"),
    (["--kubelet-arg", "config=/etc/k.yaml"], "/etc/k.yaml"),
    (["--kubelet-arg=--config=/etc/k.yaml"], "/etc/k.yaml"),
    (["--kubelet-arg=config", "--kubelet-arg=/etc/k.yaml"], "/etc/k.yaml"),
    (["--kubelet-arg=config-dir=/etc/k.d"], None),
    (["--kubelet-arg=max-pods=200", "--node-label", "config=x"], None),
])  # fmt: skip
def test_a_kubelet_config_file_among_k3s_arguments_is_found_as_k3s_reads_them(args, file):
    assert cluster.kubelet_config_arg(args) == file


def _problems(site: Path) -> list[str]:
    with pytest.raises(SiteError) as e:
        load_site(site)
    return e.value.problems


@pytest.mark.parametrize("lines, problem", [
    ("  shutdown_grace_s: 30\n  shutdown_critical_s: 30\n",
     "site.yaml:22: cluster: shutdown_critical_s (30) must be at least 1 and less than shutdown_grace_s (30)"),
    ("  shutdown_grace_s: 30\n  shutdown_critical_s: 0\n",
     "site.yaml:22: cluster: shutdown_critical_s (0) must be at least 1 and less than shutdown_grace_s (30)"),
    # the default third of 2 s is 0 s: said, since the site did not write it
    ("  shutdown_grace_s: 2\n",
     "site.yaml:22: cluster: shutdown_critical_s (0, by default a third of shutdown_grace_s) must be at least 1"),
    ("  shutdown_grace_s: 0\n  shutdown_critical_s: 10\n",
     "site.yaml:22: cluster: shutdown_critical_s (10) without shutdown_grace_s: graceful node shutdown is off"),
    ("  shutdown_grace_s: 601\n", "site.yaml:23: cluster.shutdown_grace_s: Input should be less than or equal to 600"),
    ("  shutdown_grace_s: -1\n", "site.yaml:23: cluster.shutdown_grace_s: Input should be greater than or equal to 0"),
    ("  shutdown_grace_s: 45s\n", "site.yaml:23: cluster.shutdown_grace_s: must be an integer, not '45s'"),
    ("  shutdown_grace_s: true\n", "site.yaml:23: cluster.shutdown_grace_s: must be an integer, not True"),
    ("  shutdown_critical_s: 601\n", "site.yaml:23: cluster.shutdown_critical_s: Input should be less than or equal to 600"),
])  # fmt: skip
def test_site_yaml_mistakes_name_the_file_line_and_field(fetched, tmp_path, lines, problem):
    problems = _problems(site_with(fetched, tmp_path, lines))
    assert any(p.startswith(problem) for p in problems), problems


def test_a_kubelet_config_file_of_the_sites_own_is_refused_beside_graceful_shutdown(fetched, tmp_path):
    """k3s keeps one --kubelet-arg=config= file: the site's would replace the one with the grace
    periods (or be replaced by it), silently."""
    own = "  k3s:\n    version: v1.31.4+k3s1\n    agent_args: [--kubelet-arg=config=/etc/k.yaml]\n"
    site = site_with(fetched, tmp_path / "a", "", None)
    text = (site / "site.yaml").read_text().replace("  k3s:\n    version: v1.31.4+k3s1\n", own)
    (site / "site.yaml").write_text(text)
    assert _problems(site) == [
        ("site.yaml: cluster.k3s.agent_args: --kubelet-arg=config=/etc/k.yaml: k3s takes one kubelet "
         "config file, and graceful node shutdown (cluster.shutdown_grace_s) needs its own "
         f"({KUBELET_FILE}); set cluster.shutdown_grace_s: 0 to use yours, and put "
         "shutdownGracePeriod in it")
    ]  # fmt: skip
    machine = site_with(fetched, tmp_path / "m", "", lambda t: t.replace(
        "      node_taints:\n", "      args: [--kubelet-arg, config=/etc/k.yaml]\n      node_taints:\n"))  # fmt: skip
    (problem,) = _problems(machine)
    assert problem.startswith("machines.yaml:53: machines[4].k3s.args: --kubelet-arg=config=/etc/k.yaml: k3s takes one")
    # off: the site's own file is the kubelet's, and no grace period is written
    off = site_with(fetched, tmp_path / "off", "  shutdown_grace_s: 0\n", lambda t: t.replace(
        "      node_taints:\n", "      args: [--kubelet-arg=config=/etc/k.yaml]\n      node_taints:\n"))  # fmt: skip
    node = load_site(off).machine("nuc2").node
    assert node["shutdown"] is None
    assert [w for w in node["exec"] if w.startswith("--kubelet-arg")] == ["--kubelet-arg=config=/etc/k.yaml"]
