"""The tunnels to the management cluster (bastion.cluster.tunnel, `bastion tunnel ...`), shown
working with the real WireGuard tools in network namespaces on 10.90.x addresses:

    ebwg<N>m  the management side: `bastion tunnel management-config` under `wg-quick up`
    ebwg<N>c  the controller host: `bastion tunnel controller-config` under `wg-quick up`, and the
              real `bastion serve` listening on its tunnel address only
    ebwg<N>n  a k3s node: its rendered Ignition's /etc/wireguard/<interface>.conf under `wg-quick up`
    ebwg<N>s  a stranger: a fresh key the site never heard of, aimed at the same endpoint

on one underlay, a bridge in the management namespace (10.90.0.0/24). wg-quick uses the kernel's
WireGuard where there is the module, else wireguard-go (this machine's kernel has none). Every
namespace goes, with every process in it stopped by PID, however the test ends."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml
from bastion import boot
from bastion.cli import main
from bastion.model import BootRequest
from bastion.render.config import render_ignition
from bastion.site.load import load_site
from bastion.state.secrets import (
    CONTROLLER_WIREGUARD_KEY,
    SecretStore,
    is_record,
    machine_secrets,
    wireguard_private_key,
    wireguard_public_key,
)
from click.testing import CliRunner
from netkit import WireguardNamespace, need_root, need_tool, need_wireguard_tools

K3S_VERSION = "v1.31.4+k3s1"
STEM = f"ebwg{os.getpid() % 100000}"
IF_MGMT, IF_CTL, IF_NODE, IF_STRANGER = (f"{STEM}{x}" for x in "mcns")
UNDERLAY = {"m": "10.90.0.1", "c": "10.90.0.2", "n": "10.90.0.3", "s": "10.90.0.4"}
POOL = "10.90.1.0/24"
MGMT_TUNNEL, NODE_TUNNEL, CTL_TUNNEL = "10.90.1.1", "10.90.1.2", "10.90.1.254"
TOKEN = "tunnel-test-token-0123456789abcdef"
API = 8080


def make_site(root: Path, management_public_key: str, controller: str = f"{{interface: {IF_CTL}}}") -> Path:
    """A site of one k3s server whose tunnels meet the management side at 10.90.0.1:51820. Its
    k3s binary is a stand-in file with its own SHA-256: no node downloads it here."""
    site = root / "site"
    binary = site / "assets" / "k3s" / K3S_VERSION / "amd64" / "k3s"
    binary.parent.mkdir(parents=True)
    binary.write_bytes(b"a stand-in for the k3s binary\n")
    (site / "site.yaml").write_text(f"""\
site: tunnel-lab
controller_url: http://10.90.0.2:{API}
cluster:
  name: tunnel
  k3s:
    version: {K3S_VERSION}
    sha256: {{amd64: {hashlib.sha256(binary.read_bytes()).hexdigest()}}}
  wireguard:
    interface: {IF_NODE}
    address_pool: {POOL}
    endpoint: {UNDERLAY["m"]}:51820
    public_key: {management_public_key}
    controller: {controller}
""")
    (site / "machines.yaml").write_text("""\
machines:
  - name: edge1
    mac: 52:54:00:90:00:03
    arch: amd64
    role: server
    address: 10.90.0.3
    disk: /dev/disk/by-id/usb-stand-in-0:0
""")
    return site


def bastion(*args: str) -> str:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


def node_wg_conf(site_dir: Path, store: SecretStore, name: str) -> str:
    """The node's wg-quick config, as its rendered Ignition writes it."""
    site = load_site(site_dir)
    m = next(m for m in site.machines if m.name == name)
    group, profile = boot.select(site, {"mac": m.mac})
    req = BootRequest({"mac": m.mac}, f"mac={m.mac}", f"http://10.90.0.2:{API}")
    config = render_ignition(site, group, profile, req, machine_secrets(store, site, m))
    files = {f["path"]: f for f in config["storage"]["files"]}
    source = files[f"/etc/wireguard/{IF_NODE}.conf"]["contents"]["source"]
    return urllib.parse.unquote(source.removeprefix("data:,"))


