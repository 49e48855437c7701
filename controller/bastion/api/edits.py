"""Writing site files through the API: every edit is validated against the whole site first."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException

from bastion import yamlfile
from bastion.api.deps import Runtime
from bastion.model import Site
from bastion.site.holder import EditConflict, Read
from bastion.site.load import SiteError

log = logging.getLogger("bastion.api")

# make(read) -> changes, run under the site's lock (SiteHolder.edit)
Make = Callable[[Read], dict[str, bytes | None]]


def current_yaml(read: Read, rel: str) -> Any:
    """The file as plain data, read the way the site loader reads it.

    Not yaml.safe_load: YAML 1.1 reads an unquoted MAC such as 52:54:00:12:34:01 as a base-60
    integer, which written back would break every machine the edit did not touch.
    """
    data = read(rel)
    if data is None:
        return None
    try:
        return _plain(yamlfile.load(data, rel))
    except yamlfile.YamlError as e:
        # read without the poll's two looks: a file caught while someone saves it is one too
        raise HTTPException(409, f"the site files on disk do not load (not because of this edit): {rel} "
                            f"is not valid YAML now; fix it by hand first, or try again if it is being "
                            f"saved: {e}") from None  # fmt: skip


def _plain(value: Any) -> Any:
    """yamlfile's LineDict/LineList as dict/list, which yaml.safe_dump can write."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def apply_or_422(runtime: Runtime, changes: dict[str, bytes | None]) -> Site:
    """Write `changes` if the site with them loads; otherwise 422 listing the problems."""
    return edit_or_422(runtime, lambda read: changes)


def edit_or_422(runtime: Runtime, make: Make) -> Site:
    """apply_or_422(make(read)), make() run under the site's lock (SiteHolder.edit): for an edit
    that reads a file (with `read`) to change part of it."""
    made: dict[str, bytes | None] = {}

    def making(read: Read) -> dict[str, bytes | None]:
        made.update(make(read))
        return made

    try:
        site = runtime.holder.edit(making)
    except SiteError as e:
        raise HTTPException(422, _refusal(runtime, e)) from None
    except EditConflict as e:
        raise HTTPException(409, str(e)) from None
    except OSError as e:  # a site directory the controller's user may not write, a full disk
        raise HTTPException(500, f"the site's files could not be written in {runtime.holder.root}: "
                            f"{e.strerror or e} (nothing was changed)") from None  # fmt: skip
    runtime.record("site", source="api", payload={"edit": sorted(made), "generation": runtime.holder.generation})
    return site


_FILE = re.compile(r"[^\s:]+")  # a problem starts with its file: "machines.yaml:3: ..."
_LINE = re.compile(r"^([^\s:]+):\d+: ")


def _where(problem: str) -> str:
    """A problem without its line number: an edit that rewrites a file moves the lines of what
    it did not change."""
    return _LINE.sub(r"\1: ", problem, count=1)


def _refusal(runtime: Runtime, e: SiteError) -> dict[str, Any]:
    """The 422's detail. While the files on disk do not load on their own (a hand edit broke
    the site: it is degraded), every edit failed as "the edit would break the site", naming the
    other file's problem; when every problem is one the files have without the edit, say so."""
    try:
        runtime.holder.load()  # with serve's secret store, as the edit was
    except SiteError as on_disk:
        already = {_where(p) for p in on_disk.problems}
        if all(_where(p) in already for p in e.problems):
            files = sorted({m.group() for p in e.problems if (m := _FILE.match(p))})
            return {"message": f"the site files on disk do not load (not because of this edit): "
                               f"fix {', '.join(files)} first", "problems": e.problems}  # fmt: skip
    except Exception:  # a second opinion only: the edit's own answer stands
        log.exception("the site files on disk could not be loaded to word a refused edit")
    return {"message": "the edit would break the site", "problems": e.problems}


def edit_yaml_or_422(runtime: Runtime, rel: str, change: Callable[[dict[str, Any]], None]) -> Site:
    """Change part of the YAML mapping in `rel` (change(doc) edits it in place, or raises an
    HTTPException), read and written under the site's lock, so that edits at once all land."""

    def make(read: Read) -> dict[str, bytes | None]:
        doc = current_yaml(read, rel)
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            raise HTTPException(409, f"{rel} is not a mapping now (a {type(doc).__name__}); fix it by hand first")
        change(doc)
        return {rel: yamlfile.dump(doc)}

    return edit_or_422(runtime, make)
