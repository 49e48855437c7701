"""A browser's request is answered only through a name the controller knows (DNS rebinding).

The management API answers reads without a token to whoever reaches the controller. A web
page cannot read another origin's answers, but it can make its own host name resolve to the
controller's address once it is loaded (DNS rebinding): its requests then go to the
controller as its own origin, and the operator's browser, inside the LAN, reads the machines,
the events and the site for it and hands them out. What gives such a request away is its Host
header: the page's name, which the controller was never called.

HostCheck, an ASGI middleware in front of everything else, refuses a browser's request (one
with Sec-Fetch-Site or Origin: every browser in use sends one of them and no page can leave
them out or forge them) whose Host is not one of the controller's names: an IP address,
`localhost`, this machine's host name, the host of site.yaml's `controller_url`, or a name
given with --allowed-hosts. 403, saying which option names it. Requests without those headers
(iPXE, Ignition, curl, `bastion`'s own commands, nodes) are not browsers' and pass: a page
cannot send one. A browser that sends neither header (Safari before 16.4 on a same-origin
GET) is not covered.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from bastion.api.listeners import forbid


# headers only a browser's request has (every browser in use sends one; no page can forge them)
BROWSER_HEADERS = (b"sec-fetch-site", b"origin")


def host_name(host: bytes) -> str:
    """The name in a Host header's value, lower case, without the port or a final dot; an IPv6
    address without its brackets."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0].rstrip(".") if ":" in text else text.rstrip(".")


def is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def refusal(name: str) -> str:
    return (f"Host {name!r} is not a name of this controller, and a browser's request through "
            "a name it does not know is refused (a web page could read the API that way: DNS "
            "rebinding). Open it by its address, or name it: --allowed-hosts "
            f"{name or 'NAME'} (BASTION_ALLOWED_HOSTS)")  # fmt: skip


class HostCheck:
    """The ASGI middleware (see the module docstring). `controller_url` gives site.yaml's
    controller_url now (the site may be reloaded with another)."""

    def __init__(self, app: Any, allowed: str | None, controller_url: Callable[[], str | None],
                 on_refusal: Callable[[], None] | None = None):  # fmt: skip
        self.app = app
        self.known = {"localhost", socket.gethostname().lower().rstrip(".")}
        self.known.update(x for x in (allowed or "").split(",") if x)
        self.controller_url = controller_url
        self.on_refusal = on_refusal

    def allows(self, name: str) -> bool:
        if name in self.known or is_address(name):
            return True
        url = self.controller_url()
        if url:
            try:
                return name == (urlsplit(url).hostname or "").rstrip(".")
            except ValueError:
                return False
        return False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = b""
        browser = False
        for key, value in scope["headers"]:
            if key == b"host":
                host = value
            elif key in BROWSER_HEADERS:
                browser = True
        name = host_name(host)
        if not browser or self.allows(name):
            await self.app(scope, receive, send)
            return
        if self.on_refusal is not None:
            self.on_refusal()
        await forbid(scope, receive, send, refusal(name))
