"""The FastAPI application: one router per concern, shared state in app.state.runtime."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from bastion import __version__, paths
from bastion.api import (
    apidocs,
    assets,
    boot,
    console_page,
    consoles,
    dashboard,
    device,
    events,
    groups,
    journal,  # fmt: skip
    machines,
    operator,
    profiles,
    system,
    ups,
)
from bastion.api.deps import GroupCommit, Runtime
from bastion.api.hostcheck import HostCheck
from bastion.api.jsonbody import StrictJsonRoute
from bastion.api.limits import BodyLimits
from bastion.api.listeners import ListenerSplit, boot_path_patterns
from bastion.boot import Provisioning
from bastion.device.consoles import ConsoleLogs
from bastion.logship.shipper import Shipper
from bastion.metrics import Metrics
from bastion.operator.runner import Operator
from bastion.settings import Settings, default_db_path, proxy_problems
from bastion.site.holder import ReloadOutcome, SiteHolder
from bastion.state.events import EventStore
from bastion.state.install import InstallMarks
from bastion.state.onetime import IgnitionTokens
from bastion.state.operator import OperatorState
from bastion.state.secrets import SecretStore, machine_secrets, secrets_dir
from bastion.state.ups import UpsState
from bastion.ups.runner import UpsWatch

log = logging.getLogger("bastion")

# FastAPI from 0.165 traces, measures and logs every request through OpenTelemetry unless told
# not to; older ones have no such argument.
_NO_TELEMETRY: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}}
    if "telemetry" in inspect.signature(FastAPI).parameters else {}
)

DESCRIPTION = """\
Edge Bastion's boot controller.

* **boot**: public, read-only, matchbox-compatible endpoints for iPXE, GRUB and Flatcar.
* **assets**: kernels and initrds from the site's `assets/` directory.
* **machines, device, profiles, groups, events**: the management API. Reads are open; every write,
  and every read that may show secrets, needs `Authorization: Bearer <token>`.
* **system**: health, Prometheus metrics, site status and reload.
* **dashboard**: `/dashboard` (and `/`), a live page for people.

