"""An API edit (SiteHolder.apply/edit) and the files on disk around it: the hooks a reload runs
run after an edit too, a file someone saves while the edit is validated is not taken as seen,
and a site file that is a symlink is written through. The hand edits are made from inside the
edit's validation (a wrapped load_site), so that they land in the window every time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from bastion.site import holder as holder_mod
from bastion.site.holder import SiteHolder
from bastion.site.load import SiteError

MACHINES = "machines.yaml"
WORKER = "profiles/flatcar-worker.yaml"


def _powered_off(site: Path) -> bytes:
    """machines.yaml with node1 declared off, as PATCH {"power": "off"} writes it."""
    text = (site / MACHINES).read_text()
    return text.replace("    relay: 0\n", "    relay: 0\n    power: 'off'\n", 1).encode()


def _during_validation(monkeypatch, hand_edit) -> None:
    """Run hand_edit() while the edit's site is being loaded (the overlay load only)."""
    real = holder_mod.load_site

    def load_site(root, overlay=None, **kw):
        if overlay:
            hand_edit()
        return real(root, overlay=overlay, **kw)

    monkeypatch.setattr(holder_mod, "load_site", load_site)


def test_an_edit_runs_the_reload_hooks_with_its_generation_after_the_lock(site_dir):
    # bastion.api.main's on_reload is what tells the device's node watchdog, the log shipper
    # and the operator that the site changed; an edit swapped the site in without it
    seen = []

    def on_reload(outcome):
        free = h._lock.acquire(blocking=False)  # a hook may reload or edit itself
        if free:
            h._lock.release()
        seen.append((outcome, h.generation, free))

    h = SiteHolder(site_dir, on_reload=on_reload)
    h.apply({MACHINES: _powered_off(site_dir)})
    assert len(seen) == 1, "the edit ran no reload hooks"
    outcome, generation, free = seen[0]
    assert (outcome.ok, outcome.generation, generation, free) == (True, 2, 2, True)
    assert outcome.edit == (MACHINES,) and outcome.error is None
    assert h.site.machine("node1").power == "off"


def test_a_hand_edit_of_another_file_saved_during_an_edit_is_loaded_by_the_poll(
    site_dir, monkeypatch
):
    h = SiteHolder(site_dir)
    worker = site_dir / WORKER

    def hand_edit():
        worker.write_text(worker.read_text().replace("args:\n", "args:\n  - handedit=1\n", 1))

    _during_validation(monkeypatch, hand_edit)
    h.apply({MACHINES: _powered_off(site_dir)})
    monkeypatch.undo()
    # the poll's two looks: the hand edit is a change, taken at the second
    assert h.poll() is None
    outcome = h.poll()
    assert outcome is not None and outcome.ok, (
        "the hand edit saved during the edit was never loaded"
    )
    assert "handedit=1" in h.site.profiles["flatcar-worker"].boot.args
    assert h.site.machine("node1").power == "off"
    assert h.poll() is None and h.poll() is None


def test_the_edits_own_write_is_no_change_for_the_poll(site_dir):
    h = SiteHolder(site_dir)
    h.apply({MACHINES: _powered_off(site_dir)})
    generation = h.generation
    assert [h.poll(), h.poll(), h.poll()] == [None, None, None]
    assert h.generation == generation


def test_a_symlinked_site_file_is_written_through_and_stays_a_link(site_dir):
    (site_dir / "env").mkdir()
    os.replace(site_dir / MACHINES, site_dir / "env" / MACHINES)
    os.symlink(f"env/{MACHINES}", site_dir / MACHINES)
    h = SiteHolder(site_dir)
    new = _powered_off(site_dir)
    h.apply({MACHINES: new})
    assert (site_dir / MACHINES).is_symlink(), "the edit replaced the link with a regular file"
    assert (site_dir / "env" / MACHINES).read_bytes() == new
    assert h.site.machine("node1").power == "off"
    # the link and the file it names are both what the edit wrote: no reload to come
    assert [h.poll(), h.poll()] == [None, None]


def test_a_symlink_out_of_the_site_directory_is_neither_written_through_nor_replaced(
    site_dir, tmp_path
):
    h = SiteHolder(site_dir)
    outside = tmp_path / "elsewhere.yaml"
    outside.write_bytes((site_dir / MACHINES).read_bytes())
    (site_dir / MACHINES).unlink()
    os.symlink(outside, site_dir / MACHINES)  # made by hand after the start
    before = outside.read_bytes()
    with pytest.raises(
        SiteError, match="machines.yaml: is a symlink that leaves the site directory"
    ):
        h.apply({MACHINES: _powered_off(site_dir)})
    assert (site_dir / MACHINES).is_symlink() and outside.read_bytes() == before
