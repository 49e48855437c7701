"""Writing site files through the API: every edit is validated against the whole site first.

An edit of one machine, profile or group can be made conditional (RFC 9110 13.1.1 If-Match):
GET answers the entry's ETag (`etag`), a digest of its definition as the site holds it, and
an edit sent with `If-Match` is made only while the entry still has that ETag. The entry is
judged under the site's lock, from the files as the edit reads them (SiteHolder.edit's compare-
and-swap then holds them until the write): there is no moment between the check and the write
in which another edit, or a hand edit, could slip in unseen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Header, HTTPException, Response

from bastion import yamlfile
from bastion.api.deps import Runtime
from bastion.model import Group, Machine, Profile, Site
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


def apply_or_422(runtime: Runtime, changes: dict[str, bytes | None],
                 if_match: IfMatch | None = None) -> Site:  # fmt: skip
    """Write `changes` if the site with them loads; otherwise 422 listing the problems."""
    return edit_or_422(runtime, lambda read: changes, if_match)


def edit_or_422(runtime: Runtime, make: Make, if_match: IfMatch | None = None) -> Site:
    """apply_or_422(make(read)), make() run under the site's lock (SiteHolder.edit): for an edit
    that reads a file (with `read`) to change part of it. `if_match`: the edit's precondition,
    judged under the same lock before make() runs (412, nothing written, when it fails)."""
    made: dict[str, bytes | None] = {}

    def making(read: Read) -> dict[str, bytes | None]:
        if if_match is not None:
            if_match.check(runtime, read)
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


def edit_yaml_or_422(runtime: Runtime, rel: str, change: Callable[[dict[str, Any]], None],
                     if_match: IfMatch | None = None) -> Site:  # fmt: skip
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

    return edit_or_422(runtime, make, if_match)


# Conditional edits (RFC 9110 8.8.3 ETag, 13.1.1 If-Match)

Entry = Machine | Profile | Group

# Where a machine stands in machines.yaml is not its definition: an edit of a machine above it
# moves it. Its k3s plan (`node`) is: the entry's own k3s, disk and wireguard fields are held
# nowhere else, and it changes only where another node changes what this one boots (the first
# server's address).
_NOT_DEFINITION = {Machine: ("line",)}


def _definition(entry: Any) -> Any:
    """An entry as plain data, for its digest: a dataclass's fields (nested ones too), less
    those of _NOT_DEFINITION."""
    if dataclasses.is_dataclass(entry) and not isinstance(entry, type):
        skip = _NOT_DEFINITION.get(type(entry), ())
        return {f.name: _definition(getattr(entry, f.name))
                for f in dataclasses.fields(entry) if f.name not in skip}  # fmt: skip
    if isinstance(entry, dict):
        return {str(k): _definition(v) for k, v in entry.items()}
    if isinstance(entry, list | tuple):
        return [_definition(v) for v in entry]
    return entry


def etag(entry: Entry) -> str:
    """The entry's strong ETag (RFC 9110 8.8.3): a digest of its definition as the site holds
    it, so it changes when the entry changes (its file, or what site.yaml gives it) and not
    when another entry of the same file does."""
    text = json.dumps(_definition(entry), sort_keys=True, separators=(",", ":"), default=str)
    return '"' + hashlib.sha256(text.encode()).hexdigest()[:32] + '"'


def answer_etag(response: Response, entry: Entry) -> None:
    response.headers["ETag"] = etag(entry)


# RFC 9110 8.8.3: entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE, etagc = %x21 / %x23-7E / obs-text.
# A list of them (5.6.1) is separated by commas with optional white space around them.
_ENTITY_TAG = re.compile(r'[ \t]*(W/)?("[\x21\x23-\x7e\x80-\xff]*")[ \t]*(?:,|$)')


def _tags(header: str) -> list[tuple[bool, str]]:
    """If-Match's entity tags as (weak, tag); HTTPException 400 for a value that is not a list
    of them (a tag without its quotes, most often). Not ignored: the client asked for the edit
    only on a condition, and an unread condition must not become a write."""
    tags, at = [], 0
    while at < len(header):
        m = _ENTITY_TAG.match(header, at)
        if m is None or m.end() == at:
            break
        tags.append((m.group(1) is not None, m.group(2)))
        at = m.end()
    if at < len(header) or not tags:
        raise HTTPException(400, f"If-Match: {header!r} is not * nor a list of entity tags in quotes "
                            '(as GET answers them in ETag, e.g. "0123abcd...")')  # fmt: skip
    return tags


def if_match_holds(header: str, current: str | None) -> bool:
    """RFC 9110 13.1.1: `*` holds while the entry exists; a list, when one of its tags is the
    entry's ETag by the strong comparison (8.8.3.2: a weak tag never matches)."""
    if header.strip() == "*":
        return current is not None
    return current is not None and any(not weak and tag == current for weak, tag in _tags(header))


