"""/docs: Swagger UI from npm, served by the controller itself (never a CDN), with a page that says
how to install it when it is not there; FastAPI's CDN pages (/redoc, the OAuth2 redirect) are
not served. The page in a real Chromium: tests/controller/api/test_apidocs_browser.py."""

from __future__ import annotations

import re

import pytest

from bastion import paths
from bastion.api import apidocs

pytestmark = pytest.mark.filterwarnings("ignore:.*httpx.*")


@pytest.fixture
def client(client_for, site_dir):
    return client_for(site_dir)


def test_the_docs_page_loads_swagger_ui_from_the_controller_never_a_cdn(client):
    if apidocs.missing():
        pytest.skip(f"Swagger UI is not installed in {paths.web_dir()}: run tools/setup")
    r = client.get("/docs")
    assert r.status_code == 200
    csp = dict(d.strip().split(" ", 1) for d in r.headers["content-security-policy"].split(";"))
    # only the two scripts the page wrote run (the bundle, FastAPI's start-up): each carries
    # the response's nonce; no 'unsafe-inline' for scripts or styles
    nonce = re.fullmatch(r"'nonce-([A-Za-z0-9_-]{22,})'", csp["script-src"]).group(1)
    assert re.findall(r"<script\b[^>]*>", r.text) == [
        f'<script nonce="{nonce}" src="/docs/vendor/swagger-ui-bundle.js">', f'<script nonce="{nonce}">']
    assert csp["style-src"] == "'self'" and "unsafe-inline" not in r.headers["content-security-policy"]
    assert nonce not in client.get("/docs").headers["content-security-policy"]  # new each time
    assert 'href="/docs/vendor/swagger-ui.css"' in r.text and "url: '/openapi.json'" in r.text
    assert "http://" not in r.text and "https://" not in r.text  # nothing from elsewhere
    assert '"validatorUrl": null' in r.text  # no call to swagger.io's validator
    assert csp["connect-src"] == "'self'" and csp["frame-ancestors"] == "'none'"
    for name, (rel, media) in apidocs.FILES.items():
        r = client.get(f"/docs/vendor/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(media)
        assert r.content == (paths.web_dir() / "node_modules" / rel).read_bytes()
    for other in ("package.json", "..%2Fpackage.json", "index.html", "oauth2-redirect.html"):
        assert client.get(f"/docs/vendor/{other}").status_code == 404, other


def test_without_swagger_ui_installed_the_page_says_how_to_install_it(client, tmp_path, monkeypatch):
    monkeypatch.setenv("BASTION_WEB_DIR", str(tmp_path / "web"))
    r = client.get("/docs")
    assert r.status_code == 200
    assert f"Swagger UI is not installed in {tmp_path / 'web'}" in r.text
    assert "tools/setup (or: cd web &amp;&amp; npm ci --ignore-scripts)" in r.text
    assert '<a href="/openapi.json">' in r.text and "/docs/vendor/" not in r.text
    r = client.get("/docs/vendor/swagger-ui-bundle.js")
    assert r.status_code == 404 and "npm ci --ignore-scripts" in r.json()["detail"]


@pytest.mark.parametrize("path", ["/redoc", "/docs/oauth2-redirect"])
def test_fastapis_cdn_pages_are_not_served(client, path):
    assert client.get(path).status_code == 404


def test_the_schema_leaves_the_docs_pages_out(client):
    paths_ = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths_ if p.startswith("/docs")]


def test_the_schema_gives_the_tokens_refusals_for_every_operation_that_needs_it(client):
    schema = client.get("/openapi.json").json()
    needing = {(method.upper(), path): op for path, ops in schema["paths"].items()
               for method, op in ops.items() if op.get("security")}  # fmt: skip
    assert ("POST", "/api/v1/reload") in needing and ("GET", "/api/v1/auth") in needing
    for op in needing.values():
        assert {"401", "403", "429"} <= set(op["responses"]), op["operationId"]
        assert op["responses"]["401"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Refusal"}
    # what they say is what the controller answers (this one has a token, so: 401)
    r = client.get("/api/v1/auth")
    assert r.status_code == 401 and set(r.json()) == {"detail"}
    # reads that need no token do not claim the refusals
    assert "401" not in schema["paths"]["/api/v1/machines"]["get"]["responses"]
    assert "401" not in schema["paths"]["/ipxe"]["get"]["responses"]
