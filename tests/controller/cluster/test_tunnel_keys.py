"""Which `bastion tunnel` and `bastion cluster peers` commands make WireGuard keys, and which
only read them: real secret stores in temporary directories.

A command that only reads keys and found none made a new store wherever its defaults pointed
($XDG_STATE_HOME of whoever ran it), said nothing, and printed public keys no node and no
controller has: the management side then refused every peer. Now such a command refuses,
naming where it looked and the service's store; `bastion tunnel make-keys` (and `bastion
cluster peers`, which the docs have make the nodes' keys) says on stderr which keys it made and
where."""

from __future__ import annotations

from pathlib import Path

import pytest
from bastion.cli import main
from bastion.site.load import load_site
from bastion.state.secrets import (
    CONTROLLER_WIREGUARD_KEY,
    SecretStore,
    is_record,
    tunnel_address_name,
    wireguard_private_key,
    wireguard_public_key,
)
from click.testing import CliRunner
from test_tunnel import make_site, sections

SERVICE_STORE = "/var/lib/edge-bastion/secrets/tunnel-lab"  # the unit's, for site tunnel-lab
NODE_KEY = "wireguard/edge1.key"


@pytest.fixture
def site_dir(tmp_path, monkeypatch):
    # the defaults only: no store named by the environment
    monkeypatch.delenv("BASTION_SECRETS_DIR", raising=False)
    return make_site(tmp_path, wireguard_public_key(wireguard_private_key()))


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner(env=env).invoke(main, list(args))


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_management_config_refuses_a_store_that_is_not_there_and_makes_none(site_dir, tmp_path):
    """The reviewer's case: run with someone else's XDG_STATE_HOME, no --secrets-dir."""
    state = tmp_path / "x"
    r = run("tunnel", "management-config", "--site", str(site_dir), env={"XDG_STATE_HOME": str(state)})
    assert r.exit_code == 1, r.output
    assert r.stdout == ""  # no config with keys nobody has
    assert not state.exists()  # and no store made where the service never looks
    looked = state / "edge-bastion" / "secrets" / "tunnel-lab"
    assert r.stderr.startswith(f"Error: the secret store {looked} does not exist; this command "
                               "only reads keys, it makes none.\n"), r.stderr  # fmt: skip
    assert "That is the default store, $XDG_STATE_HOME/edge-bastion/secrets/<site>" in r.stderr
    assert f"The service's store is {SERVICE_STORE}" in r.stderr
    assert f"give --secrets-dir {SERVICE_STORE} (or BASTION_SECRETS_DIR)" in r.stderr
    assert f"bastion tunnel make-keys --site {site_dir} --secrets-dir {looked}" in r.stderr


@pytest.mark.parametrize("command", ["show", "controller-config", "management-config"])
@pytest.mark.parametrize("missing", [CONTROLLER_WIREGUARD_KEY, NODE_KEY])
def test_a_read_only_command_refuses_a_missing_key_and_names_its_path(site_dir, tmp_path, command, missing):
    store = SecretStore(tmp_path / "store")
    kept = {name: wireguard_private_key() for name in (CONTROLLER_WIREGUARD_KEY, NODE_KEY) if name != missing}
    for name, key in kept.items():
        store.put(name, key)
    r = run("tunnel", command, "--site", str(site_dir), "--secrets-dir", str(store.root))
    if command != "management-config" and missing == NODE_KEY:
        # these read the controller's key only: a node's is not theirs to miss
        assert r.exit_code == 0, r.output
    else:
        assert r.exit_code == 1, r.output
        assert r.stdout == ""
        assert r.stderr.startswith(f"Error: the secret store {store.root} has no {store.path(missing)}; "), r.stderr
        assert f"--secrets-dir {SERVICE_STORE}" in r.stderr
    # read, never written: the store holds what it held
    assert store.names() == sorted(kept) and all(store.get(n) == k for n, k in kept.items())


