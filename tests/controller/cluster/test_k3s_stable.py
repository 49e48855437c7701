"""What a cluster keeps once a node's config went out (bastion.state.ledger), judged on copies of
examples/home-lab: which server starts the cluster, the nodes' tunnel addresses, the cluster's
name.

A config "goes out" as `bastion serve` hands it out: machine_secrets with the controller's store
(the token, the node password, the WireGuard key are made then, and the start and the address
recorded), or the real app's one-time URL. A load only reads the store.

The store's records are named here as the store names them (k3s/<cluster>/init-server,
wireguard/<machine>.address), not through the module's helpers, so that the tests read the files
the controller writes."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from bastion.site.load import SiteError, load_site
from bastion.state.secrets import SecretStore, default_secrets_dir, machine_secrets, token_name
from bastion_testkit import TOKEN, auth

SITE = "home-lab"
CLUSTER = "home"
INIT = f"k3s/{CLUSTER}/init-server"
PI1_URL = "https://192.168.1.21:6443"
PI0 = """  - name: pi0
    mac: dc:a6:32:00:00:09
    arch: arm64
    role: server
    address: 192.168.1.20
    disk: /dev/disk/by-id/usb-new-0:0

"""
NUC3 = """
  - name: nuc3
    mac: 1c:69:7a:00:00:03
    arch: amd64
    role: agent
    address: 192.168.1.33
"""
PI2 = """  - name: pi2
    mac: dc:a6:32:00:00:02
    arch: arm64
    role: server
    address: 192.168.1.22
    relay: 1
    disk: /dev/disk/by-id/usb-Samsung_Portable_SSD_T7_S5T2NS0W100002-0:0
    labels:
      board: rpi4

"""
TUNNELS = {"pi1": "10.200.0.2", "pi2": "10.200.0.3", "pi3": "10.200.0.4", "nuc1": "10.200.0.5"}


def address(machine: str) -> str:
    return f"wireguard/{machine}.address"


def store() -> SecretStore:
    return SecretStore(default_secrets_dir(SITE))


def hand_out(site_dir: Path, names: tuple[str, ...] | None = None) -> None:
    """Each node's secrets made as the controller makes them when it hands out its config."""
    site = load_site(site_dir)
    for m in site.cluster_nodes:
        if names is None or m.name in names:
            machine_secrets(store(), site, m)


def edit(site_dir: Path, name: str, change) -> None:
    path = site_dir / name
    path.write_text(change(path.read_text()))


def insert_pi0(text: str) -> str:
    return text.replace("\nmachines:\n", "\nmachines:\n" + PI0, 1)


def remove_pi2(text: str) -> str:
    assert PI2 in text
    return text.replace(PI2, "")


def nodes(site_dir: Path, **kw) -> dict[str, dict]:
    return {m.name: m.node for m in load_site(site_dir, **kw).cluster_nodes}


def starts(site_dir: Path, **kw) -> list[str]:
    return [name for name, node in nodes(site_dir, **kw).items() if node["init"]]


def tunnels(site_dir: Path) -> dict[str, str]:
    return {name: node["wireguard"]["ip"] for name, node in nodes(site_dir).items() if node["wireguard"]}


def problems(site_dir: Path) -> list[str]:
    with pytest.raises(SiteError) as e:
        load_site(site_dir)
    return e.value.problems


def listing(root: Path) -> dict[str, tuple[int, int, bytes | None]]:
    """Every path under root: its mode, its mtime (ns) and a file's bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(root))] = (st.st_mode, st.st_mtime_ns, p.read_bytes() if p.is_file() else None)
    return out


# --- who starts the cluster ------------------------------------------------------------------------


def k3s_exec(config: dict) -> list[str]:
    unit = next(u for u in config["systemd"]["units"] if u["name"] == "k3s.service")["contents"]
    return next(x for x in unit.splitlines() if x.startswith("ExecStart=")).removeprefix("ExecStart=").split()


def ignition_of(client, mac: str, address: str) -> dict:
    """A node's Ignition, as it boots: its boot script, then the one-time URL in it."""
    node = type(client)(client.app, base_url="http://192.168.1.10:8080", client=(address, 40000))
    r = node.get("/ipxe", params={"mac": mac})
    assert r.status_code == 200, r.text
    url = urlsplit(re.search(r"ignition\.config\.url=(\S+)", r.text).group(1))
    r = node.get(f"{url.path}?{url.query}")
    assert r.status_code == 200, r.text
    return json.loads(r.text)


