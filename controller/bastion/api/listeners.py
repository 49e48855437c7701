"""Two listeners, one application: the boot endpoints on `--listen`, everything else on
`--management-listen` (docs/network.md).

Any machine on the PXE LAN may fetch what a machine needs to boot and report: iPXE and GRUB
scripts, Ignition, metadata, assets, the callback, the heartbeat, a journal upload, and
/healthz. The management API, the dashboard, /metrics and the API docs belong to the operators'
network. With a management listener configured, `bastion serve` binds both sockets in one
process (one application, one site, one history), and ListenerSplit, an ASGI middleware in
front of everything else, refuses a request on the boot listener for any path that is not a
boot endpoint: 403 with the reason, before a token is checked or a body read, counted in
bastion_listener_refusals_total.

Which listener a request came in on is its socket's local address (ASGI `server`): the two
listeners never share one (Settings refuses it), and a wildcard listener (0.0.0.0:PORT) is told
by its port alone.

The management listener serves the boot endpoints too: the operators' side may fetch a
machine's iPXE script or Ignition to look at it, and nothing there is secret from them. What
the split keeps from the PXE LAN is the management surface, not the other way round.

Without a management listener there is no split: `--listen` serves everything, as before.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from bastion.settings import same_listener

#: Boot endpoints that are not on the boot routers: a liveness probe for either side.
EXTRA_BOOT_PATHS = ("/healthz",)


def boot_path_patterns(routes: Iterable[Any]) -> list[re.Pattern[str]]:
    """The path patterns of these (Starlette) routes and of EXTRA_BOOT_PATHS."""
    patterns = [route.path_regex for route in routes]
    patterns += [re.compile("^" + re.escape(path) + "$") for path in EXTRA_BOOT_PATHS]
    return patterns


def refusal(path: str) -> str:
    return (f"{path} is not a boot endpoint, and this is the boot listener (--listen): the "
            "management API, the dashboard, /metrics and the API docs are served on the "
            "management listener (--management-listen)")  # fmt: skip


class ListenerSplit:
    """The ASGI middleware (see the module docstring)."""

    def __init__(self, app: Any, management: tuple[str, int], boot_paths: list[re.Pattern[str]],
                 on_refusal: Any = None):  # fmt: skip
        self.app = app
        self.management = management
        self.boot_paths = boot_paths
        self.on_refusal = on_refusal

    def on_management_listener(self, scope: dict[str, Any]) -> bool:
        server = scope.get("server")
        if not server:  # no socket (a unix socket, an in-process call): not the boot listener
            return True
        return same_listener((str(server[0]), int(server[1] or 0)), self.management)

    def is_boot_path(self, path: str) -> bool:
        return any(p.match(path) for p in self.boot_paths)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or self.on_management_listener(scope) \
                or self.is_boot_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        if self.on_refusal is not None:
            self.on_refusal()
        await forbid(scope, receive, send, refusal(scope["path"]))


async def forbid(scope: dict[str, Any], receive: Any, send: Any, reason: str) -> None:
    """Refuse a request from ASGI middleware, before the application: 403 with `reason` as the
    JSON `detail`, the connection closed (a body, if any, is not read); a WebSocket (a console
    stream) closed before it is accepted, which the server answers with 403."""
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.close", "code": 1008, "reason": reason[:120]})
        return
    body = json.dumps({"detail": reason}).encode()
    await send({
        "type": "http.response.start",
        "status": 403,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body})