def test_make_keys_says_which_keys_it_made_and_where(site_dir, tmp_path):
    store = SecretStore(tmp_path / "store")
    r = run("tunnel", "make-keys", "--site", str(site_dir), "--secrets-dir", str(store.root))
    assert r.exit_code == 0, r.output
    assert r.stdout == ""  # no secret, and nothing else either
    made = [f"made the WireGuard key {store.path(n)}" for n in (CONTROLLER_WIREGUARD_KEY, NODE_KEY)]
    where = (f"(in the secret store {store.root}; the service's is {SERVICE_STORE}: a key made "
             "elsewhere reaches no node the service serves)")  # fmt: skip
    assert r.stderr.splitlines() == [*made, where]
    keys = {n: store.get(n) for n in store.names() if not is_record(n)}
    assert sorted(keys) == [CONTROLLER_WIREGUARD_KEY, NODE_KEY]
    # the node's tunnel address went out with its key: recorded for the plans to keep
    edge1 = load_site(site_dir, secrets=store.root).machine("edge1")
    assert store.get(tunnel_address_name("edge1")) == edge1.node["wireguard"]["ip"]

    again = run("tunnel", "make-keys", "--site", str(site_dir), "--secrets-dir", str(store.root))
    assert again.exit_code == 0, again.output
    assert again.stderr == f"every tunnel key is in the secret store {store.root}: made none\n"
    assert {n: store.get(n) for n in store.names() if not is_record(n)} == keys

    # and the readers read exactly those
    r = run("tunnel", "management-config", "--site", str(site_dir), "--secrets-dir", str(store.root))
    assert r.exit_code == 0 and r.stderr == "", r.output
    _, *peers = sections(r.stdout)
    assert [p["PublicKey"] for p in peers] == [wireguard_public_key(keys[CONTROLLER_WIREGUARD_KEY]),
                                               wireguard_public_key(keys[NODE_KEY])]  # fmt: skip


def test_the_readers_print_the_keys_of_the_store_they_are_given(site_dir, tmp_path):
    """A store as the service keeps it (made by hand here), named with --secrets-dir: its keys,
    and no file added to it or anywhere else."""
    service = SecretStore(tmp_path / "var-lib" / "secrets" / "tunnel-lab")
    keys = {CONTROLLER_WIREGUARD_KEY: wireguard_private_key(), NODE_KEY: wireguard_private_key()}
    for name, key in keys.items():
        service.put(name, key)
    before = files_under(tmp_path)
    env = {"XDG_STATE_HOME": str(tmp_path / "state")}
    shown = run("tunnel", "show", "--site", str(site_dir), "--secrets-dir", str(service.root), env=env)
    conf = run("tunnel", "management-config", "--site", str(site_dir), "--secrets-dir", str(service.root), env=env)
    assert shown.exit_code == 0 and conf.exit_code == 0, shown.output + conf.output
    assert f"public key  {wireguard_public_key(keys[CONTROLLER_WIREGUARD_KEY])}" in shown.stdout
    assert [p["PublicKey"] for p in sections(conf.stdout)[1:]] == [wireguard_public_key(k) for k in keys.values()]
    assert files_under(tmp_path) == before


def test_cluster_peers_says_which_keys_it_made(site_dir, tmp_path):
    """`bastion cluster peers` makes the nodes' missing keys (docs/controller.md, the tutorial):
    no longer silently."""
    store = SecretStore(tmp_path / "store")
    r = run("cluster", "peers", "--site", str(site_dir), "--secrets-dir", str(store.root))
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines()[0] == f"made the WireGuard key {store.path(NODE_KEY)}", r.stderr
    assert f"the service's is {SERVICE_STORE}" in r.stderr
    assert store.names() == [tunnel_address_name("edge1"), NODE_KEY]  # the nodes' only: the controller's is not its to make
    assert f"PublicKey = {wireguard_public_key(store.get(NODE_KEY))}" in r.stdout
    again = run("cluster", "peers", "--site", str(site_dir), "--secrets-dir", str(store.root))
    assert again.exit_code == 0 and again.stderr == "" and again.stdout == r.stdout
