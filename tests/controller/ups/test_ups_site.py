"""site.yaml `ups:`: what loads, and what `bastion site check` refuses, named by file and field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def check(site_dir, ups_yaml: str) -> subprocess.CompletedProcess:
    p = site_dir / "site.yaml"
    p.write_text(p.read_text() + ups_yaml)
    return subprocess.run([str(Path(sys.executable).parent / "bastion"), "site", "check", str(site_dir)],
                          capture_output=True, text=True, check=False)  # fmt: skip


def test_a_ups_section_loads_with_its_defaults(site_dir):
    from bastion.site.load import load_site

    check(site_dir, "ups:\n  name: eaton\n  host: 10.77.0.9\n  username: monitor\n")
    ups = load_site(site_dir).settings.ups
    assert (ups.name, ups.host, ups.port, ups.username) == ("eaton", "10.77.0.9", 3493, "monitor")
    assert (ups.on_battery_s, ups.low_charge, ups.resume_charge) == (60, 20, 50)


@pytest.mark.parametrize("yaml, problem", [
    ("ups:\n  host: 10.0.0.1\n", "ups.name"),
    ("ups:\n  name: 'two words'\n", "ups.name"),
    ("ups:\n  name: eaton\n  port: 70000\n", "ups.port"),
    ("ups:\n  name: eaton\n  password: hunter2\n", "ups.password"),
    ("ups:\n  name: eaton\n  low_charge: 60\n  resume_charge: 40\n", "resume_charge (40) must be above low_charge"),
    ("ups:\n  name: eaton\n  on_battery_s: -1\n", "ups.on_battery_s"),
    # a name the resolver cannot encode: the watch failed every pass with a UnicodeError
    ("ups:\n  name: eaton\n  host: " + "a" * 64 + "\n", "is not a host name or address"),
    ("ups:\n  name: eaton\n  host: \"ups\\0\"\n", "is not a host name or address"),
    ("ups:\n  name: eaton\n  host: ups..lan\n", "is not a host name or address"),
])  # fmt: skip
def test_site_check_refuses_a_bad_ups_section_by_file_and_field(site_dir, yaml, problem):
    r = check(site_dir, yaml)
    assert r.returncode == 1, r.stdout
    assert "site.yaml" in r.stderr and problem in r.stderr, r.stderr
