"""`bastion flash --secrets DIR`: the site is loaded against the secret store `bastion serve
--secrets DIR` reads, so a k3s site that serve refuses (the server that started the cluster is
gone from machines.yaml, and the store remembers it) is refused by flash too, naming the
store; without the option, $BASTION_SECRETS_DIR, then the site's default store, as for serve."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from bastion.state.secrets import SecretStore, init_server_name, token_name
from dresskit import BIN
from test_flash import SITE_YAML, make_site, small_tftp

K3S_VERSION = "v1.31.4+k3s1"

MACHINES = """\
machines:
  - name: node-a
    mac: 52:54:00:00:00:0a
    relay: 0
    arch: amd64
    role: server
    address: 10.77.0.21
    disk: /dev/disk/by-id/usb-stand-in-0:0
  - name: node-b
    mac: 52:54:00:00:00:0b
    relay: 3
"""


def bastion(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "bastion"), *args], capture_output=True, text=True,
                          timeout=300, check=False, env=env)  # fmt: skip


def k3s_site(root: Path) -> Path:
    """test_flash's site with a k3s cluster `edge` of one server, node-a, and node-b. Its k3s binary is a
    stand-in file with its own SHA-256: nothing downloads it."""
    binary = root / "assets" / "k3s" / K3S_VERSION / "amd64" / "k3s"
    binary.parent.mkdir(parents=True)
    binary.write_bytes(b"a stand-in for the k3s binary\n")
    sha = hashlib.sha256(binary.read_bytes()).hexdigest()
    return make_site(root, SITE_YAML + f"""\
cluster:
  name: edge
  k3s:
    version: {K3S_VERSION}
    sha256: {{amd64: {sha}}}
""", MACHINES)  # fmt: skip


def store_of_a_cluster_started_by(root: Path, server: str) -> Path:
    """A secret store whose cluster `edge` went out (its token) and was started by `server`."""
    store = SecretStore(root)
    store.put(token_name("edge"), "a-token-0123456789abcdef")
    store.put(init_server_name("edge"), server)
    return root


def test_the_site_is_loaded_against_the_secret_store_given_as_serve_takes_it(tmp_path):
    site = k3s_site(tmp_path / "site")
    store = store_of_a_cluster_started_by(tmp_path / "store", "node-gone")
    args = ["flash", "--sim", str(tmp_path / "flash"), "--site", str(site), "--tftp-dir",
            str(small_tftp(tmp_path / "tftp")), "--dry-run"]  # fmt: skip
    gone = (f"machine node-gone started the k3s cluster edge (the secret store remembers it: "
            f"{store}/k3s/edge/init-server), and machines.yaml has no server node-gone now")  # fmt: skip

    r = bastion(*args, "--secrets", str(store))
    assert r.returncode == 1, r.stdout + r.stderr
    assert gone in r.stderr, r.stderr

    # the default store (none here) has no record: the same site flashes
    env = {k: v for k, v in os.environ.items() if k != "BASTION_SECRETS_DIR"}
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    r = bastion(*args, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dry run: nothing written" in r.stdout

    # serve's environment variable names the store as well, and --secrets-dir is its other name
    r = bastion(*args, env={**env, "BASTION_SECRETS_DIR": str(store)})
    assert r.returncode == 1 and gone in r.stderr, r.stdout + r.stderr
    r = bastion(*args, "--secrets-dir", str(store), env=env)
    assert r.returncode == 1 and gone in r.stderr, r.stdout + r.stderr

    # a store whose server is still declared: flashed
    store_of_a_cluster_started_by(tmp_path / "store-a", "node-a")
    r = bastion(*args, "--secrets", str(tmp_path / "store-a"), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
