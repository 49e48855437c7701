"""Management API: profiles (profiles/<id>.json in matchbox format, or <id>.yaml in ours)."""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel

from bastion import yamlfile
from bastion.api.deps import AdminDep, RuntimeDep, SiteDep
from bastion.api.edits import (
    NOT_MODIFIED,
    PRECONDITION_FAILED,
    PUT_PRECONDITION_FAILED,
    IfMatch,
    IfMatchHeader,
    IfNoneMatchHeader,
    IfNoneMatchRead,
    answer_etag,
    apply_or_422,
    edit_or_422,
    etag,
    not_modified,
)
from bastion.api.jsonbody import StrictJsonRoute
from bastion.model import Boot, Profile, Site
from bastion.site.holder import Read
from bastion.site.schema import check_name

router = APIRouter(prefix="/profiles", tags=["profiles"], route_class=StrictJsonRoute)


class BootOut(BaseModel):
    kernel: str
    initrd: list[str]
    args: list[str]


class ProfileOut(BaseModel):
    id: str
    name: str
    format: Literal["matchbox", "bastion"]
    os: str
    source: str
    boot: BootOut | None
    boot_by_arch: dict[str, BootOut]
    ignition: str | None
    generic: str | None
    install: Literal["always", "once"] = "always"


def _boot(b: Boot | None) -> BootOut | None:
    return BootOut(kernel=b.kernel, initrd=list(b.initrd), args=list(b.args)) if b else None


def profile_out(p: Profile) -> ProfileOut:
    return ProfileOut(
        id=p.id, name=p.name, format=p.format, os=p.os, source=p.source, boot=_boot(p.boot),
        boot_by_arch={a: _boot(b) for a, b in p.boot_by_arch.items()},
        ignition=p.ignition, generic=p.generic, install=p.install,
    )  # fmt: skip


def _profile(site: Site, pid: str) -> Profile:
    p = site.profiles.get(pid)
    if p is None:
        raise HTTPException(404, f"no profile {pid!r}")
    return p


@router.get("", summary="All profiles")
def list_profiles(site: SiteDep) -> list[ProfileOut]:
    return [profile_out(p) for p in site.profiles.values()]


@router.get("/{pid}", summary="One profile",
            description="`ETag`: its definition's; send it back as `If-Match` to edit it only while "
            "nobody else has, or as `If-None-Match` to get 304 while it is unchanged.",
            responses=NOT_MODIFIED)  # fmt: skip
def get_profile(pid: str, site: SiteDep, response: Response,
                if_none_match: IfNoneMatchRead = None) -> ProfileOut:  # fmt: skip
    p = _profile(site, pid)
    tag = etag(p)
    if (unchanged := not_modified(if_none_match, tag)) is not None:
        return unchanged
    answer_etag(response, tag)
    return profile_out(p)


def _if_match(header: str | None, pid: str, creates: bool = False,
              none_match: str | None = None) -> IfMatch:  # fmt: skip
    # every file that could hold the id (site.yaml, for the built-in k3s one, is always read)
    files = tuple(f"profiles/{pid}.{ext}" for ext in ("json", "yaml", "yml"))
    return IfMatch(header, f"profile {pid!r}", lambda site: site.profiles.get(pid), files, creates,
                   none_match)  # fmt: skip


@router.put(
    "/{pid}",
    summary="Add or replace a profile (needs the token)",
    description="`format=matchbox` (default) writes the body as profiles/<id>.json, a matchbox "
    "profile (id, name, boot{kernel, initrd, args}, ignition_id, generic_id); `format=bastion` "
    "writes profiles/<id>.yaml in Edge Bastion's format. The other file for the id is removed.",
    responses=PUT_PRECONDITION_FAILED,
)
def put_profile(
    pid: str,
    body: dict[str, Any],
    runtime: RuntimeDep,
    site: SiteDep,
    response: Response,
    _: AdminDep,
    format: Literal["matchbox", "bastion"] = "matchbox",
    if_match: IfMatchHeader = None,
    if_none_match: IfNoneMatchHeader = None,
) -> ProfileOut:
    try:
        check_name(pid, "profile id")
    except ValueError as e:
        raise HTTPException(422, str(e)) from None
    if format == "matchbox":
        body = {**body, "id": pid}
        written = {f"profiles/{pid}.json": json.dumps(body, indent=2).encode() + b"\n"}
        stale = [f"profiles/{pid}.yaml", f"profiles/{pid}.yml"]
    else:
        written = {f"profiles/{pid}.yaml": yamlfile.dump(body)}
        stale = [f"profiles/{pid}.json", f"profiles/{pid}.yml"]

    def make(read: Read) -> dict[str, bytes | None]:
        # which other file holds the id is read under the edit's lock: chosen before it, a file
        # someone renamed meanwhile (spare.json to spare.yaml) stayed, and the site with two
        # files for one id refused the edit (422); read() also holds it in the compare-and-swap
        return {**written, **{rel: None for rel in stale if read(rel) is not None}}

    condition = _if_match(if_match, pid, creates=True, none_match=if_none_match)
    new = edit_or_422(runtime, make, condition)
    p = _profile(new, pid)
    answer_etag(response, etag(p))
    return profile_out(p)


@router.delete(
    "/{pid}",
    status_code=204,
    summary="Remove a profile (needs the token)",
    description="Removes the profile's file under profiles/. A profile that no file holds (the "
    "`k3s` profile site.yaml's `cluster:` makes) is 409: edit site.yaml instead.",
    responses=PRECONDITION_FAILED,
)
def delete_profile(pid: str, runtime: RuntimeDep, site: SiteDep, _: AdminDep,
                   if_match: IfMatchHeader = None) -> None:  # fmt: skip
    p = _profile(site, pid)
    # a built-in profile's source names where it comes from, not a file: "removing" that file
    # changed nothing and was still recorded as an edit of it
    if not p.source.startswith("profiles/"):
        raise HTTPException(409, f"profile {pid!r} comes from {p.source}, not from a file under "
                            "profiles/; edit that instead, or PUT a profile of this id to replace it")  # fmt: skip
    apply_or_422(runtime, {p.source: None}, _if_match(if_match, pid))
