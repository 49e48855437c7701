"""Event history: read by anyone who can reach the API; written by the device link (token)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field

from bastion import match
from bastion.api.deps import AdminDep, RuntimeDep, SiteDep, StoreDep
from bastion.api.jsonbody import StrictJsonRoute

router = APIRouter(prefix="/events", tags=["events"], route_class=StrictJsonRoute)


class EventOut(BaseModel):
    id: int
    ts: float
    kind: str
    source: str
    mac: str | None
    machine: str | None
    endpoint: str | None
    profile: str | None
    group: str | None
    status: int | None
    payload: dict[str, Any]


class EventIn(BaseModel):
    # a field it does not know is refused, not dropped: {"machine": "node1"} was a 201 with no
    # machine (it comes from the MAC)
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(pattern=r"^[a-z][a-z0-9_.-]{0,31}$", examples=["dhcp", "tftp", "power"])
    source: str = Field(default="device", max_length=64)
    mac: str | None = None
    payload: dict[str, Any] = Field(default_factory=dict)


@router.get("", summary="Events, newest first (or oldest first after an id)")
def list_events(
    store: StoreDep,
    limit: int = Query(100, ge=0, le=10000, description="at most this many"),
    after: int | None = Query(None, ge=0, le=2**63 - 1, description="only events after this id, oldest first"),
    kind: str | None = None,
    mac: str | None = None,
    machine: str | None = None,
) -> list[EventOut]:
    if mac is not None:
        try:
            mac = match.parse_mac(mac)
        except match.Malformed:
            raise HTTPException(422, f"{mac!r} is not a MAC address") from None
    events = store.query(limit=limit, after=after, kind=kind, mac=mac, machine=machine)
    return [EventOut(**e.as_dict()) for e in events]


@router.post("", status_code=201, summary="Record an event (device link; needs the token)")
def post_event(body: EventIn, runtime: RuntimeDep, site: SiteDep, _: AdminDep) -> EventOut:
    mac = None
    if body.mac is not None:
        try:
            mac = match.parse_mac(body.mac)
        except match.Malformed:
            raise HTTPException(422, f"{body.mac!r} is not a MAC address") from None
    machine = site.machine_by_mac(mac)
    event_id = runtime.record(
        body.kind, source=body.source, mac=mac, machine=machine.name if machine else None, payload=body.payload
    )
    return EventOut(**runtime.store.query(limit=1, after=event_id - 1)[0].as_dict())
