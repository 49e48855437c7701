"""The registry cache from site.yaml: the instances the controller host runs, their config.yml,
and `bastion site check` refusing a registry configuration that is not what the nodes are told."""

from __future__ import annotations

import pytest
import yaml
from bastion.cluster.plan import registries_yaml
from bastion.regcache import plan
from bastion.regcache.run import render
from bastion.serve_cli import site_check
from bastion.state.secrets import SecretStore
from click.testing import CliRunner
from regcache_kit import home_lab, load_problems, registry_cache


def test_one_instance_per_mirror_on_consecutive_ports(tmp_path):
    cache = registry_cache(home_lab(tmp_path / "site"))
    got = [(i.mirror, i.listen, i.upstream, i.endpoint) for i in plan.instances(cache)]
    assert got == [
        ("docker.io", "192.168.1.10:5000", "https://registry-1.docker.io", "http://192.168.1.10:5000"),
        ("ghcr.io", "192.168.1.10:5001", "https://ghcr.io", "http://192.168.1.10:5001"),
        ("quay.io", "192.168.1.10:5002", "https://quay.io", "http://192.168.1.10:5002"),
        ("registry.k8s.io", "192.168.1.10:5003", "https://registry.k8s.io", "http://192.168.1.10:5003"),
    ]


def test_the_nodes_registries_yaml_names_exactly_the_instances(tmp_path):
    cache = registry_cache(home_lab(tmp_path / "site"))
    told = yaml.safe_load(registries_yaml(cache))["mirrors"]
    assert told == {i.mirror: {"endpoint": [i.endpoint]} for i in plan.instances(cache)}


def test_a_cache_run_elsewhere_is_one_url_for_every_mirror(tmp_path):
    site = home_lab(tmp_path / "site", "  registry_cache:\n    url: https://cache.example.net\n")
    cache = registry_cache(site)
    assert plan.endpoints(cache) == {m: "https://cache.example.net" for m in cache.mirrors}


def test_configs_take_credentials_from_the_secret_store_only(tmp_path):
    cache = registry_cache(home_lab(tmp_path / "site"))
    store = SecretStore(tmp_path / "secrets")
    store.put("registry-cache/ghcr.io/username", "robot")
    store.put("registry-cache/ghcr.io/password", "s3cret")
    written = render(cache, tmp_path / "state", store)
    configs = {inst.mirror: (path, yaml.safe_load(path.read_text())) for inst, path in written}
    path, ghcr = configs["ghcr.io"]
    assert ghcr["proxy"] == {"remoteurl": "https://ghcr.io", "username": "robot", "password": "s3cret"}
    assert path.stat().st_mode & 0o777 == 0o600
    assert configs["docker.io"][1]["proxy"] == {"remoteurl": "https://registry-1.docker.io"}
    # each its own storage, and one HTTP secret made once in the store
    roots = {c["storage"]["filesystem"]["rootdirectory"] for _, c in configs.values()}
    assert len(roots) == 4
    assert {c["http"]["secret"] for _, c in configs.values()} == {store.get(plan.HTTP_SECRET)}


@pytest.mark.parametrize("section, problem", [
    ("  registry_cache:\n    url: http://192.168.1.10:5000\n    mirrors: ['*']\n    serve: {}\n",
     "site.yaml:46: cluster.registry_cache: mirrors: '*' cannot be served"),
    ("  registry_cache:\n    url: http://192.168.1.10\n    serve: {}\n",
     "site.yaml:46: cluster.registry_cache: url: 'http://192.168.1.10' needs a port"),
    ("  registry_cache:\n    url: http://192.168.1.10:5000\n    serve: {upstreams: {gcr.io: 'https://gcr.io'}}\n",
     "site.yaml:46: cluster.registry_cache: serve.upstreams: 'gcr.io' is not in mirrors"),
    ("  registry_cache:\n    url: http://192.168.1.10:5000\n    serve: {max_size: lots}\n",
     "site.yaml:47: cluster.registry_cache.serve.max_size: 'lots' is not a size"),
    # a state directory and secrets named '..' or '-' (render ended in a traceback)
    ("  registry_cache:\n    url: http://192.168.1.10:5000\n    mirrors: [docker.io, '..']\n    serve: {}\n",
     "site.yaml:47: cluster.registry_cache.mirrors: '..' is not a registry host name[:port]"),
    ("  registry_cache:\n    url: http://192.168.1.10:5000\n    mirrors: ['-']\n    serve: {}\n",
     "site.yaml:47: cluster.registry_cache.mirrors: '-' is not a registry host name[:port]"),
    ("  registry_cache:\n    url: http://192.168.1.10:5000\n    mirrors: ['ghcr.io:99999']\n",
     "site.yaml:47: cluster.registry_cache.mirrors: 'ghcr.io:99999' is not a registry host name[:port]"),
    # mirror i listens on url's port + i: quay.io on 8080, the controller's own (controller_url)
    ("  registry_cache:\n    url: http://192.168.1.10:8078\n    serve: {}\n",
     "site.yaml:8: cluster.registry_cache: quay.io would be served on 192.168.1.10:8080, controller_url's own port"),
])  # fmt: skip
def test_a_cache_that_cannot_be_served_as_declared_is_refused(tmp_path, section, problem):
    problems = load_problems(home_lab(tmp_path / "site", section))
    assert any(p.startswith(problem) for p in problems), problems


