"""bastion.atomic: the one way the controller replaces a file."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
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


# -- what a crash leaves behind ------------------------------------------------------------------


def _crash_before_rename(call: str, directory: Path) -> Path:
    """Run `call` in a child process that dies just before the rename (os._exit: no cleanup
    runs, as after a kill or a power cut); the temporary it left in directory."""
    before = set(directory.iterdir())
    code = f"import os\nfrom bastion import atomic\nos.replace = lambda *a: os._exit(3)\n{call}\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=directory, check=False)
    assert r.returncode == 3
    (left,) = set(directory.iterdir()) - before
    return left


def _age(p: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(p, (t, t), follow_symlinks=False)


def test_what_a_crash_left_is_swept_by_the_next_write_to_that_directory(tmp_path):
    # A kill or power cut between the temporary and the rename left `.<name>.<hex>.tmp` in
    # assets/ and the state directories for ever: nothing ever removed one.
    old_file = _crash_before_rename("atomic.write_bytes('manifest.json', b'{}')", tmp_path)
    old_link = _crash_before_rename("atomic.symlink('v1', 'current')", tmp_path)
    live = _crash_before_rename("atomic.write_bytes('manifest.json', b'{}')", tmp_path)
    for p in (old_file, old_link):
        _age(p, 24 * 3600)  # far past STALE_AFTER
    # Not ours, however old: another shape of name, a directory of our shape.
    foreign = [tmp_path / ".site.yaml.0badc0de.tmp", tmp_path / "notes.bastion-0badc0de.tmp",
               tmp_path / ".x.bastion-nothex!!.tmp"]  # fmt: skip
    for p in foreign:
        p.write_text("keep\n")
    ours_dir = tmp_path / ".d.bastion-0badc0de.tmp"
    ours_dir.mkdir()
    for p in [*foreign, ours_dir]:
        _age(p, 24 * 3600)

    atomic.write_bytes(tmp_path / "other", b"x")

    assert not old_file.exists() and not old_link.is_symlink()
    assert live.exists()  # touched a moment ago: as a write in progress would be
    assert all(p.read_text() == "keep\n" for p in foreign) and ours_dir.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live.name, "other", *(p.name for p in foreign), ours_dir.name]
    )


def test_sweep_takes_only_temporaries_older_than_asked(tmp_path):
    left = _crash_before_rename("atomic.write_text('a', 'x')", tmp_path)
    assert atomic.sweep(tmp_path) == []
    _age(left, 120)
    assert atomic.sweep(tmp_path, older_than=3600) == []
    assert atomic.sweep(tmp_path, older_than=60) == [left.name]
    assert list(tmp_path.iterdir()) == []
    assert atomic.sweep(tmp_path / "missing") == []  # never raises
