"""Management API: groups (matchbox groups/<id>.json, plus one per declared machine)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, ConfigDict, Field

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
    etag,
    not_modified,
)
from bastion.api.jsonbody import StrictJsonRoute
from bastion.model import Group, Site
from bastion.site.schema import check_name

router = APIRouter(prefix="/groups", tags=["groups"], route_class=StrictJsonRoute)


class GroupOut(BaseModel):
    id: str
    name: str
    profile: str
    selector: dict[str, str]
    format: str
    source: str
    machine: str | None


class GroupIn(BaseModel):
    """A matchbox group (the id comes from the URL)."""

    model_config = ConfigDict(extra="forbid")
    name: str = ""
    profile: str
    selector: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)


def group_out(g: Group) -> GroupOut:
    return GroupOut(
        id=g.id, name=g.name, profile=g.profile, selector=g.selector, format=g.format,
        source=g.source, machine=g.machine.name if g.machine else None,
    )  # fmt: skip


def _group(site: Site, gid: str) -> Group:
    g = site.group(gid)
    if g is None:
        raise HTTPException(404, f"no group {gid!r}")
    return g


@router.get("", summary="All groups, in matching order (most specific first)")
def list_groups(site: SiteDep) -> list[GroupOut]:
    return [group_out(g) for g in site.groups]


@router.get("/{gid}", summary="One group (without its metadata)",
            description="`ETag`: its definition's (its metadata too); send it back as `If-Match` to "
            "edit it only while nobody else has, or as `If-None-Match` to get 304 while it is "
            "unchanged.", responses=NOT_MODIFIED)  # fmt: skip
def get_group(gid: str, site: SiteDep, response: Response,
              if_none_match: IfNoneMatchRead = None) -> GroupOut:  # fmt: skip
    g = _group(site, gid)
    tag = etag(g)
    if (unchanged := not_modified(if_none_match, tag)) is not None:
        return unchanged
    answer_etag(response, tag)
    return group_out(g)


@router.get("/{gid}/metadata", summary="A group's metadata as JSON (needs the token; not secret: "
                                       "GET /metadata answers it to the group's machines)")  # fmt: skip
def get_group_metadata(gid: str, site: SiteDep, _: AdminDep) -> dict[str, Any]:
    """The group's metadata as the site files hold it. The token guards it less than it seems:
    GET /metadata answers its keys and values (but lists and multi-line values) without a
    token to any host that sends the group's selector, which GET /api/v1/groups shows, and
    templates put it into /ignition and /generic. Secrets belong in the secret store, which
    reaches a node only on its one-time Ignition URL."""
    return _group(site, gid).metadata


def _if_match(header: str | None, gid: str, creates: bool = False,
              none_match: str | None = None) -> IfMatch:  # fmt: skip
    return IfMatch(header, f"group {gid!r}", lambda site: site.group(gid), (f"groups/{gid}.json",),
                   creates, none_match)  # fmt: skip


@router.put("/{gid}", summary="Add or replace a matchbox group (needs the token)",
            responses=PUT_PRECONDITION_FAILED)  # fmt: skip
def put_group(gid: str, body: GroupIn, runtime: RuntimeDep, site: SiteDep, response: Response, _: AdminDep,
              if_match: IfMatchHeader = None,
              if_none_match: IfNoneMatchHeader = None) -> GroupOut:  # fmt: skip
    # a group made from machines.yaml or default_profile first: its id (machine:NAME) is no
    # file name, and the answer is where to edit it, as DELETE says
    existing = site.group(gid)
    if existing is not None and existing.format != "matchbox":
        raise HTTPException(409, f"group {gid!r} comes from {existing.source}; edit that instead")
    try:
        check_name(gid, "group id")
    except ValueError as e:
        raise HTTPException(422, str(e)) from None
    doc = {"id": gid, **body.model_dump()}
    new = apply_or_422(runtime, {f"groups/{gid}.json": json.dumps(doc, indent=2).encode() + b"\n"},
                       _if_match(if_match, gid, creates=True, none_match=if_none_match))  # fmt: skip
    g = _group(new, gid)
    answer_etag(response, etag(g))
    return group_out(g)


@router.delete("/{gid}", status_code=204, summary="Remove a matchbox group (needs the token)",
               responses=PRECONDITION_FAILED)  # fmt: skip
def delete_group(gid: str, runtime: RuntimeDep, site: SiteDep, _: AdminDep,
                 if_match: IfMatchHeader = None) -> None:  # fmt: skip
    g = _group(site, gid)
    if g.format != "matchbox":
        raise HTTPException(409, f"group {gid!r} comes from {g.source}; edit that instead")
    apply_or_422(runtime, {g.source: None}, _if_match(if_match, gid))