IfMatchHeader = Annotated[
    str | None,
    Header(alias="If-Match",
           description="Make the edit only while the entry's ETag (as GET answers it) is one of "
           "these, or, with `*`, while it exists; otherwise 412 and nothing is written"),
]  # fmt: skip

# The routes' 412 in the schema; Refusal is the {"detail"} body bastion.api.apidocs declares.
PRECONDITION_FAILED: dict[int | str, dict[str, Any]] = {
    412: {
        "description": "If-Match does not hold: the entry changed since it was read (or, with `*`, "
                       "does not exist); nothing was written. `ETag` is the entry's ETag now.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Refusal"}}},
        "headers": {"ETag": {"description": "the entry's ETag now (absent: there is no such entry)",
                             "schema": {"type": "string"}}},
    }
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class IfMatch:
    """An edit's precondition on one entry (edit_or_422). `header`: If-Match as sent (None: no
    precondition, the edit is made as before); `what`: the entry in words ("machine 'node1'");
    `find`: the entry in a site, None when it has none; `files`: the site files the entry is
    made of; `creates`: the edit would make a missing entry (PUT), so that a missing one fails
    the precondition; otherwise a missing entry is 404, as without If-Match."""

    header: str | None
    what: str
    find: Callable[[Site], Entry | None]
    files: tuple[str, ...]
    creates: bool = False

    def __post_init__(self) -> None:
        if self.header is not None and self.header.strip() != "*":
            _tags(self.header)  # a value that is no list of tags is 400 before anything is read

    def check(self, runtime: Runtime, read: Read) -> None:
        """Under the site's lock (make()): raise 412 unless the entry, as the files read now
        make it, has a tag of If-Match. `read` puts the files into the edit's compare-and-swap,
        so what was judged is what is written over."""
        if self.header is None:
            return
        held = {rel: read(rel) for rel in (*self.files, "site.yaml")}
        try:
            site = runtime.holder.load(overlay=held)
        except SiteError:
            # files that do not load now (a hand edit broke them): the site served, the one
            # whose ETags the client can have read, is the entry's definition
            site = runtime.holder.site
        entry = self.find(site)
        if entry is None and not self.creates:
            # RFC 9110 13.2.1: the 404 the request has without If-Match comes first (a DELETE of
            # a file someone else removed meanwhile was a 204 that removed nothing)
            raise HTTPException(404, f"{self.what} does not exist now; nothing was written")
        current = etag(entry) if entry is not None else None
        if if_match_holds(self.header, current):
            return
        if current is None:
            raise HTTPException(412, f"{self.what} does not exist (If-Match: {self.header}); "
                                "nothing was written")  # fmt: skip
        raise HTTPException(412, f"{self.what} has changed: its ETag is {current}, not If-Match "
                            f"{self.header}; nothing was written (GET it again and make the edit "
                            "on what it is now)", headers={"ETag": current})  # fmt: skip
