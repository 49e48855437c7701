"""Several sites that dial one management endpoint: `bastion tunnel management-config --site A
--site B` gives the management side one interface with every site's peers.

Each site's config alone was a whole [Interface] listening on the endpoint's port, so the second
site's `wg-quick up` on the same host failed ("Address already in use"). Shown here on the
configs, and with the real wg-quick in network namespaces on 10.92.x addresses:

    ebws<N>m  the management side: the two sites' one interface under `wg-quick up`
    ebws<N>a  site a's controller host: `bastion tunnel controller-config` under `wg-quick up`
    ebws<N>b  site b's, likewise

on one underlay, a bridge in the management namespace (10.92.0.0/24). Every namespace goes, with
every process in it (wireguard-go) stopped by PID, however the test ends."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from bastion.cli import main
from bastion.state.secrets import (
    CONTROLLER_WIREGUARD_KEY,
    SecretStore,
    wireguard_private_key,
    wireguard_public_key,
)
from click.testing import CliRunner
from netkit import need_root, need_wireguard_tools
from test_tunnel import K3S_VERSION, Tunnels, answers, sections, wait_for

STEM = f"ebws{os.getpid() % 100000}"
ENDPOINT = "10.92.0.1:51820"
UNDERLAY = {"m": "10.92.0.1", "a": "10.92.0.2", "b": "10.92.0.3"}
POOLS = {"a": "10.92.1.0/24", "b": "10.92.2.0/24"}


def make_site(root: Path, name: str, pool: str, mgmt_public: str, mac: str, endpoint: str = ENDPOINT) -> Path:
    """A site of one k3s server and a controller tunnel, meeting the management side at
    `endpoint`. Its k3s binary is a stand-in with its own SHA-256: nothing downloads it."""
    site = root / name
    binary = site / "assets" / "k3s" / K3S_VERSION / "amd64" / "k3s"
    binary.parent.mkdir(parents=True)
    binary.write_bytes(b"a stand-in for the k3s binary\n")
    (site / "site.yaml").write_text(f"""\
site: {name}
controller_url: http://192.0.2.10:8080
cluster:
  name: {name}
  k3s:
    version: {K3S_VERSION}
    sha256: {{amd64: {hashlib.sha256(binary.read_bytes()).hexdigest()}}}
  wireguard:
    interface: {STEM}n
    address_pool: {pool}
    endpoint: {endpoint}
    public_key: {mgmt_public}
    controller: {{interface: {STEM}{name}}}
""")
    (site / "machines.yaml").write_text(f"""\
machines:
  - name: edge1
    mac: {mac}
    arch: amd64
    role: server
    address: 192.0.2.{20 + ord(name[0]) % 2}
    disk: /dev/disk/by-id/usb-stand-in-0:0
