"""POST /journal/upload: the nodes' journals, from systemd-journal-upload, into the log targets.

Flatcar's image carries systemd-journal-upload; with site.yaml `logs.journal: true` the
built-in Flatcar config points it at `<controller>/journal`, and it POSTs the journal export
format to `<that>/upload`. Entries are parsed as the body arrives (bastion.logship.journal) and
offered to the shipper, not stored in the history: one outbound connection per collector
carries the site's logs. The node is named by the address the upload came from when that
address is a machine's (bastion.state.addresses: what it booted from, its heartbeats), else by
the entries' `_HOSTNAME` (a machine's hostname or name): `_HOSTNAME` is the sender's own word,
and a node could otherwise ship entries as another.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import PlainTextResponse
from starlette.requests import ClientDisconnect

from bastion.api.deps import RuntimeDep, SiteDep, client_address
from bastion.api.jsonbody import StrictJsonRoute
from bastion.logship.journal import READ, Entry, ExportParser, Malformed, as_event

router = APIRouter(tags=["logs"], route_class=StrictJsonRoute)

CONTENT_TYPE = "application/vnd.fdo.journal"


@router.post("/journal/upload", summary="A node's journal entries (systemd-journal-upload)",
             response_class=PlainTextResponse, status_code=202)  # fmt: skip
async def journal_upload(request: Request, runtime: RuntimeDep, site: SiteDep) -> PlainTextResponse:
    if site.settings.logs is None or not site.settings.logs.journal:
        raise HTTPException(404, "journal upload is off (site.yaml logs.journal)")
    ctype = request.headers.get("content-type", "").split(";")[0].strip()
    if ctype != CONTENT_TYPE:
        raise HTTPException(415, f"expected Content-Type {CONTENT_TYPE}")
    client = client_address(request.scope)
    binding = runtime.addresses.lookup(client, time.time())
    by_address = site.machine(binding.machine) if binding is not None else None
    names: dict[str, tuple[str | None, str | None]] = {}
    parser = ExportParser(keep=READ)
    shipped = 0

    def ship(entry: Entry) -> None:
        if entry.cut_count:
            runtime.metrics.journal_fields_cut.inc(entry.cut_count)
        host = "" if by_address is not None else entry.get("_HOSTNAME", "")
        if host not in names:
            m = by_address or next((m for m in site.machines if host and host in (m.hostname, m.name)), None)
            names[host] = (m.name, m.mac) if m is not None else (None, None)
        machine, mac = names[host]
        if runtime.logship is not None:
            runtime.logship.offer(as_event(entry, client=client, machine=machine, mac=mac))

    try:
        async for chunk in request.stream():
            for entry in parser.feed(chunk):
                ship(entry)
                shipped += 1
        parser.close()
    except Malformed as e:
        for entry in e.entries:  # whole, before the bad byte in the same chunk
            ship(entry)
            shipped += 1
        runtime.metrics.journal_entries.labels(result="malformed").inc()
        raise HTTPException(400, f"not the journal export format: {e} (after {shipped} entries)") from None
    except ClientDisconnect:  # cut short (the node went away): its whole entries were shipped
        runtime.metrics.journal_entries.labels(result="malformed").inc()
        return PlainTextResponse("", status_code=400)  # nobody is left to read it
    finally:  # the entries shipped before a bad byte, a cut or a body past its limit count too
        runtime.metrics.journal_entries.labels(result="shipped").inc(shipped)
    return PlainTextResponse(f"OK. {shipped} entries.\n", status_code=202)
