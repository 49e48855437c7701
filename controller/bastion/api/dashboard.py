"""The dashboard: pages server-rendered with Jinja2 (templates/) and kept live by polling the
JSON API; plain JavaScript, nothing from another origin (docs/dashboard.md).

The pages are public like the API's reads and show nothing the open endpoints do not: the site
page (/dashboard: machines with their status, relay and last step, the cluster's servers and
agents, the device's health, the events filtered by machine and kind) and one page per machine
(/dashboard/machines/{name}: its boot timeline, where it stands, its events, a link to its
console). Switching power is done by the page's script with the API token the person typed,
kept in the tab's sessionStorage and sent as a bearer header: the API decides, the page shows
its answer (a refusal's own words).
"""

from __future__ import annotations

import secrets
from pathlib import Path

import anyio
import jinja2
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse

from bastion import __version__
from bastion.api.deps import RuntimeDep, SiteDep
from bastion.api.jsonbody import StrictJsonRoute

router = APIRouter(tags=["dashboard"], route_class=StrictJsonRoute)

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).resolve().parent.parent / "templates"),
    autoescape=True,  # machine names, labels and event payloads come from files and nodes
    undefined=jinja2.StrictUndefined,
)
# The kinds offered by the events filter, besides any seen lately (the API takes any kind).
KINDS = ("asset", "boot", "callback", "dhcp", "heap", "heartbeat", "install", "operator", "power",
         "power_request", "site", "tftp", "ups", "watchdog")  # fmt: skip


# The pages' scripts hold the API token once a person logs in: they may talk to this controller
# only (connect-src), load nothing from elsewhere, and may not be framed by another site (a
# power button clicked through someone else's page). Only the <script> and <style> elements the
# template wrote run: each carries this response's nonce. Markup that slips into a page (a
# template bug, a value not escaped) cannot run script, not even through an onerror= attribute,
# and cannot load a script from this origin either: the controller also serves text/plain
# (boot scripts, assets) that Chromium would run as a script if 'self' were allowed.
CSP = ("default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")  # fmt: skip


def new_nonce() -> str:
    """A nonce for one response's Content-Security-Policy and its tags (CSP 3 asks for at least
    128 bits, never reused): the pages are rendered for each request and never cached."""
    return secrets.token_urlsafe(16)


def _page(template: str, runtime, site, **values) -> HTMLResponse:
    nonce = new_nonce()
    html = _env.get_template(template).render(
        version=__version__, site=site, device=runtime.device is not None,
        generation=runtime.holder.generation, nonce=nonce, **values,
    )  # fmt: skip
    return HTMLResponse(html, headers={"Content-Security-Policy": CSP.format(nonce=nonce),
                                       "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})  # fmt: skip


@router.get("/", include_in_schema=False)
@router.get("/dashboard", response_class=HTMLResponse, summary="The dashboard (HTML)")
async def dashboard(request: Request, runtime: RuntimeDep, site: SiteDep,
                    machine: str | None = None, kind: str | None = None) -> HTMLResponse:  # fmt: skip
    # ?machine=&kind=: the events filter, in the address so that a reload or a link keeps it
    machine, kind = machine or None, kind or None
    last: dict[str, dict] = {}
    recent = runtime.store.query(limit=500)
    for e in recent:  # newest first: the first seen is the latest
        if e.machine and e.machine not in last:
            last[e.machine] = e.as_dict()
    kinds = sorted(set(KINDS) | {e.kind for e in recent} | ({kind} if kind else set()))
    names = [m.name for m in site.machines]
    if machine and machine not in names:  # a machine no longer declared still has its events
        names.append(machine)
    if machine or kind:
        events = [e.as_dict() for e in runtime.store.query(limit=50, machine=machine, kind=kind)]
    else:
        events = [e.as_dict() for e in recent[:50]]
    status: dict[str, dict] = {}
    if runtime.operator is not None:  # where each machine stands (bastion.operator)
        view = await anyio.to_thread.run_sync(runtime.operator.view)
        status = {m["name"]: m["status"] for m in view["machines"]}
    return _page("dashboard.html", runtime, site, machines=site.machines, last=last, events=events,
                 kinds=kinds, names=names, chosen={"machine": machine, "kind": kind},
                 newest=recent[0].id if recent else 0, broken=runtime.holder.last_error,
                 status=status)  # fmt: skip


@router.get("/dashboard/machines/{name}", response_class=HTMLResponse,
            summary="One machine's page: boot timeline, status, events (HTML)")  # fmt: skip
async def machine_page(name: str, runtime: RuntimeDep, site: SiteDep) -> HTMLResponse:
    m = site.machine(name)
    if m is None:
        raise HTTPException(404, f"no machine {name!r} in machines.yaml")
    return _page("machine.html", runtime, site, m=m)
