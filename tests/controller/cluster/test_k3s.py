"""The k3s cluster of a site (site.yaml cluster:, bastion.cluster.plan, the built-in k3s.bu), judged on
examples/home-lab: every node's Ignition, rendered with real secrets from a temporary secret
store, passes Debian's ignition-validate, and says what each node must do. The WireGuard configs
go through the real wg tools (wg-quick strip, wg setconf, wg showconf) on interfaces in a network
namespace the test makes: the kernel's wireguard when it has it, else wireguard-go."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest
import yaml
from bastion import boot
from bastion.model import BootRequest
from bastion.render.config import render_ignition
from bastion.site.load import SiteError, load_site
from bastion.state.secrets import (
    SecretStore,
    is_record,
    machine_secrets,
    wireguard_private_key,
    wireguard_public_key,
)
from bastion_testkit import EXAMPLES, REPO, assert_valid_ignition
from mirrorkit import K3sRelease, home_lab_copy, render_all
from netkit import WireguardNamespace, need_wireguard_tools

HOME_LAB = EXAMPLES / "home-lab"
VERSION = "v1.31.4+k3s1"
# the made-up k3s releases fetched into each site (by the real fetch, from a loopback mirror)
FETCHED: dict[Path, K3sRelease] = {}
CONTROLLER = "http://192.168.1.10:8080"
FIRST_SERVER_URL = "https://192.168.1.21:6443"
SERVERS = ("pi1", "pi2", "pi3")
AGENTS = ("nuc1", "nuc2")
TUNNELLED = ("pi1", "pi2", "pi3", "nuc1")


def make_home_lab(root: Path, endpoint: str | None = None) -> Path:
    """A copy of examples/home-lab with stand-in Flatcar images and a made-up k3s release,
    fetched as `bastion assets fetch k3s` does (FETCHED[site] has its binaries)."""
    site = root / "home-lab"
    FETCHED[site] = home_lab_copy(site, VERSION)
    if endpoint:  # wg setconf resolves the endpoint: no DNS in the test's namespace
        text = (site / "site.yaml").read_text().replace("mgmt.example.net:51820", endpoint)
        (site / "site.yaml").write_text(text)
    return site


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """(site dir, secret store, rendered Ignition by node name)"""
    root = tmp_path_factory.mktemp("home-lab")
    site = make_home_lab(root, endpoint="192.0.2.1:51820")
    store = SecretStore(root / "secrets")
    return site, store, render_all(site, store)


def files_of(config: dict) -> dict[str, dict]:
    return {f["path"]: f for f in config["storage"].get("files", [])}


def units_of(config: dict) -> dict[str, dict]:
    return {u["name"]: u for u in config["systemd"].get("units", [])}


def contents(entry: dict) -> str:
    source = entry["contents"]["source"]
    assert source.startswith("data:,"), source
    return urllib.parse.unquote(source[len("data:,"):])


def exec_start(config: dict) -> list[str]:
    unit = units_of(config)["k3s.service"]["contents"]
    lines = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 1, unit
    return lines[0].removeprefix("ExecStart=").split()


# --- the site --------------------------------------------------------------------------------------


def test_the_home_lab_loads_with_its_assets_and_no_warning(tmp_path):
    site = load_site(make_home_lab(tmp_path))
    assert site.warnings == ()
    assert [m.name for m in site.cluster_nodes] == [*SERVERS, *AGENTS]
    assert {m.profile for m in site.machines} == {"k3s"}
    assert site.profiles["k3s"].source.startswith("site.yaml (cluster")


def test_bastion_site_check_of_the_example_says_to_fetch_k3s_and_nothing_else():
    r = subprocess.run([str(REPO / ".venv/bin/bastion"), "site", "check", str(HOME_LAB)],
                       check=False, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    # without k3s and the images it says what is missing, and nothing else
    lines = r.stderr.splitlines()
    fetch = [x for x in lines if "has not been fetched: run `bastion assets fetch k3s" in x]
    assert [x.split(" has not")[0] for x in fetch] == [
        "site.yaml: cluster.k3s: k3s v1.31.4+k3s1 for arm64 (machine pi1 is arm64)",
        "site.yaml: cluster.k3s: k3s v1.31.4+k3s1 for amd64 (machine nuc1 is amd64)",
    ]
    assert all(x in fetch or "does not exist (yet)" in x for x in lines), r.stderr


def test_every_node_gets_the_flatcar_pxe_image_of_its_architecture(tmp_path):
    site = load_site(make_home_lab(tmp_path))
    for m in site.machines:
        answer = boot.ipxe(site, BootRequest({"mac": m.mac}, "", CONTROLLER))
        assert answer.status == 200
        arch = "arm64" if m.name in SERVERS else "amd64"
        console = "console=ttyAMA0,115200n8" if arch == "arm64" else "console=ttyS0,115200n8"
        kernel = answer.body.splitlines()[1].split()
        assert kernel[1] == f"/assets/flatcar/stable/{arch}/current/flatcar_production_pxe.vmlinuz"
        assert "flatcar.first_boot=1" in kernel and console in kernel
        assert f"ignition.config.url={CONTROLLER}/ignition?mac={m.mac.replace(':', '-')}" in kernel


# --- every node's Ignition ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*SERVERS, *AGENTS])
def test_ignition_validate_accepts_every_node(lab, name, tmp_path):
    _, _, configs = lab
    assert configs[name]["ignition"]["version"] == "3.3.0"
    assert_valid_ignition(configs[name], tmp_path)


def test_the_first_server_starts_the_cluster_and_the_others_join_it(lab):
    _, _, configs = lab
    inits = [n for n, c in configs.items() if "--cluster-init" in exec_start(c)]
    assert inits == ["pi1"]
    for name, config in configs.items():
        words = exec_start(config)
        assert words[0] == "/opt/bin/k3s"
        assert words[1] == ("server" if name in SERVERS else "agent")
        assert words[words.index("--node-name") + 1] == name
        assert words[words.index("--token-file") + 1] == "/etc/rancher/k3s/token"
        if name == "pi1":
            assert "--server" not in words
        else:
            assert words[words.index("--server") + 1] == FIRST_SERVER_URL
        if name in SERVERS:
            assert "--agent-token-file" in words and "--disable=traefik" in words
        else:
            assert "--agent-token-file" not in words and "--disable=traefik" not in words
    assert exec_start(configs["nuc2"])[-2:] == ["--node-taint", "home-lab/batch=true:NoSchedule"]
    unit = units_of(configs["pi1"])["k3s.service"]
    assert unit["enabled"] is True and "Type=notify" in unit["contents"]
    assert "Type=exec" in units_of(configs["nuc1"])["k3s.service"]["contents"]


def test_the_k3s_binary_is_the_controllers_and_checked_by_its_sha256(lab):
    site_dir, _, configs = lab
    for name, config in configs.items():
        arch = "arm64" if name in SERVERS else "amd64"
        binary = files_of(config)["/opt/bin/k3s"]
        assert binary["mode"] == 0o755
        assert binary["contents"]["source"] == f"{CONTROLLER}/assets/k3s/{VERSION}/{arch}/k3s"
        digest = hashlib.sha256(FETCHED[site_dir].binaries[arch]).hexdigest()
        assert binary["contents"]["verification"]["hash"] == f"sha256-{digest}"
        assert {"path": "/opt/bin/kubectl", "target": "/opt/bin/k3s", "overwrite": True} in config["storage"]["links"]


def test_the_controller_serves_the_k3s_binary_the_configs_name(lab, client_for):
    site_dir, _, _ = lab
    client = client_for(site_dir)
    r = client.get(f"/assets/k3s/{VERSION}/arm64/k3s")
    assert r.status_code == 200 and r.content == FETCHED[site_dir].binaries["arm64"]


def test_hostname_and_ssh_keys(lab):
    _, _, configs = lab
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleHomeLabAdminKey admin@home-lab"
    for name, config in configs.items():
        assert contents(files_of(config)["/etc/hostname"]) == name
        assert config["passwd"]["users"] == [{"name": "core", "sshAuthorizedKeys": [key]}]


def test_containerd_pulls_through_the_registry_cache(lab):
    _, _, configs = lab
    for config in configs.values():
        registries = yaml.safe_load(contents(files_of(config)["/etc/rancher/k3s/registries.yaml"]))
        # the controller host serves the cache (serve:): one Distribution instance per registry
        assert registries["mirrors"] == {
            "docker.io": {"endpoint": ["http://192.168.1.10:5000"]},
            "ghcr.io": {"endpoint": ["http://192.168.1.10:5001"]},
            "quay.io": {"endpoint": ["http://192.168.1.10:5002"]},
            "registry.k8s.io": {"endpoint": ["http://192.168.1.10:5003"]},
        }


def test_the_usb_ssd_holds_var_lib_rancher_on_servers_only(lab):
    _, _, configs = lab
    for name in SERVERS:
        config = configs[name]
        device = f"/dev/disk/by-id/usb-Samsung_Portable_SSD_T7_S5T2NS0W10000{name[-1]}-0:0"
        assert config["storage"]["filesystems"] == [{
            "device": device, "format": "ext4", "label": "k3s-data", "wipeFilesystem": False,
            "path": "/var/lib/rancher", "mountOptions": ["noatime"],
        }]  # fmt: skip
        mount = units_of(config)["var-lib-rancher.mount"]
        assert mount["enabled"] is True
        assert f"What={device}\n" in mount["contents"] and "Where=/var/lib/rancher\n" in mount["contents"]
        assert "Type=ext4\n" in mount["contents"]
        assert "RequiresMountsFor=/var/lib/rancher" in units_of(config)["k3s.service"]["contents"]
    for name in AGENTS:
        config = configs[name]
        assert "filesystems" not in config["storage"]
        assert not [u for u in units_of(config) if u.endswith(".mount")]
        assert "RequiresMountsFor" not in units_of(config)["k3s.service"]["contents"]


def test_tokens_come_from_the_store_and_agents_never_get_the_servers_token(lab):
    site_dir, store, configs = lab
    server_token = store.get("k3s/home/token")
    agent_token = store.get("k3s/home/agent-token")
    assert server_token and agent_token and server_token != agent_token
    for name, config in configs.items():
        files = files_of(config)
        assert files["/etc/rancher/k3s/token"]["mode"] == 0o600
        text = json.dumps(config)
        if name in SERVERS:
            assert contents(files["/etc/rancher/k3s/token"]) == server_token
            assert contents(files["/etc/rancher/k3s/agent-token"]) == agent_token
        else:
            assert contents(files["/etc/rancher/k3s/token"]) == agent_token
            assert server_token not in text and "/etc/rancher/k3s/agent-token" not in files
    # made once: a second rendering reads the same secrets back
    assert render_all(site_dir, store) == configs
    # and what went out with the configs (bastion.state.ledger): the start, the tunnel addresses
    assert store.names() == ["k3s/home/agent-token", "k3s/home/init-server",
                             *[f"k3s/home/node-password/{n}" for n in sorted(SERVERS + AGENTS)],
                             "k3s/home/token",
                             *[f"wireguard/{n}.{x}" for n in sorted(TUNNELLED) for x in ("address", "key")]]  # fmt: skip


def test_every_node_keeps_its_own_k3s_identity_across_boots(lab, tmp_path):
    """k3s refuses a node that comes back under its name with another node password: each
    node gets its own from the store, the same at every boot (rendering), and no other's."""
    site_dir, store, configs = lab
    passwords = {}
    for name, config in configs.items():
        f = files_of(config)["/etc/rancher/node/password"]
        assert f["mode"] == 0o600 and f["overwrite"] is True
        passwords[name] = contents(f)
        assert passwords[name] == store.get(f"k3s/home/node-password/{name}")
        assert len(passwords[name]) == 64
    assert len(set(passwords.values())) == len(passwords)  # one per node
    # The next boot: rendered again from the same store, the same identity.
    again = render_all(site_dir, store)
    for name, config in again.items():
        assert contents(files_of(config)["/etc/rancher/node/password"]) == passwords[name]
    # A rendered config never holds another node's password.
    for name, config in configs.items():
        text = json.dumps(config)
        assert [n for n, pw in passwords.items() if pw in text] == [name]
    # A new store (a controller that lost its secrets) gives every node a new identity.
    fresh = render_all(site_dir, SecretStore(tmp_path / "other-store"))
    assert all(contents(files_of(c)["/etc/rancher/node/password"]) != passwords[n]
               for n, c in fresh.items())  # fmt: skip


