"""`bastion install-service` for a site that serves its registry cache: the cache's unit beside
the controller's, accepted by systemd-analyze verify, running `bastion registry-cache run` as
the controller's user with its state directory. Under --root: the host's /etc is never touched."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from bastion.cli import main
from click.testing import CliRunner
from regcache_kit import home_lab

pytestmark = pytest.mark.skipif(not shutil.which("systemd-analyze"),
                                reason="needs systemd-analyze (Debian: systemd)")  # fmt: skip


def test_a_site_that_serves_its_cache_gets_the_caches_unit(tmp_path):
    site = home_lab(tmp_path / "site")
    root = tmp_path / "root"
    r = CliRunner().invoke(main, ["install-service", "--site", str(site), "--root", str(root)],
                           catch_exceptions=False)  # fmt: skip
    assert r.exit_code == 0, r.output
    unit = root / "etc/systemd/system/edge-bastion-registry-cache.service"
    assert f"wrote {unit}" in r.output
    v = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False,
                       timeout=60)  # fmt: skip
    assert v.returncode == 0, v.stdout + v.stderr
    lines = set(unit.read_text().splitlines())
    for want in ("User=edge-bastion", "StateDirectory=edge-bastion", "ProtectSystem=strict",
                 "Environment=XDG_STATE_HOME=%S", "Restart=on-failure"):  # fmt: skip
        assert want in lines, want
    exec_start = next(x for x in lines if x.startswith("ExecStart="))
    assert exec_start.endswith(f" registry-cache run --site {site.resolve()}")
    # the controller's unit is there too, unchanged in kind
    assert (root / "etc/systemd/system/edge-bastion.service").is_file()


def test_a_site_without_a_served_cache_gets_no_caches_unit(tmp_path):
    site = home_lab(tmp_path / "site", "  registry_cache:\n    url: https://cache.example.net\n")
    root = tmp_path / "root"
    r = CliRunner().invoke(main, ["install-service", "--site", str(site), "--root", str(root),
                                  "--dry-run"], catch_exceptions=False)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "registry-cache" not in r.output
    r = CliRunner().invoke(main, ["install-service", "--site", str(site), "--root", str(root)],
                           catch_exceptions=False)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert not (root / "etc/systemd/system/edge-bastion-registry-cache.service").exists()
