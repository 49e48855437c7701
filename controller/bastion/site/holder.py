"""The site currently served, and how it is replaced: whole, and only by a site that loaded.

`SiteHolder` keeps the last good Site. `reload()` loads the directory again; on success the new
Site replaces the old one in a single assignment (requests in flight keep the one they started
with), on failure the old one keeps serving and the error is kept for /healthz, the API and the
event history. `poll()` reloads when a file's mtime, size or presence changed and then held still
for one more look. `apply(changes)` validates edits made through the API against the whole site
before writing them, atomically.

An edit of more than one file (a profile moved from JSON to YAML: the new file written, the old
one removed) is made whole even across a crash between its files: `apply` first writes what it
is about to do to `.bastion-edit.json` in the site directory (each file's new bytes, and a
digest of what it held before), and removes that record when every file is done. A holder
that starts and finds the record finishes the edit, file by file, where a file still holds
what it held before; a file changed since by someone else stops it (logged, and the record
kept aside as `.bastion-edit.json.conflict`), and the site is loaded as it is.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bastion import atomic
from bastion.site.load import SiteError, load_site
from bastion.model import Site

# Not part of the configuration: served as they are, or runtime state.
_SKIP_DIRS = {"assets", "var"}
EDIT_RECORD = ".bastion-edit.json"  # a dotfile: no reload is set off by it

log = logging.getLogger("bastion.site")


def _digest(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def _current(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _write(root: Path, changes: dict[str, bytes | None]) -> None:
    for rel, data in changes.items():
        path = root / rel
        if data is None:
            if _current(path) is not None:
                path.unlink(missing_ok=True)
                atomic.fsync_dir(path.parent)
        else:
            atomic.write_bytes(path, data)


def _set_aside(record: Path) -> list[str]:
    """Keep a record that is not to be finished as `.conflict` (for a person to read); nothing
    was written."""
    os.replace(record, record.with_name(EDIT_RECORD + ".conflict"))
    return []


def finish_interrupted_edit(root: Path) -> list[str]:
    """Finish an API edit that a crash cut short (EDIT_RECORD); returns the files it wrote or
    removed. Raises nothing: a record that does not read, or a file changed since, is logged and
    the record set aside."""
    record = root / EDIT_RECORD
    try:
        doc = json.loads(record.read_text())
        files = {rel: (None if f["data"] is None else base64.b64decode(f["data"]), f["before"])
                 for rel, f in doc["files"].items()}  # fmt: skip
    except FileNotFoundError:
        return []
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        log.error("%s does not read (%s): set aside, the site is loaded as it is", record, e)
        return _set_aside(record)
    todo: dict[str, bytes | None] = {}
    for rel, (data, before) in files.items():
        now = _current(root / rel)
        if now == data:
            continue  # written before the crash
        if _digest(now) != before:
            log.error("an interrupted edit of %s is not finished: %s changed since; its record "
                      "is set aside as %s.conflict", root, rel, EDIT_RECORD)  # fmt: skip
            return _set_aside(record)
        todo[rel] = data
    _write(root, todo)
    record.unlink()
    atomic.fsync_dir(root)
    if todo:
        log.warning("finished an edit that was interrupted: %s", ", ".join(sorted(todo)))
    return sorted(todo)


def fingerprint(root: Path) -> tuple:
    """(path, mtime_ns, size) of every configuration file under root, sorted."""
    out = []

    def walk(d: Path, rel: str) -> None:
        try:
            entries = list(os.scandir(d))
        except OSError:
            return
        for e in entries:
            if e.name.startswith("."):
                continue
            r = f"{rel}{e.name}"
            try:
                # a symlinked directory is not walked into (two links to "." made 2**40 paths
                # and the poll thread never came back); its own entry still counts
                if e.is_dir(follow_symlinks=False):
                    if not (rel == "" and e.name in _SKIP_DIRS):
                        walk(Path(e.path), r + "/")
                elif e.is_symlink() and not e.is_file():  # to a directory, or to nothing
                    st = e.stat(follow_symlinks=False)
                    out.append((r, st.st_mtime_ns, st.st_size))
                elif e.is_file():
                    st = e.stat()
                    out.append((r, st.st_mtime_ns, st.st_size))
            except OSError:
                continue

    walk(root, "")
    # What `bastion assets fetch k3s` records is configuration too: the nodes' k3s checksums
    # (bastion.cluster.plan.recorded_sha256). A fetch while serving reloads the site.
    for manifest in sorted(root.glob("assets/k3s/*/manifest.json")):
        try:
            st = manifest.stat()
        except OSError:
            continue
        out.append((str(manifest.relative_to(root)), st.st_mtime_ns, st.st_size))
    return tuple(sorted(out))


class Settle:
    """When a watch over the site files takes a change: once the files' fingerprint differs
    from the one last taken and then looks the same at two looks running. One look is not
    enough: an editor that truncates a file and then writes it can be caught in between, and an
    empty machines.yaml is a valid one (no machines). `bastion serve` (SiteHolder.poll) and the
    registry cache (bastion.regcache.run.SiteWatch) both go by it, so that the plan the nodes
    are told and the one the cache runs change at the same look."""

    def __init__(self, seen: tuple):
        self.seen = seen  # the fingerprint last taken
        self._settling: tuple | None = None  # a changed fingerprint seen once

    def changed(self, now: tuple) -> bool:
        """One look (`now`, a fingerprint): True when it is a change that has settled, which
        is then taken as seen."""
        if now == self.seen:
            self._settling = None
            return False
        if now != self._settling:
            self._settling = now
            return False
        self.take(now)
        return True

    def take(self, now: tuple) -> None:
        """The files are `now` (read or written by the watcher itself): no change pending."""
        self.seen, self._settling = now, None


@dataclass(frozen=True)
class ReloadOutcome:
    ok: bool
    changed: bool
    generation: int
    error: str | None = None


class SiteHolder:
    def __init__(self, root: Path, on_reload: Callable[[ReloadOutcome], None] | None = None):
        self.root = Path(root)
        self.on_reload = on_reload
        self._lock = threading.Lock()
        finish_interrupted_edit(self.root)
        self._settle = Settle(fingerprint(self.root))
        self.site: Site = load_site(self.root)  # raises SiteError: nothing to serve yet
        self.generation = 1
        self.loaded_at = time.time()
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    def _report(self, outcome: ReloadOutcome) -> ReloadOutcome:
        if self.on_reload is not None:
            self.on_reload(outcome)
        return outcome

    def reload(self) -> ReloadOutcome:
        """Load the directory again; keep serving the old site when the new one is broken."""
        with self._lock:
            self._settle.take(fingerprint(self.root))
            try:
                site = load_site(self.root)
            except Exception as e:  # SiteError; any other, a file the loader did not foresee
                if isinstance(e, SiteError):
                    self.last_error = str(e)
                else:  # a failed reload all the same
                    log.exception("site reload failed")
                    self.last_error = f"the site could not be loaded: {type(e).__name__}: {e}"[:500]
                self.last_error_at = time.time()
                return self._report(ReloadOutcome(False, False, self.generation, self.last_error))
            self._swap(site)
            return self._report(ReloadOutcome(True, True, self.generation))

    def poll(self) -> ReloadOutcome | None:
        """Reload once the configuration files changed and then looked the same twice running
        (Settle: one look is not enough); None otherwise."""
        if not self._settle.changed(fingerprint(self.root)):
            return None
        return self.reload()

    def apply(self, changes: dict[str, bytes | None]) -> Site:
        """Validate `changes` (relative path -> new bytes, None to delete) against the whole
        site, then write them atomically and serve the result. Raises SiteError untouched."""
        return self.edit(lambda: changes)

    def edit(self, make: Callable[[], dict[str, bytes | None]]) -> Site:
        """apply(make()), with make() run under the same lock as the write: an edit that reads
        a file to change part of it (a machine in machines.yaml) reads what the edit before it
        wrote. Read before the lock, two edits at once each wrote back the file as it was
        without the other's change, and both were answered 200 (20 machines added at once kept
        3). Whatever make() raises goes to the caller, nothing written."""
        with self._lock:
            changes = make()
            site = load_site(self.root, overlay=changes)
            if len(changes) > 1:  # one file alone is replaced atomically as it is
                self._write_recorded(changes)
            else:
                _write(self.root, changes)
            self._settle.take(fingerprint(self.root))
            self._swap(site)
        return site

    def _write_recorded(self, changes: dict[str, bytes | None]) -> None:
        """Write several files as one edit: the record first (a crash is finished at the next
        start), and on an error here (a full disk) the files already written put back."""
        record = self.root / EDIT_RECORD
        before = {rel: _current(self.root / rel) for rel in changes}
        files = {rel: {"data": None if data is None else base64.b64encode(data).decode(),
                       "before": _digest(before[rel])} for rel, data in changes.items()}  # fmt: skip
        atomic.write_text(record, json.dumps({"files": files}))
        try:
            _write(self.root, changes)
        except BaseException:
            _write(self.root, {rel: old for rel, old in before.items()
                               if _current(self.root / rel) != old})  # fmt: skip
            record.unlink()
            raise
        record.unlink()
        atomic.fsync_dir(self.root)

    def _swap(self, site: Site) -> None:
        self.site = site
        self.generation += 1
        self.loaded_at = time.time()
        self.last_error = None
        self.last_error_at = None
