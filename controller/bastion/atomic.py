"""Files replaced atomically: whoever reads a file sees its old content or its new one, never a
part, and after a crash or power cut the file is one of the two, whole.

The recipe: write a temporary file in the same directory (a rename is atomic only within one
filesystem), fsync it, rename it over the target, fsync the directory so the rename itself is
durable. A file that already exists keeps its permission bits (a site file edited through the
API stays 0644); a new one gets `mode`, less the umask, as open(2) would.

A crash or power cut between making the temporary and renaming it leaves the temporary behind.
Each is named `.<name>.bastion-<8 hex digits>.tmp` (`.link` for a symlink), a shape nothing else
makes, and every write through this module removes those in its directory that nobody has
touched for `STALE_AFTER` seconds (`sweep`): a write in progress touches its temporary at every
chunk and renames it moments after the last, so an old one is a leftover, never a live write.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20
# The temporaries this module makes, and only those (see the module docstring).
_TEMP_RE = re.compile(r"\..+\.bastion-[0-9a-f]{8}\.(?:tmp|link)")
# How long a temporary must have stood untouched before a sweep takes it for a crash's leftover.
STALE_AFTER = 15 * 60


def fsync_dir(d: Path | str) -> None:
    """Make the directory's entries (a rename, a new file) durable."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path, what: str = "tmp") -> Path:
    """A new temporary's path beside `path`, in the shape `sweep` takes back after a crash: for
    a writer that cannot replace by rename (bastion.state.secrets links its temporary)."""
    return path.with_name(f".{path.name}.bastion-{secrets.token_hex(4)}.{what}")


def sweep(directory: Path | str, older_than: float = STALE_AFTER) -> list[str]:
    """Remove the temporaries this module made in directory that have stood untouched for
    older_than seconds (a crash's leftovers); the names removed. Nothing else is touched: not a
    file of another shape, not a directory, not one written to recently. Never raises: a
    directory that cannot be read or a file that cannot be removed is left for the next sweep."""
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for e in entries:
        if not _TEMP_RE.fullmatch(e.name):
            continue
        try:
            if not (e.is_file(follow_symlinks=False) or e.is_symlink()):
                continue
            if now - e.stat(follow_symlinks=False).st_mtime < older_than:
                continue
            os.unlink(e.path)
        except OSError:
            continue
        removed.append(e.name)
    return removed


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def _replacing(path: Path, what: str = "tmp") -> Iterator[Path]:
    """The recipe's frame: a temporary name beside path for the caller to make (a file written
    and fsynced, a link), then renamed over path and the directory fsynced. If anything fails,
    the temporary is removed and path is as it was."""
    tmp = temp_name(path, what)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    fsync_dir(path.parent)
    sweep(path.parent)


def write_bytes(
    path: Path | str, data: bytes, *, mode: int = 0o666, keep_mode: bool = True,
    if_changed: bool = False,
) -> bool:
    """Replace path with data. mode: a new file's permissions (the umask applies); an existing
    file keeps its own unless keep_mode is False (a secret is 0600 whatever it was). if_changed: leave a file that already holds data alone (no write, no new
    mtime). Returns whether anything was written."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    if if_changed and st is not None and stat.S_ISREG(st.st_mode):
        try:
            if st.st_size == len(data) and path.read_bytes() == data:
                return False
        except OSError:
            pass
    path.parent.mkdir(parents=True, exist_ok=True)
    with _replacing(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            if st is not None and keep_mode:
                os.fchmod(f.fileno(), stat.S_IMODE(st.st_mode))
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return True


def write_text(path: Path | str, text: str, **kw: Any) -> bool:
    return write_bytes(path, text.encode(), **kw)


def write_json(path: Path | str, obj: Any, **kw: Any) -> bool:
    """obj as indented JSON (a trailing newline), atomically."""
    return write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode(), **kw)


def symlink(target: str | os.PathLike, link: Path | str) -> None:
    """Point link at target, replacing whatever link was (never a moment without it)."""
    link = Path(link)
    with _replacing(link, "link") as tmp:
        os.symlink(target, tmp)


def move_into(src: Path | str, dst: Path | str) -> None:
    """Rename src to dst atomically; across filesystems, by a copy next to dst first."""
    src, dst = Path(src), Path(dst)
    try:
        os.replace(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        with _replacing(dst) as tmp, open(tmp, "xb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, _CHUNK)
            out.flush()
            os.fsync(out.fileno())
        _unlink(src)  # once the copy is durable
        return
    fsync_dir(dst.parent)
    sweep(dst.parent)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


def exchange(a: Path | str, b: Path | str) -> bool:
    """Swap two paths in one step (renameat2 with RENAME_EXCHANGE, Linux 3.15 and glibc 2.28 or
    later), so that neither name is ever missing: a directory replaced this way is the old one
    or the new one after a crash, never none. False, with nothing changed, where the kernel,
    the filesystem or the C library cannot do it; the caller then falls back."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        fsync_dir(Path(b).parent)
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))