With `--management-listen`, only boot, assets, `/journal/upload` and `/healthz` are served on
`--listen` (the PXE LAN); everything else is on the management listener (docs/network.md).
"""


async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
    """The client went, or its body broke off (a malformed chunk, which the HTTP protocol has
    already answered with 400) while a route read it: nothing is left to answer, and it is no
    error of the application's to log with a traceback."""
    return Response(status_code=400)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI's answer to an HTTP error, with a 405's Allow naming every method the path has.
    A path with one route per method (a machine's GET, PUT, PATCH and DELETE; an asset's GET
    and HEAD) got the methods of the first route the router matched: Allow: GET for a path that
    takes four. RFC 9110 15.5.6: Allow lists the methods the resource supports. Each method is
    tried against the routes as the router would match it (FastAPI nests included routers)."""
    if exc.status_code == 405:
        routes = request.app.router.routes
        allowed = [m for m in _METHODS
                   if any(r.matches({**request.scope, "method": m})[0] is Match.FULL for r in routes)]  # fmt: skip
        if allowed:
            exc = StarletteHTTPException(405, exc.detail, {**(exc.headers or {}), "Allow": ", ".join(allowed)})
    return await http_exception_handler(request, exc)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def create_app(settings: Settings) -> FastAPI:
    """Build the application. Raises bastion.site.load.SiteError if the site does not load."""
    metrics = Metrics()
    runtime_box: list[Runtime] = []

    def on_reload(outcome: ReloadOutcome) -> None:
        # An edit through the API is no reload (it records its own `site` event, naming the
        # files: bastion.api.edits), but reaches all that a reload does below.
        if not outcome.edit:
            metrics.site_reloads.labels(result="ok" if outcome.ok else "error").inc()
            payload = {"ok": outcome.ok, "generation": outcome.generation}
            if outcome.error:
                payload["error"] = outcome.error
                log.error("site reload failed; still serving generation %d:\n%s", outcome.generation, outcome.error)
            else:
                log.info("site reloaded: generation %d", outcome.generation)
            runtime_box[0].record("site", payload=payload) if runtime_box else store.record("site", payload=payload)
        if outcome.ok and runtime_box and runtime_box[0].logship is not None:
            runtime_box[0].logship.configure(holder.site.settings.logs, site=holder.site.name,
                                             site_root=settings.site_dir)  # fmt: skip
        if outcome.ok and runtime_box and runtime_box[0].device is not None:
            runtime_box[0].device.site_changed()
        if runtime_box and runtime_box[0].operator is not None:
            runtime_box[0].operator.wake()

    # Every load of the site (the first, reloads, edits) reads what went out (bastion.state.ledger)
    # from the store the one-time URLs make secrets in (runtime.secrets below): --secrets, else
    # load_site's default, which is secrets_dir(<site name>) as runtime.secrets's is.
    # A machine's `address:` inside --trusted-proxies is refused at every load, not only at
    # start: any host the entry covers could name that machine in X-Forwarded-For.
    holder = SiteHolder(settings.site_dir, on_reload=on_reload, secrets=settings.secrets_dir,
                        check=lambda site: proxy_problems(settings.trusted_proxies, site.machines)[0])  # fmt: skip
    # The site's own history unless --db names one; bounded (--history-days, --history-events,
    # --history-size).
    db_path = settings.db_path or default_db_path(holder.site.name, settings.site_dir)
    store = EventStore(db_path, max_events=settings.history_events,
                       max_age_s=settings.history_days * 86400,
                       max_bytes=settings.history_size)  # fmt: skip
    runtime = Runtime(settings=settings, holder=holder, store=store, metrics=metrics)
    runtime.group_commit = group_commit = GroupCommit(runtime.commit_events)
    metrics.history_source = lambda: {"bastion_history_commits": group_commit.batches,
                                      "bastion_history_committed_events": group_commit.events,
                                      "bastion_history_pruned": store.pruned}  # fmt: skip
    runtime_box.append(runtime)
    runtime.secrets = SecretStore(secrets_dir(holder.site.name, settings.secrets_dir))
    # logs off-site (site.yaml logs:): a queue per target beside the history, events.logship/
    runtime.logship = Shipper(Path(db_path).parent / f"{Path(db_path).stem}.logship", metrics,
                              runtime.record, secrets=runtime.secrets)  # fmt: skip  # bastion.logship.cli.queue_dir reads it
    runtime.logship.configure(holder.site.settings.logs, site=holder.site.name, site_root=settings.site_dir)
    metrics.gauge_source = lambda: {
        "bastion_site_generation": holder.generation,
        "bastion_site_broken": 1 if holder.last_error else 0,
        "bastion_site_machines": len(holder.site.machines),
        "bastion_site_groups": len(holder.site.groups),
        "bastion_site_profiles": len(holder.site.profiles),
    }
    runtime.record("site", payload={"ok": True, "generation": holder.generation, "loaded": str(settings.site_dir)})
    runtime.provisioning = Provisioning(
        tokens=IgnitionTokens(db_path, ttl_s=settings.ignition_token_ttl),
        installs=InstallMarks(db_path),
        secrets_for=lambda site, machine: machine_secrets(runtime.secrets, site, machine),
    )
    # the nodes' console logs: beside the other per-site state, readable with or without a device
    runtime.consoles = ConsoleLogs(
        settings.console_dir or paths.var_dir() / "consoles" / Path(db_path).parent.name)
    if settings.device_port:
        from bastion.device.hub import DeviceHub
        from bastion.state.eventcursor import EventCursor

        # the cursor kept beside the history: a restarted controller records what the device
        # said while it was stopped (an upgrade, a restart), from the device's ring
        runtime.device = DeviceHub(settings.device_port, lambda: holder.site, runtime.record,
                                   consoles=runtime.consoles, cursors=EventCursor(db_path))  # fmt: skip

    # the operator: desired state in the site files drives power and boot (bastion.operator)
    runtime.addresses.seed([e.as_dict() for e in reversed(store.query(limit=5000))])
    # what each machine's heartbeats said last, so that a restart is not every node's reboot
    runtime.heartbeats.seed((e.machine, e.payload) for e in store.newest_per_machine("heartbeat")
                            if holder.site.machine(e.machine) is not None)  # fmt: skip
    runtime.operator = Operator(holder, store, OperatorState(db_path), runtime.record,
                                hub=runtime.device, installs=runtime.provisioning.installs)

    # the UPS watch (site.yaml `ups:`; idle without one): power cuts shut the nodes down
    runtime.ups = UpsWatch(holder, runtime.record, runtime.heartbeats, hub=runtime.device,
                           secrets=runtime.secrets, state=UpsState(db_path),
                           operator=runtime.operator)  # fmt: skip
    metrics.ups_source = lambda: runtime.ups.gauges() if holder.site.settings.ups else {}

    if settings.tftp_listen:
        from bastion.tftpd import TftpService

        host, port = settings.tftp_listen
        runtime.tftp = TftpService(settings.site_dir / "tftp", host, port, record=runtime.record)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = None
        if runtime.tftp is not None:
            try:
                runtime.tftp.start()  # binds here: a busy port fails the start-up, named
            except OSError as e:
                host, port = settings.tftp_listen
                log.error("cannot serve TFTP on %s:%d: %s", host, port, e.strerror or e)
                raise
        if settings.poll_seconds > 0:
            task = asyncio.create_task(_watch(holder, settings.poll_seconds))
        if runtime.device is not None:
            runtime.device.start()
        runtime.operator.start()
        runtime.ups.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(runtime.ups.close)
            await anyio.to_thread.run_sync(runtime.operator.close)
            if runtime.tftp is not None:
                await anyio.to_thread.run_sync(runtime.tftp.stop)
            if runtime.device is not None:
                await anyio.to_thread.run_sync(runtime.device.close)
            runtime.consoles.close()
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await anyio.to_thread.run_sync(runtime.logship.close)  # what is queued stays on disk

    # FastAPI's OpenTelemetry (0.165+) is off: nothing here exports it, and asking for its
    # providers on every request was 5% of a boot request's time (docs/benchmarks-http.md)
    app = FastAPI(title="Edge Bastion controller", version=__version__, description=DESCRIPTION,
                  lifespan=lifespan, **_NO_TELEMETRY,
                  # /docs is bastion.api.apidocs' (Swagger UI from this controller, not a CDN)
                  docs_url=None, redoc_url=None, swagger_ui_oauth2_redirect_url=None)
    app.state.runtime = runtime
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    # before the routes: a body is refused by its size and sender before anything reads it
    app.add_middleware(BodyLimits, runtime=runtime)
    app.include_router(boot.router)
    app.include_router(assets.router)
    app.include_router(system.router)
    app.include_router(apidocs.router)
    app.include_router(dashboard.router)
    app.include_router(console_page.router)
    app.include_router(journal.router)
    api = APIRouter(prefix="/api/v1", route_class=StrictJsonRoute)
    for module in (machines, device, consoles, profiles, groups, events, operator, ups):
        api.include_router(module.router)
    app.include_router(api)
    apidocs.document_refusals(app)
    if settings.management_listen is not None:
        # outermost: a management path on the boot listener is refused
        # before anything else
        boot_routes = [*boot.router.routes, *assets.router.routes, *journal.router.routes]
        app.add_middleware(ListenerSplit, management=settings.management_listen,
                           boot_paths=boot_path_patterns(boot_routes),
                           on_refusal=metrics.listener_refusals.inc)  # fmt: skip
    # outermost of all: a browser's request through a name the controller does not know
    app.add_middleware(HostCheck, allowed=settings.allowed_hosts,
                       controller_url=lambda: runtime.holder.site.settings.controller_url)  # fmt: skip
    return app


async def _watch(holder: SiteHolder, every: float) -> None:
    """Reload the site when its files change (mtime/size/presence, polled)."""
    while True:
        await asyncio.sleep(every)
        try:
            await anyio.to_thread.run_sync(holder.poll)
        except Exception:  # a watcher that dies silently would stop reloads for good
            log.exception("site poll failed")
