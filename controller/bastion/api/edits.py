"""Writing site files through the API: every edit is validated against the whole site first.

An edit of one machine, profile or group can be made conditional (RFC 9110 13.1.1 If-Match):
GET answers the entry's ETag (`etag`, `machine_etag`), a digest of what an edit of it can
change, and an edit sent with `If-Match` is made only while the entry still has that ETag. A
PUT sent with `If-None-Match: *` (13.1.2) is made only while there is no such entry: a create
that cannot replace one someone else made. Either is judged under the site's lock, from the
files as the edit reads them (SiteHolder.edit's compare-and-swap then holds them until the
write): there is no moment between the check and the write in which another edit, or a hand
edit, could slip in unseen. GET honours If-None-Match too (`not_modified`: 304 while the
client's copy is current).
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
from bastion.site.load import SiteError, SiteFiles, Unreadable

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

# A machine's ETag is a digest of what an edit of it can change: its entry as machines.yaml
# writes it (`written`: every field, the k3s, disk, wireguard and networks ones that reach the
# site only through its k3s plan too), and its declaration as GET shows it (_SHOWN: its profile
# reference, and what site.yaml's defaults give it). Not its k3s plan: the plan also holds what
# other entries and the secret store decide (the first server's address, `wireguard.replaces`),
# which the edit neither writes nor shows, so a change there was a 412 for an edit that lost
# nothing. Not its place in the file either (an edit of a machine above it moves it).
_SHOWN = ("name", "mac", "uuid", "arch", "role", "profile", "hostname", "labels", "relay",
          "heartbeat", "power", "maintenance", "reprovision")  # fmt: skip


# The machine of a group that machines.yaml makes (machine:NAME): its place in the file is not
# the group's definition either.
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


def _digest(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return '"' + hashlib.sha256(text.encode()).hexdigest()[:32] + '"'


def etag(entry: Profile | Group) -> str:
    """A profile's or group's strong ETag (RFC 9110 8.8.3): a digest of its definition as the
    site holds it, so it changes when the entry changes (its file, or what site.yaml gives it)
    and not when another entry of the same file does. A machine's is machine_etag."""
    return _digest(_definition(entry))


def machine_etag(m: Machine, machines_yaml: bytes | None) -> str:
    """A machine's strong ETag: its declaration as GET shows it, and its entry as
    `machines_yaml` (the file's bytes) writes it (above _SHOWN)."""
    shown = {k: _definition(getattr(m, k)) for k in _SHOWN}
    return _digest({"shown": shown, "written": written_entry(machines_yaml, m.name)})


def written_entry(machines_yaml: bytes | None, name: str) -> Any:
    """Machine `name`'s entry in machines.yaml as plain data, the way the site loader reads it;
    None when the file has none, or does not parse (an edit of it is then 409 anyway)."""
    if machines_yaml is None:
        return None
    entries = _written_entries(machines_yaml)
    return None if entries is None else entries.get(name)


# The last machines.yaml parsed for an ETag, by the SHA-256 of its bytes, and its entries by
# name: a GET of one machine reads the file for its tag, and parsing it (tens of milliseconds
# for a site of a thousand machines) at every GET made a client that reads each machine in turn
# pay it once per machine. One file, so one entry; replaced whole, so no lock.
_parsed: tuple[bytes, dict[str, Any] | None] | None = None


def _written_entries(machines_yaml: bytes) -> dict[str, Any] | None:
    global _parsed
    key = hashlib.sha256(machines_yaml).digest()
    last = _parsed
    if last is not None and last[0] == key:
        return last[1]
    entries: dict[str, Any] | None = {}
    try:
        doc = yamlfile.load(machines_yaml, "machines.yaml")
    except yamlfile.YamlError:
        entries = None
    else:
        machines = doc.get("machines") if isinstance(doc, dict) else None
        for entry in machines if isinstance(machines, list) else ():
            name = entry.get("name") if isinstance(entry, dict) else None
            if isinstance(name, str) and name not in entries:  # the first, as before
                entries[name] = _plain(entry)
    _parsed = (key, entries)
    return entries