def test_a_server_inserted_above_the_first_joins_the_cluster_the_controller_handed_out(lab, client_for):
    """The reviewer's case through the controller: pi1's config (--cluster-init) goes out on its
    one-time URL; then pi0, a new machine with an empty disk, is inserted above pi1 and the site
    reloaded. pi0 used to get --cluster-init with the same token, a second cluster, and every
    other node was told to join it."""
    client = client_for(lab)
    assert "--cluster-init" in k3s_exec(ignition_of(client, "dc:a6:32:00:00:01", "192.168.1.21"))
    edit(lab, "machines.yaml", insert_pi0)
    r = client.post("/api/v1/reload", headers=auth(TOKEN))
    assert r.status_code == 200, r.text
    pi0 = k3s_exec(ignition_of(client, "dc:a6:32:00:00:09", "192.168.1.20"))
    assert "--cluster-init" not in pi0
    assert pi0[pi0.index("--server") + 1] == PI1_URL
    pi2 = k3s_exec(ignition_of(client, "dc:a6:32:00:00:02", "192.168.1.22"))
    assert pi2[pi2.index("--server") + 1] == PI1_URL
    assert "--cluster-init" in k3s_exec(ignition_of(client, "dc:a6:32:00:00:01", "192.168.1.21"))
    assert store().get(INIT) == "pi1"  # recorded when pi1's config went out


def test_serve_reads_and_writes_the_store_its_secrets_option_names(lab, tmp_path):
    """`bastion serve --secrets DIR` (Settings.secrets_dir): the one-time URLs make the records in
    DIR and every load of the site (the first, a reload) reads them from DIR, not from the
    default store, which is left alone."""
    from bastion.api.main import create_app
    from bastion.settings import Settings
    from fastapi.testclient import TestClient

    chosen = SecretStore(tmp_path / "service-secrets")
    app = create_app(Settings(site_dir=lab, db_path=tmp_path / "events.db", api_token=TOKEN, poll_seconds=0,
                              secrets_dir=chosen.root))  # fmt: skip
    with TestClient(app) as client:
        # pi2's config goes out: the plan's start (pi1) is recorded with it
        ignition_of(client, "dc:a6:32:00:00:02", "192.168.1.22")
        edit(lab, "machines.yaml", insert_pi0)
        r = client.post("/api/v1/reload", headers=auth(TOKEN))
        assert r.status_code == 200, r.text
        pi0 = k3s_exec(ignition_of(client, "dc:a6:32:00:00:09", "192.168.1.20"))
        assert "--cluster-init" not in pi0 and pi0[pi0.index("--server") + 1] == PI1_URL
    assert chosen.get(INIT) == "pi1" and chosen.get(address("pi2")) == TUNNELS["pi2"]
    assert not default_secrets_dir(SITE).exists()
    # the CLI's loads read the same store when they are given it
    assert starts(lab, secrets=chosen.root) == ["pi1"]
    assert starts(lab) == ["pi0"]  # the default store has nothing: nothing went out from it


@pytest.mark.parametrize("store_from", ["recorded", "before-records"])
def test_a_server_inserted_above_the_first_does_not_start_the_cluster(lab, store_from):
    """pi2's config went out first (the start recorded is the plan's, pi1, not pi2), then the
    others'. `before-records`: a store from before the start was recorded, where the first
    server that got its config is the one."""
    assert starts(lab) == ["pi1"]
    hand_out(lab, ("pi2",))
    hand_out(lab)
    if store_from == "before-records":
        store().path(INIT).unlink()
    edit(lab, "machines.yaml", insert_pi0)
    plans = nodes(lab)
    assert [n for n, p in plans.items() if p["init"]] == ["pi1"]
    for name, node in plans.items():
        assert node["first_server"] == "pi1" and node["server_url"] == PI1_URL
        if name != "pi1":
            assert "--cluster-init" not in node["exec"]
            assert node["exec"][node["exec"].index("--server") + 1] == PI1_URL, name
    if store_from == "recorded":
        assert store().get(INIT) == "pi1"  # the plan's start, recorded when pi2's config went out


def test_before_any_config_went_out_the_order_decides(lab):
    assert starts(lab) == ["pi1"]
    edit(lab, "machines.yaml", insert_pi0)
    assert starts(lab) == ["pi0"]  # no store yet: nothing went out, nothing to keep


