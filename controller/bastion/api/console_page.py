"""The browser's view of a node's serial console: /dashboard/machines/{name}/console.

An xterm.js terminal on the console WebSocket (bastion.api.consoles; docs/consoles.md). The
page itself shows nothing secret (the console needs the token, typed into the page and sent as
the socket's first message), so it is public like the dashboard. xterm.js comes from npm
(web/package.json, installed by tools/setup with `npm ci`) and is served from here, never from
a CDN; when it is not installed the page says how to install it.
"""

from __future__ import annotations

from pathlib import Path

import jinja2
from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, HTMLResponse

from bastion import __version__, paths
from bastion.api import vendor
from bastion.api.dashboard import new_nonce
from bastion.api.deps import SiteDep
from bastion.api.jsonbody import StrictJsonRoute

router = APIRouter(tags=["dashboard"], route_class=StrictJsonRoute)

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).resolve().parent.parent / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)

# name in the URL -> (file under web_dir()/node_modules, media type): only these are served
XTERM_FILES = {
    "xterm.js": ("@xterm/xterm/lib/xterm.js", "text/javascript"),
    "xterm.css": ("@xterm/xterm/css/xterm.css", "text/css"),
    "addon-fit.js": ("@xterm/addon-fit/lib/addon-fit.js", "text/javascript"),
}
INSTALL_HINT = vendor.INSTALL_HINT
# The page holds the token: its scripts are the three the template wrote (xterm.js and its fit
# addon from /dashboard/vendor, and the page's own), each with this response's nonce
# (bastion.api.dashboard.CSP says why not 'self'); it talks to this controller only (the
# WebSocket), nobody frames it. Styles stay 'unsafe-inline': xterm.js draws the terminal with
# <style> elements it writes while it runs (colours, cell size, scrollbar) and style=
# attributes for 24-bit colours, which no nonce or hash can name. Injected CSS could only
# restyle the page: default-src 'none' leaves it nothing to load, so nothing to send anywhere.
CSP = ("default-src 'none'; script-src 'nonce-{nonce}'; style-src 'self' 'unsafe-inline'; "
       "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")  # fmt: skip


def xterm_missing() -> list[str]:
    return vendor.missing(XTERM_FILES)


@router.get("/dashboard/machines/{name}/console", response_class=HTMLResponse,
            summary="A machine's serial console in the browser (HTML)")  # fmt: skip
async def console_page(name: str, site: SiteDep) -> HTMLResponse:
    if site.machine(name) is None:
        raise HTTPException(404, f"no machine {name!r} in the site")
    nonce = new_nonce()
    html = _env.get_template("console.html").render(
        version=__version__, site=site, machine=name, missing=xterm_missing(),
        hint=INSTALL_HINT, web_dir=str(paths.web_dir()), nonce=nonce,
    )
    return HTMLResponse(html, headers={"Content-Security-Policy": CSP.format(nonce=nonce),
                                       "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})  # fmt: skip


@router.get("/dashboard/vendor/xterm/{file}", include_in_schema=False)
async def xterm_file(file: str) -> FileResponse:
    return vendor.file_response(XTERM_FILES, file, "xterm.js")
