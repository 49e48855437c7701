"""site.yaml `networks:` (docs/network.md): the networks model's checks, and k3s's traffic and
ingress put on the cluster and ingress networks in each node's rendered Ignition (judged by
ignition-validate); a site without cluster or ingress networks renders exactly as before."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from bastion.site.load import SiteError, load_site
from bastion.state.secrets import SecretStore
from bastion_testkit import assert_valid_ignition
from mirrorkit import home_lab_copy, render_all

VERSION = "v1.31.4+k3s1"
CONTROLLER = "http://192.168.1.10:8080"
CLUSTER = {"pi1": "192.168.20.21", "pi2": "192.168.20.22", "pi3": "192.168.20.23",
           "nuc1": "192.168.20.31", "nuc2": "192.168.20.32"}
INGRESS = {"nuc1": "192.168.30.31", "nuc2": "192.168.30.32"}
MACS = {"pi1": "dc:a6:32:00:00:01", "nuc1": "1c:69:7a:00:00:01"}


@pytest.fixture(scope="module")
def fetched(tmp_path_factory) -> Path:
    """examples/home-lab with stand-in Flatcar images and a made-up k3s release, fetched."""
    site = tmp_path_factory.mktemp("home-lab") / "home-lab"
    home_lab_copy(site, VERSION)
    return site


def copy_of(fetched: Path, root: Path, name: str = "site") -> Path:
    site = root / name
    shutil.copytree(fetched, site)
    return site


def with_node_networks(site: Path, cluster_extra: str = "", ingress_extra: str = "") -> Path:
    """Uncomment the cluster and ingress networks and give every node its addresses."""
    text = (site / "site.yaml").read_text()
    text = text.replace("  # cluster:\n  #   subnet: 192.168.20.0/24\n  #   vlan: 20\n",
                        f"  cluster:\n    subnet: 192.168.20.0/24\n    vlan: 20\n{cluster_extra}")
    text = text.replace("  # ingress:\n  #   subnet: 192.168.30.0/24\n  #   vlan: 30\n",
                        f"  ingress:\n    subnet: 192.168.30.0/24\n    vlan: 30\n{ingress_extra}")
    (site / "site.yaml").write_text(text)
    machines = (site / "machines.yaml").read_text()
    for name, ip in CLUSTER.items():
        nets = f"{{cluster: {ip}" + (f", ingress: {INGRESS[name]}}}" if name in INGRESS else "}")
        machines = re.sub(rf"(  - name: {name}\n)", rf"\1    networks: {nets}\n", machines)
    (site / "machines.yaml").write_text(machines)
    return site


def files_of(config: dict) -> dict[str, str]:
    """path -> inline contents (data: URLs decoded)."""
    import urllib.parse

    out = {}
    for f in config["storage"].get("files", []):
        source = f.get("contents", {}).get("source", "")
        out[f["path"]] = urllib.parse.unquote(source.removeprefix("data:,")) if source.startswith("data:,") else source
    return out


def exec_start(config: dict) -> list[str]:
    unit = next(u for u in config["systemd"]["units"] if u["name"] == "k3s.service")["contents"]
    line = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    return line.removeprefix("ExecStart=").split()


def after(words: list[str], flag: str) -> str | None:
    return words[words.index(flag) + 1] if flag in words else None


# --- rendering ---------------------------------------------------------------------------------


def test_without_node_networks_every_node_renders_exactly_as_without_networks(fetched, tmp_path):
    """The example declares pxe and management only: what the nodes get is what a site with no
    networks: at all gets."""
    store = SecretStore(tmp_path / "secrets")
    declared = render_all(copy_of(fetched, tmp_path, "declared"), store)
    bare = copy_of(fetched, tmp_path, "bare")
    text = (bare / "site.yaml").read_text()
    (bare / "site.yaml").write_text(text[: text.index("\n# The networks (docs/network.md).")] + "\n")
    assert load_site(bare).settings.networks is None
    assert load_site(copy_of(fetched, tmp_path, "again")).settings.networks.management.vlan == 10
    assert render_all(bare, store) == declared
    assert not any(p.startswith("/etc/systemd/network/") for c in declared.values() for p in files_of(c))


@pytest.fixture(scope="module")
def rendered(fetched, tmp_path_factory):
    root = tmp_path_factory.mktemp("networks")
    site = with_node_networks(copy_of(fetched, root))
    return render_all(site, SecretStore(root / "secrets"))


@pytest.mark.parametrize("name", sorted(CLUSTER))
def test_ignition_validate_accepts_every_node_on_the_networks(rendered, name, tmp_path):
    assert_valid_ignition(rendered[name], tmp_path)


def test_k3s_runs_on_the_cluster_network(rendered):
    for name, config in rendered.items():
        words = exec_start(config)
        assert after(words, "--node-ip") == CLUSTER[name]
        assert after(words, "--flannel-iface") == "vlan20"
        if name.startswith("pi"):
            assert after(words, "--advertise-address") == CLUSTER[name]
        else:
            assert "--advertise-address" not in words
        if name != "pi1":  # they join the first server at its cluster address
            assert after(words, "--server") == "https://192.168.20.21:6443"
    assert after(exec_start(rendered["pi1"]), "--tls-san") == "192.168.20.21"


def test_ingress_is_announced_on_the_ingress_network(rendered):
    for name, config in rendered.items():
        assert after(exec_start(config), "--node-external-ip") == INGRESS.get(name)


def test_each_node_gets_its_vlan_interfaces(rendered):
    files = files_of(rendered["nuc1"])
    pxe = files["/etc/systemd/network/10-pxe.network"]
    assert f"MACAddress={MACS['nuc1']}" in pxe and "DHCP=ipv4" in pxe
    assert re.findall(r"^VLAN=(\S+)$", pxe, re.MULTILINE) == ["vlan20", "vlan30"]
    netdev = files["/etc/systemd/network/20-cluster.netdev"]
    assert "Name=vlan20" in netdev and "Kind=vlan" in netdev and "Id=20" in netdev
    assert "Address=192.168.20.31/24" in files["/etc/systemd/network/20-cluster.network"]
    assert "Id=30" in files["/etc/systemd/network/20-ingress.netdev"]
    assert "Address=192.168.30.31/24" in files["/etc/systemd/network/20-ingress.network"]
    # pi1 is on no ingress: its boot interface carries the cluster VLAN only
    pi1 = files_of(rendered["pi1"])
    assert re.findall(r"^VLAN=(\S+)$", pi1["/etc/systemd/network/10-pxe.network"], re.MULTILINE) == ["vlan20"]
    assert "/etc/systemd/network/20-ingress.network" not in pi1


def test_a_network_on_a_nic_of_its_own_and_named_interfaces(fetched, tmp_path):
    site = with_node_networks(copy_of(fetched, tmp_path), cluster_extra="    interface: k3s0\n")
    text = (site / "site.yaml").read_text()
    text = text.replace("  ingress:\n    subnet: 192.168.30.0/24\n    vlan: 30\n",
                        "  ingress:\n    subnet: 192.168.30.0/24\n    interface: eth1\n")
    text = text.replace("  pxe:\n    subnet: 192.168.1.0/24\n", "  pxe:\n    subnet: 192.168.1.0/24\n    interface: eth0\n")
    (site / "site.yaml").write_text(text)
    configs = render_all(site, SecretStore(tmp_path / "secrets"))
    files = files_of(configs["nuc1"])
    assert after(exec_start(configs["nuc1"]), "--flannel-iface") == "k3s0"
    pxe = files["/etc/systemd/network/10-pxe.network"]
    assert "Name=eth0" in pxe and re.findall(r"^VLAN=(\S+)$", pxe, re.MULTILINE) == ["k3s0"]
    assert "/etc/systemd/network/20-ingress.netdev" not in files  # a NIC, not a VLAN
    assert "Name=eth1" in files["/etc/systemd/network/20-ingress.network"]
    assert "Address=192.168.30.31/24" in files["/etc/systemd/network/20-ingress.network"]


# --- the checks --------------------------------------------------------------------------------


def _problems(site: Path) -> list[str]:
    with pytest.raises(SiteError) as e:
        load_site(site)
    return e.value.problems


@pytest.mark.parametrize(("site_edit", "machines_edit", "problem"), [
    (lambda t: t.replace("    subnet: 192.168.10.0/24\n", "    subnet: 192.168.1.128/25\n"), None,
     ("site.yaml:{net}: networks: management (192.168.1.128/25) overlaps pxe (192.168.1.0/24): the "
      "networks must not share addresses")),
    (lambda t: t.replace("  management:\n", "  storage:\n    subnet: 10.9.0.0/24\n  management:\n"), None,
     "site.yaml:{net}: networks: 'storage': not a network this site knows (pxe, management, cluster, ingress)"),
    (lambda t: t.replace("    vlan: 30\n", "    vlan: 10\n"), "nodes",
     "site.yaml:{net}: networks: ingress and management are both VLAN 10"),
    (lambda t: t.replace("    subnet: 192.168.10.0/24\n", "    subnet: 192.168.10.1/24\n"), None,
     "site.yaml:{subnet}: networks.management.subnet: '192.168.10.1/24' has host bits set: the subnet is 192.168.10.0/24"),
    (lambda t: t.replace("    subnet: 192.168.20.0/24\n    vlan: 20\n", "    subnet: 192.168.20.0/24\n"), "nodes",
     "site.yaml:{net}: networks: cluster: give its vlan"),
    (lambda t: t.replace("    vlan: 10\n", "    vlan: 5000\n"), None,
     "site.yaml:{vlan}: networks.management.vlan:"),
    (lambda t: t.replace("controller_url: http://192.168.1.10:8080", "controller_url: http://192.168.10.10:8080"), None,
     "site.yaml: controller_url: 192.168.10.10 is not on networks.pxe (192.168.1.0/24): the nodes fetch their boot scripts there"),
    (lambda t: t.replace("  ip: 192.168.1.11\n", "  ip: 192.168.10.11\n"), None,
     "site.yaml: device.ip: 192.168.10.11 is not on networks.pxe (192.168.1.0/24)"),
    (lambda t: t.replace("  pxe:\n    subnet: 192.168.1.0/24\n", ""), None,
     "site.yaml: networks.pxe: is required with networks:"),
    (None, lambda t: t.replace("    address: 192.168.1.22\n", "    address: 192.168.2.22\n"),
     "machines.yaml:19: machines[1].address: 192.168.2.22 is not on networks.pxe (192.168.1.0/24)"),
    (None, lambda t: t.replace("  - name: nuc1\n", "  - name: nuc1\n    networks: {cluster: 192.168.20.31}\n"),
     "machines.yaml:36: machines[3].networks.cluster: site.yaml declares no networks.cluster"),
    (None, lambda t: t.replace("  - name: nuc1\n", "  - name: nuc1\n    networks: {storage: 192.168.20.31}\n"),
     "machines.yaml:36: machines[3].networks.storage: 'storage': a node has addresses of its own on cluster and ingress"),
    ("nodes", lambda t: t.replace("networks: {cluster: 192.168.20.22}", "networks: {cluster: 192.168.21.22}"),
     "machines.yaml:17: machines[1].networks.cluster: 192.168.21.22 is not on networks.cluster (192.168.20.0/24)"),
    ("nodes", lambda t: t.replace("networks: {cluster: 192.168.20.22}", "networks: {cluster: 192.168.20.21}"),
     "machines.yaml:17: machines[1].networks.cluster: 192.168.20.21 is also machines[0].networks.cluster"),
    ("nodes", lambda t: t.replace("    networks: {cluster: 192.168.20.23}\n", ""),
     "machines.yaml:27: machines[2].networks: a k3s node needs its address on networks.cluster (192.168.20.0/24)"),
])  # fmt: skip
def test_network_mistakes_name_the_file_line_and_field(fetched, tmp_path, site_edit, machines_edit, problem):
    site = copy_of(fetched, tmp_path)
    # site.yaml's lines, counted from its `networks:` (the section ends the example)
    top = (site / "site.yaml").read_text().splitlines().index("networks:") + 1
    problem = problem.format(net=top + 1, subnet=top + 4, vlan=top + 5)
    if "nodes" in (site_edit, machines_edit):
        with_node_networks(site)
    for name, edit in (("site.yaml", site_edit), ("machines.yaml", machines_edit)):
        if callable(edit):
            path = site / name
            path.write_text(edit(path.read_text()))
    problems = _problems(site)
    assert any(p.startswith(problem) for p in problems), problems


def test_networks_on_a_machine_of_a_site_without_networks(site_dir):
    text = (site_dir / "machines.yaml").read_text()
    (site_dir / "machines.yaml").write_text(
        text.replace("  - name: node1\n", "  - name: node1\n    networks: {cluster: 10.9.0.1}\n"))
    problems = _problems(site_dir)
    assert any(p.startswith("machines.yaml:5: machines[0].networks: site.yaml declares no networks:")
               for p in problems), problems
