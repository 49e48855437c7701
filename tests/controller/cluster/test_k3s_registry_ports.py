"""The nodes' /etc/rancher/k3s/registries.yaml with the cache's mirrors on ports of their own
(site.yaml `cluster.registry_cache.mirrors: {registry: port}`): every node's rendered Ignition
(the built-in k3s.bu, judged by Debian's ignition-validate) names each registry's own port,
whatever its place in the mapping, and the list form names url's port plus the place, as it
always has."""

from __future__ import annotations

import urllib.parse

import yaml
from bastion.state.secrets import SecretStore
from bastion_testkit import assert_valid_ignition
from mirrorkit import home_lab_copy, render_all

VERSION = "v1.31.4+k3s1"
REGISTRIES = "/etc/rancher/k3s/registries.yaml"
SECTION = "  registry_cache:\n    url: http://192.168.1.10:5000\n    serve: {max_size: 10GiB}\n"


def _told(tmp_path, mirrors: str) -> dict[str, dict]:
    """Each node's registries.yaml `mirrors:`, rendered from home-lab with these mirrors."""
    site = tmp_path / "home-lab"
    home_lab_copy(site, VERSION)
    text = (site / "site.yaml").read_text()
    assert SECTION in text
    (site / "site.yaml").write_text(text.replace(
        SECTION, f"  registry_cache:\n    url: http://192.168.1.10:5000\n    mirrors: {mirrors}\n"
                 "    serve: {max_size: 10GiB}\n"))  # fmt: skip
    out = {}
    for name, config in render_all(site, SecretStore(tmp_path / "secrets")).items():
        assert_valid_ignition(config, tmp_path)
        [entry] = [f for f in config["storage"]["files"] if f["path"] == REGISTRIES]
        source = entry["contents"]["source"]
        assert source.startswith("data:,"), source
        out[name] = yaml.safe_load(urllib.parse.unquote(source[len("data:,"):]))["mirrors"]
    return out


def test_every_node_is_told_each_registrys_own_port(tmp_path):
    told = _told(tmp_path, "{registry.k8s.io: 5013, docker.io: 5010, ghcr.io: 5011}")
    assert set(told) == {"pi1", "pi2", "pi3", "nuc1", "nuc2"}
    for mirrors in told.values():
        assert mirrors == {
            "registry.k8s.io": {"endpoint": ["http://192.168.1.10:5013"]},
            "docker.io": {"endpoint": ["http://192.168.1.10:5010"]},
            "ghcr.io": {"endpoint": ["http://192.168.1.10:5011"]},
        }


def test_the_list_form_still_names_url_s_port_plus_the_place(tmp_path):
    told = _told(tmp_path, "[ghcr.io, docker.io]")
    for mirrors in told.values():
        assert mirrors == {"ghcr.io": {"endpoint": ["http://192.168.1.10:5000"]},
                           "docker.io": {"endpoint": ["http://192.168.1.10:5001"]}}  # fmt: skip
