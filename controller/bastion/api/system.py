"""Health, metrics, site status and reload."""

from __future__ import annotations

import anyio
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from bastion import __version__
from bastion.api.deps import AdminDep, RuntimeDep
from bastion.api.jsonbody import StrictJsonRoute
from bastion.metrics import CONTENT_TYPE

router = APIRouter(tags=["system"], route_class=StrictJsonRoute)


class SiteStatus(BaseModel):
    name: str
    root: str
    generation: int
    loaded_at: float
    machines: int
    profiles: int
    groups: int
    last_error: str | None
    last_error_at: float | None
    warnings: list[str]


def site_status(runtime) -> SiteStatus:
    h = runtime.holder
    s = h.site
    return SiteStatus(
        name=s.name, root=str(s.root), generation=h.generation, loaded_at=h.loaded_at,
        machines=len(s.machines), profiles=len(s.profiles), groups=len(s.groups),
        last_error=h.last_error, last_error_at=h.last_error_at, warnings=list(s.warnings),
    )  # fmt: skip


@router.get("/healthz", summary="Liveness and the state of the site being served")
def healthz(runtime: RuntimeDep) -> JSONResponse:
    h = runtime.holder
    return JSONResponse(
        {
            "status": "ok" if h.last_error is None else "degraded",
            "version": __version__,
            "site": h.site.name,
            "generation": h.generation,
            "last_error": h.last_error,
        }
    )


@router.get("/metrics", summary="Prometheus metrics (text format)")
def metrics(runtime: RuntimeDep) -> Response:
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/api/v1/site", summary="The site being served: counts, generation, last error")
def get_site_status(runtime: RuntimeDep) -> SiteStatus:
    return site_status(runtime)


class ReloadOut(BaseModel):
    ok: bool
    generation: int
    error: str | None


@router.post("/api/v1/reload", summary="Load the site files again now (needs the token)")
async def reload(runtime: RuntimeDep, _: AdminDep) -> JSONResponse:
    outcome = await anyio.to_thread.run_sync(runtime.holder.reload)
    body = ReloadOut(ok=outcome.ok, generation=outcome.generation, error=outcome.error)
    return JSONResponse(body.model_dump(), status_code=200 if outcome.ok else 422)


@router.get("/api/v1/auth", summary="Check a token: 200 with the right one, 401 without, 429 after "
                                   "too many wrong ones from the address (needs the token)")  # fmt: skip
def check_token(_: AdminDep) -> dict[str, bool]:
    # The dashboard's log-in asks this before it keeps a token: nothing else is done or shown.
    return {"ok": True}