def test_no_secret_is_written_into_the_site_directory(lab):
    site_dir, store, _ = lab
    values = [store.get(n) for n in store.names() if not is_record(n)]
    for path in site_dir.rglob("*"):
        if path.is_file() and "assets" not in path.parts:
            text = path.read_text()
            assert not any(v in text for v in values), path


def test_the_wireguard_config_is_on_the_tunnelled_nodes(lab):
    _, store, configs = lab
    for name, config in configs.items():
        files, units = files_of(config), units_of(config)
        if name not in TUNNELLED:
            assert "/etc/wireguard/wg0.conf" not in files and "wg-quick@wg0.service" not in units
            continue
        assert files["/etc/wireguard/wg0.conf"]["mode"] == 0o600
        assert units["wg-quick@wg0.service"] == {"name": "wg-quick@wg0.service", "enabled": True}
        conf = contents(files["/etc/wireguard/wg0.conf"])
        assert f"PrivateKey = {store.get(f'wireguard/{name}.key')}\n" in conf
        address = f"10.200.0.{TUNNELLED.index(name) + 2}/24"
        assert f"Address = {address}\n" in conf
        assert "PublicKey = L9/htaddxvN6QFRHm9vBHTYuy8Q6EuO8Y9zGtfwTd3g=\n" in conf
        assert "AllowedIPs = 10.200.0.0/24\n" in conf and "Endpoint = 192.0.2.1:51820\n" in conf