def sections(conf: str) -> list[dict[str, str]]:
    """A wg-quick config's sections, each {"": "[Interface]"/"[Peer]", key: value}."""
    out: list[dict[str, str]] = []
    for line in conf.splitlines():
        line = line.strip()
        if line.startswith("["):
            out.append({"": line})
        elif "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[-1][key.strip()] = value.strip()
    return out


# --- the configs -----------------------------------------------------------------------------------


def make_keys(site_dir: Path, store: SecretStore) -> None:
    """`bastion tunnel make-keys`: the other tunnel commands only read keys (test_tunnel_keys.py)."""
    bastion("tunnel", "make-keys", "--site", str(site_dir), "--secrets-dir", str(store.root))


@pytest.fixture
def site(tmp_path):
    """(site dir, store, the management side's private key)"""
    mgmt = wireguard_private_key()
    return make_site(tmp_path, wireguard_public_key(mgmt)), SecretStore(tmp_path / "secrets"), mgmt


def test_the_controller_config_names_its_key_in_the_store_and_holds_none(site):
    site_dir, store, mgmt = site
    make_keys(site_dir, store)
    conf = bastion("tunnel", "controller-config", "--site", str(site_dir), "--secrets-dir", str(store.root))
    key = store.get(CONTROLLER_WIREGUARD_KEY)
    assert key and key not in conf  # made once in the store, never printed
    assert stat.S_IMODE(store.path(CONTROLLER_WIREGUARD_KEY).stat().st_mode) == 0o600
    again = bastion("tunnel", "controller-config", "--site", str(site_dir), "--secrets-dir", str(store.root))
    assert again == conf and store.get(CONTROLLER_WIREGUARD_KEY) == key
    interface, peer = sections(conf)
    assert interface == {"": "[Interface]", "Address": f"{CTL_TUNNEL}/24",
                         "PostUp": f"wg set %i private-key {store.path(CONTROLLER_WIREGUARD_KEY)}"}  # fmt: skip
    assert peer == {"": "[Peer]", "PublicKey": wireguard_public_key(mgmt), "Endpoint": "10.90.0.1:51820",
                    "AllowedIPs": POOL, "PersistentKeepalive": "25"}  # fmt: skip
    shown = bastion("tunnel", "show", "--site", str(site_dir), "--secrets-dir", str(store.root))
    assert f"public key  {wireguard_public_key(key)}" in shown and key not in shown


def test_a_store_path_the_shell_would_split_is_quoted_in_postup(site, tmp_path):
    # wg-quick runs PostUp through bash: a space split the path ("fopen: No such file"), a `$`
    # or `;` in it would have run
    site_dir, _, _ = site
    store = SecretStore(tmp_path / "sp ace;$(x)" / "store")
    make_keys(site_dir, store)
    conf = bastion("tunnel", "controller-config", "--site", str(site_dir), "--secrets-dir", str(store.root))
    post_up = sections(conf)[0]["PostUp"]
    assert post_up == "wg set %i private-key " + shlex.quote(str(store.path(CONTROLLER_WIREGUARD_KEY)))
    assert shlex.split(post_up.replace("%i", "wg0"))[-1] == str(store.path(CONTROLLER_WIREGUARD_KEY))


def test_a_damaged_key_in_the_store_is_one_line_naming_the_file(site):
    site_dir, store, _ = site
    make_keys(site_dir, store)
    store.path(CONTROLLER_WIREGUARD_KEY).write_text("garbage\n")
    for cmd in ("show", "controller-config", "management-config"):
        r = CliRunner().invoke(main, ["tunnel", cmd, "--site", str(site_dir), "--secrets-dir", str(store.root)])
        assert r.exit_code == 1, r.output
        assert r.output.startswith(f"Error: {store.path(CONTROLLER_WIREGUARD_KEY)}: a WireGuard private "
                                   "key is 32 bytes in base64, and this is not one: restore it"), (cmd, r.output)
        assert len(r.output.strip().splitlines()) == 1