def test_a_mark_hands_the_start_to_another_server_for_good(lab):
    """pi1's disk was replaced: pi2 is marked, so that pi1 joins instead of starting a second
    cluster; pi2 stays the one once the mark is gone (pi1's next new disk joins too), recorded
    when a config goes out under the mark."""
    hand_out(lab)
    mark = ("    relay: 1\n", "    relay: 1\n    k3s: {init: true}\n")
    edit(lab, "machines.yaml", lambda t: t.replace(*mark))
    plans = nodes(lab)
    assert [n for n, p in plans.items() if p["init"]] == ["pi2"]
    assert plans["pi1"]["exec"][plans["pi1"]["exec"].index("--server") + 1] == "https://192.168.1.22:6443"
    assert store().get(INIT) == "pi1"  # a load writes nothing
    hand_out(lab, ("pi1",))
    assert store().get(INIT) == "pi2"
    edit(lab, "machines.yaml", lambda t: t.replace(mark[1], mark[0]))
    assert starts(lab) == ["pi2"]


def test_the_server_that_started_the_cluster_cannot_silently_go(lab):
    hand_out(lab)
    path = lab / "machines.yaml"
    original = path.read_text()
    start, end = original.index("  - name: pi1\n"), original.index("  - name: pi2\n")
    path.write_text(original[:start] + original[end:])
    where = default_secrets_dir(SITE) / "k3s" / CLUSTER / "init-server"
    assert problems(lab) == [(
        f"machines.yaml: machines: machine pi1 started the k3s cluster home (the secret store "
        f"remembers it: {where}), and machines.yaml has no server pi1 now: put it back; or, if it "
        "is gone for good, mark the server that starts the cluster from now on with `k3s: {init: "
        "true}`: one that holds the cluster's data, since a server with an empty disk would start "
        "a second cluster (docs/site-files.md)"
    )]
    # pi1 back, but as an agent
    path.write_text(original.replace("    role: server\n    address: 192.168.1.21", "    role: agent\n    address: 192.168.1.21")
                    .replace("    disk: /dev/disk/by-id/usb-Samsung_Portable_SSD_T7_S5T2NS0W100001-0:0\n", ""))  # fmt: skip
    [problem] = problems(lab)
    assert problem.startswith("machines.yaml:8: machines[0].role: pi1 started the k3s cluster home "
                              f"(the secret store remembers it: {where}) and must stay a server; ")  # fmt: skip
    # the operator says which server holds the cluster now
    edit(lab, "machines.yaml", lambda t: t.replace("    relay: 1\n", "    relay: 1\n    k3s: {init: true}\n"))
    assert starts(lab) == ["pi2"]


# --- a load only reads -----------------------------------------------------------------------------


def test_a_load_makes_no_store_and_changes_none(lab, tmp_path):
    load_site(lab)
    assert not (tmp_path / "state").exists()  # a command that only reads leaves none behind
    hand_out(lab, ("pi2",))
    root = default_secrets_dir(SITE)
    store().path(address("pi2")).unlink()  # a key without its record: a store from before them
    before = listing(root)
    edit(lab, "machines.yaml", insert_pi0)
    edit(lab, "machines.yaml", remove_pi2)
    for _ in range(2):
        load_site(lab)
    assert listing(root) == before


def test_the_store_a_load_is_given_is_read_and_the_default_is_not(lab, tmp_path):
    other = SecretStore(tmp_path / "elsewhere")
    other.put(token_name(CLUSTER), "t")
    other.put(INIT, "pi3")
    before = listing(other.root)
    assert starts(lab, secrets=other.root) == ["pi3"]
    assert starts(lab) == ["pi1"]
    assert starts(lab, secrets=tmp_path / "none") == ["pi1"]
    assert listing(other.root) == before and not (tmp_path / "none").exists()