# --- the real wg tools ------------------------------------------------------------------------------


@pytest.fixture
def wg_namespace():
    need_wireguard_tools()
    ns = WireguardNamespace(f"bastion-wg-{os.getpid()}")
    yield ns
    ns.close()


def parse_showconf(text: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    interface: dict[str, str] = {}
    peers: list[dict[str, str]] = []
    section = None
    for line in text.splitlines():
        line = line.strip()
        if line in ("[Interface]", "[Peer]"):
            section = interface if line == "[Interface]" else {}
            if line == "[Peer]":
                peers.append(section)
        elif "=" in line and section is not None:
            key, _, value = line.partition("=")
            section[key.strip()] = value.strip()
    return interface, peers


@pytest.mark.netns
def test_the_wg_tools_read_each_node_config(lab, wg_namespace, tmp_path):
    _, store, configs = lab
    for i, name in enumerate(TUNNELLED):
        conf = tmp_path / "wg0.conf"
        conf.write_text(contents(files_of(configs[name])["/etc/wireguard/wg0.conf"]))
        stripped = subprocess.run(["wg-quick", "strip", str(conf)], check=False, capture_output=True, text=True, timeout=30)
        assert stripped.returncode == 0, stripped.stderr
        assert "Address" not in stripped.stdout  # wg-quick's own keys are gone, wg's remain
        iface = f"bwg{os.getpid() % 100000}n{i}"
        wg_namespace.add(iface)
        wg_namespace.wg("setconf", iface, "/dev/stdin", input=stripped.stdout)
        interface, peers = parse_showconf(wg_namespace.wg("showconf", iface))
        assert interface["PrivateKey"] == store.get(f"wireguard/{name}.key")
        assert peers == [{
            "PublicKey": "L9/htaddxvN6QFRHm9vBHTYuy8Q6EuO8Y9zGtfwTd3g=",
            "AllowedIPs": "10.200.0.0/24",
            "Endpoint": "192.0.2.1:51820",
            "PersistentKeepalive": "25",
        }]  # fmt: skip
        assert wg_namespace.wg("show", iface, "public-key").strip() == wireguard_public_key(interface["PrivateKey"])


@pytest.mark.netns
def test_the_management_side_peer_list_matches_the_nodes(lab, wg_namespace):
    site_dir, store, _ = lab
    r = subprocess.run(
        [str(REPO / ".venv/bin/bastion"), "cluster", "peers", "--site", str(site_dir),
         "--secrets-dir", str(store.root)],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    private = wireguard_private_key()
    assert not any(store.get(n) in r.stdout for n in store.names() if not is_record(n))  # public keys only
    iface = f"bwg{os.getpid() % 100000}m"
    wg_namespace.add(iface)
    wg_namespace.wg("setconf", iface, "/dev/stdin", input=f"[Interface]\nPrivateKey = {private}\n{r.stdout}")
    _, peers = parse_showconf(wg_namespace.wg("showconf", iface))
    want = {wireguard_public_key(store.get(f"wireguard/{n}.key")): f"10.200.0.{i + 2}/32" for i, n in enumerate(TUNNELLED)}
    assert {p["PublicKey"]: p["AllowedIPs"] for p in peers} == want


# --- the public endpoints ----------------------------------------------------------------------------


def test_the_public_endpoints_never_hand_out_a_secret(tmp_path, monkeypatch, client_for):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    site_dir = make_home_lab(tmp_path)
    site = load_site(site_dir)
    from bastion.state.secrets import default_secrets_dir

    store = SecretStore(default_secrets_dir(site.name))  # the store the controller would use
    values = []
    for m in site.machines:
        s = machine_secrets(store, site, m)
        values += [s["k3s_token"], s.get("k3s_agent_token", s["k3s_token"])]
        if "wireguard" in s:
            values.append(s["wireguard"]["private_key"])
    client = client_for(site_dir)
    for m in site.machines:
        mac = m.mac.replace(":", "-")
        r = client.get(f"/ignition?mac={mac}")
        assert r.status_code == 403, r.text
        assert "one-time URL" in r.text
        for path in (f"/ignition?mac={mac}", f"/ipxe?mac={mac}", f"/metadata?mac={mac}",
                     "/api/v1/machines", f"/api/v1/machines/{m.name}", "/api/v1/groups"):  # fmt: skip
            text = client.get(path).text
            assert not any(v in text for v in values), path


# --- what the loader refuses -----------------------------------------------------------------------


def _edited(tmp_path: Path, site_edit=None, machines_edit=None) -> Path:
    site = make_home_lab(tmp_path)
    for name, edit in (("site.yaml", site_edit), ("machines.yaml", machines_edit)):
        if edit:
            path = site / name
            path.write_text(edit(path.read_text()))
    return site


def _problems(site: Path) -> list[str]:
    with pytest.raises(SiteError) as e:
        load_site(site)
    return e.value.problems


@pytest.mark.parametrize(("site_edit", "machines_edit", "problem"), [
    (lambda t: t.replace("  flatcar:\n", "  flatcar:\n    chanel: beta\n"), None,
     "site.yaml:37: cluster.flatcar.chanel: is not a known field"),
    (lambda t: t.replace("    persistent_keepalive: 25", "    keepalive: 25"), None,
     "site.yaml:53: cluster.wireguard.keepalive: is not a known field"),
    (None, lambda t: t.replace("    disk: /dev/disk/by-id/usb-Samsung_Portable_SSD_T7_S5T2NS0W100002-0:0\n", "    disk: /dev/sdb\n"),
     "machines.yaml:21: machines[1].disk.device: '/dev/sdb' is not a stable device name: use /dev/disk/by-id/"),
    (None, lambda t: t.replace("    disk: /dev/disk/by-id/usb-Samsung_Portable_SSD_T7_S5T2NS0W100003-0:0\n", ""),
     "machines.yaml:25: machines[2].disk: a server needs its disk"),
    (None, lambda t: t.replace("    address: 192.168.1.21  # its DHCP reservation: the cluster's join URL\n", ""),
     "machines.yaml:5: machines[0].address: pi1 starts the cluster: give it its fixed address"),
    (None, lambda t: t.replace("    k3s:\n      node_labels:", "    k3s:\n      init: true\n      node_labels:", 1),
     "machines.yaml:42: machines[3].k3s.init: only a server can start the cluster"),
    (None, lambda t: t.replace("    arch: amd64\n    role: agent\n    address: 192.168.1.31", "    role: agent\n    address: 192.168.1.31"),
     "machines.yaml:35: machines[3].arch: a k3s node needs arch: amd64 or arm64"),
    (None, lambda t: t.replace("    wireguard: false ", "    wireguard: {address: 10.200.0.7}\n    #").replace(
        "    relay: 0\n", "    relay: 0\n    wireguard: {address: 10.200.0.7}\n"),
     "machines.yaml:52: machines[4].wireguard.address: 10.200.0.7 is taken by pi1"),
    (None, lambda t: t.replace("    wireguard: false ", "    wireguard: {address: 10.200.0.1}\n    #"),
     "machines.yaml:51: machines[4].wireguard.address: 10.200.0.1 is taken by the management side"),
    (None, lambda t: t.replace("    wireguard: false ", "    wireguard: {address: 10.201.0.9}\n    #"),
     "machines.yaml:51: machines[4].wireguard.address: 10.201.0.9 is not a host address of 10.200.0.0/24"),
    (lambda t: t.replace("    server_args:", f"    sha256:\n      arm46: {'a' * 64}\n    server_args:"), None,
     "site.yaml:31: cluster.k3s.sha256: 'arm46' is not a k3s architecture"),
    (lambda t: t.replace("    server_args:", f"    sha256:\n      arm64: {'a' * 64}\n    server_args:"), None,
     f"site.yaml: cluster.k3s.sha256.arm64: {'a' * 64} is not the SHA-256 that k3s v1.31.4+k3s1's own sha256sum-arm64.txt gives"),
    (lambda t: t.replace("    version: v1.31.4+k3s1", "    version: v1.31"), None,
     "site.yaml:24: cluster.k3s.version: 'v1.31' is not a k3s release name"),
    (lambda t: t.replace("    public_key: L9/", "    public_key: L9"), None,
     "site.yaml:52: cluster.wireguard.public_key: 'L9htadd"),
    (lambda t: t.replace("    address_pool: 10.200.0.0/24", "    address_pool: 10.200.0.1/24"), None,
     "site.yaml:50: cluster.wireguard.address_pool: '10.200.0.1/24' is not a network"),
    (lambda t: t.replace("cluster:\n  name: home\n", "cluster:\n  name: Home\n"), None,
     "site.yaml:22: cluster.name: 'Home' is not a cluster name"),
    (lambda t: t.replace("    url: http://192.168.1.10:5000", "    url: 192.168.1.10:5000"), None,
     "site.yaml:44: cluster.registry_cache.url: '192.168.1.10:5000' is not an http(s) URL"),
    # WireGuard drops a peer's packets from outside its AllowedIPs: the handshake completes and
    # the management side can reach nothing
    (lambda t: t.replace("    persistent_keepalive: 25", "    persistent_keepalive: 25\n    allowed_ips: [10.96.0.0/12]"), None,
     "site.yaml:50: cluster.wireguard: allowed_ips: 10.96.0.0/12 leaves out the management side's address 10.200.0.1"),
    (lambda t: t.replace("    controller: {}", "    controller: {allowed_ips: [10.200.0.128/25]}"), None,
     "site.yaml:50: cluster.wireguard: controller.allowed_ips: 10.200.0.128/25 leaves out the management side's address"),
    # the instance of wg-quick@: systemd cannot load wg-quick@wg+0.service
    (lambda t: t.replace("    persistent_keepalive: 25", "    persistent_keepalive: 25\n    interface: wg+0"), None,
     "site.yaml:54: cluster.wireguard.interface: 'wg+0' is not an interface name"),
    (lambda t: t.replace("    controller: {}", "    controller: {interface: 'wg=b'}"), None,
     "site.yaml:56: cluster.wireguard.controller.interface: 'wg=b' is not an interface name"),
    # joined into the mount unit's Options= line, a line break started a section
    (lambda t: t.replace("    format: ext4", "    format: ext4\n    mount_options: [noatime, \"x\\n[Install]\\nWantedBy=foo\"]"), None,
     "site.yaml:61: cluster.disk.mount_options: 'x\\n[Install]\\nWantedBy=foo' is not a mount option"),
])  # fmt: skip
def test_mistakes_name_the_file_line_and_field(tmp_path, site_edit, machines_edit, problem):
    problems = _problems(_edited(tmp_path, site_edit, machines_edit))
    assert any(p.startswith(problem) for p in problems), problems


def test_two_servers_marked_init_is_an_error(tmp_path):
    def edit(t):
        return t.replace("    relay: 0\n", "    relay: 0\n    k3s: {init: true}\n").replace(
            "    relay: 1\n", "    relay: 1\n    k3s: {init: true}\n")  # fmt: skip

    assert _problems(_edited(tmp_path, None, edit)) == [
        "machines.yaml:22: machines[1].k3s.init: machine pi1 starts the cluster already"
    ]


def test_a_marked_server_starts_the_cluster_and_server_url_wins(tmp_path):
    site_dir = _edited(
        tmp_path,
        lambda t: t.replace("  # server_url: https://k3s.home.arpa:6443", "  server_url: https://k3s.home.arpa:6443"),
        lambda t: t.replace("    relay: 2\n", "    relay: 2\n    k3s: {init: true}\n"),
    )  # fmt: skip
    site = load_site(site_dir)
    nodes = {m.name: m.node for m in site.cluster_nodes}
    assert [n for n, node in nodes.items() if node["init"]] == ["pi3"]
    assert nodes["pi1"]["exec"][2:4] == ["--server", "https://k3s.home.arpa:6443"]
    assert "--cluster-init" in nodes["pi3"]["exec"]
    assert nodes["pi3"]["exec"][nodes["pi3"]["exec"].index("--tls-san") + 1] == "k3s.home.arpa"


def test_cluster_fields_without_a_cluster_are_errors(tmp_path):
    site = tmp_path / "s"
    shutil.copytree(EXAMPLES / "site", site)
    text = (site / "machines.yaml").read_text().replace("    relay: 0\n", "    relay: 0\n    disk: /dev/disk/by-id/usb-x\n")
    (site / "machines.yaml").write_text(text)
    assert "machines.yaml:9: machines[0].disk: needs a site.yaml cluster: section (and role server or agent)" in _problems(site)


def test_a_site_overrides_the_built_in_template_and_profile(tmp_path):
    site_dir = make_home_lab(tmp_path)
    (site_dir / "ignition").mkdir()
    builtin = (REPO / "controller/bastion/cluster/k3s.bu").read_text()
    (site_dir / "ignition" / "k3s.bu").write_text(builtin.replace("      mode: 0644\n      overwrite: true\n      contents:\n        inline: {{ machine.hostname | tojson }}",
                                                                  "      mode: 0644\n      overwrite: true\n      contents:\n        inline: {{ (machine.hostname ~ '.home.arpa') | tojson }}"))  # fmt: skip
    (site_dir / "profiles").mkdir()
    (site_dir / "profiles" / "k3s.yaml").write_text(
        "os: flatcar\nkernel: /assets/flatcar/stable/amd64/current/flatcar_production_pxe.vmlinuz\n"
        "arch:\n  arm64:\n    kernel: /assets/flatcar/stable/arm64/current/flatcar_production_pxe.vmlinuz\n"
        "    args:\n      - console=ttyS0,115200\nignition: k3s.bu\n"
    )
    configs = render_all(site_dir, SecretStore(tmp_path / "secrets"))
    assert contents(files_of(configs["pi1"])["/etc/hostname"]) == "pi1.home.arpa"
    site = load_site(site_dir)
    assert site.profiles["k3s"].source == "profiles/k3s.yaml"
    body = boot.ipxe(site, BootRequest({"mac": "dc:a6:32:00:00:01"}, "", CONTROLLER)).body
    assert "console=ttyS0,115200" in body and "ttyAMA0" not in body


def test_machine_secrets_is_empty_for_machines_outside_the_cluster(site_dir, tmp_path):
    site = load_site(site_dir)
    store = SecretStore(tmp_path / "s")
    assert all(machine_secrets(store, site, m) == {} for m in site.machines)
    assert store.names() == []


def test_the_wireguard_keys_are_real_x25519_pairs(lab):
    _, store, _ = lab
    for name in TUNNELLED:
        key = store.get(f"wireguard/{name}.key")
        assert len(base64.b64decode(key)) == 32
        assert len(base64.b64decode(wireguard_public_key(key))) == 32


def test_every_node_beats_its_name_boot_id_and_k3s_state_to_the_controller(tmp_path, serve):
    """The k3s Butane's heartbeat script, run here with sh and curl against a real `bastion
    serve`: the controller records the node's first beat of a boot, and only that."""
    site_dir = make_home_lab(tmp_path)
    text = (site_dir / "machines.yaml").read_text()
    # pi1 beats from here, and a machine that declares `address:` is heard only from there: the
    # copy's LAN is loopback's, pi1 at 127.0.0.1
    site_yaml = site_dir / "site.yaml"
    site_yaml.write_text(site_yaml.read_text().replace("192.168.1.", "127.0.0."))
    text = text.replace("192.168.1.", "127.0.0.").replace("address: 127.0.0.21 ", "address: 127.0.0.1 ")
    (site_dir / "machines.yaml").write_text(
        text.replace("    relay: 3\n", "    relay: 3\n    heartbeat: {timeout_s: 30, boot_s: 600}\n"))
    server = serve(site_dir)
    site = load_site(site_dir)
    store = SecretStore(tmp_path / "secrets")
    configs = {}
    for m in site.cluster_nodes:
        group, profile = boot.select(site, {"mac": m.mac})
        req = BootRequest({"mac": m.mac}, f"mac={m.mac}", server.url)
        configs[m.name] = render_ignition(site, group, profile, req, machine_secrets(store, site, m))
    for name, config in configs.items():
        units = units_of(config)
        timer = units["bastion-heartbeat.timer"]
        assert timer["enabled"] is True
        every = "10s" if name == "nuc1" else "30s"  # a third of nuc1's timeout_s; else 30 s
        assert f"OnUnitActiveSec={every}" in timer["contents"]
        assert "ExecStart=/opt/bin/bastion-heartbeat" in units["bastion-heartbeat.service"]["contents"]
        assert files_of(config)["/opt/bin/bastion-heartbeat"]["mode"] == 0o755
    script = contents(files_of(configs["pi1"])["/opt/bin/bastion-heartbeat"])
    assert script.startswith("#!/bin/sh\n") and "mac=dc:a6:32:00:00:01\n" in script
    for _ in range(3):  # three beats of one boot
        r = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
    beats = server.get("/api/v1/events", params={"kind": "heartbeat"}).json()
    assert len(beats) == 1, beats
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert beats[0]["machine"] == "pi1" and beats[0]["source"] == "node"
    assert beats[0]["payload"]["node"] == "pi1" and beats[0]["payload"]["boot_id"] == boot_id
    assert beats[0]["payload"]["news"] == "boot"


def test_logs_journal_runs_systemd_journal_upload_to_the_controller(tmp_path):
    """site.yaml logs.journal: every node's Flatcar sends its journal to the controller's
    /journal/upload with the systemd-journal-upload Flatcar ships (docs/logs.md)."""
    site = make_home_lab(tmp_path, endpoint="192.0.2.1:51820")
    store = SecretStore(tmp_path / "secrets")
    without = render_all(site, store)
    assert all("systemd-journal-upload.service" not in units_of(c) for c in without.values())
    with open(site / "site.yaml", "a") as f:
        f.write("\nlogs:\n  journal: true\n")
    for name, config in render_all(site, store).items():
        assert units_of(config)["systemd-journal-upload.service"]["enabled"] is True, name
        conf = contents(files_of(config)["/etc/systemd/journal-upload.conf.d/edge-bastion.conf"])
        assert conf == f"[Upload]\nURL={CONTROLLER}/journal\n"
        assert_valid_ignition(config, tmp_path)
