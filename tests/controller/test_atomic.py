"""bastion.atomic: the one way the controller replaces a file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bastion import atomic


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def test_a_new_file_gets_the_mode_less_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic.write_bytes(tmp_path / "a", b"x")
        atomic.write_bytes(tmp_path / "b", b"x", mode=0o600)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a") == 0o644
    assert _mode(tmp_path / "b") == 0o600


def test_an_existing_file_keeps_its_mode(tmp_path):
    p = tmp_path / "machines.yaml"
    p.write_text("old\n")
    os.chmod(p, 0o640)
    atomic.write_text(p, "new\n")
    assert p.read_text() == "new\n"
    assert _mode(p) == 0o640


def test_keep_mode_false_forces_the_mode(tmp_path):
    p = tmp_path / "token"
    p.write_text("old\n")
    os.chmod(p, 0o644)
    atomic.write_text(p, "new\n", mode=0o600, keep_mode=False)
    assert _mode(p) == 0o600


def test_if_changed_leaves_an_identical_file_alone(tmp_path):
    p = tmp_path / "board.json"
    assert atomic.write_bytes(p, b"{}", if_changed=True) is True
    before = os.stat(p)
    assert atomic.write_bytes(p, b"{}", if_changed=True) is False
    assert os.stat(p).st_ino == before.st_ino
    assert atomic.write_bytes(p, b"{ }", if_changed=True) is True
    assert p.read_bytes() == b"{ }"


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    p = tmp_path / "site.yaml"
    p.write_text("good\n")
    with pytest.raises(TypeError):
        atomic.write_bytes(p, "not bytes")  # type: ignore[arg-type]
    assert p.read_text() == "good\n"
    assert _leftovers(tmp_path) == []


def test_write_json_is_indented_with_a_newline(tmp_path):
    atomic.write_json(tmp_path / "m.json", {"a": [1]})
    assert (tmp_path / "m.json").read_text() == '{\n  "a": [\n    1\n  ]\n}\n'


def test_parents_are_made(tmp_path):
    atomic.write_bytes(tmp_path / "x" / "y" / "z", b"1")
    assert (tmp_path / "x/y/z").read_bytes() == b"1"


def test_symlink_replaces_a_link_in_one_step(tmp_path):
    link = tmp_path / "current"
    atomic.symlink("v1", link)
    atomic.symlink("v2", link)
    assert os.readlink(link) == "v2"
    assert _leftovers(tmp_path) == []


def test_move_into_across_filesystems(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's tmp_path")
    src = shm / f"bastion-test-{os.getpid()}"
    src.write_bytes(b"payload" * 1000)
    try:
        atomic.move_into(src, tmp_path / "obj")
    finally:
        src.unlink(missing_ok=True)
    assert (tmp_path / "obj").read_bytes() == b"payload" * 1000
    assert not src.exists()
    assert _leftovers(tmp_path) == []


def test_move_into_on_one_filesystem_renames(tmp_path):
    src = tmp_path / "part"
    src.write_bytes(b"1")
    ino = os.stat(src).st_ino
    atomic.move_into(src, tmp_path / "obj")
    assert os.stat(tmp_path / "obj").st_ino == ino


def test_exchange_swaps_two_directories_in_one_step(tmp_path):
    a, b = tmp_path / "new", tmp_path / "tftp"
    a.mkdir()
    (a / "f").write_text("new")
    b.mkdir()
    (b / "f").write_text("old")
    assert atomic.exchange(a, b) is True  # Linux 3.15+, glibc 2.28+: the machine this runs on
    assert (b / "f").read_text() == "new" and (a / "f").read_text() == "old"
    with pytest.raises(FileNotFoundError):
        atomic.exchange(a, tmp_path / "missing")
    assert (a / "f").read_text() == "old"  # nothing moved