K3S_BU = "controller/bastion/cluster/k3s.bu"


def _own_k3s_bu(site_dir, edit) -> None:
    """The site's own ignition/k3s.bu: the built-in one, edited."""
    from regcache_kit import REPO

    (site_dir / "ignition").mkdir(exist_ok=True)
    (site_dir / "ignition" / "k3s.bu").write_text(edit((REPO / K3S_BU).read_text()))


def test_site_check_refuses_nodes_told_another_registry_configuration(tmp_path):
    site = home_lab(tmp_path / "site")
    # a site template that tells containerd something else than the served cache
    _own_k3s_bu(site, lambda t: t.replace(
        "inline: {{ cluster.registries_yaml | tojson }}",
        'inline: "mirrors:\\n  docker.io:\\n    endpoint: [\\"http://192.168.1.10:5000\\"]\\n'
        '  ghcr.io:\\n    endpoint: [\\"http://192.168.1.10:5000\\"]\\n"'))  # fmt: skip
    r = CliRunner().invoke(site_check, [str(site)])
    assert r.exit_code == 1
    assert ("site.yaml: cluster.registry_cache: machine pi1's Ignition (ignition/k3s.bu): "
            "/etc/rancher/k3s/registries.yaml mirrors.ghcr.io.endpoint is "
            "['http://192.168.1.10:5000'], but the cache serves ghcr.io on http://192.168.1.10:5001"
            ) in r.output  # fmt: skip
    assert "mirrors.quay.io is missing: the cache serves quay.io on http://192.168.1.10:5002" in r.output


def test_site_check_refuses_nodes_told_no_registry_configuration(tmp_path):
    site = home_lab(tmp_path / "site")
    _own_k3s_bu(site, lambda t: t.replace("{%- if cluster.registries_yaml %}", "{%- if false %}"))
    problems = load_problems(site)
    assert ("site.yaml: cluster.registry_cache: machine nuc1's Ignition (ignition/k3s.bu) writes no "
            "/etc/rancher/k3s/registries.yaml: its containerd would not use the cache") in problems


def test_site_check_accepts_the_built_in_and_an_unchanged_copy(tmp_path):
    site = home_lab(tmp_path / "site")
    assert CliRunner().invoke(site_check, [str(site)]).exit_code == 0
    _own_k3s_bu(site, lambda t: t)
    r = CliRunner().invoke(site_check, [str(site)])
    assert r.exit_code == 0, r.output


def test_a_registry_log_past_its_bound_is_cut_and_the_registry_writes_on(tmp_path):
    # While the upstream cannot be reached each restart appended a Go trace: ~30 MB a day per
    # mirror on a small appliance. A writer that appends, as the registry does (its stdout is
    # the log opened "ab"), keeps its descriptor: its next line lands at the new end.
    import subprocess
    import time

    from bastion.regcache.run import cap_log

    log = tmp_path / "registry.log"
    with log.open("ab") as out:
        writer = subprocess.Popen(["sh", "-c", "while :; do echo 0123456789abcdef; done"], stdout=out)
    try:
        while log.stat().st_size < 100_000:
            time.sleep(0.01)
        assert not cap_log(log, limit=10**9)
        assert cap_log(log, limit=50_000)
        old = (tmp_path / "registry.log.1").read_bytes()
        assert len(old) >= 100_000 and old.startswith(b"0123456789abcdef\n")
        time.sleep(0.2)
    finally:
        writer.kill()
        writer.wait()
    now = log.read_bytes()
    # a writer at its old offset would have left a hole of NULs where the cut bytes were
    assert now and b"\0" not in now
