"""The site currently served, and how it is replaced: whole, and only by a site that loaded.

`SiteHolder` keeps the last good Site. `reload()` loads the directory again; on success the new
Site replaces the old one in a single assignment (requests in flight keep the one they started
with), on failure the old one keeps serving and the error is kept for /healthz, the API and the
event history. `poll()` reloads when a file's mtime, size or presence changed and then held still
for one more look. `apply(changes)` validates edits made through the API against the whole site
before writing them, atomically, and then runs the same hooks (`on_reload`) as a reload does.

An edit is a compare-and-swap on the files it touches: each is read once for the edit (`read`
in `edit(make)`), and just before the write, under the lock, every one of them must still hold
what it held then, or nothing is written (EditConflict). A person saving machines.yaml while the
API's edit of it was being validated had their save replaced by the edit, unseen. The files the
edit does not write are left to the poll: the fingerprint taken as seen is the one from before
the edit read anything, with only the edit's own files brought up to date, so a hand edit of
another file saved meanwhile is still a change to load.

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
from bastion.model import Site
from bastion.site.load import SiteError, SiteFiles, Unreadable, load_site

# Not part of the configuration: served as they are, or runtime state.
_SKIP_DIRS = {"assets", "var"}
EDIT_RECORD = ".bastion-edit.json"  # a dotfile: no reload is set off by it

log = logging.getLogger("bastion.site")

# An edit's reader (SiteHolder.edit): read(rel) is the site file's bytes, None for no file.
Read = Callable[[str], bytes | None]


def _digest(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def _current(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _written_at(root: Path, rel: str) -> Path:
    """Where an edit of `rel` writes: through a symlink to its target when that stays inside the
    site directory (the loader reads no other), so that the link is kept; replacing the link
    with a regular file silently cut a site file off from the file it was shared with."""
    path = root / rel
    if path.is_symlink():
        target = path.resolve()
        if target.is_relative_to(root.resolve()):
            return target
    return path


def _target_rel(root: Path, rel: str) -> str:
    """For a symlink written through (_written_at), the site file it names; else `rel`."""
    path = _written_at(root, rel)
    return rel if path == root / rel else path.relative_to(root.resolve()).as_posix()


def _write(root: Path, changes: dict[str, bytes | None]) -> None:
    for rel, data in changes.items():
        path = root / rel
        if data is None:
            if _current(path) is not None:
                path.unlink(missing_ok=True)  # a symlink: the link goes, what it named stays
                atomic.fsync_dir(path.parent)
        else:
            atomic.write_bytes(_written_at(root, rel), data)


def _still(files: SiteFiles, rel: str) -> bytes | None | Unreadable:
    """What `rel` holds now, for an edit's compare-and-swap (a file that cannot be read now is
    a change)."""
    try:
        return files.read(rel)
    except Unreadable as e:
        return e


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


def _seen_after_edit(before: tuple, after: tuple, touched: set[str]) -> tuple:
    """The fingerprint to take as seen after an edit: `before` (taken before the edit read
    anything), with the entries of the paths the edit wrote (`touched`) as they are `after` it.
    A file someone else saved while the edit ran keeps its old entry: a change the poll loads."""
    entries = {e[0]: e for e in before if e[0] not in touched}
    entries.update((e[0], e) for e in after if e[0] in touched)
    return tuple(sorted(entries.values()))


@dataclass(frozen=True)
class ReloadOutcome:
    ok: bool
    changed: bool
    generation: int
    error: str | None = None
    # An edit through the API (SiteHolder.edit): the files it wrote or removed. Empty for a
    # load of the directory (start, reload, poll). The API records its own `site` event for an
    # edit (bastion.api.edits), naming the files.
    edit: tuple[str, ...] = ()


class EditConflict(Exception):
    """A file an edit read or replaces changed on disk while the edit was being made: nothing
    was written."""

    def __init__(self, rels: list[str]):
        self.rels = rels
        super().__init__(f"{', '.join(rels)} changed on disk during the edit; try again")


class SiteHolder:
    def __init__(self, root: Path, on_reload: Callable[[ReloadOutcome], None] | None = None,
                 secrets: Path | str | None = None,
                 check: Callable[[Site], list[str]] | None = None):  # fmt: skip
        """`secrets`: the secret store every load of the site reads the cluster's records from
        (`bastion serve --secrets`; None: load_site's default). Loads never write it.
        `check`: the problems a loaded site has with what the process was started with (serve's
        options), which make every load fail as the site's own problems do: the first, a
        reload (the old site keeps serving) and an edit (refused, nothing written)."""
        self.root = Path(root)
        self.secrets = secrets
        self.check = check
        self.on_reload = on_reload
        self._lock = threading.Lock()
        finish_interrupted_edit(self.root)
        self._settle = Settle(fingerprint(self.root))
        self.site: Site = self.load()  # raises SiteError: nothing to serve yet
        self.generation = 1
        self.loaded_at = time.time()
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    def load(self, overlay: dict[str, bytes | None] | None = None) -> Site:
        """The site as its files (with `overlay`) load now, with this holder's secret store;
        nothing is swapped in. Raises SiteError."""
        site = load_site(self.root, overlay=overlay, secrets=self.secrets)
        problems = self.check(site) if self.check is not None else []
        if problems:
            raise SiteError(problems)
        return site

    def _report(self, outcome: ReloadOutcome) -> ReloadOutcome:
        if self.on_reload is not None:
            self.on_reload(outcome)
        return outcome

    def reload(self) -> ReloadOutcome:
        """Load the directory again; keep serving the old site when the new one is broken."""
        with self._lock:
            self._settle.take(fingerprint(self.root))
            try:
                site = self.load()
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
        return self.edit(lambda read: changes)

    def edit(self, make: Callable[[Read], dict[str, bytes | None]]) -> Site:
        """apply(make(read)), with make() run under the same lock as the write: an edit that
        reads a file to change part of it (a machine in machines.yaml) reads what the edit before
        it wrote. Read before the lock, two edits at once each wrote back the file as it was
        without the other's change, and both were answered 200 (20 machines added at once kept
        3). make() reads site files with `read(rel)` (bytes, or None for no file), so that the
        write can check they are unchanged. Whatever make() raises goes to the caller, nothing
        written. Raises SiteError when the site with the changes does not load (or a file to
        edit cannot be read: a symlink leaving the site directory, a directory), EditConflict
        when a file read or replaced changed on disk meanwhile. The hooks (`on_reload`) run
        after the lock is let go, with `edit` naming the files."""
        with self._lock:
            # before anything is read: a file saved from here on is a change for the poll
            before = fingerprint(self.root)
            files = SiteFiles(self.root)
            held: dict[str, bytes | None] = {}  # each file the edit read or replaces, as it was

            def read(rel: str) -> bytes | None:
                if rel not in held:
                    try:
                        held[rel] = files.read(rel)
                    except Unreadable as e:
                        raise SiteError([str(e)]) from None
                return held[rel]

            changes = make(read)
            for rel in changes:
                read(rel)
            site = self.load(overlay=changes)
            changed = [rel for rel, data in held.items() if _still(files, rel) != data]
            if changed:
                raise EditConflict(sorted(changed))
            if len(changes) > 1:  # one file alone is replaced atomically as it is
                self._write_recorded(changes)
            else:
                _write(self.root, changes)
            touched = set(changes) | {_target_rel(self.root, rel) for rel in changes}
            self._settle.take(_seen_after_edit(before, fingerprint(self.root), touched))
            self._swap(site)
            generation = self.generation
        self._report(ReloadOutcome(True, True, generation, edit=tuple(sorted(changes))))
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
