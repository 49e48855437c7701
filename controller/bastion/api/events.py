"""Event history: read by anyone who can reach the API; written by the device link (token)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from bastion import match
from bastion.api.deps import AdminDep, RuntimeDep, SiteDep, StoreDep
from bastion.api.jsonbody import StrictJsonRoute
from bastion.state.events import Event, EventStore

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


#: An answer holds about this many bytes of JSON at most, whatever its `limit`. Anyone on the LAN
#: can fill the history with events of 8 KiB (POST /callback needs no token), and 10,000 of
#: them were 57 MiB of JSON made at once for each GET, and 274 MiB more peak memory with the
#: objects behind it. An answer cut short says where the rest is (a `Link` header, rel="next").
ANSWER_BYTES = 4 * 2**20

# Events read from the history at a time: at most about 2 MB of them (8 KiB of payload each)
# are in memory at once besides the answer, and the store's lock is held for one read of them.
_ROWS = 200


def _read(store: EventStore, after: int | None, before: int | None,
          filters: dict) -> Iterator[Event]:  # fmt: skip
    """The events between ids `after` and `before` (either may be None) matching `filters`,
    read _ROWS at a time: oldest first after an id (the store's order then), else newest first,
    each read going on past the last event of the one before."""
    while True:
        batch = store.query(after=after, before=before, limit=_ROWS, **filters)
        yield from batch
        if len(batch) < _ROWS:
            return
        if after is not None:
            after = batch[-1].id
        else:
            before = batch[-1].id


def _json(e: Event) -> bytes:
    """The event as FastAPI's JSONResponse writes an EventOut."""
    out = EventOut(**e.as_dict()).model_dump(mode="json")
    return json.dumps(out, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


@router.get("", summary="Events, newest first (or oldest first after an id)",
            response_model=list[EventOut])  # fmt: skip
def list_events(
    request: Request,
    store: StoreDep,
    limit: int = Query(100, ge=0, le=10000, description="at most this many (and about 4 MiB)"),
    after: int | None = Query(None, ge=0, le=2**63 - 1, description="only events after this id, oldest first"),
    before: int | None = Query(None, ge=0, le=2**63 - 1, description="only events before this id"),
    kind: str | None = None,
    mac: str | None = None,
    machine: str | None = None,
) -> Response:
    if mac is not None:
        try:
            mac = match.parse_mac(mac)
        except match.Malformed:
            raise HTTPException(422, f"{mac!r} is not a MAC address") from None
    filters = {"kind": kind, "mac": mac, "machine": machine}
    events = _read(store, after, before, filters)
    parts: list[bytes] = []
    size, last, more = 2, None, False
    for e in events if limit else ():
        part = _json(e)
        if parts and size + len(part) + 1 > ANSWER_BYTES:
            more = True  # this one is the next page's first
            break
        parts.append(part)
        size, last = size + len(part) + 1, e.id
        if len(parts) == limit:
            more = True  # perhaps: the next page says
            break
    headers = {}
    if more and last is not None:
        # the same question from where this answer stopped
        cursor = {"after": last} if after is not None else {"before": last}
        url = request.url.include_query_params(**cursor)
        headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'
    return Response(b"[" + b",".join(parts) + b"]", media_type="application/json", headers=headers)


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
