"""The dashboard: one page, server-rendered with Jinja2 and kept live by polling the JSON API.

Read-only and public like the API's reads (it shows nothing the open endpoints do not): the
site, its machines with their status (the operator's: Off, Powering, Booting (step), ...),
relay and last boot step, the device's relays, and the event history as it grows. Switching power stays behind the token (CLI or API).
"""

from __future__ import annotations

from pathlib import Path

import anyio
import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from bastion import __version__
from bastion.api.deps import RuntimeDep, SiteDep

router = APIRouter(tags=["dashboard"])

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).resolve().parent.parent / "templates"),
    autoescape=True,  # machine names, labels and event payloads come from files and nodes
    undefined=jinja2.StrictUndefined,
)


@router.get("/", include_in_schema=False)
@router.get("/dashboard", response_class=HTMLResponse, summary="The dashboard (HTML)")
async def dashboard(request: Request, runtime: RuntimeDep, site: SiteDep) -> HTMLResponse:
    last: dict[str, dict] = {}
    for e in runtime.store.query(limit=500):  # newest first: the first seen is the latest
        if e.machine and e.machine not in last:
            last[e.machine] = e.as_dict()
    events = [e.as_dict() for e in runtime.store.query(limit=50)]
    status: dict[str, dict] = {}
    if runtime.operator is not None:  # where each machine stands (bastion.operator)
        view = await anyio.to_thread.run_sync(runtime.operator.view)
        status = {m["name"]: m["status"] for m in view["machines"]}
    html = _env.get_template("dashboard.html").render(
        version=__version__, site=site, machines=site.machines, last=last, events=events,
        device=runtime.device is not None, generation=runtime.holder.generation,
        broken=runtime.holder.last_error, status=status,
    )
    return HTMLResponse(html)
