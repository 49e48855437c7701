"""Settle, the rule by which `bastion serve` (SiteHolder.poll) and the registry cache
(regcache.run.SiteWatch) take a change of the site files: a fingerprint other than the one last
taken, seen the same at two looks running."""

from __future__ import annotations

from bastion.site.holder import Settle, fingerprint

A, B, C = ("a",), ("b",), ("c",)


def looks(settle: Settle, *fingerprints: tuple) -> list[bool]:
    return [settle.changed(f) for f in fingerprints]


def test_a_change_is_taken_at_its_second_look_and_once():
    s = Settle(A)
    assert looks(s, A, B, B, B) == [False, False, True, False]
    assert s.seen == B


def test_a_change_still_moving_is_not_taken_until_it_holds_still():
    # an editor that truncates a file and then writes it: two different looks, then the same
    assert looks(Settle(A), B, C, C) == [False, False, True]


def test_files_back_as_they_were_take_nothing_and_start_the_count_over():
    s = Settle(A)
    assert looks(s, B, A, B, B) == [False, False, False, True]


def test_take_drops_a_change_on_its_way():
    # the watcher's own reload or write: what it read or wrote is no change to take later
    s = Settle(A)
    assert looks(s, B) == [False]
    s.take(B)
    assert looks(s, B, B) == [False, False]


def test_over_real_files(tmp_path):
    (tmp_path / "machines.yaml").write_text("machines: []\n")
    s = Settle(fingerprint(tmp_path))
    (tmp_path / "machines.yaml").write_text("machines:\n  - name: node1\n    mac: 52:54:00:12:34:01\n")
    (tmp_path / ".bastion-edit.json").write_text("{}")  # a dotfile: not configuration
    assert looks(s, fingerprint(tmp_path), fingerprint(tmp_path), fingerprint(tmp_path)) == [False, True, False]
