"""Management API: the device (relay power, status) over its serial link (`serve --device`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from bastion.api.deps import AdminDep, RuntimeDep
from bastion.api.jsonbody import StrictJsonRoute
from bastion.device.hub import DeviceHub, PowerTargetError
from bastion.device.link import DeviceError, DeviceTimeout

router = APIRouter(tags=["device"], route_class=StrictJsonRoute)


async def get_hub(runtime: RuntimeDep) -> DeviceHub:
    if runtime.device is None:
        raise HTTPException(
            503, "no device: start the controller with --device PORT (the device's serial line)"
        )
    return runtime.device


HubDep = Annotated[DeviceHub, Depends(get_hub)]
# Handlers list AdminDep before HubDep: FastAPI resolves dependencies in parameter order, and a
# caller without the token must get 401, not learn whether a device is attached (503).


class PowerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    state: Literal["on", "off", "cycle"]
    off_ms: int | None = Field(default=None, ge=0, description="off time of a cycle")


async def _power(runtime, hub: DeviceHub, target: str, body: PowerIn) -> dict[str, Any]:
    try:
        _, name = hub.channel_for(target)
        if name is not None and runtime.operator is not None:
            # A person's command: the operator holds off the machine until it is released.
            await anyio.to_thread.run_sync(runtime.operator.hold, name, "api", body.state)
        # The serial exchange blocks: keep it off the event loop.
        answer = await anyio.to_thread.run_sync(hub.power, target, body.state, body.off_ms)
        return {**answer, "held": name is not None and runtime.operator is not None}
    except PowerTargetError as e:
        raise HTTPException(404, str(e)) from None
    except DeviceTimeout as e:
        raise HTTPException(504, f"the device did not answer: {e}") from None
    except DeviceError as e:
        # The device refused (an interlock, an unknown channel): its words, as a conflict.
        raise HTTPException(409, str(e)) from None


@router.post("/machines/{name}/power", summary="Switch a machine's power (needs the token)")
async def machine_power(name: str, body: PowerIn, _: AdminDep, hub: HubDep,
                        runtime: RuntimeDep) -> dict[str, Any]:  # fmt: skip
    return await _power(runtime, hub, name, body)


@router.post("/device/power/{channel}", summary="Switch a relay channel (needs the token)")
async def channel_power(channel: int, body: PowerIn, _: AdminDep, hub: HubDep,
                        runtime: RuntimeDep) -> dict[str, Any]:  # fmt: skip
    return await _power(runtime, hub, str(channel), body)


@router.get("/device", summary="The device: link state, firmware, relays, tasks, counters")
async def device_status(hub: HubDep) -> dict[str, Any]:
    return await anyio.to_thread.run_sync(hub.describe)