""")
    return site


def bastion(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def two_sites(tmp_path):
    """(site a, site b, their stores, the management side's private key), every key made."""
    mgmt = wireguard_private_key()
    sites = {k: make_site(tmp_path, k, POOLS[k], wireguard_public_key(mgmt), f"52:54:00:92:00:0{i}")
             for i, k in enumerate("ab")}  # fmt: skip
    stores = {k: SecretStore(tmp_path / f"secrets-{k}") for k in "ab"}
    for store in stores.values():  # each site's own, as its controller keeps it
        for name in (CONTROLLER_WIREGUARD_KEY, "wireguard/edge1.key"):
            store.put(name, wireguard_private_key())
    return sites, stores, mgmt


def shared_config(sites, stores, key_file: str = "/etc/wireguard/mgmt.key"):
    return bastion("tunnel", "management-config", "--site", str(sites["a"]), "--site", str(sites["b"]),
                   "--secrets-dir", str(stores["a"].root), "--secrets-dir", str(stores["b"].root),
                   "--private-key-file", key_file)  # fmt: skip


def public(store: SecretStore, name: str) -> str:
    return wireguard_public_key(store.get(name))


def test_two_sites_on_one_endpoint_are_one_interface_with_every_peer(two_sites):
    sites, stores, _ = two_sites
    r = shared_config(sites, stores)
    assert r.exit_code == 0, r.output
    interface, *peers = sections(r.stdout)
    assert interface == {"": "[Interface]", "Address": "10.92.1.1/24, 10.92.2.1/24", "ListenPort": "51820",
                         "PostUp": "wg set %i private-key /etc/wireguard/mgmt.key"}  # fmt: skip
    assert peers == [
        {"": "[Peer]", "PublicKey": public(stores["a"], CONTROLLER_WIREGUARD_KEY), "AllowedIPs": "10.92.1.254/32"},
        {"": "[Peer]", "PublicKey": public(stores["a"], "wireguard/edge1.key"), "AllowedIPs": "10.92.1.2/32"},
        {"": "[Peer]", "PublicKey": public(stores["b"], CONTROLLER_WIREGUARD_KEY), "AllowedIPs": "10.92.2.254/32"},
        {"": "[Peer]", "PublicKey": public(stores["b"], "wireguard/edge1.key"), "AllowedIPs": "10.92.2.2/32"},
    ]  # fmt: skip
    # one site alone is what it always was: its own address, its own peers
    alone = bastion("tunnel", "management-config", "--site", str(sites["a"]), "--secrets-dir", str(stores["a"].root),
                    "--private-key-file", "/etc/wireguard/mgmt.key")  # fmt: skip
    assert alone.exit_code == 0, alone.output
    assert sections(alone.stdout) == [{**interface, "Address": "10.92.1.1/24"}, *peers[:2]]


def rewrite(site: Path, old: str, new: str) -> None:
    path = site / "site.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


OVERLAP = ("sites a and b: their address pools 10.92.1.0/24 and 10.92.0.0/16 overlap: on one "
           "interface their peers' addresses would collide; give each site a pool of its own "
           "(site.yaml cluster.wireguard.address_pool)")  # fmt: skip
PORTS = "the sites' endpoints have different ports (a: 51820, b: 51821): one interface listens on one port"


@pytest.mark.parametrize(("old", "new", "problem"), [
    (POOLS["b"], "10.92.0.0/16", OVERLAP),
    (POOLS["b"], POOLS["a"], "sites a and b: their address pools 10.92.1.0/24 and 10.92.1.0/24 overlap"),
    (ENDPOINT, "10.92.0.1:51821", PORTS),
    ("public_key", None, "the sites name different management public keys (a: "),  # None: another key
], ids=["pools-overlap", "same-pool", "ports-differ", "keys-differ"])  # fmt: skip
def test_sites_that_cannot_share_the_interface_are_refused(two_sites, old, new, problem):
    sites, stores, mgmt = two_sites
    if new is None:
        old, new = wireguard_public_key(mgmt), wireguard_public_key(wireguard_private_key())
    rewrite(sites["b"], old, new)
    r = shared_config(sites, stores)
    assert r.exit_code == 1, r.output
    assert r.stdout == ""
    assert r.stderr.startswith("Error: these sites cannot share one management interface:\n"), r.stderr
    assert problem in r.stderr, r.stderr


def test_one_store_for_two_sites_is_refused(two_sites):
    """Their controllers would have one key: WireGuard would take them for one peer."""
    sites, stores, _ = two_sites
    r = bastion("tunnel", "management-config", "--site", str(sites["a"]), "--site", str(sites["b"]),
                "--secrets-dir", str(stores["a"].root), "--secrets-dir", str(stores["a"].root))  # fmt: skip
    assert r.exit_code == 1, r.output
    key = public(stores["a"], CONTROLLER_WIREGUARD_KEY)
    assert f"a's controller and b's controller have the public key {key}" in r.stderr, r.stderr


def test_the_stores_are_one_per_site(two_sites, monkeypatch):
    sites, stores, _ = two_sites
    r = bastion("tunnel", "management-config", "--site", str(sites["a"]), "--site", str(sites["b"]),
                "--secrets-dir", str(stores["a"].root))  # fmt: skip
    assert r.exit_code == 2 and "give one --secrets-dir per --site, in the same order" in r.output, r.output
    monkeypatch.setenv("BASTION_SECRETS_DIR", str(stores["a"].root))
    r = bastion("tunnel", "management-config", "--site", str(sites["a"]), "--site", str(sites["b"]))
    assert r.exit_code == 2 and "BASTION_SECRETS_DIR names one secret store" in r.output, r.output
    # with one site it is that site's store, as before
    r = bastion("tunnel", "management-config", "--site", str(sites["a"]))
    assert r.exit_code == 0, r.output
    assert sections(r.stdout)[1]["PublicKey"] == public(stores["a"], CONTROLLER_WIREGUARD_KEY)


class SharedEndpoint(Tunnels):
    """The management namespace and the two controllers' on one underlay bridge (in the
    management namespace)."""

    roles, stem, underlay = "mab", STEM, UNDERLAY


@pytest.mark.netns
def test_both_sites_controllers_handshake_with_the_one_interface(two_sites, tmp_path):
    need_root()
    need_wireguard_tools()
    sites, stores, mgmt = two_sites
    key_file = tmp_path / "mgmt.key"
    key_file.write_text(mgmt + "\n")
    key_file.chmod(0o600)
    r = shared_config(sites, stores, str(key_file))
    assert r.exit_code == 0, r.output
    confs = {"m": r.stdout}
    for k in "ab":
        c = bastion("tunnel", "controller-config", "--site", str(sites[k]), "--secrets-dir", str(stores[k].root))
        assert c.exit_code == 0, c.output
        confs[k] = c.stdout
    tunnels = SharedEndpoint()
    try:
        tunnels.up()
        for role in "mab":  # the management side first
            conf = tmp_path / f"{STEM}{role}.conf"
            conf.write_text(confs[role])
            conf.chmod(0o600)
            tunnels.ns[role].quick_up(conf)

        # each site's controller reaches the management side at its own pool's address
        for role, mgmt_ip in (("a", "10.92.1.1"), ("b", "10.92.2.1")):
            wait_for(f"site {role}'s controller reaches {mgmt_ip}",
                     lambda role=role, ip=mgmt_ip: answers(tunnels, role, ip))  # fmt: skip
        seen = tunnels.ns["m"].latest_handshakes(f"{STEM}m")
        controllers = {public(stores[k], CONTROLLER_WIREGUARD_KEY) for k in "ab"}
        nodes = {public(stores[k], "wireguard/edge1.key") for k in "ab"}
        assert set(seen) == controllers | nodes  # every peer of both sites on the one interface
        assert all(seen[k] > 0 for k in controllers), seen
        assert not any(seen[k] for k in nodes)  # no node runs here
        listed = tunnels.ns["m"].wg("show", f"{STEM}m", "allowed-ips").splitlines()
        allowed = dict(line.split("\t") for line in listed)
        assert allowed == {public(stores["a"], CONTROLLER_WIREGUARD_KEY): "10.92.1.254/32",
                           public(stores["a"], "wireguard/edge1.key"): "10.92.1.2/32",
                           public(stores["b"], CONTROLLER_WIREGUARD_KEY): "10.92.2.254/32",
                           public(stores["b"], "wireguard/edge1.key"): "10.92.2.2/32"}  # fmt: skip
    finally:
        tunnels.close()
