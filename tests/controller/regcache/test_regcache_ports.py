"""Mirrors on ports of their own (site.yaml `mirrors: {registry: port}`): a registry's port does
not depend on its place, so no edit of the list sends a node's pulls of one registry to another
registry's proxy; what the site may not say is refused at load, naming the field."""

from __future__ import annotations

import pytest
import yaml
from bastion.cluster.plan import registries_yaml
from bastion.regcache import plan
from bastion.regcache.run import handed_over, render
from bastion.serve_cli import site_check
from bastion.state.secrets import SecretStore
from click.testing import CliRunner
from regcache_kit import home_lab, load_problems, registry_cache

PINNED = ("  registry_cache:\n    url: http://192.168.1.10:5000\n"
          "    mirrors: {docker.io: 5000, ghcr.io: 5001, quay.io: 5002, registry.k8s.io: 5003}\n"
          "    serve: {max_size: 10GiB}\n")  # fmt: skip


def _section(mirrors: str, url: str = "http://192.168.1.10:5000", serve: str = "{}") -> str:
    return f"  registry_cache:\n    url: {url}\n    mirrors: {mirrors}\n    serve: {serve}\n"


def test_each_mirror_is_served_on_the_port_it_is_given(tmp_path):
    site = home_lab(tmp_path / "site", _section("{quay.io: 5107, docker.io: 5100, ghcr.io: 5103}"))
    cache = registry_cache(site)
    got = [(i.mirror, i.listen, i.upstream, i.endpoint) for i in plan.instances(cache)]
    assert got == [
        ("quay.io", "192.168.1.10:5107", "https://quay.io", "http://192.168.1.10:5107"),
        ("docker.io", "192.168.1.10:5100", "https://registry-1.docker.io", "http://192.168.1.10:5100"),
        ("ghcr.io", "192.168.1.10:5103", "https://ghcr.io", "http://192.168.1.10:5103"),
    ]


def test_the_nodes_registries_yaml_names_the_given_ports(tmp_path):
    site = home_lab(tmp_path / "site", _section("{ghcr.io: 5003, docker.io: 5000}"))
    told = yaml.safe_load(registries_yaml(registry_cache(site)))["mirrors"]
    assert told == {"ghcr.io": {"endpoint": ["http://192.168.1.10:5003"]},
                    "docker.io": {"endpoint": ["http://192.168.1.10:5000"]}}  # fmt: skip
    # and what every node's rendered Ignition writes is checked against them
    r = CliRunner().invoke(site_check, [str(site)])
    assert r.exit_code == 0, r.output


def test_a_reorder_with_given_ports_keeps_every_registrys_port_and_config(tmp_path):
    first = home_lab(tmp_path / "a", PINNED)
    moved = home_lab(tmp_path / "b", _section(
        "{registry.k8s.io: 5003, quay.io: 5002, docker.io: 5000, ghcr.io: 5001}", serve="{max_size: 10GiB}"))  # fmt: skip
    before, after = registry_cache(first), registry_cache(moved)
    assert plan.endpoints(after) == plan.endpoints(before) == {
        "docker.io": "http://192.168.1.10:5000", "ghcr.io": "http://192.168.1.10:5001",
        "quay.io": "http://192.168.1.10:5002", "registry.k8s.io": "http://192.168.1.10:5003",
    }  # fmt: skip
    assert handed_over(plan.instances(before), plan.instances(after)) == []
    # the same config.yml for every instance: the runner restarts none of them
    store = SecretStore(tmp_path / "secrets")
    texts = {}
    for name, cache in (("before", before), ("after", after)):
        texts[name] = {i.mirror: p.read_text() for i, p in render(cache, tmp_path / "state", store)}
    assert texts["before"] == texts["after"]


def test_the_list_form_means_what_it_meant_and_a_reorder_of_it_is_named(tmp_path):
    listed = registry_cache(home_lab(tmp_path / "a", _section("[docker.io, ghcr.io]")))
    assert plan.ports(listed) == {"docker.io": 5000, "ghcr.io": 5001}
    # writing those same ports down changes no endpoint: a site can move to the mapping freely
    pinned = registry_cache(home_lab(tmp_path / "b", _section("{docker.io: 5000, ghcr.io: 5001}")))
    assert plan.endpoints(pinned) == plan.endpoints(listed)
    first = registry_cache(home_lab(tmp_path / "c", _section("[quay.io, docker.io, ghcr.io]")))
    assert handed_over(plan.instances(listed), plan.instances(first)) == [
        ("http://192.168.1.10:5000", "docker.io", "quay.io"),
        ("http://192.168.1.10:5001", "ghcr.io", "docker.io"),
    ]


