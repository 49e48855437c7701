"""Every command that loads a site checks its k3s cluster against the secret store it is given
(`--secrets DIR`, serve's option), not the running user's default store; `bastion
install-service` against the store the service will use; and install-service checks
--trusted-proxies against the machines' addresses as serve does.

The stores here disagree on purpose: the given one says a machine that machines.yaml no longer
has started the cluster, which makes the site refuse to load (bastion.cluster.plan), while the
default store under the test's XDG_STATE_HOME is empty, or the other way round. The records are
written under the names the controller writes (k3s/<cluster>/token, k3s/<cluster>/init-server)."""

from __future__ import annotations

from pathlib import Path

import pytest
from bastion.assets import rpi4
from bastion.assets.download import FetchError
from bastion.cli import main
from bastion.regcache.run import SiteWatch
from bastion.service import STATE_DIR
from bastion.state.secrets import SecretStore, default_secrets_dir
from click.testing import CliRunner

SITE = "home-lab"
GONE = "pi9"  # no machine of examples/home-lab


def started_by_gone_server(root: Path) -> Path:
    """A store at `root` that says pi9 started the cluster `home` (its token exists)."""
    store = SecretStore(root)
    store.put("k3s/home/token", "t" * 32)
    store.put("k3s/home/init-server", GONE)
    return root


def bastion(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def refused_for_gone_server(output: str, store: Path) -> bool:
    return f"machine {GONE} started the k3s cluster home" in output and str(store) in output


@pytest.fixture
def chosen(tmp_path) -> Path:
    return started_by_gone_server(tmp_path / "chosen-secrets")


def test_site_check_reads_the_store_secrets_names(lab, chosen):
    assert bastion("site", "check", str(lab)).exit_code == 0  # the default store: empty
    r = bastion("site", "check", str(lab), "--secrets", str(chosen))
    assert r.exit_code == 1, r.output
    assert refused_for_gone_server(r.output, chosen), r.output
    # serve's other spelling
    assert bastion("site", "check", str(lab), "--secrets-dir", str(chosen)).exit_code == 1


def test_registry_cache_loads_the_site_with_the_store_it_reads_its_credentials_from(
    lab, chosen, tmp_path
):
    state = tmp_path / "cache-state"
    r = bastion("registry-cache", "render", "--site", str(lab), "--state", str(state),
                "--secrets-dir", str(chosen))  # fmt: skip
    assert r.exit_code == 1, r.output
    assert refused_for_gone_server(r.output, chosen), r.output
    assert not state.exists()  # nothing rendered for a site that does not load
    r = bastion("registry-cache", "render", "--site", str(lab), "--state", str(state),
                "--secrets", str(tmp_path / "none-yet"))  # fmt: skip
    assert r.exit_code == 0, r.output


def test_registry_cache_run_reloads_the_site_with_the_same_store(lab, chosen):
    said: list[str] = []
    watch = SiteWatch(lab, said.append, secrets=chosen)
    machines = lab / "machines.yaml"
    machines.write_text(machines.read_text() + "# edited\n")
    assert [watch(), watch()] == [None, None]  # the change settles at the second look
    assert len(said) == 1 and refused_for_gone_server(said[0], chosen), said


def test_fleet_resources_checks_the_site_with_the_store_secrets_names(lab, chosen):
    args = ["fleet", "resources", str(lab), "--name", "home-lab",
            "--controller-url", "http://10.200.0.1:8080"]  # fmt: skip
    assert bastion(*args).exit_code == 0
    r = bastion(*args, "--secrets", str(chosen))
    assert r.exit_code == 1, r.output
    assert refused_for_gone_server(r.output, chosen), r.output


def test_rpi4_firmware_finds_the_pis_of_the_site_loaded_with_the_given_store(lab, chosen):
    dirs, _notes = rpi4.dirs_from_site(lab)
    assert dirs  # examples/home-lab labels its Pis board: rpi4
    with pytest.raises(FetchError) as e:
        rpi4.dirs_from_site(lab, chosen)
    assert refused_for_gone_server(str(e.value), chosen), e.value


def test_cluster_nodes_says_who_starts_the_cluster_as_the_store_given_says(lab, chosen):
    # "starts or joins" is the store's record once a config went out, not the file's order
    assert bastion("cluster", "nodes", "--site", str(lab), "--json").exit_code == 0
    r = bastion("cluster", "nodes", "--site", str(lab), "--secrets", str(chosen), "--json")
    assert r.exit_code == 1, r.output
    assert refused_for_gone_server(r.output, chosen), r.output


def test_rpi4_firmware_command_takes_the_store(lab, chosen, tmp_path):
    # refused while finding the site's Pis, before anything is downloaded: no mirror is needed
    r = bastion("assets", "fetch", "rpi4-uefi", "--site", str(lab), "--secrets", str(chosen),
                "--mirror", "http://127.0.0.1:9/none")  # fmt: skip
    assert r.exit_code == 1, r.output
    assert refused_for_gone_server(r.output, chosen), r.output


def install_service(site: Path, root: Path, *extra: str):
    return bastion("install-service", "--site", str(site), "--root", str(root), "--dry-run", *extra)


def test_install_service_checks_the_site_against_the_services_store(lab, tmp_path):
    root = tmp_path / "root"
    service_store = root / STATE_DIR.lstrip("/") / "secrets" / SITE
    # the installing user's own store says nothing of what the service handed out
    started_by_gone_server(default_secrets_dir(SITE))
    r = install_service(lab, root)
    assert r.exit_code == 0, r.output
    # the service's does
    started_by_gone_server(service_store)
    (default_secrets_dir(SITE) / "k3s/home/token").unlink()
    r = install_service(lab, root)
    assert r.exit_code == 1, r.output
    assert "does not load, so the service could not start" in r.output
    assert refused_for_gone_server(r.output, service_store), r.output


def test_install_service_refuses_trusted_proxies_holding_a_machines_address(lab, tmp_path):
    root = tmp_path / "root"
    r = install_service(lab, root, "--trusted-proxies", "192.168.1.0/24")
    assert r.exit_code == 2, r.output
    assert "--trusted-proxies 192.168.1.0/24 holds machine pi1's address 192.168.1.21" in r.output
    # a network that holds no machine is taken, with serve's warning
    r = install_service(lab, root, "--trusted-proxies", "10.9.0.0/30")
    assert r.exit_code == 0, r.output
    assert "warning: --trusted-proxies 10.9.0.0/30 is a network of 4 addresses" in r.output
    exec_start = next(x for x in r.output.splitlines() if x.startswith("ExecStart="))
    assert exec_start.endswith(" --trusted-proxies 10.9.0.0/30")  # the unit has them as given