def test_a_store_that_is_no_directory_is_none(lab, tmp_path):
    (tmp_path / "a-file").write_text("k3s/home/init-server\n")
    assert starts(lab, secrets=tmp_path / "a-file") == ["pi1"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a 0000 directory all the same")
def test_a_store_that_cannot_be_read_is_none(lab, tmp_path):
    other = SecretStore(tmp_path / "elsewhere")
    other.put(token_name(CLUSTER), "t")
    other.put(INIT, "pi3")
    os.chmod(other.root, 0)
    try:
        assert starts(lab, secrets=other.root) == ["pi1"]
    finally:
        os.chmod(other.root, 0o700)


# --- tunnel addresses ------------------------------------------------------------------------------


def test_removing_a_machine_keeps_every_other_tunnel_address(lab):
    """pi2 removed. pi3 and nuc1 used to move up to pi2's and pi3's addresses, and the
    management side, which knows them by address, lost both."""
    assert tunnels(lab) == TUNNELS
    hand_out(lab)
    edit(lab, "machines.yaml", remove_pi2)
    assert tunnels(lab) == {k: v for k, v in TUNNELS.items() if k != "pi2"}
    # a machine added now does not get pi2's address while others are free
    edit(lab, "machines.yaml", lambda t: t + NUC3)
    assert tunnels(lab)["nuc3"] == "10.200.0.6"
    # and pi2, back, has its own
    edit(lab, "machines.yaml", lambda t: t.replace("  - name: pi3\n", PI2 + "  - name: pi3\n"))
    assert tunnels(lab) == {**TUNNELS, "nuc3": "10.200.0.6"}
    assert {m: store().get(address(m)) for m in TUNNELS} == TUNNELS  # recorded as they went out


def test_a_pin_on_an_address_that_went_out_is_refused_and_another_moves_nobody(lab):
    """nuc3 appended with a pinned address. The pin used to win and pi2, whose address it was,
    moved to the next free one."""
    hand_out(lab)
    edit(lab, "machines.yaml", lambda t: t + NUC3 + "    wireguard: {address: 10.200.0.3}\n")
    where = default_secrets_dir(SITE) / "wireguard" / "pi2.address"
    assert problems(lab) == [(
        "machines.yaml:63: machines[5].wireguard.address: 10.200.0.3 is machine pi2's tunnel "
        f"address, which went out already (the secret store remembers it: {where}): the "
        "management side and pi2 know it; give another"
    )]
    edit(lab, "machines.yaml", lambda t: t.replace("{address: 10.200.0.3}", "{address: 10.200.0.9}"))
    assert tunnels(lab) == {**TUNNELS, "nuc3": "10.200.0.9"}


def test_a_full_pool_gives_a_gone_machines_address_to_a_new_one(lab):
    """A /29: .1 the management side's, .6 the controller host's, .2 to .5 the four nodes'."""
    edit(lab, "site.yaml", lambda t: t.replace("address_pool: 10.200.0.0/24", "address_pool: 10.200.0.0/29"))
    assert tunnels(lab) == TUNNELS
    hand_out(lab)
    edit(lab, "machines.yaml", remove_pi2)
    edit(lab, "machines.yaml", lambda t: t + NUC3)
    assert tunnels(lab) == {**{k: v for k, v in TUNNELS.items() if k != "pi2"}, "nuc3": "10.200.0.3"}
    assert store().get(address("pi2")) == "10.200.0.3"  # until nuc3's config goes out
    hand_out(lab, ("nuc3",))
    assert store().get(address("pi2")) == "" and store().get(address("nuc3")) == "10.200.0.3"
    # pi2 back: nuc3's address went out, and no other is left
    edit(lab, "machines.yaml", lambda t: t.replace("\nmachines:\n", "\nmachines:\n" + PI2, 1))
    assert problems(lab) == [
        "machines.yaml:5: machines[0].wireguard: no address left in cluster.wireguard.address_pool 10.200.0.0/29"
    ]


def test_the_controller_hosts_address_cannot_be_a_nodes(lab):
    hand_out(lab)
    edit(lab, "site.yaml", lambda t: t.replace("    controller: {}", "    controller: {address: 10.200.0.4}"))
    [problem] = problems(lab)
    assert problem.startswith("site.yaml: cluster.wireguard.controller.address: 10.200.0.4 is machine "
                              "pi3's tunnel address, which went out already")  # fmt: skip


# --- the cluster's name ----------------------------------------------------------------------------


@pytest.mark.parametrize("rename", [
    (lambda t: t.replace("  name: home\n", "  name: home2\n"), "home2", "cluster.name is 'home2'"),
    (lambda t: t.replace("  name: home\n", ""), "home-lab",
     "the cluster is named after the site ('home-lab': 'home-lab'), as cluster.name is not set"),
], ids=["cluster.name", "unnamed"])  # fmt: skip
def test_a_renamed_cluster_is_refused_until_its_secrets_move(lab, rename):
    change, new, what = rename
    hand_out(lab)
    token = store().get(token_name(CLUSTER))
    edit(lab, "site.yaml", change)
    root = default_secrets_dir(SITE)
    assert problems(lab) == [(
        f"site.yaml: cluster.name: the secret store {root} holds the k3s secrets of cluster 'home' "
        f"and none of {new!r}: {what}. Under a new name every node would get a new token, which "
        "k3s on them refuses, and new node passwords. Set `cluster: {name: home}` (the name is "
        f"only the secrets' name); or move the secrets to the new name, with the service stopped: "
        f"mv {root}/k3s/home {root}/k3s/{new}; or, to start a new cluster on wiped disks, move "
        f"{root}/k3s/home out of the store"
    )]
    shutil.move(root / "k3s" / "home", root / "k3s" / new)  # the message's mv
    site = load_site(lab)
    assert machine_secrets(store(), site, site.machine("pi2"))["k3s_token"] == token
    assert starts(lab) == ["pi1"]
