"""bastion.state.secrets (the secret store) and the renderer's guard: a template that reads `secrets`
renders only when it is given them (the one-time URL path), never otherwise."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import shutil
import sys
import time

import pytest

from bastion.model import BootRequest
from bastion import boot
from bastion.render.config import SecretsRequired, render_ignition, uses_secrets
from bastion.state.secrets import SecretError, SecretStore, wireguard_private_key, wireguard_public_key
from bastion.site.load import load_site


def test_a_secret_is_made_once_and_read_back(tmp_path):
    store = SecretStore(tmp_path / "s")
    made = []

    def make():
        made.append(1)
        return f"v{len(made)}"

    assert store.get("k3s/token") is None
    assert store.get_or_create("k3s/token", make) == "v1"
    assert store.get_or_create("k3s/token", make) == "v1"
    assert SecretStore(tmp_path / "s").get("k3s/token") == "v1"  # from disk, not memory
    assert made == [1]
    assert store.names() == ["k3s/token"]


def test_the_store_is_private_and_leaves_no_temporary_files(tmp_path):
    store = SecretStore(tmp_path / "s")
    store.put("wireguard/node1.key", "x")
    assert stat.S_IMODE(os.stat(tmp_path / "s").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "s" / "wireguard").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "s" / "wireguard" / "node1.key").st_mode) == 0o600
    assert [p.name for p in (tmp_path / "s" / "wireguard").iterdir()] == ["node1.key"]


def test_a_secret_a_crash_left_half_made_is_swept_by_a_later_one(tmp_path):
    # a process killed between writing its temporary and linking it in leaves the temporary
    # (the secret's value, 0600) beside the store's files; it was never removed
    root = tmp_path / "s"
    crash = ("import os, sys\n"
             "from bastion.state.secrets import SecretStore\n"
             "os.link = lambda *a: os._exit(3)  # killed at that moment\n"
             f"SecretStore({str(root)!r}).get_or_create('wireguard/node1.key')\n")
    assert subprocess.run([sys.executable, "-c", crash], check=False).returncode == 3
    left = [p for p in (root / "wireguard").iterdir()]
    assert len(left) == 1 and left[0].name.startswith(".node1.key."), left
    SecretStore(root).get_or_create("wireguard/node2.key")
    assert left[0].exists()  # a write in progress looks the same for a while: kept
    old = time.time() - 16 * 60
    os.utime(left[0], (old, old))
    SecretStore(root).get_or_create("wireguard/node3.key")
    assert sorted(p.name for p in (root / "wireguard").iterdir()) == ["node2.key", "node3.key"]


@pytest.mark.parametrize("name", ["", "../x", "a/../b", "/etc/passwd", "a//b", ".hidden", "a b"])
def test_secret_names_cannot_leave_the_store(tmp_path, name):
    with pytest.raises(SecretError, match="bad secret name"):
        SecretStore(tmp_path).get_or_create(name)


def test_wireguard_keys_match_the_wg_tool(tmp_path):
    key = wireguard_private_key()
    raw = base64.b64decode(key)
    assert len(raw) == 32 and raw[0] & 7 == 0 and raw[31] & 0xC0 == 0x40
    if shutil.which("wg") is None:
        pytest.skip("wg (wireguard-tools) is not installed; tools/setup installs it")
    wg_pub = subprocess.run(["wg", "pubkey"], input=key, capture_output=True, text=True, check=True).stdout.strip()
    assert wireguard_public_key(key) == wg_pub
    theirs = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
    assert wireguard_public_key(theirs) == subprocess.run(
        ["wg", "pubkey"], input=theirs, capture_output=True, text=True, check=True
    ).stdout.strip()


def _secret_site(tmp_path):
    site = tmp_path / "site"
    (site / "profiles").mkdir(parents=True)
    (site / "ignition").mkdir()
    (site / "site.yaml").write_text("site: s\nroles:\n  node: node\n")
    (site / "machines.yaml").write_text(
        "machines:\n  - name: n1\n    mac: 52:54:00:00:00:01\n    role: node\n"
        "    address: 10.77.0.21\n"
    )
    (site / "profiles" / "node.yaml").write_text("kernel: /assets/k\nignition: node.bu\n")
    (site / "ignition" / "node.bu").write_text(
        "variant: flatcar\nversion: 1.0.0\nstorage:\n  files:\n    - path: /etc/token\n"
        "      mode: 0600\n      contents:\n        inline: {{ secrets.token }}\n"
    )
    return load_site(site)


def test_a_template_that_reads_secrets_renders_only_with_them(tmp_path):
    site = _secret_site(tmp_path)
    group, profile = boot.select(site, {"mac": "52:54:00:00:00:01"})
    assert uses_secrets(site.ignition["node.bu"])
    req = BootRequest({"mac": "52:54:00:00:00:01"}, "mac=52:54:00:00:00:01", "http://c")
    with pytest.raises(SecretsRequired, match="node.bu reads `secrets`.*one-time URL"):
        render_ignition(site, group, profile, req)
    config = render_ignition(site, group, profile, req, secrets={"token": "s3cret"})
    assert config["storage"]["files"][0]["contents"]["source"] == "data:,s3cret"
    # and the public endpoint refuses instead of leaking or crashing
    answer = boot.ignition_config(site, req)
    assert answer.status == 403 and "one-time URL" in answer.body and "s3cret" not in answer.body


def test_templates_without_secrets_are_not_flagged(site_dir):
    site = load_site(site_dir)
    assert not any(uses_secrets(tf) for tf in site.ignition.values())


def test_a_secret_every_user_may_read_is_used_and_warned_of_once(tmp_path, caplog):
    """The store's own secrets are 0600; one put there by hand (docs/logs.md, docs/ups.md) under
    umask 022 is 0644 and was used without a word."""
    store = SecretStore(tmp_path / "s")
    put = tmp_path / "s" / "ups" / "main" / "password"
    put.parent.mkdir(parents=True)
    put.write_text("hunter2-upsd\n")
    put.chmod(0o644)
    with caplog.at_level("WARNING", logger="bastion.state.secrets"):
        assert store.get("ups/main/password") == "hunter2-upsd"
        assert store.get_or_create("ups/main/password") == "hunter2-upsd"
        put.chmod(0o640)  # group access: the service's group
        assert store.get("ups/main/password") == "hunter2-upsd"
        assert store.get_or_create("k3s/x/token") and store.get("k3s/x/token")  # made 0600
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"the secret {put} can be read by every user on this host (mode 0644): "
                    f"chmod 600 {put}"]  # fmt: skip
    assert "hunter2" not in caplog.text


def _ask_for_key(root, name, barrier, answers):
    """One process's store, as `bastion serve` and `bastion cluster peers` each have their own."""
    store = SecretStore(root)
    barrier.wait()
    answers.put(store.get_or_create(name, wireguard_private_key))


def test_processes_that_make_the_same_secret_at_once_are_all_given_the_one_stored(tmp_path):
    # The store's lock is per object: each process made its own key and renamed it over the
    # other's, so `serve` handed a node one private key and `cluster peers` told the management
    # side the public key of another (20 races of 2 in 20).
    import multiprocessing

    mp = multiprocessing.get_context("fork")
    root = tmp_path / "s"
    for trial in range(10):
        name = f"wireguard/node{trial}.key"
        barrier, answers = mp.Barrier(4), mp.Queue()
        procs = [mp.Process(target=_ask_for_key, args=(root, name, barrier, answers))
                 for _ in range(4)]  # fmt: skip
        for p in procs:
            p.start()
        got = [answers.get(timeout=60) for _ in procs]
        for p in procs:
            p.join()
        stored = (root / "wireguard" / f"node{trial}.key").read_text()
        assert got == [stored.strip()] * 4, f"trial {trial}"
        assert stored.endswith("\n") and wireguard_public_key(stored.strip())
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(root / "wireguard").st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in (root / "wireguard").iterdir()} == {0o600}
    # the losers' temporary files are gone
    left = sorted(p.name for p in (root / "wireguard").iterdir())
    assert left == [f"node{i}.key" for i in range(10)]