def served_machine_etag(runtime: Runtime, m: Machine) -> str:
    """machine_etag of a machine of the site served, with machines.yaml as it is on disk. Should
    the poll not have loaded a hand edit yet, the two disagree, and the tag is one no edit's
    check (which reads both from the files) can make: a 412, never an edit made over a change
    the client was not shown."""
    try:
        data = SiteFiles(runtime.holder.root).read("machines.yaml")
    except Unreadable:
        data = None
    return machine_etag(m, data)


def answer_etag(response: Response, tag: str) -> None:
    response.headers["ETag"] = tag


# RFC 9110 8.8.3: entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE, etagc = %x21 / %x23-7E / obs-text.
# A list of them (5.6.1) is separated by commas with optional white space around them.
_ENTITY_TAG = re.compile(r'[ \t]*(W/)?("[\x21\x23-\x7e\x80-\xff]*")[ \t]*(?:,|$)')


def _tags(header: str, name: str = "If-Match") -> list[tuple[bool, str]]:
    """The entity tags of If-Match (or `name`) as (weak, tag); HTTPException 400 for a value
    that is not a list of them (a tag without its quotes, most often). Not ignored: the client
    asked for the edit only on a condition, and an unread condition must not become a write."""
    tags, at = [], 0
    while at < len(header):
        m = _ENTITY_TAG.match(header, at)
        if m is None or m.end() == at:
            break
        tags.append((m.group(1) is not None, m.group(2)))
        at = m.end()
    if at < len(header) or not tags:
        raise HTTPException(400, f"{name}: {header!r} is not * nor a list of entity tags in quotes "
                            '(as GET answers them in ETag, e.g. "0123abcd...")')  # fmt: skip
    return tags


def if_match_holds(header: str, current: str | None) -> bool:
    """RFC 9110 13.1.1: `*` holds while the entry exists; a list, when one of its tags is the
    entry's ETag by the strong comparison (8.8.3.2: a weak tag never matches)."""
    if header.strip() == "*":
        return current is not None
    return current is not None and any(not weak and tag == current for weak, tag in _tags(header))


def if_none_match_holds(header: str, current: str | None) -> bool:
    """RFC 9110 13.1.2: `*` holds while the entry does not exist; a list, while none of its
    tags is the entry's ETag by the weak comparison (8.8.3.2: `W/` aside, the same quoted
    string), so a cache that weakened the tag still gets its 304."""
    if header.strip() == "*":
        return current is None
    return current is None or all(tag != current for _, tag in _tags(header, "If-None-Match"))


def not_modified(if_none_match: str | None, current: str) -> Response | None:
    """GET's answer to If-None-Match (RFC 9110 13.1.2, 15.4.5): 304 with the entry's ETag and
    no body while a tag of the header is `current` (the entry's ETag) or it is `*`, else None
    (answer 200). A value that is not a list of tags is ignored here, unlike an edit's (400): a
    read that cannot use the client's copy only costs it the whole answer."""
    if if_none_match is None:
        return None
    try:
        holds = if_none_match_holds(if_none_match, current)
    except HTTPException:
        return None
    return None if holds else Response(status_code=304, headers={"ETag": current})


IfMatchHeader = Annotated[
    str | None,
    Header(alias="If-Match",
           description="Make the edit only while the entry's ETag (as GET answers it) is one of "
           "these, or, with `*`, while it exists; otherwise 412 and nothing is written"),
]  # fmt: skip

IfNoneMatchHeader = Annotated[
    str | None,
    Header(alias="If-None-Match",
           description="`*`: create the entry only, never replace one: 412 and nothing is written "
           "when it exists (a list of tags: 412 while the entry's ETag is one of them)"),
]  # fmt: skip

IfNoneMatchRead = Annotated[
    str | None,
    Header(alias="If-None-Match",
           description="ETags of the copy the client holds (or `*`): 304 without a body while the "
           "entry's ETag is one of them, compared weakly"),
]  # fmt: skip

_ETAG_NOW = {"ETag": {"description": "the entry's ETag now (absent: there is no such entry)",
                      "schema": {"type": "string"}}}  # fmt: skip
