"""Management API: the device (relay power, status) over its serial link (`serve --device`)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, HTTPException, Path
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bastion.api.deps import AdminDep, RuntimeDep
from bastion.api.jsonbody import StrictJsonRoute
from bastion.device.hub import DeviceHub, PowerHeld, PowerTargetError
from bastion.device.link import DeviceError, DeviceTimeout, NotSent
from firmware.power import MAX_OFF_MS  # the device's own bound: longer is an off, later an on

router = APIRouter(tags=["device"], route_class=StrictJsonRoute)


async def get_hub(runtime: RuntimeDep) -> DeviceHub:
    if runtime.device is None:
        raise HTTPException(
            503, "no device: start the controller with --device PORT (the device's serial line)"
        )
    return runtime.device


HubDep = Annotated[DeviceHub, Depends(get_hub)]

# Each exchange with the device blocks a worker thread for up to its timeout (5 s) when the
# device does not answer, and the worker threads are shared with every synchronous route (a
# node's /ignition among them): 120 concurrent GET /api/v1/device against a silent device
# held /ignition up for 14.5 s. Device calls take at most DEVICE_THREADS threads; the rest
# wait on the event loop, holding none.
DEVICE_THREADS = 4


class _DeviceCalls:
    """Per application: the device's thread limiter, and GET /api/v1/device's exchange in
    flight, whose answer whoever asks meanwhile shares (made in the event loop, where anyio's
    limiter must be)."""

    def __init__(self) -> None:
        self.limiter = anyio.CapacityLimiter(DEVICE_THREADS)
        self.describing: asyncio.Future | None = None


def _calls(runtime) -> _DeviceCalls:
    if runtime.device_calls is None:
        runtime.device_calls = _DeviceCalls()
    return runtime.device_calls


def device_limiter(runtime) -> anyio.CapacityLimiter:
    """The device's thread limiter, for every route that waits on the device (typing into a
    console too: bastion.api.consoles). Call it in the event loop."""
    return _calls(runtime).limiter
# Handlers list AdminDep before HubDep: FastAPI resolves dependencies in parameter order, and a
# caller without the token must get 401, not learn whether a device is attached (503).


class PowerIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    state: Literal["on", "off", "cycle"]
    off_ms: int | None = Field(default=None, ge=0, le=MAX_OFF_MS,
                               description="off time of a cycle (ms; at least the channel's minimum)")  # fmt: skip

    @model_validator(mode="after")
    def _off_ms_is_a_cycles(self) -> PowerIn:
        if self.off_ms is not None and self.state != "cycle":
            raise ValueError(f"off_ms is the off time of a cycle: not for state {self.state!r}")
        return self


async def _power(runtime, hub: DeviceHub, target: str, body: PowerIn) -> dict[str, Any]:
    operator = runtime.operator
    hold = None
    try:
        _, name = hub.channel_for(target)
        if name is not None and operator is not None:
            # A person's command: the operator holds off the machine until it is released (held
            # first, so that no pass of the operator's acts on it in between).
            hold = await anyio.to_thread.run_sync(operator.hold_for_power, name, "api", body.state)
        # The serial exchange blocks: keep it off the event loop, in the device's own threads.
        answer = await anyio.to_thread.run_sync(hub.power, target, body.state, body.off_ms,
                                                limiter=_calls(runtime).limiter)  # fmt: skip
        return {**answer, "held": hold is not None}
    except PowerTargetError as e:
        raise HTTPException(404, str(e)) from None
    except DeviceError as e:
        refused = isinstance(e, PowerHeld) or e.code in ("refused", "badreq", "unknown")
        not_sent = isinstance(e, NotSent)  # the link was not up: the device never saw it
        if hold is not None and (refused or not_sent):  # nothing was switched: nothing to hold for
            why = "not sent" if not_sent else "refused"
            await anyio.to_thread.run_sync(operator.unhold, name, hold,
                                           f"power {body.state} {why}: {e}")  # fmt: skip
        if refused:
            # The device refused (an interlock, an unknown channel), or the UPS policy did: their
            # words, as a conflict.
            raise HTTPException(409, str(e)) from None
        if not_sent:
            raise HTTPException(503, f"the device is not reachable: {e}") from None
        # No answer, an answer lost to a restart, a failure inside the device: it may have been
        # done, so a hold stays, and the answer says so.
        held = f"; {name} is held (bastion machine release {name} gives it back)" if hold else ""
        if isinstance(e, DeviceTimeout):
            raise HTTPException(504, f"the device did not answer: {e}{held}") from None
        raise HTTPException(502, f"the device failed: {e}{held}") from None


@router.post("/machines/{name}/power", summary="Switch a machine's power (needs the token)")
async def machine_power(name: str, body: PowerIn, _: AdminDep, hub: HubDep,
                        runtime: RuntimeDep) -> dict[str, Any]:  # fmt: skip
    return await _power(runtime, hub, name, body)


@router.post("/device/power/{channel}", summary="Switch a relay channel (needs the token)")
async def channel_power(channel: Annotated[int, Path(ge=0, le=255, description="the relay channel, from 0")],
                        body: PowerIn, _: AdminDep, hub: HubDep, runtime: RuntimeDep) -> dict[str, Any]:  # fmt: skip
    return await _power(runtime, hub, str(channel), body)


@router.get("/device", summary="The device: link state, firmware, relays, tasks, counters")
async def device_status(hub: HubDep, runtime: RuntimeDep) -> dict[str, Any]:
    # (no token needed: asked once at a time, whoever asks meanwhile gets the same answer)
    calls = _calls(runtime)
    if calls.describing is None:
        calls.describing = asyncio.ensure_future(
            anyio.to_thread.run_sync(hub.describe, limiter=calls.limiter))

        def done(_: asyncio.Future) -> None:
            calls.describing = None

        calls.describing.add_done_callback(done)
    return await asyncio.shield(calls.describing)
