"""Management API: the operator (bastion.operator) -- where each machine stands, holds, and
`plan` / `apply` of the site files' declaration."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Body, HTTPException
from pydantic import BaseModel, ConfigDict

from bastion.api.deps import AdminDep, RuntimeDep
from bastion.api.jsonbody import StrictJsonRoute
from bastion.operator.runner import Operator, PlanChanged
from bastion.site.load import SiteError

router = APIRouter(tags=["operator"], route_class=StrictJsonRoute)


def _operator(runtime) -> Operator:
    if runtime.operator is None:
        raise HTTPException(503, "this controller runs no operator")
    return runtime.operator


def _known(runtime, name: str) -> None:
    if runtime.holder.site.machine(name) is None:
        raise HTTPException(404, f"no machine {name!r} in machines.yaml")


class ApplyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    plan: str | None = None  # the plan `GET /api/v1/plan` answered; None: whatever it is now


@router.get("/operator", summary="Where every machine stands: declaration, relay, boot, status")
async def operator_view(runtime: RuntimeDep) -> dict[str, Any]:
    return await anyio.to_thread.run_sync(_operator(runtime).view)


_PLAN_DOC = """\
The plan: `id` (what `POST /api/v1/apply` takes), `site`, `sync`, `applied_generation`,
`changes` and `actions`.

`changes` is every difference between the declaration in the files on disk and the one applied
last, in this order:

- per machine, by name: `{"machine", "field": "machine", "from": "absent", "to": "declared"}`
  (or back) for a machine added or removed; `power`, `maintenance`, `reprovision` as the
  operator acts on them (site.yaml `defaults:` included); then every other field of its
  machines.yaml entry that changed, dotted into mappings (`mac`, `role`, `address`,
  `labels.rack`, `wireguard.address`, `networks.cluster`), `null` where it is not set. A field
  whose name or value may hold a secret (password, secret, token, private, credential, psk,
  key) has `"secret": true` and `"(secret)"` for both values;
- the site: `{"machine": null, "file": "machines.yaml", "field": "order", "from": [...], "to":
  [...]}` when the machines' order changed, and `{"machine": null, "file": PATH, "field":
  "sha256", "from": DIGEST, "to": DIGEST}` for every other file of the site that changed
  (site.yaml, profiles, templates, files/...; `null`: no such file), never its contents.

Only `power`, `maintenance`, `reprovision` and a machine added or removed lead to `actions`;
the others are adopted by the apply and switch nothing. Every change is in `id`: a plan made
before another edit of the files is refused by the apply (409)."""


@router.get("/plan", summary="What applying the site files on disk would do, without doing it "
            "(needs the token)", description=_PLAN_DOC)  # fmt: skip
async def plan(runtime: RuntimeDep, _: AdminDep) -> dict[str, Any]:
    # The token, as for the POST /apply this read comes before: a plan loads and validates the
    # whole site from disk and renders every machine's Ignition (about 190 ms for 1,000
    # machines), which any host on the LAN could otherwise ask for in a loop. No secret is in
    # it; nobody without the token can act on it.
    try:
        return await anyio.to_thread.run_sync(_operator(runtime).plan)
    except SiteError as e:
        raise HTTPException(422, {"message": "the site files do not load", "problems": e.problems}) from None


@router.post("/apply", summary="Reload the site files and do what their plan says (needs the token)")
async def apply(body: Annotated[ApplyIn, Body(default_factory=ApplyIn)], runtime: RuntimeDep,
                _: AdminDep) -> dict[str, Any]:  # fmt: skip
    # No body is `{}`, as the docs have it: whatever the plan is (`curl -X POST` with no -d).
    try:
        return await anyio.to_thread.run_sync(_operator(runtime).apply, body.plan)
    except SiteError as e:
        raise HTTPException(422, {"message": "the site files do not load", "problems": e.problems}) from None
    except PlanChanged as e:
        raise HTTPException(409, {"message": str(e), "plan": e.plan}) from None


@router.post("/machines/{name}/hold", summary="Hold a machine: the operator leaves it alone (needs the token)")
async def hold(name: str, runtime: RuntimeDep, _: AdminDep) -> dict[str, Any]:
    _known(runtime, name)
    mem = await anyio.to_thread.run_sync(_operator(runtime).hold, name, "api")
    return {"machine": name, "hold": mem.hold}


@router.post("/machines/{name}/release", summary="Release a held or failed machine (needs the token)")
async def release(name: str, runtime: RuntimeDep, _: AdminDep) -> dict[str, Any]:
    _known(runtime, name)
    mem = await anyio.to_thread.run_sync(_operator(runtime).release, name, "api")
    return {"machine": name, "hold": mem.hold, "failed": mem.failed}
