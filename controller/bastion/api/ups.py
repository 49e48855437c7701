"""Management API: the UPS watch (bastion.ups) -- what the UPS said last and where the power-cut
policy stands."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException

from bastion.api.deps import RuntimeDep
from bastion.api.jsonbody import StrictJsonRoute

router = APIRouter(tags=["ups"], route_class=StrictJsonRoute)


@router.get("/ups", summary="The UPS's last status and charge, and the power-cut policy's phase")
async def ups_view(runtime: RuntimeDep) -> dict[str, Any]:
    if runtime.ups is None or runtime.holder.site.settings.ups is None:
        raise HTTPException(404, "the site declares no UPS (site.yaml ups:)")
    return runtime.ups.describe()
