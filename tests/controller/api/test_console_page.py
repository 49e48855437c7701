"""The browser's console page (/dashboard/machines/{name}/console): xterm.js from npm, served by
the controller itself, and a page that says how to install it when it is not there."""

from __future__ import annotations

import re

import pytest

from bastion import paths
from bastion.api.console_page import XTERM_FILES, xterm_missing


@pytest.fixture
def client(client_for, site_dir):
    return client_for(site_dir)


def test_without_xterm_installed_the_page_says_how_to_install_it(client, tmp_path, monkeypatch):
    monkeypatch.setenv("BASTION_WEB_DIR", str(tmp_path / "web"))
    r = client.get("/dashboard/machines/node1/console")
    assert r.status_code == 200
    assert "xterm.js is not installed" in r.text and "tools/setup (or: cd web &amp;&amp; npm ci --ignore-scripts)" in r.text
    assert "/dashboard/vendor/xterm/xterm.js" not in r.text
    r = client.get("/dashboard/vendor/xterm/xterm.js")
    assert r.status_code == 404 and "npm ci" in r.json()["detail"]


def test_the_page_serves_xterm_from_the_controller_never_a_cdn(client):
    if xterm_missing():
        pytest.skip(f"xterm.js not installed in {paths.web_dir()}: run tools/setup")
    r = client.get("/dashboard/machines/node2/console")
    assert r.status_code == 200
    nonce = re.search(r"script-src 'nonce-([^']+)'", r.headers["content-security-policy"]).group(1)
    assert f'<script nonce="{nonce}" src="/dashboard/vendor/xterm/xterm.js"></script>' in r.text
    assert "/api/v1/machines/${encodeURIComponent(machine)}/console/stream" in r.text
    assert '"node2"' in r.text
    assert "http://" not in r.text and "https://" not in r.text  # nothing from elsewhere
    for name, (rel, media) in XTERM_FILES.items():
        r = client.get(f"/dashboard/vendor/xterm/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(media)
        assert r.content == (paths.web_dir() / "node_modules" / rel).read_bytes()
    assert client.get("/dashboard/vendor/xterm/package.json").status_code == 404
    assert client.get("/dashboard/vendor/xterm/..%2F..%2Fpackage.json").status_code == 404


def test_an_unknown_machine_has_no_console_page(client):
    r = client.get("/dashboard/machines/nobody/console")
    assert r.status_code == 404 and "no machine 'nobody'" in r.json()["detail"]


@pytest.mark.parametrize("installed", [True, False], ids=["xterm", "no-xterm"])
def test_the_page_runs_only_the_scripts_it_was_served_with(client, tmp_path, monkeypatch, installed):
    # script-src is a nonce, new for each response, carried by each <script> the template wrote
    # (xterm.js, its fit addon, the page's own): markup that slips into the page cannot run
    # script, nor load one from this controller. Styles stay 'unsafe-inline' (xterm.js writes
    # its own, bastion.api.console_page.CSP says why).
    if not installed:
        monkeypatch.setenv("BASTION_WEB_DIR", str(tmp_path / "web"))
    elif xterm_missing():
        pytest.skip(f"xterm.js not installed in {paths.web_dir()}: run tools/setup")
    nonces = []
    for _ in range(2):
        r = client.get("/dashboard/machines/node2/console")
        csp = dict(d.strip().split(" ", 1) for d in r.headers["content-security-policy"].split(";"))
        nonce = re.fullmatch(r"'nonce-([A-Za-z0-9_-]{22,})'", csp["script-src"]).group(1)
        assert csp["default-src"] == "'none'" and "'unsafe-inline'" in csp["style-src"]
        scripts = re.findall(r"<script\b[^>]*>", r.text)
        # without xterm.js the page says how to install it and has no script at all
        assert len(scripts) == (3 if installed else 0)
        assert all(f'nonce="{nonce}"' in s for s in scripts), scripts
        assert not re.search(r"<[a-z][^>]*\son[a-z]+=", r.text)
        nonces.append(nonce)
    assert nonces[0] != nonces[1]