def test_the_management_config_has_every_peer_at_its_own_address_only(site):
    site_dir, store, _ = site
    make_keys(site_dir, store)
    conf = bastion("tunnel", "management-config", "--site", str(site_dir), "--secrets-dir", str(store.root),
                   "--private-key-file", "/etc/wireguard/mgmt.key")  # fmt: skip
    assert not any(store.get(n) in conf for n in store.names() if not is_record(n))  # public keys only
    interface, *peers = sections(conf)
    assert interface == {"": "[Interface]", "Address": f"{MGMT_TUNNEL}/24", "ListenPort": "51820",
                         "PostUp": "wg set %i private-key /etc/wireguard/mgmt.key"}  # fmt: skip
    assert peers == [
        {"": "[Peer]", "PublicKey": wireguard_public_key(store.get(CONTROLLER_WIREGUARD_KEY)),
         "AllowedIPs": f"{CTL_TUNNEL}/32"},
        {"": "[Peer]", "PublicKey": wireguard_public_key(store.get("wireguard/edge1.key")),
         "AllowedIPs": f"{NODE_TUNNEL}/32"},
    ]  # fmt: skip


def test_the_controller_address_is_never_a_nodes(tmp_path):
    """A node pinned to the controller's address is refused; a pinned controller address moves
    the controller, not the nodes."""
    site_dir = make_site(tmp_path, wireguard_public_key(wireguard_private_key()), controller="{address: 10.90.1.2}")
    site = load_site(site_dir)
    assert site.cluster_nodes[0].node["wireguard"]["ip"] == "10.90.1.3"
    text = (site_dir / "machines.yaml").read_text() + "    wireguard: {address: 10.90.1.2}\n"
    (site_dir / "machines.yaml").write_text(text)
    r = CliRunner().invoke(main, ["site", "check", str(site_dir)])
    assert r.exit_code != 0
    assert "10.90.1.2 is taken by the controller host" in r.output


def test_a_site_without_a_controller_tunnel_says_how_to_get_one(tmp_path):
    site_dir = make_site(tmp_path, wireguard_public_key(wireguard_private_key()))
    text = (site_dir / "site.yaml").read_text().replace(f"    controller: {{interface: {IF_CTL}}}\n", "")
    (site_dir / "site.yaml").write_text(text)
    r = CliRunner().invoke(main, ["tunnel", "show", "--site", str(site_dir), "--secrets-dir", str(tmp_path / "s")])
    assert r.exit_code == 1 and "controller: {}" in r.output


# --- the tunnels, end to end ------------------------------------------------------------------------


class Tunnels:
    """The four namespaces on one underlay bridge (in the management namespace)."""

    roles = "mcns"  # the management side first, then those on the bridge it holds
    stem, underlay = STEM, UNDERLAY  # namespace names, and each role's underlay address

    def __init__(self):
        self.ns: dict[str, WireguardNamespace] = {}

    def up(self) -> None:
        for role in self.roles:
            self.ns[role] = WireguardNamespace(f"{self.stem}{role}")
        m = self.ns["m"].ns
        m.ip("link", "add", "br0", "type", "bridge")
        m.ip("addr", "add", f"{self.underlay['m']}/24", "dev", "br0")
        m.ip("link", "set", "br0", "up")
        for role in self.roles[1:]:
            peer = self.ns[role].ns
            m.veth(f"v{role}", peer, "u0")
            m.ip("link", "set", f"v{role}", "master", "br0")
            m.ip("link", "set", f"v{role}", "up")
            peer.ip("addr", "add", f"{self.underlay[role]}/24", "dev", "u0")
            peer.ip("link", "set", "u0", "up")

    def run(self, role: str, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return self.ns[role].ns.run(*cmd, capture_output=True, text=True, timeout=timeout)

    def close(self) -> None:
        for w in self.ns.values():
            w.close()


def curl(tunnels: Tunnels, role: str, url: str, *extra: str) -> subprocess.CompletedProcess:
    # --noproxy: the machine's proxy settings have nothing to do with these namespaces
    return tunnels.run(role, "curl", "-sS", "--noproxy", "*", "--max-time", "5", *extra, url)


# Whether a TCP connection to a closed port gets its refusal back: the far end's kernel answered
# (through the tunnel, for a tunnel address), where silence or "no route" means it did not.
_PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], 9), timeout=2)
except ConnectionRefusedError:
    sys.exit(0)