_REFUSAL = {"application/json": {"schema": {"$ref": "#/components/schemas/Refusal"}}}

# The routes' 412 in the schema; Refusal is the {"detail"} body bastion.api.apidocs declares.
PRECONDITION_FAILED: dict[int | str, dict[str, Any]] = {
    412: {
        "description": "If-Match does not hold: the entry changed since it was read (or, with `*`, "
                       "does not exist); nothing was written. `ETag` is the entry's ETag now.",
        "content": _REFUSAL,
        "headers": _ETAG_NOW,
    }
}  # fmt: skip

# PUT's: If-Match, or If-None-Match (create only)
PUT_PRECONDITION_FAILED: dict[int | str, dict[str, Any]] = {
    412: {
        "description": "If-Match does not hold (the entry changed since it was read, or, with `*`, "
                       "does not exist), or If-None-Match does not (with `*`: the entry exists); "
                       "nothing was written. `ETag` is the entry's ETag now.",
        "content": _REFUSAL,
        "headers": _ETAG_NOW,
    }
}  # fmt: skip

# GET's 304 (If-None-Match)
NOT_MODIFIED: dict[int | str, dict[str, Any]] = {
    304: {
        "description": "Not Modified: a tag of If-None-Match is the entry's ETag (or it is `*`); "
                       "no body, the client's copy is current",
        "headers": {"ETag": {"description": "the entry's ETag", "schema": {"type": "string"}}},
    }
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class IfMatch:
    """An edit's precondition on one entry (edit_or_422). `header`: If-Match as sent (None: no
    precondition, the edit is made as before); `what`: the entry in words ("machine 'node1'");
    `find`: the entry in a site, None when it has none; `files`: the site files the entry is
    made of; `creates`: the edit would make a missing entry (PUT), so that a missing one fails
    the precondition; otherwise a missing entry is 404, as without If-Match. `none_match`:
    If-None-Match as sent (PUT's; `*` = create only), judged after If-Match (RFC 9110 13.2.2).
    `tag`: the entry's ETag, from the files as the edit reads them (None: etag(entry))."""

    header: str | None
    what: str
    find: Callable[[Site], Entry | None]
    files: tuple[str, ...]
    creates: bool = False
    none_match: str | None = None
    tag: Callable[[Any, Read], str] | None = None

    def __post_init__(self) -> None:
        # a value that is no list of tags is 400 before anything is read
        if self.header is not None and self.header.strip() != "*":
            _tags(self.header)
        if self.none_match is not None and self.none_match.strip() != "*":
            _tags(self.none_match, "If-None-Match")

    def check(self, runtime: Runtime, read: Read) -> None:
        """Under the site's lock (make()): raise 412 unless the entry, as the files read now
        make it, has a tag of If-Match, and (If-None-Match) none of those sent there. `read`
        puts the files into the edit's compare-and-swap, so what was judged is what is written
        over."""
        if self.header is None and self.none_match is None:
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
        if entry is None:
            current = None
        else:
            current = self.tag(entry, read) if self.tag is not None else etag(entry)
        if self.header is not None and not if_match_holds(self.header, current):
            self._refuse(current)
        if self.none_match is not None and not if_none_match_holds(self.none_match, current):
            # only an entry that exists fails If-None-Match: `current` is its tag
            if self.none_match.strip() == "*":
                raise HTTPException(412, f"{self.what} exists already: its ETag is {current} "
                                    "(If-None-Match: * creates only); nothing was written",
                                    headers={"ETag": current})  # fmt: skip
            raise HTTPException(412, f"{self.what} has the ETag {current}, which If-None-Match "
                                f"{self.none_match} names; nothing was written",
                                headers={"ETag": current})  # fmt: skip

    def _refuse(self, current: str | None) -> None:
        """If-Match does not hold: 412."""
        if current is None:
            raise HTTPException(412, f"{self.what} does not exist (If-Match: {self.header}); "
                                "nothing was written")  # fmt: skip
        raise HTTPException(412, f"{self.what} has changed: its ETag is {current}, not If-Match "
                            f"{self.header}; nothing was written (GET it again and make the edit "
                            "on what it is now)", headers={"ETag": current})  # fmt: skip
