"""An API edit of several files is one edit, across a crash between its files too
(bastion.site.holder: the edit record). The crash is a real one: a child process that writes
the first file of the edit and dies with os._exit, as a kill or a power cut would leave it."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from bastion.site import holder as holder_mod
from bastion.site.holder import EDIT_RECORD, SiteHolder
from bastion.site.load import SiteError

YAML = "profiles/flatcar-worker.yaml"
JSON = "profiles/flatcar-worker.json"


def _to_json(site: Path) -> dict[str, bytes | None]:
    """What PUT /api/v1/profiles/flatcar-worker?format=matchbox asks for: the profile as
    matchbox JSON, and its YAML file gone."""
    body = yaml.safe_load((site / YAML).read_text())
    body["name"] = "Flatcar worker, as JSON"
    return {JSON: json.dumps({**body, "id": "flatcar-worker"}, indent=2).encode() + b"\n", YAML: None}


def _crash_after_first_file(site: Path) -> None:
    code = f"""
import os, sys
from pathlib import Path
from bastion.site import holder as h
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_holder_edit import _to_json
site = Path({str(site)!r})
changes = _to_json(site)
real = h._write
def first_then_die(root, todo):
    rel = next(iter(todo))
    real(root, {{rel: todo[rel]}})
    os._exit(9)
h._write = first_then_die
h.SiteHolder(site).apply(changes)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 9, r.stderr
    assert (site / EDIT_RECORD).exists() and (site / JSON).exists() and (site / YAML).exists()


def test_an_edit_cut_short_by_a_crash_is_finished_at_the_next_start(site_dir):
    _crash_after_first_file(site_dir)
    with pytest.raises(SiteError, match="also defined by"):
        holder_mod.load_site(site_dir)  # what the crash left: not a site that loads
    h = SiteHolder(site_dir)
    assert h.site.profiles["flatcar-worker"].name == "Flatcar worker, as JSON"
    assert not (site_dir / YAML).exists() and not (site_dir / EDIT_RECORD).exists()


def test_a_file_changed_after_the_crash_is_not_overwritten(site_dir):
    _crash_after_first_file(site_dir)
    (site_dir / YAML).write_text((site_dir / YAML).read_text() + "# edited by hand since\n")
    with pytest.raises(SiteError, match="also defined by"):
        SiteHolder(site_dir)
    assert (site_dir / YAML).read_text().endswith("# edited by hand since\n")
    assert (site_dir / f"{EDIT_RECORD}.conflict").exists() and not (site_dir / EDIT_RECORD).exists()


def test_an_error_midway_puts_back_what_was_written(site_dir, monkeypatch):
    h = SiteHolder(site_dir)
    before = {p: p.read_bytes() for p in (site_dir / "profiles").iterdir()}
    real_unlink = Path.unlink

    def full_disk(self, missing_ok=False):
        if self.name == "flatcar-worker.yaml":
            raise OSError(errno.EIO, "I/O error", str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", full_disk)
    with pytest.raises(OSError):
        h.apply(_to_json(site_dir))
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in (site_dir / "profiles").iterdir()} == before
    assert not (site_dir / EDIT_RECORD).exists()
    assert h.site.profiles["flatcar-worker"].name == "Flatcar worker"


def test_a_whole_edit_leaves_no_record(site_dir):
    h = SiteHolder(site_dir)
    h.apply(_to_json(site_dir))
    assert h.site.profiles["flatcar-worker"].name == "Flatcar worker, as JSON"
    assert not (site_dir / YAML).exists() and not (site_dir / EDIT_RECORD).exists()
    assert SiteHolder(site_dir).site.profiles["flatcar-worker"].name == "Flatcar worker, as JSON"
