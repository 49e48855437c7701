"""A copy of examples/home-lab that loads without `bastion assets fetch k3s` (the nodes are
told to download k3s from elsewhere, with its SHA-256 given), with its registry cache edited."""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
CACHE_SECTION = "  registry_cache:\n    url: http://192.168.1.10:5000\n    serve: {max_size: 10GiB}\n"
_K3S = "    version: v1.31.4+k3s1\n"


def home_lab(dest: Path, registry_cache: str | None = None) -> Path:
    """examples/home-lab in `dest`; `registry_cache` replaces its cluster.registry_cache."""
    shutil.copytree(REPO / "examples" / "home-lab", dest)
    path = dest / "site.yaml"
    text = path.read_text()
    assert CACHE_SECTION in text and _K3S in text
    text = text.replace(_K3S, _K3S + "    url: https://k3s.example.net/{version}/{binary}\n"
                              f"    sha256: {{amd64: {'a' * 64}, arm64: {'b' * 64}}}\n")  # fmt: skip
    if registry_cache is not None:
        text = text.replace(CACHE_SECTION, registry_cache)
    path.write_text(text)
    return dest


def registry_cache(site_dir: Path):
    """The site's cluster.registry_cache as loaded."""
    from bastion.site.load import load_site

    return load_site(site_dir).settings.cluster.registry_cache


def load_problems(site_dir: Path) -> list[str]:
    """The problems of a site that must not load."""
    import pytest
    from bastion.site.load import SiteError, load_site

    with pytest.raises(SiteError) as e:
        load_site(site_dir)
    return e.value.problems
