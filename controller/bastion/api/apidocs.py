"""The API's interactive documentation, /docs: Swagger UI, served by this controller itself.

FastAPI's own /docs and /redoc pages load their scripts and styles from public CDNs (and ReDoc
its fonts from Google): at a site without internet they are blank, and elsewhere every operator
who opens them runs a third party's code next to a page where the token is typed. Swagger UI
comes from npm instead (swagger-ui-dist in web/package.json, installed by tools/setup with
`npm ci`), as xterm.js does for the console page; when it is not installed, /docs says how to
install it and links the schema. ReDoc is not offered: its npm package needs some 100 MB of
dependencies for a second view of the same schema. No OAuth2 redirect page either: the API's
token is a bearer token, typed into Swagger UI's "Authorize" dialog.
"""

from __future__ import annotations

import html
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from bastion import __version__, paths
from bastion.api import vendor
from bastion.api.dashboard import new_nonce
from bastion.api.jsonbody import StrictJsonRoute
from bastion.api.vendor import INSTALL_HINT

router = APIRouter(route_class=StrictJsonRoute)

PACKAGE = "swagger-ui-dist"
# name in the URL -> (file under web_dir()/node_modules, media type): only these are served
FILES = {
    "swagger-ui-bundle.js": (f"{PACKAGE}/swagger-ui-bundle.js", "text/javascript"),
    "swagger-ui.css": (f"{PACKAGE}/swagger-ui.css", "text/css"),
    "favicon-32x32.png": (f"{PACKAGE}/favicon-32x32.png", "image/png"),
}
# Its scripts are the two the page wrote (the bundle and FastAPI's inline start-up), each with
# this response's nonce (bastion.api.dashboard.CSP says why not 'self'); it asks this
# controller only (the schema, "Try it out"), nobody frames it. Swagger UI draws its icons as
# data: images.
CSP = ("default-src 'none'; script-src 'nonce-{nonce}'; style-src 'self'; "
       "img-src 'self' data:; connect-src 'self'; form-action 'none'; base-uri 'none'; "
       "frame-ancestors 'none'")  # fmt: skip


def _headers(nonce: str) -> dict[str, str]:
    return {"Content-Security-Policy": CSP.format(nonce=nonce), "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store"}  # fmt: skip


def missing() -> list[str]:
    """The files of Swagger UI that are not installed."""
    return vendor.missing(FILES)


@router.get("/docs", include_in_schema=False)
async def swagger_ui() -> HTMLResponse:
    title = f"Edge Bastion controller {__version__}: API"
    if missing():
        text = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}"
                "</title></head><body><h1>The API's documentation</h1>"
                f"<p>Swagger UI is not installed in {html.escape(str(paths.web_dir()))}: run "
                f"<code>{html.escape(INSTALL_HINT)}</code>. The schema itself is at "
                '<a href="/openapi.json">/openapi.json</a>; docs/controller.md describes every '
                "endpoint.</p></body></html>")  # fmt: skip
        return HTMLResponse(text, headers=_headers(new_nonce()))
    page = get_swagger_ui_html(
        openapi_url="/openapi.json", title=title,
        swagger_js_url="/docs/vendor/swagger-ui-bundle.js",
        swagger_css_url="/docs/vendor/swagger-ui.css",
        swagger_favicon_url="/docs/vendor/favicon-32x32.png",
        # no calls to swagger.io's validator from the operator's browser
        swagger_ui_parameters={"validatorUrl": None},
    )  # fmt: skip
    # FastAPI writes both <script> tags without attributes to add: the nonce goes into each.
    nonce = new_nonce()
    body = bytes(page.body).decode().replace("<script", f'<script nonce="{nonce}"')
    return HTMLResponse(body, headers=_headers(nonce))


@router.get("/docs/vendor/{file}", include_in_schema=False)
async def swagger_file(file: str) -> FileResponse:
    return vendor.file_response(FILES, file, "Swagger UI")


# What every endpoint that needs the token can answer without it (bastion.api.deps.admin_refusal)
_REFUSALS = {
    "401": "No token, or the wrong one (`WWW-Authenticate: Bearer`)",
    "403": "The management API is disabled: the controller has no token configured",
    "429": "Too many wrong tokens from this address: any token is refused until `Retry-After` "
           "seconds have passed (bastion.api.deps.TokenFailures)",
}


def document_refusals(app: FastAPI) -> None:
    """Put the token's refusals into the schema of every operation that needs the token (those
    with a security requirement), with their body ({"detail": "..."}): a client made from
    /openapi.json, and Swagger UI, know them instead of calling them undocumented."""
    make = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = make()
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas["Refusal"] = {"title": "Refusal", "type": "object", "required": ["detail"],
                                  "properties": {"detail": {"type": "string", "title": "Detail"}}}  # fmt: skip
            body = {"application/json": {"schema": {"$ref": "#/components/schemas/Refusal"}}}
            for operations in schema.get("paths", {}).values():
                for op in operations.values():
                    if isinstance(op, dict) and op.get("security"):
                        for code, text in _REFUSALS.items():
                            op.setdefault("responses", {}).setdefault(code, {"description": text, "content": body})
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
