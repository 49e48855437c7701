"""Management API: the nodes' serial consoles through the device (docs/consoles.md).

- GET  /api/v1/machines/{name}/console          the kept log (token: consoles show secrets)
- WS   /api/v1/machines/{name}/console/stream   live, both ways

A browser cannot set headers on a WebSocket, so the token comes in the first message, a text
frame `{"token": "..."}`, within AUTH_TIMEOUT_S. Then the server sends the recent backlog and
the live bytes as binary frames; every frame the client sends (binary or text) is typed into
the node's console. A wrong or missing token closes the socket with code 1008 and the reason,
and from an address that has sent too many wrong tokens any token gets 1013 (the HTTP API's
429: bastion.api.deps.token_refusal); no device (or none wired to that machine) closes it with
1011 and why, once the backlog is out.
A message over MAX_MESSAGE_BYTES closes the socket with 1009 (`bastion serve` sets uvicorn's
ws_max_size and ws_max_queue from these).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import anyio
from fastapi import APIRouter, HTTPException, WebSocket, WebSocketDisconnect
from fastapi.responses import Response

from bastion.api import jsonbody
from bastion.api.deps import AdminDep, RuntimeDep, SiteDep, token_refusal
from bastion.api.device import device_limiter
from bastion.api.httpserver import AUTHENTICATED
from bastion.api.jsonbody import StrictJsonRoute
from bastion.device.hub import PowerTargetError
from bastion.device.link import DeviceError

router = APIRouter(tags=["consoles"], route_class=StrictJsonRoute)

AUTH_TIMEOUT_S = 10.0
POLICY = 1008  # RFC 6455 7.4.1: policy violation (the token)
UNAVAILABLE = 1011  # the server cannot: no device, no console wired
TRY_AGAIN_LATER = 1013  # IANA's WebSocket close codes: too many wrong tokens from the address
#: The largest WebSocket message taken (uvicorn's ws_max_size; its default is 16 MiB). A client
#: sends a token message and keystrokes, a paste at most (the browser sends one as one message,
#: `bastion console` reads 1 KiB at a time); the device types 96 bytes per request. Without it,
#: a client with no token had the server hold 16 MiB of one unfinished first frame per socket
#: until AUTH_TIMEOUT_S; over it the socket is closed with 1009 as soon as the frame's header
#: says so.
MAX_MESSAGE_BYTES = 64 * 1024
#: Messages read ahead of the handler per socket (uvicorn's ws_max_queue; its default is 32):
#: past it the socket is not read (TCP holds the client back), so one socket holds at most
#: this many times MAX_MESSAGE_BYTES.
MAX_QUEUED_MESSAGES = 4


def _machine(site, name: str) -> str:
    if site.machine(name) is None:
        raise HTTPException(404, f"no machine {name!r} in the site")
    return name


@router.get("/machines/{name}/console", summary="A machine's kept console log (needs the token)",
            response_class=Response)  # fmt: skip
async def console_log(name: str, _: AdminDep, site: SiteDep, runtime: RuntimeDep,
                      tail: int | None = None) -> Response:  # fmt: skip
    """The machine's console as the controller kept it, oldest first (the rotated files,
    then the current one); `tail`: the last that many bytes only. Raw bytes as the node sent
    them (text/plain, no charset promised)."""
    _machine(site, name)
    if tail is not None and tail < 1:
        raise HTTPException(422, "tail: a number of bytes, at least 1")
    data = await anyio.to_thread.run_sync(runtime.consoles.read, name, tail)
    return Response(data, media_type="text/plain")


async def _authenticate(ws: WebSocket, runtime) -> tuple[int, str] | None:
    """None when the first message carries the right token, else the close code and why not."""
    try:
        msg = await asyncio.wait_for(ws.receive(), AUTH_TIMEOUT_S)
    except TimeoutError:
        return POLICY, f'no {{"token": ...}} message within {AUTH_TIMEOUT_S:g} s'
    if msg.get("type") == "websocket.disconnect":
        return POLICY, "disconnected"
    text = msg.get("text")
    if text is None:
        return POLICY, 'the first message must be a text frame {"token": "..."}'
    try:
        given = jsonbody.loads(text).get("token")
    except (ValueError, AttributeError):  # BadJson is a ValueError
        return POLICY, 'the first message must be JSON {"token": "..."}'
    # stripped as an Authorization header's value is (HTTP drops the spaces around it)
    refusal = token_refusal(runtime, ws.scope, given.strip() if isinstance(given, str) else None)
    if refusal is None:
        return None
    # the console page forgets a token refused with 1008: not a right one refused for a while
    return (TRY_AGAIN_LATER if refusal[0] == 429 else POLICY), refusal[1]


@router.websocket("/machines/{name}/console/stream")
async def console_stream(ws: WebSocket, name: str) -> None:
    runtime = ws.app.state.runtime
    await ws.accept()
    refused = await _authenticate(ws, runtime)
    if refused is not None:
        # the client may have gone already, or the server closed the socket to make room
        # (bastion.api.httpserver): Starlette says so with WebSocketDisconnect, not a traceback
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await ws.close(refused[0], refused[1][:120])
        return
    # until here the server may close the socket to make room for another connection, as one
    # that has not sent its request yet (bastion.api.httpserver); not once it has the token
    authenticated = ws.scope.get("extensions", {}).get(AUTHENTICATED)
    if authenticated is not None:
        authenticated()
    if runtime.holder.site.machine(name) is None:
        await ws.close(POLICY, f"no machine {name!r} in the site"[:120])
        return
    consoles = runtime.consoles
    sub, backlog = consoles.subscribe(name, asyncio.get_running_loop())
    try:
        if backlog:
            await ws.send_bytes(backlog)
        hub = runtime.device
        problem = None
        if hub is None:
            problem = "no device: the controller runs without --device"
        else:
            try:
                hub.console_channel(name)
            except PowerTargetError as e:
                problem = str(e)
        if problem is not None:
            await ws.close(UNAVAILABLE, problem[:120])
            return
        await _pump(ws, sub, hub, name, device_limiter(runtime))
    finally:
        consoles.unsubscribe(name, sub)


async def _pump(ws: WebSocket, sub, hub, name: str, limiter: anyio.CapacityLimiter) -> None:
    async def out() -> None:
        while True:
            await ws.send_bytes(await sub.get())

    async def typed() -> str | None:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return None
            data: Any = msg.get("bytes")
            if data is None:
                data = (msg.get("text") or "").encode()
            if not data:
                continue
            try:
                # `cin` exchanges block a thread as long as power requests do: the same few
                await anyio.to_thread.run_sync(hub.console_write, name, data, limiter=limiter)
            except (DeviceError, PowerTargetError, TimeoutError) as e:
                return str(e)

    sender = asyncio.create_task(out())
    try:
        why = await typed()
    except WebSocketDisconnect:
        why = None
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender
    if why is not None:
        with contextlib.suppress(RuntimeError):
            await ws.close(UNAVAILABLE, why[:120])
