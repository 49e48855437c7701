"""The browser's console page (/dashboard/machines/{name}/console): xterm.js from npm, served by
the controller itself, and a page that says how to install it when it is not there."""

from __future__ import annotations

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
    assert '<script src="/dashboard/vendor/xterm/xterm.js"></script>' in r.text
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
