"""Public, read-only boot endpoints with matchbox's paths and query semantics, and the callback
nodes use to report that they booted."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, Response

from bastion import boot, match
from bastion.api import jsonbody
from bastion.api.deps import (
    BootRequestDep,
    Runtime,
    RuntimeDep,
    SiteDep,
    base_url,
    boot_context,
    node_client,
)
from bastion.api.hostcheck import BROWSER_HEADERS
from bastion.api.jsonbody import StrictJsonRoute
from bastion.model import BootRequest
from bastion.state import heartbeats, install

router = APIRouter(tags=["boot"], route_class=StrictJsonRoute)

_QUERY_DOC = (
    "Query parameters are the machine's labels: `mac` (any common notation, normalised), `uuid`, "
    "`arch`, `hostname`, `serial` and any others; the most specific group whose selectors all "
    "match answers."
)


def boot_events(runtime: Runtime, endpoint: str, req: BootRequest | None,
                answer: boot.Answer) -> list[tuple[str, dict]]:  # fmt: skip
    """The events that record a boot request and its answer, as (kind, fields)."""
    labels = req.labels if req else {}
    mac = labels.get("mac")
    machine = answer.machine
    if machine is None and (mac or labels.get("uuid")):  # answered by a group of no machine's
        known = boot.reporting_machine(runtime.holder.site, mac, labels.get("uuid"))
        machine = known.name if known else None
    raw_query = req.raw_query if req else ""
    if req is not None and "token" in req.labels:
        # never a usable one-time token in the history (GET /api/v1/events is open)
        raw_query = boot.without_token(req)[1].raw_query
        raw_query = "token=(redacted)" + (f"&{raw_query}" if raw_query else "")
    payload = {"query": raw_query} if raw_query else {}
    if req is not None and req.client:
        payload["client"] = req.client
    if answer.error:
        payload["error"] = answer.error
    payload.update(answer.detail)
    profile = answer.profile.id if answer.profile else None
    group = answer.group.id if answer.group else None
    events: list[tuple[str, dict]] = [
        ("boot", {"mac": mac, "machine": machine, "endpoint": endpoint, "profile": profile,
                  "group": group, "status": answer.status, "payload": payload}),
    ]  # fmt: skip
    if answer.token_event is not None:
        event = dict(answer.token_event)
        events.append(("ignition-token", {
            "mac": event.pop("mac", None) or mac, "machine": event.pop("machine", None) or machine,
            "endpoint": endpoint, "profile": profile, "group": group, "status": answer.status,
            "payload": event}))  # fmt: skip
    return events


# Every boot answer is one machine's answer of the moment: a one-time URL's token or the secrets
# behind it, a network boot that install-once turns into a local one, the site as last loaded.
# A caching proxy between the nodes and the controller must keep none of them (RFC 9111 5.2.2.5).
_NOT_CACHED = {"cache-control": "no-store"}


def _answered(runtime: Runtime, endpoint: str, answer: boot.Answer, started: float) -> Response:
    runtime.metrics.boot_answered(endpoint, answer.status, time.perf_counter() - started)
    return Response(answer.body, answer.status, headers=_NOT_CACHED, media_type=answer.media_type)


def respond(runtime: Runtime, endpoint: str, req: BootRequest | None, answer: boot.Answer, started: float) -> Response:
    """Record the request as an event and in the metrics, and send the answer (a handler in
    the thread pool)."""
    for kind, fields in boot_events(runtime, endpoint, req, answer):
        runtime.record(kind, **fields)
    return _answered(runtime, endpoint, answer, started)


async def respond_batched(runtime: Runtime, endpoint: str, req: BootRequest | None,
                          answer: boot.Answer, started: float) -> Response:  # fmt: skip
    """respond() for a handler on the event loop: its events go in with the next group commit,
    and the answer is sent once they are committed (an answered request is in the history)."""
    await runtime.record_batched(boot_events(runtime, endpoint, req, answer))
    return _answered(runtime, endpoint, answer, started)


# The two requests of every iPXE boot are answered from the ASGI scope alone
# (bastion.api.deps.boot_context): FastAPI's dependency solving was a sixth of /ipxe's time, its
# middleware and routing most of the rest (docs/benchmarks-http.md). `bastion serve`'s HTTP
# protocol hands these GETs straight to fast_app() (bastion.api.httpserver), past the whole
# middleware stack; other servers (tests' clients) reach them through the routes.


async def _boot_ipxe(runtime: Runtime, scope: dict) -> Response:
    started = time.perf_counter()
    _, req = boot_context(runtime, scope)
    return await respond_batched(runtime, "/boot.ipxe", req, boot.boot_ipxe(), started)


async def _ipxe(runtime: Runtime, scope: dict) -> Response:
    started = time.perf_counter()
    site, req = boot_context(runtime, scope)
    return await respond_batched(runtime, "/ipxe", req, boot.ipxe(site, req, runtime.provisioning), started)


_FAST_PATHS = {"/boot.ipxe": _boot_ipxe, "/boot.ipxe.0": _boot_ipxe, "/ipxe": _ipxe}


@router.get("/boot.ipxe", summary="iPXE bootstrap: chains to /ipxe with the machine's facts")
@router.get("/boot.ipxe.0", include_in_schema=False)
async def boot_ipxe(request: Request) -> Response:
    return await _boot_ipxe(request.app.state.runtime, request.scope)


@router.get("/ipxe", summary="The machine's iPXE boot script", description=_QUERY_DOC)
async def ipxe(request: Request) -> Response:
    return await _ipxe(request.app.state.runtime, request.scope)


def fast_app(runtime: Runtime) -> Callable[[dict], Callable[[dict], Awaitable[Response]] | None]:
    """For `bastion serve`'s HTTP protocol (bastion.api.httpserver): given a request's scope,
    the handler that answers it directly (a Response for the scope, written by the protocol),
    or None for the application's full stack. A GET of /boot.ipxe or /ipxe qualifies unless it
    carries X-Forwarded-* headers (uvicorn's proxy-headers middleware may then rewrite its
    client and scheme) or is a browser's (Sec-Fetch-Site, Origin: bastion.api.hostcheck may
    refuse it). Both are boot endpoints, so the listener split (bastion.api.listeners) has
    nothing to refuse."""

    def bound(handler: Callable[[Runtime, dict], Awaitable[Response]]) -> Callable[[dict], Awaitable[Response]]:
        return lambda scope: handler(runtime, scope)

    handlers = {path: bound(handler) for path, handler in _FAST_PATHS.items()}

    def find(scope: dict) -> Callable[[dict], Awaitable[Response]] | None:
        handler = handlers.get(scope["path"])
        if handler is None or scope["method"] != "GET":
            return None
        for name, _ in scope["headers"]:
            if name.startswith(b"x-forwarded-") or name in BROWSER_HEADERS:
                return None
        return handler

    return find


@router.get("/grub/grub.cfg", summary="GRUB bootstrap: chains to /grub with the machine's facts")
async def grub_cfg(runtime: RuntimeDep, site: SiteDep, request: Request,
                   req: BootRequestDep) -> Response:
    started = time.perf_counter()
    answer = boot.grub_bootstrap(base_url(runtime, site, request))
    # The request (no query: GRUB asks $prefix/grub.cfg plainly) records the client's
    # address, which ties this step to the machine in a boot's trace.
    return await respond_batched(runtime, "/grub/grub.cfg", req, answer, started)


@router.get("/grub", summary="The machine's GRUB config", description=_QUERY_DOC)
async def grub(runtime: RuntimeDep, site: SiteDep, req: BootRequestDep) -> Response:
    started = time.perf_counter()
    return await respond_batched(runtime, "/grub", req, boot.grub(site, req, runtime.provisioning), started)


@router.get("/ignition", summary="The machine's Ignition config (spec 3.3.0)", description=_QUERY_DOC)
def ignition(runtime: RuntimeDep, site: SiteDep, req: BootRequestDep) -> Response:
    started = time.perf_counter()
    if "token" in req.labels and runtime.provisioning is not None:
        answer = boot.onetime_ignition(site, req, runtime.provisioning)
    else:
        answer = boot.ignition_config(site, req)
    return respond(runtime, "/ignition", req, answer, started)


@router.get("/generic", summary="The machine's generic config", description=_QUERY_DOC)
def generic(runtime: RuntimeDep, site: SiteDep, req: BootRequestDep) -> Response:
    started = time.perf_counter()
    return respond(runtime, "/generic", req, boot.generic(site, req), started)


@router.get("/metadata", summary="The machine's metadata as KEY=value lines", description=_QUERY_DOC)
async def metadata(runtime: RuntimeDep, site: SiteDep, req: BootRequestDep) -> Response:
    started = time.perf_counter()
    return await respond_batched(runtime, "/metadata", req, boot.metadata(site, req), started)


def _uuid(fields: dict) -> str | None:
    """A report's `uuid` as labels have it (lower case; empty: none, as iPXE's ${uuid} is when
    the firmware has no UUID): it names a machine declared by its UUID alone."""
    uuid = fields.get("uuid")
    return str(uuid).lower() if uuid else None


def not_from_a_web_page(request: Request) -> None:
    """/callback and /heartbeat take forms and text without a token, as a node's curl sends
    them: a browser's request (it says where it comes from, Origin or Sec-Fetch-Site) is a web
    page's, which could otherwise mark a machine installed from an operator's browser."""
    site = request.headers.get("sec-fetch-site")
    if request.headers.get("origin") is not None or site in ("cross-site", "same-site"):
        raise HTTPException(403, f"{request.url.path} is for nodes, not web pages: a request with "
                                 "Origin or a cross-site Sec-Fetch-Site is refused")  # fmt: skip


def from_its_address(runtime: Runtime, machine, client: str | None, endpoint: str) -> None:
    """A report (/callback, /heartbeat) about a machine that declares `address:` is taken only
    from that address: any LAN host may send one with its MAC, and would otherwise mark it
    installed, or keep the device's node watchdog from power-cycling it when it hangs. Counted
    and logged (once per address) as the address book's mismatches are."""
    if machine is None or not machine.address or client == machine.address:
        return
    runtime.addresses.mismatch(machine.name, machine.address, client or "an unknown address",
                                f"POST {endpoint}")  # fmt: skip
    raise HTTPException(403, f"{endpoint} for {machine.name} is taken only from its address "
                             f"{machine.address} (machines.yaml); this request came from "
                             f"{client or 'an unknown address'}")  # fmt: skip