def test_with_every_port_given_the_url_needs_none(tmp_path):
    cache = registry_cache(home_lab(tmp_path / "site", _section("{docker.io: 6000}", url="http://192.168.1.10")))
    assert plan.endpoints(cache) == {"docker.io": "http://192.168.1.10:6000"}


@pytest.mark.parametrize("section, problem", [
    (_section("{docker.io: 5000, ghcr.io: 5001, quay.io: 5000}"),
     "site.yaml:47: cluster.registry_cache.mirrors: docker.io and quay.io are both on port 5000"),
    (_section("{docker.io: 0}"),
     "site.yaml:47: cluster.registry_cache.mirrors: docker.io: 0 is not a TCP port (1 to 65535)"),
    (_section("{docker.io: 65536}"),
     "site.yaml:47: cluster.registry_cache.mirrors: docker.io: 65536 is not a TCP port (1 to 65535)"),
    (_section("{docker.io: '5000'}"),
     "site.yaml:47: cluster.registry_cache.mirrors: docker.io: '5000' is not a TCP port"),
    (_section("{docker.io: true}"),
     "site.yaml:47: cluster.registry_cache.mirrors: docker.io: True is not a TCP port"),
    (_section("{docker.io: }"),
     "site.yaml:47: cluster.registry_cache.mirrors: docker.io: None is not a TCP port"),
    (_section("{'..': 5000}"),
     "site.yaml:47: cluster.registry_cache.mirrors: '..' is not a registry host name[:port]"),
    (_section("{'*': 5000}"),
     "site.yaml:46: cluster.registry_cache: mirrors: '*' cannot be served"),
    # one item with a port in the list form: every mirror gets its port, in one mapping, or none
    (_section("[docker.io, {ghcr.io: 5003}]"),
     "site.yaml:47: cluster.registry_cache.mirrors: {'ghcr.io': 5003}: give every mirror its port"),
    (_section("docker.io"),
     "site.yaml:47: cluster.registry_cache.mirrors: must be a list of registries, or a mapping"),
    # ports mean nothing to a cache run elsewhere: every mirror is its one url
    ("  registry_cache:\n    url: http://cache.example.net:5000\n    mirrors: {docker.io: 5000}\n",
     "site.yaml:46: cluster.registry_cache: mirrors: ports (registry: port) are for the cache"),
    (_section("{docker.io: 5000}", url="http://192.168.1.10:0"),
     "site.yaml:46: cluster.registry_cache: url: 'http://192.168.1.10:0': its port is not a TCP port"),
    (_section("[docker.io]", url="http://192.168.1.10:99999"),
     "site.yaml:46: cluster.registry_cache: url: 'http://192.168.1.10:99999': its port is not a TCP port"),
    (_section("{docker.io: 5000}", serve="{upstreams: {gcr.io: 'https://gcr.io'}}"),
     "site.yaml:46: cluster.registry_cache: serve.upstreams: 'gcr.io' is not in mirrors ['docker.io']"),
    # the controller listens on controller_url's port (8080) on the same host
    (_section("{docker.io: 5000, ghcr.io: 8080}"),
     "site.yaml:8: cluster.registry_cache.mirrors: ghcr.io would be served on 192.168.1.10:8080, controller_url's own port"),
])  # fmt: skip
def test_ports_that_cannot_be_served_are_refused_naming_the_field(tmp_path, section, problem):
    problems = load_problems(home_lab(tmp_path / "site", section))
    assert any(p.startswith(problem) for p in problems), problems


def test_bastion_site_check_says_the_problem(tmp_path):
    site = home_lab(tmp_path / "site", _section("{docker.io: 5000, ghcr.io: 5000}"))
    r = CliRunner().invoke(site_check, [str(site)])
    assert r.exit_code == 1
    assert ("site.yaml:47: cluster.registry_cache.mirrors: docker.io and ghcr.io are both on port "
            "5000: each mirror is its own registry, on a port of its own") in r.output  # fmt: skip