except OSError:
    sys.exit(1)
sys.exit(0)
"""


def answers(tunnels: Tunnels, role: str, ip: str) -> bool:
    return tunnels.run(role, sys.executable, "-c", _PROBE, ip).returncode == 0


def wait_for(what: str, ok, timeout: float = 30) -> None:
    """Poll until ok() (a guard against a hang, not a measure of speed)."""
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.2)


@pytest.mark.netns
def test_the_management_side_reaches_the_controller_through_the_tunnel_only(tmp_path):
    need_root("curl")
    need_wireguard_tools()
    mgmt_key = wireguard_private_key()
    site_dir = make_site(tmp_path, wireguard_public_key(mgmt_key))
    store = SecretStore(tmp_path / "secrets")
    key_file = tmp_path / "mgmt.key"
    key_file.write_text(mgmt_key + "\n")
    key_file.chmod(0o600)
    make_keys(site_dir, store)
    confs = {
        "m": bastion("tunnel", "management-config", "--site", str(site_dir), "--secrets-dir",
                     str(store.root), "--private-key-file", str(key_file)),
        "c": bastion("tunnel", "controller-config", "--site", str(site_dir), "--secrets-dir", str(store.root)),
        "n": node_wg_conf(site_dir, store, "edge1"),
        # the stranger: a key of its own, the management side's endpoint and public key
        "s": f"[Interface]\nPrivateKey = {wireguard_private_key()}\nAddress = 10.90.1.77/24\n\n"
             f"[Peer]\nPublicKey = {wireguard_public_key(mgmt_key)}\nEndpoint = 10.90.0.1:51820\n"
             f"AllowedIPs = {POOL}\nPersistentKeepalive = 1\n",
    }  # fmt: skip
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    tunnels = Tunnels()
    try:
        tunnels.up()
        for role in "mcns":  # the management side first: the others' first packets reach it
            conf = tmp_path / f"{STEM}{role}.conf"
            conf.write_text(confs[role])
            conf.chmod(0o600)
            tunnels.ns[role].quick_up(conf)
        log = tmp_path / "serve.log"
        tunnels.ns["c"].ns.start(
            [sys.executable, "-m", "bastion.serve_cli", "serve", "--site", str(site_dir), "--listen",
             f"{CTL_TUNNEL}:{API}", "--token-file", str(token_file), "--db", str(tmp_path / "events.db"),
             "--secrets-dir", str(store.root), "--poll", "0", "--log-level", "warning"],
            name="bastion-serve", log=log, env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")},
        )  # fmt: skip

        # both ends of both tunnels: a handshake once traffic flows
        for role, iface in (("c", IF_CTL), ("n", IF_NODE)):
            wait_for(f"the management side answers through {iface}",
                     lambda role=role: answers(tunnels, role, MGMT_TUNNEL))  # fmt: skip
            (when,) = tunnels.ns[role].latest_handshakes(iface).values()
            assert when > 0, f"{iface}: no handshake"
        seen = tunnels.ns["m"].latest_handshakes(IF_MGMT)
        want = {wireguard_public_key(store.get(CONTROLLER_WIREGUARD_KEY)),
                wireguard_public_key(store.get("wireguard/edge1.key"))}  # fmt: skip
        assert set(seen) == want and all(seen.values()), seen

        # the controller's API through the tunnel
        api = f"http://{CTL_TUNNEL}:{API}"
        wait_for("the controller's API on its tunnel address",
                 lambda: curl(tunnels, "m", f"{api}/healthz").returncode == 0,
                 timeout=60)  # fmt: skip
        r = curl(tunnels, "m", f"{api}/api/v1/site", "-f")
        assert r.returncode == 0, r.stderr + log.read_text()
        assert json.loads(r.stdout)["name"] == "tunnel-lab", r.stdout
        # the management API proper: with the token, and only with it
        reload = f"{api}/api/v1/reload"
        r = curl(tunnels, "m", reload, "-X", "POST", "-H", f"Authorization: Bearer {TOKEN}", "-f")
        assert r.returncode == 0, r.stderr + log.read_text()
        assert json.loads(r.stdout)["ok"] is True, r.stdout
        r = curl(tunnels, "m", reload, "-X", "POST", "-o", "/dev/null", "-w", "%{http_code}")
        assert r.stdout == "401", r.stdout

        # not past the tunnel: nothing listens on the controller's underlay address
        r = curl(tunnels, "m", f"http://{UNDERLAY['c']}:{API}/healthz")
        assert r.returncode == 7, (r.returncode, r.stdout, r.stderr)  # curl: connection refused
        # with the management side's tunnel gone, its tunnel route goes too: no way at all
        tunnels.ns["m"].ns.ip("link", "set", IF_MGMT, "down")
        r = curl(tunnels, "m", f"{api}/healthz")
        assert r.returncode != 0 and not r.stdout, (r.returncode, r.stdout)
        tunnels.ns["m"].ns.ip("link", "set", IF_MGMT, "up")
        assert curl(tunnels, "m", f"{api}/healthz").returncode == 0

        # the stranger: on the same underlay as the others, its packets reach the management
        # side's port, and go nowhere
        assert answers(tunnels, "s", UNDERLAY["m"])
        assert not any(answers(tunnels, "s", MGMT_TUNNEL) for _ in range(3))
        r = curl(tunnels, "s", f"{api}/healthz")
        assert r.returncode != 0 and not r.stdout, (r.returncode, r.stdout)
        assert list(tunnels.ns["s"].latest_handshakes(IF_STRANGER).values()) == [0]
        assert set(tunnels.ns["m"].latest_handshakes(IF_MGMT)) == want  # not a peer
        transfer = tunnels.ns["s"].wg("show", IF_STRANGER, "transfer").split()
        assert int(transfer[2]) > 0 and int(transfer[1]) == 0, transfer  # sent, never answered
    finally:
        tunnels.close()


# --- bastion install-service ------------------------------------------------------------------------


def test_install_service_sets_up_the_controller_hosts_tunnel(tmp_path, site, umask_022):
    """Under --root: the private key made once in the service's secret store, the wg-quick
    config beside the units naming it, the controller's unit after wg-quick@; the units pass
    systemd-analyze verify. The host's /etc is never touched. The state directory it makes is
    0700 under umask 022: systemd keeps an existing StateDirectory='s mode (it only warns that
    it differs from StateDirectoryMode=)."""
    need_tool("systemd-analyze")
    site_dir, _, mgmt = site
    root = tmp_path / "root"

    def install(*extra: str):
        return CliRunner().invoke(main, ["install-service", "--site", str(site_dir), "--root", str(root),
                                         "--listen", f"{CTL_TUNNEL}:{API}", *extra],
                                  catch_exceptions=False)  # fmt: skip

    dry = install("--dry-run")
    assert dry.exit_code == 0, dry.output
    assert not root.exists()
    assert f"etc/wireguard/{IF_CTL}.conf would be:" in dry.output
    r = install()
    assert r.exit_code == 0, r.output
    key_file = root / "var/lib/edge-bastion/secrets/tunnel-lab" / CONTROLLER_WIREGUARD_KEY
    conf = root / f"etc/wireguard/{IF_CTL}.conf"
    unit = root / "etc/systemd/system/edge-bastion.service"
    key = key_file.read_text().strip()
    assert f"wrote {key_file}" in r.output and key not in r.output
    assert f"public key {wireguard_public_key(key)}" in r.output
    for path, mode in ((key_file, 0o600), (key_file.parent, 0o700), (key_file.parents[2], 0o700),
                       (root / "var/lib/edge-bastion", 0o700), (conf, 0o600),
                       (conf.parent, 0o700)):  # fmt: skip
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    text = conf.read_text()
    assert key not in text
    interface, peer = sections(text)
    assert interface["Address"] == f"{CTL_TUNNEL}/24"
    # the path on the host, where the unit's XDG_STATE_HOME puts the controller's secret store
    assert interface["PostUp"] == ("wg set %i private-key "
                                   f"/var/lib/edge-bastion/secrets/tunnel-lab/{CONTROLLER_WIREGUARD_KEY}")  # fmt: skip
    assert peer["PublicKey"] == wireguard_public_key(mgmt)
    lines = unit.read_text().splitlines()
    assert f"Wants=network-online.target wg-quick@{IF_CTL}.service" in lines
    assert f"After=network-online.target wg-quick@{IF_CTL}.service" in lines
    v = subprocess.run(["systemd-analyze", "verify", str(unit)], check=False, capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert v.returncode == 0, v.stdout + v.stderr
    # a second install keeps the key (the management side knows its public key)
    again = install()
    assert again.exit_code == 0, again.output
    assert f"kept {key_file} (it exists)" in again.output and key_file.read_text().strip() == key
    assert conf.read_text() == text


# --- docs/tunnel.md ---------------------------------------------------------------------------------

DOC = Path(__file__).resolve().parents[3] / "docs" / "tunnel.md"
EXAMPLE = DOC.parent.parent / "examples" / "home-lab"


def doc_blocks(lang: str) -> list[tuple[str, str]]:
    """(the line before, the body) of each fenced block in `lang`."""
    return [(m.group(1), m.group(2)) for m in re.finditer(
        rf"([^\n]*)\n```{lang}\n(.*?)```", DOC.read_text(), re.DOTALL)]  # fmt: skip


def example_copy(dest: Path) -> Path:
    """examples/home-lab, loadable without fetching k3s: the nodes would download it from a URL
    with these (stand-in) hashes; nothing here downloads it."""
    shutil.copytree(EXAMPLE, dest)
    path = dest / "site.yaml"
    version = f"    version: {K3S_VERSION}\n"
    text = path.read_text()
    assert version in text
    sums = {arch: hashlib.sha256(f"stand-in k3s {arch}".encode()).hexdigest() for arch in ("amd64", "arm64")}
    path.write_text(text.replace(version, version + "    url: https://k3s.example.net/{version}/{binary}\n"
                                 f"    sha256: {{amd64: {sums['amd64']}, arm64: {sums['arm64']}}}\n"))  # fmt: skip
    return dest


def test_the_docs_commands_run_on_the_example_and_print_no_secret(tmp_path):
    [(before, body)] = doc_blocks("sh")
    assert before.strip() == "<!-- runnable -->"
    site_dir = example_copy(tmp_path / "home-lab")
    store = SecretStore(tmp_path / "secrets")
    lines = [ln.split("#")[0].strip() for ln in body.splitlines()]
    commands = [shlex.split(ln)[1:] for ln in lines if ln.startswith("bastion ")]
    assert len(commands) == 5 and commands[0][:2] == ["tunnel", "make-keys"]  # the keys first
    outputs = []
    for argv in commands:
        assert CliRunner().invoke(main, [*argv, "--help"]).exit_code == 0, argv
        argv = [str(site_dir) if a == "examples/home-lab" else a for a in argv]
        outputs.append(bastion(*argv, "--secrets-dir", str(store.root)))
    secrets = [store.get(n) for n in store.names() if not is_record(n)]
    assert CONTROLLER_WIREGUARD_KEY in store.names() and len(secrets) == 5  # the controller's, 4 nodes'
    assert not any(s in out for s in secrets for out in outputs)
    # what the page says of the example: wg-bastion at the pool's last address, /32 peers
    assert "interface   wg-bastion\naddress     10.200.0.254\n" in outputs[1]
    _, *peers = sections(outputs[3])
    assert [p["AllowedIPs"] for p in peers] == ["10.200.0.254/32", "10.200.0.2/32", "10.200.0.3/32",
                                                "10.200.0.4/32", "10.200.0.5/32"]  # fmt: skip


def test_the_docs_site_yaml_is_the_examples():
    [(_, body)] = doc_blocks("yaml")
    documented = yaml.safe_load(body)["cluster"]["wireguard"]
    example = yaml.safe_load((EXAMPLE / "site.yaml").read_text())["cluster"]["wireguard"]
    assert documented.items() <= example.items()