@router.post(
    "/callback",
    dependencies=[Depends(not_from_a_web_page)],
    summary="A node reports a boot stage",
    description="Body: JSON object or form fields (or query parameters) with `mac` and any of "
    "`digest`, `stage`, `status`, `message`, at most 64 KiB (413 beyond, before it is read). "
    "Lands in the event history as kind `callback`. For a machine that declares `address:` "
    "in machines.yaml only a request from that address is taken (403 from any other).",
)
async def callback(runtime: RuntimeDep, site: SiteDep, request: Request) -> JSONResponse:
    body = await request.body()  # at most 64 KiB: bastion.api.limits
    fields: dict[str, object] = dict(parse_qsl(request.url.query, keep_blank_values=True))
    text = body.decode("utf-8", errors="replace").strip()
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if text.startswith(("{", "[")) or content_type == "application/json":
        try:
            data = jsonbody.loads(text)
        except jsonbody.BadJson as e:
            raise HTTPException(400, f"callback body: {e}") from None
        except ValueError as e:
            raise HTTPException(400, f"callback body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise HTTPException(400, f"callback body must be a JSON object, not {type(data).__name__}")
        fields.update(data)
    elif text:
        fields.update(parse_qsl(text, keep_blank_values=True))
    raw_mac = fields.pop("mac", None)
    mac = None
    if raw_mac is not None:
        try:
            mac = match.parse_mac(str(raw_mac))
        except match.Malformed:
            raise HTTPException(400, f"{raw_mac!r} is not a MAC address") from None
    uuid = _uuid(fields)
    machine = boot.reporting_machine(site, mac, uuid)
    client = node_client(runtime, request.scope)
    from_its_address(runtime, machine, client, "/callback")
    event_id = runtime.record(
        "callback",
        source="node",
        mac=mac,
        machine=machine.name if machine else None,
        endpoint="/callback",
        payload={**fields, "client": client},
    )
    runtime.metrics.callbacks.inc()
    if (mac is not None or uuid) and runtime.device is not None:
        runtime.device.heartbeat(mac, uuid=uuid)  # a node that reports is alive
    answer: dict[str, object] = {"ok": True, "event": event_id, "machine": machine.name if machine else None}
    profile = site.profiles.get(machine.profile) if machine else None
    if (machine is not None and profile is not None and profile.install == "once"
            and runtime.provisioning is not None and install.reports_success(fields)):  # fmt: skip
        mark = runtime.provisioning.installs.mark(machine.name, mac=machine.mac, uuid=machine.uuid,
                                                  profile=profile.id, callback=event_id)  # fmt: skip
        if mark is not None:
            runtime.record("install", mac=mac, machine=machine.name, profile=profile.id, endpoint="/callback",
                           payload={"state": "installed", "callback": event_id, "client": client})  # fmt: skip
        answer["installed"] = True
    return JSONResponse(answer)


@router.post(
    "/heartbeat",
    dependencies=[Depends(not_from_a_web_page)],
    summary="A running node says it is alive (the device's node watchdog)",
    description="Query or form fields (a body of at most 4 KiB): `mac`, and optionally `node` "
    "(its name), `boot_id` (/proc/sys/kernel/random/boot_id) and `k3s` (the k3s unit's state), "
    "as the k3s Butane's bastion-heartbeat.timer sends them. For a machine with `relay:` and "
    "`heartbeat:` in machines.yaml the beat goes to the device, which power-cycles the node "
    "when its beats stop (with backoff and a cap). Answers 202 when forwarded, 200 when the "
    "site does not watch that machine. Recorded as a `heartbeat` event only when it says "
    "something new (a machine's first beat of a boot, a changed k3s state): nodes beat every "
    "few seconds. During a power cut (site.yaml `ups:`) the answer of a node asked to shut "
    "down carries `shutdown` (the reason); the k3s Butane's heartbeat then powers the node off. "
    "For a machine that declares `address:` in machines.yaml only a beat from that address is "
    "taken (403 from any other: neither recorded nor forwarded).",
)
async def heartbeat(runtime: RuntimeDep, site: SiteDep, request: Request) -> JSONResponse:
    fields = dict(parse_qsl(request.url.query))
    body = (await request.body()).decode("utf-8", errors="replace")  # 4 KiB at most: limits
    for key, value in parse_qsl(body):
        fields.setdefault(key, value)
    if "mac" not in fields:
        raise HTTPException(400, "mac is missing: a heartbeat gives it as a query or form field "
                                 "(mac=52:54:00:12:34:01), not as JSON")  # fmt: skip
    try:
        mac = match.parse_mac(str(fields["mac"]))
    except match.Malformed:
        raise HTTPException(400, f"{fields['mac']!r} is not a MAC address") from None
    try:
        checked = heartbeats.fields(fields)
    except heartbeats.BadBeat as e:
        raise HTTPException(400, str(e)) from None
    uuid = _uuid(fields)
    known = boot.reporting_machine(site, mac, uuid)
    client = node_client(runtime, request.scope)
    from_its_address(runtime, known, client, "/heartbeat")  # neither recorded nor forwarded
    runtime.metrics.heartbeats.inc()
    recorded = False
    if known is not None:
        _, news = runtime.heartbeats.beat(known.name, checked)
        if news is not None:
            runtime.record("heartbeat", source="node", mac=mac, machine=known.name,
                           endpoint="/heartbeat", payload={"news": news, "client": client,
                           **{k: v for k, v in checked.items() if v is not None}})  # fmt: skip
            recorded = True
    if runtime.operator is not None:
        runtime.operator.heartbeat(mac, uuid)  # Ready, in the operator's status
    hub = runtime.device
    machine = hub.heartbeat(mac, uuid=uuid) if hub is not None else None
    answer: dict[str, object] = {"ok": True, "machine": machine, "forwarded": machine is not None,
                                 "recorded": recorded}  # fmt: skip
    if known is not None and runtime.ups is not None:
        why = runtime.ups.shutdown_for(known.name)  # a power cut: bastion.ups
        if why is not None:
            answer["shutdown"] = why
    return JSONResponse(answer, status_code=202 if machine else 200)
